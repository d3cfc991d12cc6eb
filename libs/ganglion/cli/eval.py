"""``ganglion eval``: several policies over one or more trace windows, as a Markdown report.

Each window is simulated once per policy with the same cluster and simulator settings. The
report (``report.md``) has a table per window (average/p50/p95/p99 JCT, queueing, makespan,
utilisation, preemptions, Themis finish-time fairness), a JCT CDF per window and the GPU
utilisation and queue length over time; ``results.json`` holds every run's metrics.

``--windows N --window-days D`` cuts N windows of D days, evenly spaced over the trace (after
``--window``, if given); without ``--windows`` the whole trace is one window.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ganglion import policies, traces
from ganglion.cli.sim import (
    UsageError,
    add_cluster_flags,
    add_sim_flags,
    add_trace_flags,
    cluster_of,
    guarded,
    load_trace,
    progress_bar,
    sim_config,
)
from ganglion.policies import PolicyError
from ganglion.sim import SimResult, simulate
from ganglion.sim.report import (
    WindowReport,
    metrics_table,
    plot_cdf,
    plot_timelines,
    write_markdown,
)


@dataclass(frozen=True)
class EvalWindow:
    """One slice of the trace to compare the policies on."""

    label: str
    """Shown in the report, e.g. ``days 14.0-21.0``."""
    trace: traces.Trace
    """Its jobs, re-based to start at 0."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="compare policies over trace windows (Markdown report with plots)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_trace_flags(p)
    p.add_argument(
        "--policies",
        required=True,
        help=f"comma-separated policies, from: {', '.join(policies.names())}",
    )
    add_cluster_flags(p)
    add_sim_flags(p)
    p.add_argument("--windows", type=int, default=0, help="number of windows (0: whole trace)")
    p.add_argument(
        "--window-days", type=float, default=7.0, help="length of each window (default 7)"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="report directory")
    p.set_defaults(run=guarded(run))


def windows_of(trace: traces.Trace, count: int, days: float) -> list[EvalWindow]:
    """``count`` windows of ``days`` days, evenly spaced; empty windows are left out."""
    if count == 0:
        return [EvalWindow("all jobs", trace)]
    span_days = trace.span_s / traces.DAY_S
    if count > 1 and span_days <= days:
        raise UsageError(
            f"the jobs span {span_days:.2f} days: room for one window of {days:g} days, "
            f"not {count} (they would all be the same)"
        )
    starts = np.linspace(0.0, max(span_days - days, 0.0), count)
    out = []
    for start in starts:
        window = traces.Window(f"{start:g}:{start + days:g}", float(start), float(start + days))
        cut = trace.window(window)
        if len(cut):
            out.append(EvalWindow(f"days {start:.1f}-{start + days:.1f}", cut))
    return out


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, soft_wrap=True)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = [n for n in names if n not in policies.names()]
    if not names or unknown:
        raise UsageError(
            f"unknown policies {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(policies.names())}"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"--policies names {', '.join(twice)} more than once")
    if args.windows < 0 or not (math.isfinite(args.window_days) and args.window_days > 0):
        raise UsageError("--windows must be >= 0 and --window-days > 0")
    cluster = cluster_of(args)  # flags first: a typo should not wait for a large trace
    trace = load_trace(args)
    config = sim_config(args)
    windows = windows_of(trace, args.windows, args.window_days)
    if not windows:
        raise UsageError("every window is empty")
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]ganglion eval[/]: {', '.join(names)} on {cluster.name} "
        f"({cluster.num_gpus} GPUs), {len(windows)} window(s) of {trace.source}",
        highlight=False,
    )
    reports: list[WindowReport] = []
    records: list[dict[str, Any]] = []
    with progress_bar(console) as bar:
        overall = bar.add_task("runs", total=len(windows) * len(names))
        for w_i, window in enumerate(windows):
            runs: list[SimResult] = []
            for name in names:
                task = bar.add_task(f"{window.label}: {name}", total=len(window.trace))

                def advance(done: int, task: Any = task) -> None:
                    bar.update(task, completed=done)

                try:
                    result = simulate(window.trace, cluster, policies.create(name), config, advance)
                except PolicyError as exc:
                    raise UsageError(f"policy {name}: {exc}") from None
                bar.remove_task(task)
                bar.advance(overall)
                runs.append(result)
                records.append({"window": window.label, **result.metrics().to_json()})
            cdf, timeline = f"w{w_i}_jct_cdf.png", f"w{w_i}_timeline.png"
            title = f"{window.label}, {cluster.name}"
            plot_cdf(runs, out / cdf, title)
            plot_timelines(runs, out / timeline, title)
            reports.append(WindowReport(window.label, tuple(runs), cdf, timeline))
            console.print(f"[bold]{window.label}[/]", highlight=False)
            console.print("\n".join(metrics_table([r.metrics() for r in runs])), highlight=False)
    setup = [
        f"trace: {trace.source} ({len(trace)} jobs)",
        f"cluster: {cluster.name}, {len(cluster.hosts)} hosts, {cluster.num_gpus} GPUs",
        f"policies: {', '.join(names)}",
        f"restart penalty: {config.restart_penalty_s:g} s; quantum: "
        + (f"{config.quantum_s:g} s" if config.quantum_s else "each policy's own")
        + f"; seed {config.seed}",
        "JCT = finish - submit; queue = first start - submit; FTF = Themis finish-time "
        "fairness (JCT / run time on a dedicated 1/n share), mean over jobs and worst tenant",
    ]
    write_markdown(out / "report.md", "Policy evaluation", setup, reports)
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    console.print(f"report: {out / 'report.md'}", highlight=False)
    return 0
