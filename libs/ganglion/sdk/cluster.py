"""Cluster mode: ``allocate()`` goes through the controller's ``JobService`` and an executor.

A lease is a job whose process is the lease holder (``python -m ganglion.sdk.holder``): Submit
it with the GPU count, Watch it until the executor reports it RUNNING, and return the GPUs of
its ``JobInfo`` segments. While it runs, the controller and the policies count those GPUs as
taken, exactly like any other job's. ``release()`` is ``Cancel`` (the executor SIGTERMs the
holder). When the client has NATS, it sends the holder a keepalive every ``ttl / 3``; a client
that dies stops sending, and the holder exits after ``ttl`` and frees the GPUs.

All of this runs on the portal loop (:mod:`ganglion.sdk.portal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from ganglion import bus, rpc
from ganglion.convert import segments_from_proto
from ganglion.domain import JobState, Segment
from ganglion.sdk.embedded import Identity
from ganglion.sdk.errors import AllocationError, AllocationTimeout
from ganglion.sdk.lease import Grant
from ganglion.sdk.natslink import NatsLink
from ganglion.v1 import controller_pb2, controller_pb2_grpc, executor_pb2

log = logging.getLogger(__name__)

ENV_CONTROLLER = "GANGLION_CONTROLLER"


@dataclass(frozen=True)
class ClusterConfig:
    """How the cluster backend talks to the controller and keeps its leases alive."""

    address: str
    """The controller's ``JobService`` (``host:port``)."""
    holder_command: tuple[str, ...]
    """argv prefix of the lease holder on the executor host (``--ttl`` is appended)."""
    lease_ttl_s: float = 30.0
    """A holder that hears no keepalive for this long frees its GPUs (0 = never, no NATS)."""
    rpc_timeout_s: float = 10.0
    """Deadline of each unary RPC."""
    release_timeout_s: float = 15.0
    """How long ``release()`` waits for the holder to end before returning anyway."""


@dataclass
class _Track:
    """What the Watch stream of one lease has told us."""

    lease_id: str
    running: asyncio.Future[controller_pb2.JobInfo]
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    state: JobState = JobState.QUEUED
    releasing: bool = False
    task: asyncio.Task[None] | None = None


def _describe(info: controller_pb2.JobInfo) -> str:
    state = JobState(info.state).name if info.state else "UNKNOWN"
    parts = [state]
    if info.exit_code:
        parts.append(f"exit code {info.exit_code}")
    if info.message:
        parts.append(info.message)
    return ", ".join(parts)


class ClusterBackend:
    def __init__(
        self,
        config: ClusterConfig,
        identity: Identity,
        link: NatsLink | None,
        on_lost: Callable[[str, str], None],
    ) -> None:
        self.config = config
        self.identity = identity
        self._link = link
        self._on_lost = on_lost
        self._channel: grpc.aio.Channel | None = None
        self._stub: controller_pb2_grpc.JobServiceAsyncStub | None = None
        self._tracks: dict[str, _Track] = {}
        self._background: set[asyncio.Task[None]] = set()

    @property
    def ttl_s(self) -> float:
        """The ttl the holder gets: 0 when this client cannot send keepalives."""
        return self.config.lease_ttl_s if self._link is not None else 0.0

    def stub(self) -> controller_pb2_grpc.JobServiceAsyncStub:
        if self._stub is None:
            self._channel = rpc.channel(self.config.address)
            self._stub = controller_pb2_grpc.JobServiceStub(self._channel)
        return self._stub

    async def cluster_gpus(self) -> tuple[int, int]:
        """(hosts, GPUs) the controller currently sees."""
        try:
            stats = await self.stub().Stats(
                controller_pb2.StatsRequest(), timeout=self.config.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise AllocationError(
                f"controller at {self.config.address} unreachable: {exc.code().name} {exc.details()}"
            ) from exc
        return stats.hosts, stats.gpus

    async def check_fits(self, gpus: int) -> None:
        """ValueError when ``gpus`` is more than the cluster has (callers ask before they give
        anything back: a request that can never be met must change nothing)."""
        hosts, total = await self.cluster_gpus()
        if total and gpus > total:
            raise ValueError(f"{gpus} GPUs asked, but the cluster has {total} (on {hosts} hosts)")

    async def allocate(self, gpus: int, timeout_s: float | None, replaces: str) -> Grant:
        """Give back ``replaces`` (checked to fit already: :meth:`check_fits`) and queue."""
        if replaces:
            await self.release(replaces, wait=False)
        lease_id = f"{self.identity.job_id}-{uuid.uuid4().hex[:8]}"
        loop = asyncio.get_running_loop()
        track = _Track(lease_id, running=loop.create_future())
        self._tracks[lease_id] = track
        if self._link is not None:
            self._link.start_keepalive(lease_id, max(self.ttl_s / 3, 0.1))
        request = controller_pb2.SubmitRequest(
            job_id=lease_id,
            tenant=self.identity.tenant,
            gpus=gpus,
            priority=self.identity.priority,
            command=[*self.config.holder_command, "--ttl", f"{self.ttl_s:g}"],
            env={"GANGLION_SDK_JOB_ID": self.identity.job_id},
        )
        try:
            await self.stub().Submit(request, timeout=self.config.rpc_timeout_s)
            track.task = asyncio.create_task(self._follow(track), name=f"sdk-watch-{lease_id}")
            async with asyncio.timeout(timeout_s):
                info = await asyncio.shield(track.running)
        except TimeoutError:
            await self._abandon(lease_id)
            raise AllocationTimeout(
                gpus, timeout_s or 0.0, lease_id, f"still {track.state.name}"
            ) from None
        except grpc.aio.AioRpcError as exc:
            await self._abandon(lease_id)
            raise AllocationError(
                f"Submit failed: {exc.code().name} {exc.details()}", lease_id
            ) from exc
        except BaseException:
            await asyncio.shield(self._abandon(lease_id))
            raise
        segments = segments_from_proto(info.segments)
        devices, simulated = await self._devices(segments)
        return Grant(
            lease_id=lease_id,
            segments=segments,
            visible_devices=devices,
            decided_by=info.decided_by,
            reason="",
            granted_s=info.start_time_s or time.time(),
            simulated=simulated,
        )

    async def _devices(self, segments: tuple[Segment, ...]) -> tuple[str, bool | None]:
        """CUDA_VISIBLE_DEVICES and whether the GPUs are simulated, from the executor's
        registration in the hosts bucket (needs NATS; unknown without it)."""
        indices = ",".join(str(i) for s in segments for i in s.gpu_indices)
        if self._link is None or len(segments) != 1:
            return indices, None
        seg = segments[0]
        try:
            async with asyncio.timeout(2.0):
                nc = await self._link.client()
                kv = await nc.jetstream().key_value(bus.HOSTS_BUCKET)
                entry = await kv.get(bus.executor_key(seg.host))
            info = executor_pb2.ExecutorInfo.FromString(entry.value or b"")
            uuids = [info.gpu_uuids[i] for i in seg.gpu_indices]
        except Exception as exc:
            log.debug("no executor registration for %s: %s", seg.host, exc)
            return indices, None
        simulated = all(u.startswith("SIM-") for u in uuids)
        return (indices if simulated else ",".join(uuids)), simulated

    async def _follow(self, track: _Track) -> None:
        """Follow the lease's job with Watch (reconnecting) until it ends."""
        stub = self.stub()
        while True:
            call = stub.Watch(controller_pb2.WatchRequest(job_id=track.lease_id))
            try:
                async for response in call:
                    if self._on_info(track, response.job):
                        return
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.NOT_FOUND:
                    self._end(track, f"the controller does not know the lease: {exc.details()}")
                    return
                log.warning(
                    "watching lease %s failed (%s); retrying", track.lease_id, exc.code().name
                )
            except Exception:
                log.warning("watching lease %s failed; retrying", track.lease_id, exc_info=True)
            finally:
                call.cancel()  # no-op once the stream ended; frees it when we stop early
            await asyncio.sleep(0.5)

    def _on_info(self, track: _Track, info: controller_pb2.JobInfo) -> bool:
        """True once the lease's job has ended."""
        track.state = JobState(info.state) if info.state else track.state
        if track.state is JobState.RUNNING:
            if not track.running.done():
                track.running.set_result(info)
            return False
        if track.state.terminal or track.state is JobState.PREEMPTED:
            self._end(track, _describe(info))
            return True
        return False

    def _end(self, track: _Track, reason: str) -> None:
        if not track.running.done():
            if track.releasing:
                track.running.cancel()  # nobody waits for it any more
            else:
                track.running.set_exception(
                    AllocationError(
                        f"lease {track.lease_id} ended before it ran: {reason}", track.lease_id
                    )
                )
        elif not track.releasing:
            log.warning(
                "lease %s lost: %s", track.lease_id, reason, extra={"lease": track.lease_id}
            )
            self._on_lost(track.lease_id, reason)
            # Dead to us: make sure it never comes back (a preempted job could be requeued).
            task = asyncio.create_task(self.release(track.lease_id, wait=False))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        track.ended.set()
        if track.releasing:
            self._tracks.pop(track.lease_id, None)

    async def _abandon(self, lease_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.release(lease_id, wait=False)

    async def release(self, lease_id: str, wait: bool = True) -> None:
        """Cancel the lease's job; with ``wait``, until the holder ended (bounded)."""
        track = self._tracks.get(lease_id)
        if track is not None:
            track.releasing = True
        if self._link is not None:
            await self._link.stop_keepalive(lease_id)
        try:
            await self.stub().Cancel(
                controller_pb2.CancelRequest(job_id=lease_id), timeout=self.config.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                log.warning(
                    "Cancel of lease %s failed (%s); its holder ends %s",
                    lease_id,
                    exc.code().name,
                    f"within {self.ttl_s:g}s" if self.ttl_s else "only when cancelled",
                )
        if track is None:
            return
        if track.ended.is_set() or track.task is None:
            await self._forget(track)
        elif wait:
            try:
                await asyncio.wait_for(track.ended.wait(), self.config.release_timeout_s)
            except TimeoutError:
                log.warning(
                    "lease %s not ended %gs after Cancel", lease_id, self.config.release_timeout_s
                )
            await self._forget(track)
        # else: the Watch task keeps following until the holder ended, then forgets it

    async def _forget(self, track: _Track) -> None:
        self._tracks.pop(track.lease_id, None)
        if track.task is not None and track.task is not asyncio.current_task():
            track.task.cancel()
            await asyncio.gather(track.task, return_exceptions=True)

    async def close(self) -> None:
        for track in list(self._tracks.values()):
            await self._forget(track)
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, self.config.rpc_timeout_s)
        if self._channel is not None:
            await self._channel.close()
