"""Decision service scale-out: ``ganglion-decision --workers N`` (N processes on one port via
SO_REUSEPORT) against one process, N = 1 .. the machine's cores.

The load generator is one closed-loop client process on the same machine with 16 connections
(the kernel balances connections, not calls, over the workers, and the client sends each call
on the connection with the fewest in flight, so a worker that drew more connections does not
set the pace). On a small machine the workers and the client share the cores and the curve
flattens early: that is the honest figure for "this machine". All the servers start first and
idle while another is measured; the runs alternate between them, each keeping its best.

Target (ours; the issue asks to show the curve): N workers >= 0.75 x the most N workers can
give here, one worker's rate times ``N`` while the client has a core of its own. Once N
reaches the cores the client takes part of the workers' CPU: with a worker costing ``s`` CPU
seconds a call and the client ``c``, the cores serve at most ``cores / (s + c)`` calls a
second, ``cores * s / (s + c)`` times one worker, and the target is 0.75 x that (and more
than one worker in any case), with both costs measured in the run (the client's over each
run's window, its warm-up excluded). Before the decide path got cheaper this ceiling was about
1.5 on 2 cores; a cheaper worker lowers it, since the client's share grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from ganglion.loadgen import LoadReport
from tools.bench.harness import (
    LARGE,
    Row,
    Size,
    Timing,
    decision_command,
    measured_max,
    row,
    verdict,
)

CONNECTIONS = 16
MAX_WORKERS = 8


def run(quick: bool = False, out_dir: Path | None = None) -> list[Row]:
    return asyncio.run(_run(Timing.of(quick), out_dir))


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which taskset and containers set)."""
    return len(os.sched_getaffinity(0)) or 1


def worker_counts() -> list[int]:
    cores = usable_cores()
    return list(range(1, min(cores, MAX_WORKERS) + 1)) if cores > 1 else [1, 2]


async def _run(timing: Timing, out_dir: Path | None) -> list[Row]:
    size = LARGE
    results: dict[int, LoadReport] = {}
    client_s: dict[int, float] = {}  # the client's CPU seconds per call in the best run
    async with contextlib.AsyncExitStack() as stack:
        servers = {n: await stack.enter_async_context(decision_command(n)) for n in worker_counts()}
        for _ in range(timing.repeats):
            for n, server in servers.items():
                run = await measured_max(server.address, server.pids, size, timing, CONNECTIONS)
                if n not in results or run.report.achieved_per_s > results[n].achieved_per_s:
                    results[n] = run.report
                    client_s[n] = run.client_s
    one = results[1].achieved_per_s
    if out_dir is not None:
        _plot(results, size, out_dir / "scaleout.png")
    return [_row(n, r, one, client_s[n], size, timing.repeats) for n, r in results.items()]


def _row(n: int, r: LoadReport, one: float, client_s: float, size: Size, repeats: int) -> Row:
    cores = usable_cores()
    ratio = r.achieved_per_s / one
    note = "the baseline"
    if n > 1:
        # s: a worker's seconds per call, from one worker's best rate (it had a core to
        # itself); c: the client's CPU seconds per call, measured in this run.
        s = 1.0 / one
        most = float(n) if n < cores else min(n, cores * s / (s + client_s))
        # At least more than one worker gives: were the one-worker run held back by the
        # client, s would come out too small and so would the bar.
        target = max(0.75 * most, 1.0)
        note = f"{verdict(ratio, target)} (0.75 x the most to expect here, {most:.2f}"
        if n >= cores:
            note += (
                f": the client shares the {cores} cores; worker {s * 1e6:.0f} us/call, "
                f"client {client_s * 1e6:.0f} us/call"
            )
        note += ")"
    return row(
        f"Schedule QPS, {n} worker process{'es' if n > 1 else ''} vs 1 ({size.label})",
        r.achieved_per_s,
        "calls/s",
        one,
        "calls/s",
        ratio,
        f"{note}; p99 {r.latency.p(99):.1f} ms at {r.concurrency} in flight, "
        f"{CONNECTIONS} connections, best of {repeats} alternating runs",
    )


def _plot(results: dict[int, LoadReport], size: Size, path: Path) -> None:
    import matplotlib  # lazily, as everywhere

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [results[n].achieved_per_s for n in ns], marker="o", label="measured")
    ax.plot(ns, [results[1].achieved_per_s * n for n in ns], ls="--", alpha=0.5, label="linear")
    ax.set_xlabel("worker processes (SO_REUSEPORT)")
    ax.set_ylabel("Schedule calls/s")
    ax.set_title(f"decision scale-out on {usable_cores()} cores ({size.label})")
    ax.set_xticks(ns)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
