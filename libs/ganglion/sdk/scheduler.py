"""``Scheduler``: the SDK's one entry point, embedded on one host or against a cluster.

One Scheduler is one job. ``allocate(gpus=N)`` (re)places the job: the job's previous lease is
given back in the same step that queues the new request, so the loop a user writes first,

    scheduler = Scheduler(gpus=[0, 1, 2, 3])
    for epoch in range(10):
        gpus = scheduler.allocate(gpus=2)
        ...
        scheduler.update({"throughput": 812.0, "loss": 0.41})

never piles up leases, lets the policy move the job between epochs, and can never deadlock by
waiting while holding. Two allocations at once are two Schedulers.
"""

from __future__ import annotations

import asyncio
import atexit
import enum
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ganglion.policies import DEFAULT_POLICY, UnknownPolicyError, create
from ganglion.sdk.cluster import ENV_CONTROLLER, ClusterBackend, ClusterConfig
from ganglion.sdk.embedded import EmbeddedBackend, Identity, Pool
from ganglion.sdk.errors import SchedulerClosedError
from ganglion.sdk.lease import Grant, Lease
from ganglion.sdk.metrics import BOOK, FileSink, JobMetricsRecord, validate_metrics
from ganglion.sdk.natslink import LinkStats, NatsLink
from ganglion.sdk.portal import Portal
from ganglion.sdk.statefile import StateStore, default_state_dir

log = logging.getLogger(__name__)

ENV_NATS_URL = "GANGLION_NATS_URL"
ENV_JOB_ID = "GANGLION_JOB_ID"
MAX_JOB_ID_LEN = 100


class Mode(enum.Enum):
    EMBEDDED = "embedded"
    CLUSTER = "cluster"


@dataclass(frozen=True)
class SchedulerConfig:
    """A Scheduler's settings after arguments and environment were resolved."""

    mode: Mode
    """Embedded unless a controller address was given (argument or ``GANGLION_CONTROLLER``)."""
    gpus: tuple[int, ...] | None
    """GPU ids this job may use (embedded mode); None = all NVML GPUs. Unused in cluster mode."""
    address: str
    """Controller ``JobService`` address (cluster mode)."""
    policy: str
    """Policy from the registry (embedded mode); the controller's own policy decides in
    cluster mode. Default: the registry default, the decision service's default too."""
    job_id: str
    """This job's id: ``GANGLION_JOB_ID`` under an executor, else generated."""
    tenant: str
    """Who pays (fairness-aware policies group by it): ``$USER`` by default."""
    priority: int
    """Higher first, where the policy honours priority."""
    host: str
    """This host's name (``GANGLION_HOST`` or the hostname)."""
    backend: str
    """GPU discovery for embedded mode: ``auto`` (NVML, else simulated), ``nvml`` or ``sim``."""
    state_dir: Path
    """Embedded state file and lock, and ``metrics.jsonl`` when there is no NATS."""
    nats_url: str
    """NATS for job metrics and lease keepalives; empty: metrics go to the file."""
    lease_ttl_s: float
    """Cluster mode: a lease whose client stopped sending keepalives ends after this long."""
    holder_python: str
    """Cluster mode: the Python that runs the lease holder on the executor host."""


def _check_job_id(job_id: str) -> str:
    if not job_id or len(job_id) > MAX_JOB_ID_LEN:
        raise ValueError(f"job_id must be 1-{MAX_JOB_ID_LEN} characters, got {job_id!r}")
    if not job_id.isprintable() or any(c.isspace() or c in ".*>" for c in job_id):
        raise ValueError(f"job_id {job_id!r}: no spaces, '.', '*' or '>' (it is a NATS token)")
    return job_id


def resolve_config(
    *,
    gpus: Sequence[int] | None,
    address: str | None,
    policy: str | None,
    job_id: str | None,
    tenant: str | None,
    priority: int,
    backend: str,
    state_dir: str | Path | None,
    nats_url: str | None,
    lease_ttl_s: float,
) -> SchedulerConfig:
    """Arguments first, then the environment, then defaults."""
    address = os.environ.get(ENV_CONTROLLER, "") if address is None else address
    if job_id is None:
        # Under an executor the job's own id, so its metrics join its placement; characters a
        # NATS token cannot hold become "_".
        env_job = re.sub(r"[\s.*>]", "_", os.environ.get(ENV_JOB_ID, ""))[:MAX_JOB_ID_LEN]
        job_id = env_job or f"sdk-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    if not math.isfinite(lease_ttl_s) or lease_ttl_s < 0:
        raise ValueError(f"lease_ttl_s must be >= 0, got {lease_ttl_s}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if backend not in ("auto", "nvml", "sim"):
        raise ValueError(f"backend must be auto, nvml or sim, got {backend!r}")
    return SchedulerConfig(
        mode=Mode.CLUSTER if address else Mode.EMBEDDED,
        gpus=tuple(gpus) if gpus is not None else None,
        address=address,
        policy=policy or DEFAULT_POLICY,
        job_id=_check_job_id(job_id),
        tenant=tenant or os.environ.get("USER", "") or "default",
        priority=priority,
        host=os.environ.get("GANGLION_HOST", "") or socket.gethostname(),
        backend=backend,
        state_dir=Path(state_dir) if state_dir is not None else default_state_dir(),
        nats_url=os.environ.get(ENV_NATS_URL, "") if nats_url is None else nats_url,
        lease_ttl_s=lease_ttl_s,
        holder_python=sys.executable,
    )


def _check_request(gpus: int, timeout: float | None) -> None:
    if isinstance(gpus, bool) or not isinstance(gpus, int):
        raise TypeError(f"gpus must be an int, got {type(gpus).__name__}")
    if gpus <= 0:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    if timeout is not None and (
        isinstance(timeout, bool) or not math.isfinite(timeout) or timeout < 0
    ):
        raise ValueError(f"timeout must be None or a finite number >= 0, got {timeout!r}")


_OPEN: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _close_open_schedulers() -> None:
    # A process that exits without close() gives its leases back now instead of after a
    # pid check (embedded) or the keepalive ttl (cluster).
    for scheduler in list(_OPEN):
        try:
            scheduler.close(timeout=3.0)
        except Exception:
            log.warning("closing a scheduler at exit failed", exc_info=True)


class Scheduler:
    """GPUs for one job: ``allocate`` / ``update`` / ``release``, plus ``*_async`` twins.

    Embedded (default): this host's GPUs, shared with every other process on it through a
    lock-protected state file in ``state_dir``. Cluster (``address=`` or
    ``GANGLION_CONTROLLER``): through the controller's ``JobService`` and the executors.
    """

    def __init__(
        self,
        gpus: Sequence[int] | None = None,
        *,
        address: str | None = None,
        policy: str | None = None,
        job_id: str | None = None,
        tenant: str | None = None,
        priority: int = 0,
        backend: str = "auto",
        state_dir: str | Path | None = None,
        nats_url: str | None = None,
        lease_ttl_s: float = 30.0,
    ) -> None:
        self.config = c = resolve_config(
            gpus=gpus,
            address=address,
            policy=policy,
            job_id=job_id,
            tenant=tenant,
            priority=priority,
            backend=backend,
            state_dir=state_dir,
            nats_url=nats_url,
            lease_ttl_s=lease_ttl_s,
        )
        self._lock = threading.Lock()
        self._lease: Lease | None = None
        self._sequence = 0
        self._closed = False
        self._portal: Portal | None = None
        self._link: NatsLink | None = None
        self._file: FileSink | None = None
        self._embedded: EmbeddedBackend | None = None
        self._cluster: ClusterBackend | None = None
        identity = Identity(c.job_id, c.tenant, c.priority)
        if c.mode is Mode.EMBEDDED:
            try:
                policy_obj = create(c.policy)
            except UnknownPolicyError as exc:
                raise ValueError(str(exc)) from None
            pool = Pool.discover(c.gpus, c.backend, c.host)
            self._embedded = EmbeddedBackend(pool, StateStore(c.state_dir), policy_obj, identity)
        if c.nats_url or c.mode is Mode.CLUSTER:
            self._portal = Portal(f"ganglion-sdk-{c.job_id}")
        if c.nats_url:
            assert self._portal is not None
            self._link = NatsLink(self._portal, c.nats_url, f"ganglion-sdk-{c.job_id}")
        else:
            self._file = FileSink(StateStore(c.state_dir).metrics_path)
        if c.mode is Mode.CLUSTER:
            if c.gpus is not None or policy is not None:
                log.info("cluster mode: the controller chooses GPUs; gpus= and policy= are unused")
            if self._link is None:
                log.warning(
                    "cluster mode without NATS (%s unset): leases have no keepalive and are "
                    "freed only by release(); metrics go to %s",
                    ENV_NATS_URL,
                    self._file.path if self._file else "",
                )
            self._cluster = ClusterBackend(
                ClusterConfig(
                    address=c.address,
                    holder_command=(c.holder_python, "-m", "ganglion.sdk.holder"),
                    lease_ttl_s=c.lease_ttl_s,
                ),
                identity,
                self._link,
                self._lost,
            )
        _OPEN.add(self)

    # --- what this scheduler is -----------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self.config.mode

    @property
    def job_id(self) -> str:
        return self.config.job_id

    @property
    def gpus(self) -> tuple[int, ...] | None:
        """The GPU ids this scheduler hands out (embedded); None in cluster mode."""
        return self._embedded.pool.gpus if self._embedded is not None else None

    @property
    def simulated(self) -> bool | None:
        """True when the GPUs are simulated (no NVIDIA driver); None when unknown (cluster
        mode before a grant, or without NATS)."""
        if self._embedded is not None:
            return self._embedded.pool.simulated
        lease = self._lease
        return lease.simulated if lease is not None else None

    @property
    def lease(self) -> Lease | None:
        """The job's current lease, None when it holds none."""
        lease = self._lease
        return lease if lease is not None and lease.active else None

    @property
    def metrics_file(self) -> Path | None:
        """Where ``update`` appends when there is no NATS (None with NATS)."""
        return self._file.path if self._file is not None else None

    @property
    def metrics_stats(self) -> LinkStats | None:
        """Publish counters when metrics go to NATS."""
        return self._link.stats if self._link is not None else None

    def __repr__(self) -> str:
        where = self.config.address if self._cluster else f"GPUs {list(self.gpus or ())}"
        sim = " simulated" if self.simulated else ""
        return f"Scheduler({self.mode.value}{sim}, {where}, job={self.job_id!r})"

    # --- allocate ---------------------------------------------------------------------

    def _portal_or_raise(self) -> Portal:
        if self._closed or self._portal is None:
            raise SchedulerClosedError
        return self._portal

    def _take_previous(self) -> str:
        """Detach the job's current lease; the backend gives it back with the new request."""
        if self._closed:
            raise SchedulerClosedError
        with self._lock:
            old, self._lease = self._lease, None
        if old is not None and old.mark_ended("replaced by a new allocation"):
            return old.id
        return ""

    def _check(self, gpus: int, timeout: float | None) -> None:
        _check_request(gpus, timeout)
        if self._embedded is not None and gpus > len(self._embedded.pool.gpus):
            raise ValueError(
                f"{gpus} GPUs asked, but this scheduler has {len(self._embedded.pool.gpus)}: "
                f"{list(self._embedded.pool.gpus)}"
            )

    def _adopt(self, grant: Grant) -> Lease:
        lease = Lease(grant, self._release_lease, self._release_lease_async)
        with self._lock:
            racing, self._lease = self._lease, lease
        if racing is not None and racing.active:
            # Two allocate() calls on one job ran at once: the later grant wins.
            self._release_lease(racing, "replaced by a concurrent allocation")
        log.info(
            "granted GPUs %s",
            list(lease),
            extra={"job": self.job_id, "lease": lease.id, "decided_by": grant.decided_by},
        )
        return lease

    def allocate(self, gpus: int = 1, timeout: float | None = None) -> Lease:
        """Block until ``gpus`` GPUs are granted; returns them as a :class:`Lease`.

        Gives back this job's previous lease first. ``timeout`` (seconds, None = forever):
        :class:`AllocationTimeout` (a ``TimeoutError``) when it passes, with nothing held.
        ValueError for a request that can never be met (more GPUs than exist, ``gpus <= 0``).
        """
        self._check(gpus, timeout)
        if self._cluster is not None:
            self._portal_or_raise().call(self._cluster.check_fits(gpus))
        previous = self._take_previous()
        if self._embedded is not None:
            grant = self._embedded.allocate(gpus, timeout, previous, cancel=None)
        else:
            assert self._cluster is not None
            grant = self._portal_or_raise().call(self._cluster.allocate(gpus, timeout, previous))
        return self._adopt(grant)

    # The async twins take `timeout` like their sync originals (same call, awaited).
    async def allocate_async(
        self,
        gpus: int = 1,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Lease:
        """:meth:`allocate` without blocking the event loop; cancelling it withdraws the request
        (GPUs granted at that very moment are given back)."""
        self._check(gpus, timeout)
        if self._cluster is not None:
            await self._portal_or_raise().call_async(self._cluster.check_fits(gpus))
        previous = self._take_previous()
        if self._cluster is not None:
            grant = await self._portal_or_raise().call_async(
                self._cluster.allocate(gpus, timeout, previous)
            )
            return self._adopt(grant)
        embedded = self._embedded
        assert embedded is not None
        cancel = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(
            None, embedded.allocate, gpus, timeout, previous, cancel
        )
        try:
            grant = await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()

            def give_back(f: asyncio.Future[Grant]) -> None:
                if not f.cancelled() and f.exception() is None:
                    embedded.release(f.result().lease_id)

            future.add_done_callback(give_back)
            raise
        return self._adopt(grant)

    # --- release ------------------------------------------------------------------------

    def _release_lease(
        self, lease: Lease, reason: str = "released", timeout: float | None = None
    ) -> None:
        if not lease.mark_ended(reason):
            return
        with self._lock:
            if self._lease is lease:
                self._lease = None
        if self._embedded is not None:
            self._embedded.release(lease.id)
        elif self._cluster is not None and self._portal is not None and not self._closed:
            try:
                self._portal.call(self._cluster.release(lease.id), timeout)
            except TimeoutError:
                log.warning("release of lease %s still in progress after %ss", lease.id, timeout)

    async def _release_lease_async(self, lease: Lease, reason: str = "released") -> None:
        if self._cluster is None:
            await asyncio.to_thread(self._release_lease, lease, reason)
            return
        if not lease.mark_ended(reason):
            return
        with self._lock:
            if self._lease is lease:
                self._lease = None
        if self._portal is not None and not self._closed:
            await self._portal.call_async(self._cluster.release(lease.id))

    def release(self, lease: Lease | None = None) -> None:
        """Give back ``lease`` (default: the job's current one). Idempotent; in cluster mode
        it returns once the executor stopped the holder (bounded)."""
        target = lease if lease is not None else self._lease
        if target is not None:
            target.release()  # through the scheduler that granted it

    async def release_async(self, lease: Lease | None = None) -> None:
        target = lease if lease is not None else self._lease
        if target is not None:
            await target.release_async()

    def _lost(self, lease_id: str, reason: str) -> None:
        """The cluster took a lease away (holder died, preempted): called on the portal loop."""
        lease = self._lease
        if lease is not None and lease.id == lease_id:
            lease.mark_ended(f"lost: {reason}")
            with self._lock:
                if self._lease is lease:
                    self._lease = None

    # --- metrics ------------------------------------------------------------------------

    def update(self, metrics: Mapping[str, float]) -> JobMetricsRecord:
        """Report job metrics (``throughput``, ``step_time_s``, ``loss``, ``accuracy``, any
        other name); returns the record. Never blocks on the network: with NATS it is queued
        for publishing (:meth:`flush` waits), else appended to :attr:`metrics_file`.
        ValueError for an empty mapping, an empty name or a value that is not a finite number.
        """
        values = validate_metrics(metrics)
        if self._closed:
            raise SchedulerClosedError
        with self._lock:
            self._sequence += 1
            sequence = self._sequence
            lease = self._lease if self._lease is not None and self._lease.active else None
        record = JobMetricsRecord(
            job_id=self.job_id,
            lease_id=lease.id if lease is not None else "",
            host=lease.segments[0].host if lease is not None else self.config.host,
            time_s=time.time(),
            sequence=sequence,
            values=values,
            gpu_indices=lease.gpus if lease is not None else (),
        )
        BOOK.observe(record)
        if self._link is not None:
            self._link.publish_metrics(record)
        elif self._file is not None:
            self._file.write(record)
        return record

    async def update_async(self, metrics: Mapping[str, float]) -> JobMetricsRecord:
        """Same as :meth:`update` (which never waits on the network); for symmetry."""
        return self.update(metrics)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until queued metrics were published; False if that took longer than ``timeout``."""
        if self._link is None or self._portal is None or self._closed:
            return True
        try:
            self._portal.call(self._link.flush(), timeout)
        except TimeoutError:
            return False
        return True

    async def flush_async(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        if self._link is None or self._portal is None or self._closed:
            return True
        try:
            await asyncio.wait_for(self._portal.call_async(self._link.flush()), timeout)
        except TimeoutError:
            return False
        return True

    # --- lifecycle ----------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Release the current lease, flush metrics, stop the background loop. Idempotent."""
        if self._closed:
            return
        try:
            lease = self._lease
            if lease is not None:
                self._release_lease(lease, timeout=timeout)
            self.flush(timeout)
        finally:
            self._closed = True
            _OPEN.discard(self)
            portal = self._portal
            if portal is not None:

                async def shutdown() -> None:
                    if self._cluster is not None:
                        await self._cluster.close()
                    if self._link is not None:
                        await self._link.close()

                try:
                    asyncio.run_coroutine_threadsafe(shutdown(), portal.loop).result(timeout)
                except Exception:
                    log.warning("scheduler shutdown incomplete", exc_info=True)
                portal.close()

    async def close_async(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Scheduler:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close_async()
