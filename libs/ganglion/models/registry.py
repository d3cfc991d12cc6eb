"""Where artefacts live: a local directory (the default) or a NATS JetStream object store.

Both hold the same layout (``<name>/<version>/manifest.json`` and the files it lists) and
answer the same four questions: which versions exist, fetch one (unverified: the caller
verifies), publish one, and the next free version number. A publisher writes the files
first and the manifest last (the directory backend renames a finished temporary folder into
place), so a reader polling for new versions never sees half an artefact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from ganglion.models.artifact import (
    MANIFEST,
    Artifact,
    CorruptArtifactError,
    Manifest,
    ModelError,
    ModelNotFoundError,
    check_name,
    parse_version,
)

MODELS_DIR_ENV = "GANGLION_MODELS_DIR"
"""A local registry directory searched before the shipped default model."""
SHIPPED = Path(__file__).resolve().parents[1] / "rl" / "default_model"
"""The small default model that ships inside the package (a local registry root)."""


@dataclass(frozen=True, order=True)
class ModelRef:
    """A version of a model."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


class Registry(Protocol):
    """What the model manager and the CLI need from a backend."""

    description: str

    async def versions(self, name: str | None = None) -> list[ModelRef]: ...

    async def fetch(self, ref: ModelRef) -> Artifact: ...

    async def publish(self, artifact: Artifact) -> ModelRef: ...


class LocalRegistry:
    """A directory of ``<name>/<version>/`` folders. Sync methods for in-process use (the
    simulator), async ones for the service (small files: read inline)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.description = f"dir:{self.root}"

    def versions_sync(self, name: str | None = None) -> list[ModelRef]:
        """Every complete version (ModelError when the directory cannot be read)."""
        refs: list[ModelRef] = []
        try:
            if not self.root.is_dir():
                return refs
            for model in self.root.iterdir():
                if not model.is_dir() or (name is not None and model.name != name):
                    continue
                for v in model.iterdir():
                    version = parse_version(v.name)
                    if version is not None and (v / MANIFEST).is_file():
                        refs.append(ModelRef(model.name, version))
        except OSError as exc:
            raise ModelError(f"cannot list {self.description}: {exc.strerror or exc}") from exc
        return sorted(refs)

    def fetch_sync(self, ref: ModelRef) -> Artifact:
        folder = self.root / ref.name / str(ref.version)
        try:
            text = (folder / MANIFEST).read_bytes()
        except OSError:
            raise ModelNotFoundError(f"{ref} not found in {self.description}") from None
        manifest = Manifest.from_json(text, str(ref))
        if (manifest.name, manifest.version) != (ref.name, ref.version):
            raise CorruptArtifactError(f"{ref}: manifest says {manifest.ref}")
        files: dict[str, bytes] = {}
        for fname in manifest.files:
            try:
                files[fname] = (folder / fname).read_bytes()
            except OSError as exc:
                raise CorruptArtifactError(f"{ref}: cannot read {fname} ({exc.strerror})") from None
        return Artifact(manifest, files)

    def publish_sync(self, artifact: Artifact) -> ModelRef:
        m = artifact.manifest
        final = self.root / m.name / str(m.version)
        if final.exists():
            raise ModelError(f"{m.ref} already exists in {self.description}")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{m.version}-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a registry is read by other users
        try:
            for fname, data in artifact.files.items():
                (tmp / fname).write_bytes(data)
            (tmp / MANIFEST).write_text(m.to_json())
            os.rename(tmp, final)  # atomic: readers see all of it or none
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return ModelRef(m.name, m.version)

    def next_version(self, name: str) -> int:
        return max((r.version for r in self.versions_sync(check_name(name))), default=0) + 1

    async def versions(self, name: str | None = None) -> list[ModelRef]:
        return self.versions_sync(name)

    async def fetch(self, ref: ModelRef) -> Artifact:
        return self.fetch_sync(ref)

    async def publish(self, artifact: Artifact) -> ModelRef:
        return self.publish_sync(artifact)


class LayeredRegistry:
    """Read-only union of local registries; the first that has a version serves it."""

    def __init__(self, layers: list[LocalRegistry]) -> None:
        self.layers = layers
        self.description = " + ".join(r.description for r in layers)

    def versions_sync(self, name: str | None = None) -> list[ModelRef]:
        return sorted({r for layer in self.layers for r in layer.versions_sync(name)})

    def fetch_sync(self, ref: ModelRef) -> Artifact:
        for layer in self.layers:
            if ref in layer.versions_sync(ref.name):
                return layer.fetch_sync(ref)
        raise ModelNotFoundError(f"{ref} not found in {self.description}")

    async def versions(self, name: str | None = None) -> list[ModelRef]:
        return self.versions_sync(name)

    async def fetch(self, ref: ModelRef) -> Artifact:
        return self.fetch_sync(ref)

    async def publish(self, artifact: Artifact) -> ModelRef:
        raise ModelError(f"{self.description} is read-only")


def default_registry() -> LayeredRegistry:
    """``$GANGLION_MODELS_DIR`` (when set) over the shipped default model."""
    layers = []
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        layers.append(LocalRegistry(Path(env)))
    layers.append(LocalRegistry(SHIPPED))
    return LayeredRegistry(layers)


async def publish_next(registry: Registry, artifact: Artifact) -> ModelRef:
    """Publish under the next free version of its name (the manifest's version is replaced)."""
    m = artifact.manifest
    versions = await registry.versions(check_name(m.name))
    version = max((r.version for r in versions), default=0) + 1
    return await registry.publish(Artifact(replace(m, version=version), artifact.files))
