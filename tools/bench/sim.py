"""Simulator speed on the real Philly trace: 64 hosts x 8 GPUs, ``fifo`` and ``tiresias``.

For each policy the first 10k, 40k and all 82,247 jobs (by submit time) are simulated; the
rows are the full run's events/s and the wall time per job at 40k and 82k, each against the
10k run of the same policy in the same process (a ratio near 1 means cost grows linearly
with jobs). The issue's wall-time targets (fifo <= 60 s, tiresias <= 120 s on the 2-core
development machine) are checked in the notes. ``--quick`` uses 1k/2k/4k jobs.

``python -m tools.bench.sim [--quick]`` runs it alone and prints the table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ganglion import policies, traces
from ganglion.sim import ClusterSpec, SimConfig, simulate
from tools.bench.harness import Row, row

POLICIES = {"fifo": 60.0, "tiresias": 120.0}
"""Policy -> wall-time target in seconds for the full trace (issue 3)."""
SIZES = (10_000, 40_000, 0)  # 0: the whole trace
QUICK_SIZES = (1_000, 2_000, 4_000)
HOSTS, GPUS_PER_HOST = 64, 8


@dataclass(frozen=True)
class Run:
    """One timed simulation."""

    policy: str
    jobs: int
    wall_s: float
    cpu_s: float
    """Process CPU time: with other work on the machine, steadier than wall time."""
    events: int
    calls: int

    @property
    def us_per_job(self) -> float:
        return self.wall_s / self.jobs * 1e6


def simulate_timed(trace: traces.Trace, policy: str, progress: Progress) -> Run:
    task = progress.add_task(f"sim {policy} {len(trace):,} jobs", total=len(trace))

    def advance(done: int) -> None:
        progress.update(task, completed=done)

    cluster = ClusterSpec.uniform(HOSTS, GPUS_PER_HOST)
    started, cpu = time.perf_counter(), time.process_time()
    result = simulate(trace, cluster, policies.create(policy), SimConfig(), advance)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    progress.remove_task(task)
    return Run(policy, len(trace), wall, cpu, result.events, result.calls)


def run(quick: bool = False, out_dir: Path | None = None) -> list[Row]:
    del out_dir
    path = traces.traces_dir() / "philly" / "philly.csv"
    if not path.exists():
        return [
            {
                "name": "sim: Philly trace",
                "value": None,
                "unit": "",
                "baseline": None,
                "baseline_unit": "",
                "ratio": None,
                "note": f"skipped: {path} not found (set GANGLION_TRACES)",
            }
        ]
    full = traces.load(path)
    sizes = [n or len(full) for n in (QUICK_SIZES if quick else SIZES)]
    rows: list[Row] = []
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        for policy, target_s in POLICIES.items():
            runs = [simulate_timed(full.head(n), policy, progress) for n in sizes]
            rows += _rows(policy, runs, target_s, whole=not quick and runs[-1].jobs == len(full))
    return rows


def _rows(policy: str, runs: list[Run], target_s: float, whole: bool) -> list[Row]:
    base, last = runs[0], runs[-1]
    label = f"{last.jobs:,} jobs" + (" (whole trace)" if whole else "")
    verdict = (
        f"target <= {target_s:g} s for the whole trace: {'met' if last.wall_s <= target_s else 'NOT met'}"
        if whole
        else "quick run: the target applies to the whole trace"
    )
    out = [
        row(
            f"sim {policy}, Philly {label} on {HOSTS}x{GPUS_PER_HOST}: events/s",
            last.events / last.wall_s,
            "events/s",
            base.events / base.wall_s,
            f"events/s at {base.jobs:,} jobs",
            (last.events / last.wall_s) / (base.events / base.wall_s),
            f"wall {last.wall_s:.1f} s (CPU {last.cpu_s:.1f} s), {last.events:,} events, "
            f"{last.calls:,} decisions; " + verdict,
        )
    ]
    for r in runs[1:]:
        out.append(
            row(
                f"sim {policy}: wall per job at {r.jobs:,} jobs",
                r.us_per_job,
                "us/job",
                base.us_per_job,
                f"us/job at {base.jobs:,} jobs",
                r.us_per_job / base.us_per_job,
                f"wall {r.wall_s:.1f} s vs {base.wall_s:.1f} s (CPU {r.cpu_s:.1f} s vs "
                f"{base.cpu_s:.1f} s); ratio 1 = linear growth",
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools.bench.sim", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1k/2k/4k jobs instead of 10k/40k/all")
    a = p.parse_args(argv)
    rows = run(quick=a.quick)
    lines = ["| benchmark | value | baseline | ratio | note |", "|---|---:|---:|---:|---|"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:,.1f} {r['unit']}"
        base = "-" if r["baseline"] is None else f"{r['baseline']:,.1f} {r['baseline_unit']}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['name']} | {value} | {base} | {ratio} | {r['note']} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
