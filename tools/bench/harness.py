"""Shared pieces of the service benchmarks: result rows, server processes, load runs.

Every server under test runs in its own process (the real ``ganglion-decision`` command, or a
spawned process for baselines and tracing variants), so the load generator in the benchmark
process never shares an interpreter with it. Throughput is best-of-N (noise on a shared
machine only ever slows a run down); every figure is a ratio against a baseline measured in
the same run on the same machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ganglion.loadgen import DecisionLoad, LoadReport, load_decision

Row = dict[str, object]
_READY = re.compile(r"listening on (\S+)(?:.* pids=(\S+))?")


def row(
    name: str,
    value: float,
    unit: str,
    baseline: float,
    baseline_unit: str,
    ratio: float,
    note: str,
) -> Row:
    """One result row, in the keys every benchmark module returns."""
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_unit": baseline_unit,
        "ratio": ratio,
        "note": note,
    }


def verdict(ratio: float, target: float) -> str:
    return f"target >= {target:.3g}: {'met' if ratio >= target else 'NOT met'}"


@dataclass(frozen=True)
class Size:
    """The request every call carries."""

    state_gpus: int
    pending: int

    @property
    def label(self) -> str:
        return f"{self.state_gpus} GPUs, {self.pending} pending"


LARGE = Size(1024, 32)
"""A mid-size cluster: 128 hosts of 8 GPUs, about half busy, 32 jobs waiting."""
SMALL = Size(64, 8)
"""A small cluster (8 hosts), where per-call overhead dominates."""


@dataclass(frozen=True)
class Timing:
    """How long each load run lasts."""

    warmup_s: float
    duration_s: float
    repeats: int
    """Runs per figure, alternating with the baseline's (the best counts)."""

    @classmethod
    def of(cls, quick: bool) -> Timing:
        return cls(0.3, 1.0, 1) if quick else cls(1.0, 3.0, 3)


MAX_CONCURRENCY = 128
"""Calls kept in flight by a closed-loop (``--max``) run."""


async def max_qps(address: str, size: Size, duration_s: float, connections: int) -> LoadReport:
    """One closed-loop run, all of it measured: ``MAX_CONCURRENCY`` calls kept in flight."""
    report = await load_decision(
        DecisionLoad(
            address=address,
            rate=None,
            duration_s=duration_s,
            warmup_s=0.0,
            state_gpus=size.state_gpus,
            pending=size.pending,
            concurrency=MAX_CONCURRENCY,
            connections=connections,
        )
    )
    _check(report)
    return report


@dataclass(frozen=True)
class Measured:
    """A closed-loop run and the CPU each side spent per call in its measured window."""

    report: LoadReport
    server_s: float
    """CPU seconds per call of the server processes (all their threads)."""
    client_s: float
    """CPU seconds per call of this process, the load generator (all its threads)."""


async def measured_max(
    address: str, pids: Sequence[int], size: Size, timing: Timing, connections: int = 4
) -> Measured:
    """One :func:`max_qps` run and both sides' CPU per call over its window. The warm-up is a
    load of its own before the CPU is read: counted in, its calls' CPU would be spread over
    the window's calls (a third too much at the full run's 1 s warm-up and 3 s window)."""
    if timing.warmup_s > 0:
        await max_qps(address, size, timing.warmup_s, connections)
    server, client = sum(map(cpu_seconds, pids)), time.process_time()
    report = await max_qps(address, size, timing.duration_s, connections)
    calls = max(report.completed, 1)
    return Measured(
        report,
        (sum(map(cpu_seconds, pids)) - server) / calls,
        (time.process_time() - client) / calls,
    )


async def at_rate(address: str, size: Size, rate: float, timing: Timing) -> LoadReport:
    """One open-loop run at ``rate`` calls/s (latency from each call's intended start)."""
    report = await load_decision(
        DecisionLoad(
            address=address,
            rate=rate,
            duration_s=timing.duration_s,
            warmup_s=timing.warmup_s,
            state_gpus=size.state_gpus,
            pending=size.pending,
            concurrency=4096,
        )
    )
    _check(report)
    return report


def _check(report: LoadReport) -> None:
    if report.failed:
        raise RuntimeError(f"calls failed during a benchmark run:\n{report.text()}")


# --- server processes ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Running:
    address: str
    pids: tuple[int, ...]


@contextlib.asynccontextmanager
async def decision_command(workers: int = 1) -> AsyncIterator[Running]:
    """The real ``ganglion-decision`` command (``python -m ganglion_decision``) on a free port."""
    env = {**os.environ, "GANGLION_LOG_LEVEL": "WARNING", "OTEL_TRACES_EXPORTER": "none"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ganglion_decision",
        "--port",
        "0",
        "--workers",
        str(workers),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30.0 + 10.0 * workers)).decode()
        match = _READY.search(line)
        if match is None:
            raise RuntimeError(f"ganglion-decision did not start: {line!r}")
        pids = tuple(int(p) for p in match.group(2).split(",")) if match.group(2) else (proc.pid,)
        yield Running(match.group(1), pids)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def spawned(
    target: Callable[..., None], *args: Any, results: list[object] | None = None
) -> AsyncIterator[Running]:
    """Run ``target(*args, conn)`` in a spawned process; it sends its port on ``conn`` when
    listening, serves until SIGTERM, and may send one more object (kept in ``results``)."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not await asyncio.to_thread(receive.poll, 60.0):
            raise RuntimeError(f"{target.__name__} did not start")
        port = receive.recv()
        yield Running(f"127.0.0.1:{port}", (proc.pid or 0,))
    finally:
        if proc.pid is not None and proc.exitcode is None:
            os.kill(proc.pid, signal.SIGTERM)
        if results is not None and await asyncio.to_thread(receive.poll, 15.0):
            with contextlib.suppress(EOFError):
                results.append(receive.recv())
        await asyncio.to_thread(proc.join, 15.0)
        if proc.exitcode is None:
            proc.kill()
            await asyncio.to_thread(proc.join, 5.0)
        receive.close()
