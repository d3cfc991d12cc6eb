"""Load on ``DecisionService.Schedule``: synthetic cluster states, raw-bytes calls.

The request is built once through the real client path (domain values -> :mod:`ganglion.convert`
-> protobuf) and serialised; every call sends those bytes over a channel without interceptors
or (de)serialisers, so the load generator spends as little CPU per call as gRPC allows and
the server is what gets measured. The decision service is stateless, so repeating one request
is a fair load. Calls are spread over several connections, each call on the one with the
fewest calls in flight: with ``ganglion-decision --workers N`` the kernel balances
*connections* over the processes (one connection only ever reaches one of them), and its
hash rarely splits them evenly, so blind round-robin would hold the whole load to the pace
of the worker that drew the most connections.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import grpc
import numpy as np

from ganglion.convert import job_to_proto, state_to_proto
from ganglion.domain import ClusterState, Job, Segment
from ganglion.loadgen.arrivals import OK, Call, Progress, Schedule, Tally, closed_loop, open_loop
from ganglion.loadgen.errors import LoadgenError, TargetUnavailableError
from ganglion.loadgen.report import LatencySummary, LoadReport, merge
from ganglion.rpc import MAX_MESSAGE_BYTES
from ganglion.v1 import decision_pb2

SCHEDULE_METHOD = "/ganglion.v1.DecisionService/Schedule"
_JOB_SIZES = (1, 1, 1, 2, 2, 4, 8)  # GPUs per job: mostly small, a few whole hosts


@dataclass(frozen=True)
class DecisionLoad:
    """One load run against a decision service."""

    address: str
    """``host:port`` of the decision service (or anything serving its Schedule method)."""
    rate: float | None = 100.0
    """Calls per second offered on a fixed schedule; None = closed loop at full speed."""
    duration_s: float = 10.0
    """Measured window, seconds."""
    warmup_s: float = 2.0
    """Load before the window that is not recorded (connections, caches, JIT-free warm-up)."""
    state_gpus: int = 1024
    """GPUs in the cluster state sent with every call."""
    pending: int = 32
    """Pending jobs in every call."""
    gpus_per_host: int = 8
    """GPUs per simulated host."""
    policy: str = ""
    """Policy to ask for; empty = the server's default."""
    concurrency: int = 256
    """Open loop: most calls in flight. Closed loop: calls in flight at all times."""
    connections: int = 4
    """TCP connections; each call goes to the one with the fewest calls in flight."""
    timeout_s: float = 5.0
    """Deadline of each call."""
    client_processes: int = 1
    """Processes generating load (each offers ``rate / client_processes``)."""
    seed: int = 0
    """Seed of the synthetic cluster state and jobs."""

    def __post_init__(self) -> None:
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        for name in ("state_gpus", "gpus_per_host", "concurrency", "connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pending < 0:
            raise ValueError(f"pending must be >= 0, got {self.pending}")
        if self.client_processes < 1:
            raise ValueError(f"client_processes must be >= 1, got {self.client_processes}")
        if not (self.duration_s > 0 and self.warmup_s >= 0 and self.timeout_s > 0):
            raise ValueError("duration and timeout must be > 0, warm-up >= 0")


def synthetic_request(
    state_gpus: int,
    pending: int,
    gpus_per_host: int = 8,
    policy: str = "",
    seed: int = 0,
    now_s: float = 1.7e9,
) -> decision_pb2.ScheduleRequest:
    """A plausible cluster: about half the GPUs held by running jobs (packed from device 0 of
    each host), utilisation sampled on busy GPUs, and ``pending`` jobs of 1-8 GPUs."""
    rng = np.random.default_rng(seed)
    hosts = math.ceil(state_gpus / gpus_per_host)
    host_gpus = {
        f"node-{i:05d}": min(gpus_per_host, state_gpus - i * gpus_per_host) for i in range(hosts)
    }
    running: list[Job] = []
    allocations: dict[str, tuple[Segment, ...]] = {}
    utilization: dict[tuple[str, int], float] = {}
    for i, (host, gpus) in enumerate(host_gpus.items()):
        used = int(rng.binomial(gpus, 0.5))
        if used == 0:
            continue
        started = now_s - float(rng.uniform(60, 3600))
        job = Job(
            id=f"run-{i:05d}",
            tenant=f"tenant-{i % 8}",
            gpus=used,
            submit_time_s=started - 30,
            attained_service_s=used * (now_s - started),
        )
        running.append(job)
        allocations[job.id] = (Segment(host, tuple(range(used))),)
        for d in range(used):
            utilization[(host, d)] = float(rng.uniform(30, 100))
    state = ClusterState.build(now_s, host_gpus, allocations, running, utilization)
    jobs = [
        Job(
            id=f"pending-{k:05d}",
            tenant=f"tenant-{k % 8}",
            gpus=int(rng.choice(_JOB_SIZES)),
            submit_time_s=now_s - (pending - k),
            command=("python", "train.py", f"--run={k}"),
            env={"RUN_ID": str(k)},
        )
        for k in range(pending)
    ]
    return decision_pb2.ScheduleRequest(
        cluster=state_to_proto(state), pending=[job_to_proto(j) for j in jobs], policy=policy
    )


class RawScheduleClient:
    """``connections`` channels calling Schedule with pre-serialised bytes, least in flight
    first (round-robin while they keep pace with each other)."""

    def __init__(self, address: str, connections: int) -> None:
        self.address = address
        self._channels = [
            grpc.aio.insecure_channel(
                address,
                options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    # A private subchannel pool gives each channel its own TCP connection;
                    # otherwise channels to one address share one.
                    ("grpc.use_local_subchannel_pool", 1),
                ],
            )
            for _ in range(connections)
        ]
        self._methods: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            ch.unary_unary(SCHEDULE_METHOD) for ch in self._channels
        ]
        self._in_flight = [0] * connections
        self._next = 0  # the round-robin turn

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Calls outstanding on each connection."""
        return tuple(self._in_flight)

    async def wait_ready(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(ch.channel_ready() for ch in self._channels))
        except TimeoutError:
            raise TargetUnavailableError(
                f"no gRPC server answered on {self.address} within {timeout_s:g} s"
            ) from None

    async def call(self, payload: bytes, timeout_s: float) -> bytes:
        # A connection to a faster (or less loaded) worker empties sooner and so gets more of
        # the calls: the client balances by completions, as gRPC's least-request policy does.
        # Ties go round-robin, so a light load still reaches every connection.
        in_flight = self._in_flight
        i = self._next
        self._next = i + 1 if i + 1 < len(in_flight) else 0
        low = min(in_flight)
        if in_flight[i] > low:
            i = in_flight.index(low)
        in_flight[i] += 1
        try:
            reply: bytes = await self._methods[i](payload, timeout=timeout_s)
        finally:
            in_flight[i] -= 1
        return reply

    def caller(self, payload: bytes, timeout_s: float) -> Call:
        async def call() -> str:
            try:
                await self.call(payload, timeout_s)
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
            return OK

        return call

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels))


async def probe(client: RawScheduleClient, payload: bytes, timeout_s: float) -> bytes:
    """One call before the load, so a wrong policy or a full server fails loudly, not as
    millions of identical errors."""
    await client.wait_ready(timeout_s)
    try:
        reply = await client.call(payload, timeout_s)
    except grpc.aio.AioRpcError as exc:
        raise LoadgenError(
            f"Schedule on {client.address} failed: {exc.code().name}: {exc.details()}"
        ) from None
    decision_pb2.ScheduleResponse.FromString(reply)  # answers must at least parse
    return reply


async def load_decision(
    config: DecisionLoad,
    progress: Progress | None = None,
    start_at: Callable[[], Awaitable[float]] | None = None,
) -> LoadReport:
    """Run the load in this process (``config.client_processes`` is ignored here).

    ``start_at``, awaited after the probe, returns the ``time.time()`` at which to start: it
    aligns several client processes on one schedule.
    """
    request = synthetic_request(
        config.state_gpus, config.pending, config.gpus_per_host, config.policy, config.seed
    )
    payload = request.SerializeToString()
    client = RawScheduleClient(config.address, config.connections)
    try:
        reply = await probe(client, payload, config.timeout_s)
        placements = len(decision_pb2.ScheduleResponse.FromString(reply).placements)
        delay = 0.05 if start_at is None else max(0.0, await start_at() - time.time())
        schedule = Schedule(time.perf_counter() + delay, config.warmup_s, config.duration_s)
        await asyncio.sleep(delay)
        call = client.caller(payload, config.timeout_s)
        drain_s = config.timeout_s + 1.0
        if config.rate is None:
            tally = await closed_loop(call, config.concurrency, schedule, drain_s, progress)
        else:
            tally = await open_loop(
                call, config.rate, schedule, config.concurrency, drain_s, progress
            )
    finally:
        await client.close()
    return _report(
        config,
        tally,
        {
            "state_gpus": config.state_gpus,
            "pending": config.pending,
            "gpus_per_host": config.gpus_per_host,
            "policy": config.policy or "(server default)",
            "request_bytes": len(payload),
            "response_bytes": len(reply),
            "placements": placements,
            "connections": config.connections,
        },
    )


def _report(config: DecisionLoad, tally: Tally, params: dict[str, Any]) -> LoadReport:
    return LoadReport(
        target="decision",
        address=config.address,
        mode="closed" if config.rate is None else "open",
        rate=config.rate or 0.0,
        concurrency=config.concurrency,
        duration_s=config.duration_s,
        warmup_s=config.warmup_s,
        sent=tally.sent,
        completed=tally.completed,
        ok=tally.ok,
        errors=dict(tally.errors),
        unfinished=tally.unfinished,
        achieved_per_s=tally.completed_in_window / config.duration_s,
        latency=LatencySummary.of(tally.histogram),
        histogram=tally.histogram.encode().decode("ascii"),
        params=params,
    )


def run_decision_load(config: DecisionLoad, progress: Progress | None = None) -> LoadReport:
    """Run the load from ``config.client_processes`` processes and merge their reports.

    One process is the default; more are for servers that outrun one Python client (a client
    process sustains a few thousand calls per second).
    """
    if config.client_processes == 1:
        return asyncio.run(load_decision(config, progress))
    return _run_in_processes(config)


def _share(config: DecisionLoad, n: int) -> DecisionLoad:
    return replace(
        config,
        rate=None if config.rate is None else config.rate / n,
        concurrency=max(1, math.ceil(config.concurrency / n)),
        connections=max(1, math.ceil(config.connections / n)),
        client_processes=1,
    )


def _client_process(config: DecisionLoad, conn: Connection) -> None:
    """A spawned client: probe, say ready, wait for the common start time, run, report."""

    async def start_at() -> float:
        conn.send("ready")
        start_wall: float = await asyncio.to_thread(conn.recv)
        return start_wall

    try:
        conn.send(asyncio.run(load_decision(config, start_at=start_at)).to_json())
    except LoadgenError as exc:
        conn.send(exc)
    finally:
        conn.close()


def _run_in_processes(config: DecisionLoad) -> LoadReport:
    n = config.client_processes
    share = _share(config, n)
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold gRPC state
    pipes: list[Connection] = []
    procs = []
    for _ in range(n):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_client_process, args=(share, child), daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    try:
        startup_s = 60.0 + config.timeout_s
        for conn in pipes:
            _expect(conn, startup_s, "ready")
        start_wall = time.time() + 0.2
        for conn in pipes:
            conn.send(start_wall)
        wait_s = config.warmup_s + config.duration_s + config.timeout_s + 30.0
        reports = [LoadReport.from_json(_expect(conn, wait_s, None)) for conn in pipes]
    finally:
        for proc in procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
    merged = merge(reports)
    return replace(
        merged,
        rate=config.rate or 0.0,
        concurrency=config.concurrency,
        params={**merged.params, "connections": share.connections * n},
    )


def _expect(conn: Connection, timeout_s: float, want: str | None) -> str:
    """The next message of a client process: re-raises its LoadgenError, checks ``want``."""
    if not conn.poll(timeout_s):
        raise LoadgenError(f"a client process said nothing for {timeout_s:g} s")
    try:
        msg: object = conn.recv()
    except EOFError:
        raise LoadgenError("a client process died; see its traceback above") from None
    if isinstance(msg, LoadgenError):
        raise msg
    if not isinstance(msg, str) or (want is not None and msg != want):
        raise LoadgenError(f"unexpected message from a client process: {msg!r}")
    return msg
