"""The model manager: which versions of the learned scheduling model are loaded, which one
decides, and how a new one takes over.

- **Names.** ``rl`` is routed to ``stable`` (or, for a ``canary`` share of requests, to the
  canary); ``rl:N`` pins version N (loaded on demand); ``rl:stable`` / ``rl:canary`` name
  an alias. Every response names the version that decided (``scheduler@N``).
- **Hot reload.** A watcher polls the registry; a new version is fetched, verified and
  loaded, and when auto-promotion is on (the default) ``stable`` moves to it. The swap is one
  reference assignment on the event loop: a request already in flight finishes on the
  version it started with, so a swap fails no request.
- **Refusal.** A corrupt (checksum) or schema-mismatched artefact is refused with a clear
  reason (``ListModels.refused``); ``stable`` stays where it was. The watcher tries a refused
  version again, less and less often, while it stays in the registry.
- **Unload.** A version taken out of service still answers the requests it was given.
- **Rollback / pin.** Setting ``stable`` by hand stops auto-promotion (until re-enabled), so a
  rollback sticks while newer versions keep appearing.
- **Shadow.** A ``shadow`` version scores the same requests after the response is sent (no
  effect on it); agreement and the would-be choices are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nats.aio.client import Client as NatsClient

from ganglion.bus import ENV_NATS_URL, connect
from ganglion.domain import ClusterState, Decision, Job
from ganglion.models import (
    MAX_VERSION,
    LocalRegistry,
    ModelError,
    ModelNotFoundError,
    ModelRef,
    Registry,
    default_registry,
    parse_version,
)
from ganglion.models.nats_registry import NatsRegistry
from ganglion.policies.rl import MODEL, POLICY

if TYPE_CHECKING:  # torch is imported only when a model is first loaded
    from ganglion.models import Artifact
    from ganglion.rl.model import ScoringModel
    from ganglion.rl.serving import InferenceBatcher

log = logging.getLogger(__name__)

ALIASES = ("stable", "canary", "shadow")
MAX_SHADOW_IN_FLIGHT = 16
"""Shadow scoring is best effort: past this many pending comparisons new ones are skipped."""
SHADOW_LOG = 50
RETRY_MAX_S = 60.0
"""The longest wait between tries of a refused version (the wait doubles from the poll
interval up to this)."""
RETRY_TRIES = 8
"""Tries of a refused version in all (about 4 minutes at the default poll interval);
``LoadModel`` still tries it by hand."""


class ModelStateError(ModelError):
    """An admin request that conflicts with the current state (gRPC FAILED_PRECONDITION)."""


@dataclass
class VersionStats:
    """Per-version counters."""

    requests: int = 0
    errors: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    shadow_requests: int = 0
    shadow_agreed: int = 0


@dataclass
class Loaded:
    """A loaded version: the model, its batcher, and its counters."""

    ref: ModelRef
    model: ScoringModel
    batcher: InferenceBatcher
    loaded_at: float
    stats: VersionStats = field(default_factory=VersionStats)


@dataclass(frozen=True)
class ShadowEntry:
    """One shadow comparison."""

    time_s: float
    stable: int
    shadow: int
    agreed: bool
    stable_placed: tuple[str, ...]
    shadow_placed: tuple[str, ...]


class ModelManager:
    """See the module docstring. All methods run on the service's event loop."""

    def __init__(
        self,
        registry: Registry,
        name: str = MODEL,
        poll_s: float = 2.0,
        threads: int = 1,
        max_batch: int = 64,
        batching: bool = True,
        seed: int | None = None,
    ) -> None:
        self.registry = registry
        self.name = name
        self.poll_s = poll_s
        self.threads = threads
        self.max_batch = max_batch
        self.batching = batching
        self.loaded: dict[int, Loaded] = {}
        self.stable: int | None = None
        self.canary: int | None = None
        self.canary_share = 0.0
        self.shadow: int | None = None
        self.auto_promote = True
        self.refused: dict[int, str] = {}
        self.available: list[int] = []
        self.shadow_log: deque[ShadowEntry] = deque(maxlen=SHADOW_LOG)
        self._rng = random.Random(seed)
        self._seen = 0  # highest version the watcher has looked at
        self._retry_at: dict[int, tuple[float, float, int]] = {}  # (next try, delay, tries)
        self._load_lock = asyncio.Lock()
        self._started: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._shadow_tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def handles(self, policy: str) -> bool:
        return policy == POLICY or policy.startswith(POLICY + ":")

    async def start(self, watch: bool = True) -> None:
        """Load the newest valid version and (optionally) start watching for new ones.
        Idempotent; concurrent callers wait for the same start."""
        if self._started is None:
            self._started = asyncio.create_task(self._start(watch))
        started = self._started
        try:
            await asyncio.shield(started)
        except Exception:
            # A failed start (an unreadable registry) is tried again by the next caller
            # instead of failing every request for the life of the process.
            if self._started is started:
                self._started = None
            raise

    async def _start(self, watch: bool) -> None:
        from ganglion.rl.model import set_threads

        set_threads(self.threads)
        await self.poll()
        if watch and self.poll_s > 0:
            self._watcher = asyncio.create_task(self._watch())

    async def close(self) -> None:
        tasks = [t for t in (self._watcher, self._started) if t is not None]
        tasks += list(self._shadow_tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for loaded in self.loaded.values():
            await loaded.batcher.close()

    async def _watch(self) -> None:
        while True:  # until cancelled by close()
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except Exception:  # a registry hiccup must not kill hot reload
                log.exception(
                    "model registry poll failed", extra={"registry": self.registry.description}
                )

    async def poll(self) -> None:
        """Look for versions newer than any seen; load them, newest last (the first start
        loads only the newest one that verifies, walking down past refused ones). A refused
        version still in the registry is tried again, less and less often (it may have been
        read while still being copied in), and promoted if it is then newer than stable."""
        refs = await self.registry.versions(self.name)
        self.available = [r.version for r in refs]
        now = time.monotonic()
        self._retry_at = {v: due for v, due in self._retry_at.items() if v in self.available}
        new = [v for v in self.available if v > self._seen]
        due = [v for v in self.available if v <= self._seen and self._retry_due(v, now)]
        if not new and not due:
            return
        first_start = self._seen == 0
        self._seen = max([self._seen, *new])
        candidates = sorted(new, reverse=True) if first_start else sorted({*new, *due})
        for version in candidates:
            try:
                await self.load(version)
            except ModelError as exc:
                _, last, tries = self._retry_at.get(version, (0.0, self.poll_s / 2, 0))
                delay = min(2 * last, RETRY_MAX_S)
                self._retry_at[version] = (now + delay, delay, tries + 1)
                log.warning(
                    "model version refused",
                    extra={
                        "version": version,
                        "reason": str(exc),
                        "retry_in_s": delay if tries + 1 < RETRY_TRIES else None,
                    },
                )
                continue
            self._retry_at.pop(version, None)
            if self.stable is None or (self.auto_promote and version > self.stable):
                self._promote(version)
            if first_start:
                break

    def _retry_due(self, version: int, now: float) -> bool:
        """A refused version is tried again, RETRY_TRIES times in all, while promotion is on
        and it could still become stable (each try reads the whole artefact)."""
        retry = self._retry_at.get(version)
        if retry is None or retry[0] > now or retry[2] >= RETRY_TRIES:
            return False
        return self.auto_promote and version > (self.stable or 0) and version not in self.loaded

    def _promote(self, version: int) -> None:
        if self.stable != version:
            log.info("stable model version", extra={"from": self.stable, "to": version})
        self.stable = version

    # -- admin -------------------------------------------------------------------------------

    async def load(self, version: int = 0) -> Loaded:
        """Fetch, verify and load ``version`` (0: newest in the registry). Raises ModelError
        (the reason is also kept in ``refused``)."""
        async with self._load_lock:
            if version == 0:
                refs = await self.registry.versions(self.name)
                if not refs:
                    raise ModelNotFoundError(f"no {self.name} model in {self.registry.description}")
                version = refs[-1].version
            if version in self.loaded:
                return self.loaded[version]
            ref = ModelRef(self.name, version)
            try:
                artifact = await self.registry.fetch(ref)
                loaded = await asyncio.to_thread(self._build, ref, artifact)
            except ModelNotFoundError:
                raise
            except ModelError as exc:
                self.refused[version] = str(exc)
                raise
            self.refused.pop(version, None)
            self.loaded[version] = loaded
            log.info("model loaded", extra={"model": str(ref), "sha256": artifact.manifest.digest})
            return loaded

    def _build(self, ref: ModelRef, artifact: Artifact) -> Loaded:
        from ganglion.rl.model import ScoringModel
        from ganglion.rl.serving import InferenceBatcher

        try:
            model = ScoringModel(artifact)
        except ValueError as exc:  # $GANGLION_TORCH_DEVICE names a device this host lacks
            raise ModelError(f"{ref}: {exc}") from None
        if model.manifest.name != ref.name or model.manifest.version != ref.version:
            raise ModelError(f"{ref}: artefact says {model.ref}")
        return Loaded(
            ref, model, InferenceBatcher(model, self.max_batch, self.batching), time.time()
        )

    def set_alias(
        self, alias: str, version: int, share: float = 0.0, auto_promote: bool = False
    ) -> None:
        if alias not in ALIASES:
            raise ValueError(f"alias must be one of {', '.join(ALIASES)}, got {alias!r}")
        if version and version not in self.loaded:
            raise ModelStateError(f"{self.name}@{version} is not loaded (LoadModel it first)")
        if alias == "stable":
            if not version:
                raise ValueError("stable needs a version")
            self._promote(version)
            self.auto_promote = auto_promote
        elif alias == "canary":
            if version and not 0 < share <= 1:
                raise ValueError(f"canary share must be in (0, 1], got {share}")
            self.canary, self.canary_share = (version or None), (share if version else 0.0)
        else:
            self.shadow = version or None

    async def unload(self, version: int) -> None:
        if version not in self.loaded:
            raise ModelNotFoundError(f"{self.name}@{version} is not loaded")
        if version == self.stable:
            raise ModelStateError(f"{self.name}@{version} is stable; point stable elsewhere first")
        loaded = self.loaded.pop(version)
        if self.canary == version:
            self.canary, self.canary_share = None, 0.0
        if self.shadow == version:
            self.shadow = None
        await loaded.batcher.close()

    def aliases_of(self, version: int) -> list[str]:
        out = []
        if self.stable == version:
            out.append("stable")
        if self.canary == version:
            out.append("canary")
        if self.shadow == version:
            out.append("shadow")
        return out

    # -- deciding ----------------------------------------------------------------------------

    async def route(self, policy: str) -> Loaded:
        """The version that decides a request naming ``policy``."""
        await self.start()
        suffix = policy[len(POLICY) + 1 :] if policy != POLICY else None
        pinned = parse_version(suffix) if suffix else None
        version: int | None
        if suffix is None and self.canary is not None and self._rng.random() < self.canary_share:
            version = self.canary
        elif suffix in (None, "stable"):
            version = self.stable
        elif suffix == "canary":
            version = self.canary
        elif pinned is not None:
            version = pinned
            if version not in self.loaded:
                await self.load(version)
        else:
            raise ValueError(
                f"policy {policy!r}: use rl, rl:stable, rl:canary or rl:VERSION "
                f"(VERSION from 1 to {MAX_VERSION})"
            )
        if version is None or version not in self.loaded:
            raise ModelNotFoundError(f"no {self.name} version for {policy!r}")
        return self.loaded[version]

    async def decide(self, policy: str, state: ClusterState, pending: Sequence[Job]) -> Decision:
        from ganglion.policies.rl import decide_with
        from ganglion.rl.decide import ActionForm
        from ganglion.rl.features import observe, pad

        chosen = await self.route(policy)
        started = time.perf_counter()
        try:
            model = chosen.model
            obs = observe(state, pending, model.k)
            if model.form is ActionForm.RANK:
                x, mask = pad(obs, model.k)
                scores = await chosen.batcher.score(x, mask)
                decision = decide_with(model, state, pending, policy, scores, obs)
            else:
                decision = await asyncio.to_thread(decide_with, model, state, pending, policy)
        except Exception:
            chosen.stats.errors += 1
            raise
        finally:
            elapsed = time.perf_counter() - started
            chosen.stats.requests += 1
            chosen.stats.total_s += elapsed
            chosen.stats.max_s = max(chosen.stats.max_s, elapsed)
        shadow = self.loaded.get(self.shadow) if self.shadow is not None else None
        if (
            shadow is not None
            and shadow is not chosen
            and len(self._shadow_tasks) < MAX_SHADOW_IN_FLIGHT
        ):
            task = asyncio.create_task(self._compare(shadow, chosen, state, pending, decision))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)
        return decision

    async def _compare(
        self,
        shadow: Loaded,
        chosen: Loaded,
        state: ClusterState,
        pending: Sequence[Job],
        real: Decision,
    ) -> None:
        from ganglion.policies.rl import decide_with
        from ganglion.rl.decide import ActionForm
        from ganglion.rl.features import observe, pad

        try:
            model = shadow.model
            if model.form is ActionForm.RANK:
                obs = observe(state, pending, model.k)
                x, mask = pad(obs, model.k)
                scores = await shadow.batcher.score(x, mask)
                would = decide_with(model, state, pending, POLICY, scores, obs)
            else:  # a forward pass per pick: off the event loop, as in decide()
                would = await asyncio.to_thread(decide_with, model, state, pending, POLICY)
        except Exception:
            log.exception("shadow scoring failed", extra={"model": str(shadow.ref)})
            return
        placed_real = tuple(p.job_id for p in real.placements)
        placed_shadow = tuple(p.job_id for p in would.placements)
        agreed = set(placed_real) == set(placed_shadow) and set(real.preemptions) == set(
            would.preemptions
        )
        shadow.stats.shadow_requests += 1
        shadow.stats.shadow_agreed += int(agreed)
        self.shadow_log.append(
            ShadowEntry(
                time.time(),
                chosen.ref.version,
                shadow.ref.version,
                agreed,
                placed_real[:8],
                placed_shadow[:8],
            )
        )

    def known_names(self) -> set[str]:
        names = {POLICY, f"{POLICY}:stable", f"{POLICY}:canary"}
        names.update(f"{POLICY}:{v}" for v in (*self.loaded, *self.available))
        return names

    def manifest_json(self, version: int) -> tuple[str, str]:
        m = self.loaded[version].model.manifest
        return json.dumps(dict(m.training), default=str), json.dumps(
            dict(m.evaluation), default=str
        )


class ModelsHandle:
    """The manager plus what it holds open (a NATS connection for the object store)."""

    def __init__(self, manager: ModelManager, nc: NatsClient | None = None) -> None:
        self.manager = manager
        self.nc = nc

    async def close(self) -> None:
        await self.manager.close()
        if self.nc is not None:
            await self.nc.close()


async def open_models(
    models_dir: str = "",
    nats_bucket: str = "",
    poll_s: float = 2.0,
    threads: int = 1,
    default_policy: str = "",
) -> ModelsHandle:
    """The model manager for a server's flags. With a directory or a bucket the newest
    version is loaded now and the registry watched; without, the default registry
    (``$GANGLION_MODELS_DIR`` over the shipped model) is used, loaded now if the server's
    default policy is a learned one (a controller's first deadline must not pay for torch's
    import), else on the first ``rl`` request."""
    if nats_bucket:
        url = os.environ.get(ENV_NATS_URL)
        if not url:
            raise ModelError(f"--models-nats-bucket needs {ENV_NATS_URL}")
        nc = await connect(url, "ganglion-decision-models")
        handle = ModelsHandle(
            ModelManager(NatsRegistry(nc.jetstream(), nats_bucket), poll_s=poll_s, threads=threads),
            nc,
        )
    elif models_dir:
        registry = LocalRegistry(Path(models_dir))
        handle = ModelsHandle(ModelManager(registry, poll_s=poll_s, threads=threads))
    else:
        handle = ModelsHandle(ModelManager(default_registry(), poll_s=poll_s, threads=threads))
        if not handle.manager.handles(default_policy):
            return handle
    await handle.manager.start()
    manager = handle.manager
    if manager.handles(default_policy) and manager.stable is None:
        # Hot reload may still bring one (a registry filled after the service starts), so
        # this is not fatal; but until then every request for the default policy fails.
        log.warning(
            "no model version for the default policy: its requests fail with NOT_FOUND until "
            "one is published to the registry",
            extra={
                "policy": default_policy,
                "registry": manager.registry.description,
                "refused": {v: reason for v, reason in manager.refused.items()},
            },
        )
    return handle
