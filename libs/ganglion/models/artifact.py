"""Model artefacts: a manifest plus files, named ``<name>`` with an integer version.

On disk (and, object by object, in the NATS object store) an artefact is::

    <name>/<version>/manifest.json
    <name>/<version>/<file>            # e.g. weights.pt, listed in the manifest with a sha256

The manifest records what is needed to serve the model safely and to trust it: its kind
(``scheduling``, ``cache-sizing``, ``transport-tuning``), the observation schema version and
feature names it was trained on, the feature normalisation, the action form, and the
provenance (algorithm, training arguments, trace, seed) and its evaluation against the
baselines. :func:`verify` refuses an artefact whose files do not match their sha256 or whose
schema does not match this build; the serving side then keeps its active version.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

MANIFEST = "manifest.json"
FORMAT = 1
"""Version of the manifest layout itself."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ModelError(Exception):
    """Base of model registry and artefact errors."""


class ModelNotFoundError(ModelError, LookupError):
    """No such model, version or alias."""


class CorruptArtifactError(ModelError):
    """The manifest is unreadable, a file is missing, or a checksum does not match."""


class SchemaMismatchError(ModelError):
    """The artefact was trained on another observation schema (or is of another kind)."""


class ModelKind(enum.Enum):
    SCHEDULING = "scheduling"
    """A learned scheduling policy (``rl``), served by ``Schedule``."""
    CACHE_SIZING = "cache-sizing"
    """A cache-sizing policy, served by ``SizeCaches``."""
    TRANSPORT_TUNING = "transport-tuning"
    """A transport-tuning policy, served by ``TuneTransport``."""


MAX_VERSION = 2**32 - 1
"""Versions are 1..MAX_VERSION: the admin RPCs and ``ListModels`` carry them as uint32."""
_VERSION = re.compile(r"[1-9][0-9]{0,9}")


def parse_version(text: str) -> int | None:
    """The version a folder or object key names (ASCII digits, no leading zero, 1 to
    :data:`MAX_VERSION`), else None. ``str.isdigit`` is not enough: it accepts ``²`` and
    other Unicode digits that ``int()`` then refuses or reads as another number."""
    if not _VERSION.fullmatch(text):
        return None
    version = int(text)
    return version if version <= MAX_VERSION else None


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ModelError(f"model name {name!r}: use 1-64 of a-z, 0-9, '-', '_'")
    return name


@dataclass(frozen=True)
class Manifest:
    """What an artefact says about itself (``manifest.json``)."""

    name: str
    """Model name, e.g. ``scheduler``."""
    version: int
    """Positive integer; a registry never reuses one."""
    kind: ModelKind
    """Which decision it serves."""
    schema_version: int
    """Observation schema the model was trained on (refused when it differs)."""
    files: Mapping[str, str]
    """File name -> sha256 (hex) of its bytes."""
    features: tuple[str, ...] = ()
    """Feature names in input order (checked against the schema too)."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Kind-specific serving parameters (scheduling: action form, k, quantum, network)."""
    normalisation: Mapping[str, list[float]] = field(default_factory=dict)
    """Feature ``mean`` and ``std`` used to normalise inputs."""
    training: Mapping[str, Any] = field(default_factory=dict)
    """Provenance: algorithm, arguments, trace, windows, seed, steps, wall time."""
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    """Held-out results against the baselines."""
    created: str = ""
    """ISO time of creation (UTC)."""

    def __post_init__(self) -> None:
        check_name(self.name)
        if not 1 <= self.version <= MAX_VERSION:
            raise ModelError(
                f"version must be an integer from 1 to {MAX_VERSION}, got {self.version}"
            )
        for f in self.files:
            if not _FILE.match(f) or f == MANIFEST:
                raise ModelError(f"bad artefact file name {f!r}")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def digest(self) -> str:
        """One sha256 over the files' digests (what ``ListModels`` shows)."""
        joined = "".join(f"{k}:{v};" for k, v in sorted(self.files.items()))
        return hashlib.sha256(joined.encode()).hexdigest()

    def to_json(self) -> str:
        body = {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "kind": self.kind.value,
            "schema_version": self.schema_version,
            "features": list(self.features),
            "files": dict(self.files),
            "params": dict(self.params),
            "normalisation": dict(self.normalisation),
            "training": dict(self.training),
            "evaluation": dict(self.evaluation),
            "created": self.created or datetime.now(UTC).isoformat(timespec="seconds"),
        }
        return json.dumps(body, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> Manifest:
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT:
                raise CorruptArtifactError(f"{where}: manifest format {body.get('format')!r}")
            return cls(
                name=str(body["name"]),
                version=int(body["version"]),
                kind=ModelKind(body["kind"]),
                schema_version=int(body["schema_version"]),
                files={str(k): str(v) for k, v in body["files"].items()},
                features=tuple(body.get("features", ())),
                params=dict(body.get("params", {})),
                normalisation=dict(body.get("normalisation", {})),
                training=dict(body.get("training", {})),
                evaluation=dict(body.get("evaluation", {})),
                created=str(body.get("created", "")),
            )
        except CorruptArtifactError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, ModelError) as exc:
            raise CorruptArtifactError(f"{where}: unreadable manifest ({exc})") from None


@dataclass(frozen=True, eq=False)
class Artifact:
    """A manifest and its files' bytes, verified or not."""

    manifest: Manifest
    files: Mapping[str, bytes]
    """File name -> contents (the manifest itself is not among them)."""

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(
    name: str,
    version: int,
    kind: ModelKind,
    schema_version: int,
    files: Mapping[str, bytes],
    **fields: Any,
) -> Artifact:
    """An artefact whose manifest lists ``files`` with their checksums."""
    manifest = Manifest(
        name=name,
        version=version,
        kind=kind,
        schema_version=schema_version,
        files={f: sha256(b) for f, b in files.items()},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        **fields,
    )
    return Artifact(manifest, dict(files))


def verify(
    artifact: Artifact, expected_schema: Mapping[ModelKind, tuple[int, tuple[str, ...]]]
) -> None:
    """Raise :class:`CorruptArtifactError` or :class:`SchemaMismatchError`; else return.

    ``expected_schema`` maps a kind to the (schema version, feature names) this build
    serves; a kind not in it is only checksum-verified.
    """
    m = artifact.manifest
    for fname, digest in m.files.items():
        data = artifact.files.get(fname)
        if data is None:
            raise CorruptArtifactError(f"{m.ref}: file {fname} is missing")
        if sha256(data) != digest:
            raise CorruptArtifactError(f"{m.ref}: {fname} does not match its sha256")
    extra = set(artifact.files) - set(m.files)
    if extra:
        raise CorruptArtifactError(f"{m.ref}: unlisted files {sorted(extra)}")
    if m.kind in expected_schema:
        version, features = expected_schema[m.kind]
        if m.schema_version != version:
            raise SchemaMismatchError(
                f"{m.ref}: observation schema v{m.schema_version}, this build serves v{version}"
            )
        if features and m.features != features:
            raise SchemaMismatchError(f"{m.ref}: feature names differ from schema v{version}")
