"""Decision service scale-out: ``ganglion-decision --workers N`` (N processes on one port via
SO_REUSEPORT) against one process, N = 1 .. the machine's cores.

The load generator is one closed-loop client process on the same machine with 16 connections
(the kernel balances connections, not calls, over the workers), so on a small machine the
workers and the client share the cores and the curve flattens early: that is the honest
figure for "this machine".
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from ganglion.loadgen import LoadReport
from tools.bench.harness import LARGE, Row, Size, Timing, decision_command, max_qps, row

CONNECTIONS = 16
MAX_WORKERS = 8


def run(quick: bool = False, out_dir: Path | None = None) -> list[Row]:
    return asyncio.run(_run(Timing.of(quick), out_dir))


def worker_counts() -> list[int]:
    cores = os.cpu_count() or 1
    return list(range(1, min(cores, MAX_WORKERS) + 1)) if cores > 1 else [1, 2]


async def _run(timing: Timing, out_dir: Path | None) -> list[Row]:
    size = LARGE
    results: dict[int, LoadReport] = {}
    for n in worker_counts():
        async with decision_command(workers=n) as server:
            results[n] = await max_qps(server.address, size, timing, connections=CONNECTIONS)
    one = results[1].achieved_per_s
    if out_dir is not None:
        _plot(results, size, out_dir / "scaleout.png")
    return [
        row(
            f"Schedule QPS, {n} worker process{'es' if n > 1 else ''} vs 1 ({size.label})",
            r.achieved_per_s,
            "calls/s",
            one,
            "calls/s",
            r.achieved_per_s / one,
            f"{os.cpu_count()} cores shared with the 1 load-generator process; "
            f"p99 {r.latency.p(99):.1f} ms at {r.concurrency} in flight, {CONNECTIONS} connections",
        )
        for n, r in results.items()
    ]


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
    ax.set_title(f"decision scale-out on {os.cpu_count()} cores ({size.label})")
    ax.set_xticks(ns)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
