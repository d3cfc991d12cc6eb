"""Embedded mode: this host's GPUs, shared by every process on it through the state file.

Each attempt runs, inside the state file's lock, the same policy object the decision service
would run (``ganglion.policies.create``), over a ``ClusterState`` of this host: one host, the
Scheduler's GPU ids, the live leases as running jobs and every waiting request of the same
pool as pending jobs. A request is granted when the policy places it; otherwise the caller
polls again, backing off from ``poll_min_s`` to ``poll_max_s``, until its timeout. Keeping the
waiting requests in the file lets the policy order the queue across processes (``fifo`` lets
nobody overtake; ``best-fit`` backfills smaller requests).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ganglion.domain import ClusterState, Job, Segment
from ganglion.gpus import Backend, GpuInventory, discover
from ganglion.policies import Policy
from ganglion.sdk.errors import AllocationError, AllocationTimeout
from ganglion.sdk.lease import Grant
from ganglion.sdk.statefile import Holder, HostState, LeaseRecord, StateStore, WaitRecord

log = logging.getLogger(__name__)


def _check_ids(gpus: Sequence[int]) -> tuple[int, ...]:
    ids: list[int] = []
    for g in gpus:
        if isinstance(g, bool) or not isinstance(g, int):
            raise ValueError(f"GPU ids must be integers, got {g!r}")
        if g < 0:
            raise ValueError(f"GPU ids must be >= 0, got {g}")
        ids.append(int(g))
    if not ids:
        raise ValueError("gpus is empty: list at least one GPU id")
    if len(set(ids)) != len(ids):
        dupes = sorted({g for g in ids if ids.count(g) > 1})
        raise ValueError(f"GPU ids listed twice: {dupes}")
    return tuple(sorted(ids))


@dataclass(frozen=True)
class Pool:
    """The GPUs one embedded Scheduler may hand out."""

    host: str
    """This host's name."""
    gpus: tuple[int, ...]
    """GPU ids (device indices), sorted."""
    inventory: GpuInventory
    """What discovery found: NVML GPUs, or simulated ones."""

    @property
    def simulated(self) -> bool:
        return self.inventory.backend is Backend.SIM

    @classmethod
    def discover(cls, gpus: Sequence[int] | None, backend: str, host: str) -> Pool:
        """NVML's GPUs when a driver is present (listed ids must exist), else the listed ids as
        simulated GPUs; ValueError for ids NVML does not know or a missing list without NVML."""
        ids = _check_ids(gpus) if gpus is not None else None
        inventory = discover(backend, host, sim_gpus=(max(ids) + 1) if ids else 0)
        if inventory.backend is Backend.NVML:
            if ids is None:
                ids = tuple(range(inventory.count))
                if not ids:
                    raise ValueError("NVML found no GPUs on this host")
            unknown = [g for g in ids if g >= inventory.count]
            if unknown:
                raise ValueError(
                    f"unknown GPU ids {unknown}: NVML sees {inventory.count} GPU(s) on this host "
                    f"(ids 0-{inventory.count - 1})"
                )
            log.info("embedded scheduler over NVML GPUs %s", list(ids), extra={"backend": "nvml"})
        else:
            if ids is None:
                raise ValueError(
                    "no NVIDIA driver here and no gpus=[...] given: list the GPU ids to simulate"
                )
            log.warning(
                "embedded scheduler over SIMULATED GPUs %s (no NVIDIA driver, or backend=sim)",
                list(ids),
                extra={"backend": "sim"},
            )
        return cls(host, ids, inventory)


@dataclass(frozen=True)
class Identity:
    """Who asks: one Scheduler is one job."""

    job_id: str
    """The job's id (metrics and leases carry it)."""
    tenant: str
    """Who pays; fairness-aware policies group by it."""
    priority: int
    """Higher first where the policy honours priority."""


@dataclass(frozen=True)
class Outcome:
    """One attempt's result."""

    grant: Grant | None
    """The grant, or None when the policy did not place the request this time."""
    free: int
    """Free GPUs of the pool at that moment."""
    ahead: int
    """Other requests of the pool waiting since before this one."""


class EmbeddedBackend:
    def __init__(
        self,
        pool: Pool,
        store: StateStore,
        policy: Policy,
        identity: Identity,
        poll_min_s: float = 0.02,
        poll_max_s: float = 0.1,
        wait_stale_s: float = 10.0,
    ) -> None:
        self.pool = pool
        self.store = store
        self.policy = policy
        self.identity = identity
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self.wait_stale_s = wait_stale_s

    def new_lease_id(self) -> str:
        return f"{self.identity.job_id}-{uuid.uuid4().hex[:8]}"

    def allocate(
        self, gpus: int, timeout_s: float | None, replaces: str, cancel: threading.Event | None
    ) -> Grant:
        """Block until the policy grants ``gpus`` GPUs, the timeout passes, or ``cancel`` is set.

        ``replaces`` (a lease of this job, or "") is given back first, in the same locked step
        that queues the request: a job never waits while holding GPUs, so two jobs that both
        grow cannot deadlock.
        """
        now = time.time()
        request = WaitRecord(
            id=self.new_lease_id(),
            job_id=self.identity.job_id,
            tenant=self.identity.tenant,
            gpus=gpus,
            pool=self.pool.gpus,
            holder=Holder.current(),  # per call: a forked child holds in its own name
            submit_s=now,
            seen_s=now,
            priority=self.identity.priority,
        )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = self.poll_min_s
        granted = False
        try:
            while True:
                outcome = self.attempt(request, replaces)
                replaces = ""
                if outcome.grant is not None:
                    granted = True
                    return outcome.grant
                if cancel is not None and cancel.is_set():
                    raise AllocationError("allocation cancelled", request.id)
                wait = delay
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        assert timeout_s is not None
                        raise AllocationTimeout(
                            gpus,
                            timeout_s,
                            request.id,
                            f"{outcome.free} of {len(self.pool.gpus)} GPUs free, "
                            f"{outcome.ahead} request(s) ahead in the queue",
                        )
                    wait = min(wait, left)
                if cancel is not None:
                    cancel.wait(wait)
                else:
                    time.sleep(wait)
                delay = min(delay * 2, self.poll_max_s)
        finally:
            if not granted:
                self.withdraw(request.id)

    def attempt(self, request: WaitRecord, replaces: str = "") -> Outcome:
        """One locked round: prune the dead, queue or renew ``request``, run the policy."""
        with self.store.locked() as state:
            now = time.time()
            state.prune(now, self.wait_stale_s)
            if replaces:
                self._drop_own(state, replaces)
            mine = next((w for w in state.waiting if w.id == request.id), None)
            if mine is None:
                state.waiting.append(request)
            elif now - mine.seen_s > self.wait_stale_s / 4:
                # Renewed now and then, not on every poll: an unchanged state is not rewritten.
                state.waiting = [
                    w if w.id != request.id else replace(w, seen_s=now) for w in state.waiting
                ]
            return self._decide(state, request, now)

    def _decide(self, state: HostState, request: WaitRecord, now: float) -> Outcome:
        pool = self.pool.gpus
        pos = {g: i for i, g in enumerate(pool)}
        host = self.pool.host
        leases = [lease for lease in state.leases if any(g in pos for g in lease.gpus)]
        running = [
            Job(
                id=lease.id,
                tenant=lease.tenant,
                gpus=len(lease.gpus),
                submit_time_s=lease.submit_s,
                priority=lease.priority,
                attained_service_s=len(lease.gpus) * max(0.0, now - lease.granted_s),
            )
            for lease in leases
        ]
        cluster = ClusterState.build(
            now_s=now,
            host_gpus={host: len(pool)},
            allocations={
                lease.id: (Segment(host, tuple(pos[g] for g in lease.gpus if g in pos)),)
                for lease in leases
            },
            running=running,
        )
        waiting = [w for w in state.waiting if w.pool == pool]
        pending = [
            Job(
                id=w.id, tenant=w.tenant, gpus=w.gpus, submit_time_s=w.submit_s, priority=w.priority
            )
            for w in waiting
        ]
        free = int((cluster.gpu_job < 0).sum())
        ahead = sum(1 for w in waiting if w.id != request.id and w.submit_s <= request.submit_s)
        try:
            decision = self.policy.schedule(cluster, pending)
        except Exception as exc:
            raise AllocationError(f"policy {self.policy.name} failed: {exc}", request.id) from exc
        placement = next((p for p in decision.placements if p.job_id == request.id), None)
        if placement is None:
            return Outcome(None, free, ahead)
        chosen = tuple(sorted(pool[i] for s in placement.segments for i in s.gpu_indices))
        taken = state.held_gpus() & set(chosen)
        if taken or len(chosen) != request.gpus:
            # Never trust a placement over the ledger: a buggy policy must not double-book.
            raise AllocationError(
                f"policy {decision.policy} placed {list(chosen)} for {request.gpus} GPU(s), "
                f"but {sorted(taken)} are held",
                request.id,
            )
        state.waiting = [w for w in state.waiting if w.id != request.id]
        state.leases.append(
            LeaseRecord(
                id=request.id,
                job_id=request.job_id,
                tenant=request.tenant,
                gpus=chosen,
                holder=request.holder,
                submit_s=request.submit_s,
                granted_s=now,
                priority=request.priority,
            )
        )
        return Outcome(
            Grant(
                lease_id=request.id,
                segments=(Segment(host, chosen),),
                visible_devices=self.pool.inventory.visible_devices(chosen),
                decided_by=f"{decision.policy}:{decision.version}",
                reason=placement.reason,
                granted_s=now,
                simulated=self.pool.simulated,
            ),
            free - len(chosen),
            ahead,
        )

    def _drop_own(self, state: HostState, lease_id: str) -> bool:
        before = len(state.leases)
        me = Holder.current()
        state.leases = [
            lease for lease in state.leases if not (lease.id == lease_id and lease.holder == me)
        ]
        return len(state.leases) != before

    def release(self, lease_id: str) -> bool:
        """Give a lease of this process back; False when it was not held (already freed)."""
        with self.store.locked() as state:
            return self._drop_own(state, lease_id)

    def withdraw(self, request_id: str) -> None:
        with self.store.locked() as state:
            state.waiting = [w for w in state.waiting if w.id != request_id]

    def snapshot(self) -> HostState:
        return self.store.read()
