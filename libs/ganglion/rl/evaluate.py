"""Held-out evaluation of a learned policy against the heuristics, on the same windows.

Windows are cut evenly over the evaluation dates (``ganglion eval``'s rule); every policy runs
every window with the same cluster and simulator settings. The headline numbers compare the
learned policy with the *best non-clairvoyant heuristic* -- the one among fifo, las,
tiresias and gittins with the lowest average JCT over all evaluation jobs -- and, for
reference, with the per-window best heuristic and the SRTF oracle (which reads true
durations, so no non-clairvoyant policy is expected to match it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ganglion import policies, traces
from ganglion.cli.eval import windows_of
from ganglion.cli.sim import progress_bar
from ganglion.policies import Policy
from ganglion.sim import ClusterSpec, SimConfig, SimResult, simulate
from ganglion.sim.report import WindowReport, plot_cdf, plot_timelines, write_markdown

NON_CLAIRVOYANT = ("fifo", "las", "tiresias", "gittins")
ORACLE = "srtf"


@dataclass(frozen=True)
class EvalSpec:
    """Which windows and cluster a policy is judged on."""

    dates: str = "2017-11-01:2017-12-23"
    """Evaluation dates (Philly November-December: never seen in training)."""
    windows: int = 6
    """Windows, evenly spaced over the dates."""
    window_days: float = 2.0
    """Length of each window."""
    hosts: int = 16
    """Simulated hosts."""
    gpus_per_host: int = 8
    """GPUs per host."""
    restart_penalty_s: float = 30.0
    """Seconds a preempted job loses per restart."""
    baselines: tuple[str, ...] = (*NON_CLAIRVOYANT, ORACLE)
    """Heuristics run on the same windows."""


@dataclass(frozen=True)
class Summary:
    """The headline comparison (what the manifest and the README report)."""

    policy: str
    """The learned policy's name."""
    best_heuristic: str
    """Non-clairvoyant heuristic with the lowest job-weighted avg JCT over all windows."""
    avg_jct_ratio: float
    """Learned avg JCT / best heuristic's, over all evaluation jobs (target <= 0.85)."""
    p99_jct_ratio: float
    """Mean over windows of learned p99 JCT / best heuristic's p99 (target <= 1)."""
    per_window_best_ratio: float
    """Geometric mean over windows of learned avg JCT / that window's best heuristic."""
    oracle_ratio: float
    """Learned avg JCT / SRTF oracle's, over all evaluation jobs."""
    ftf_ratio: float
    """Mean finish-time fairness, learned / best heuristic (lower is fairer)."""
    windows: int
    jobs: int
    avg_jct_s: dict[str, float]
    """Job-weighted avg JCT of every policy over all windows."""
    per_window: list[dict[str, Any]]
    """Each window's avg and p99 JCT per policy."""

    def to_json(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float):
                return round(v, 4) if math.isfinite(v) else None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        out = clean(asdict(self))
        assert isinstance(out, dict)
        return out


def eval_windows(spec: EvalSpec, trace: traces.Trace) -> list[tuple[str, traces.Trace]]:
    dated = trace.window(traces.Window.parse(spec.dates))
    return [(w.label, w.trace) for w in windows_of(dated, spec.windows, spec.window_days)]


def evaluate(
    learned: Policy, spec: EvalSpec, trace: traces.Trace, out: Path | None = None
) -> Summary:
    """Run the learned policy and the baselines on every window; optionally write a report
    (``report.md`` with CDF and timeline plots) into ``out``."""
    cluster = ClusterSpec.uniform(spec.hosts, spec.gpus_per_host)
    config = SimConfig(restart_penalty_s=spec.restart_penalty_s)
    windows = eval_windows(spec, trace)
    names = [learned.name, *spec.baselines]
    runs: dict[str, list[SimResult]] = {n: [] for n in names}
    reports: list[WindowReport] = []
    with progress_bar(Console(stderr=True)) as bar:
        task = bar.add_task("evaluating", total=len(windows) * len(names))
        for w_i, (label, window) in enumerate(windows):
            results = []
            for name in names:
                policy = learned if name == learned.name else policies.create(name)
                result = simulate(window, cluster, policy, config)
                runs[name].append(result)
                results.append(result)
                bar.update(task, advance=1, description=f"{label}: {name}")
            if out is not None:
                cdf, timeline = f"w{w_i}_jct_cdf.png", f"w{w_i}_timeline.png"
                plot_cdf(results, out / cdf, f"{label}, {cluster.name}")
                plot_timelines(results, out / timeline, f"{label}, {cluster.name}")
                reports.append(WindowReport(label, tuple(results), cdf, timeline))
    summary = summarise(learned.name, runs, [label for label, _ in windows])
    if out is not None:
        setup = [
            f"trace: {trace.source}, windows of {spec.window_days:g} days over {spec.dates}",
            f"cluster: {cluster.name} ({cluster.num_gpus} GPUs); restart penalty "
            f"{spec.restart_penalty_s:g} s",
            f"best non-clairvoyant heuristic: {summary.best_heuristic}; learned/best avg JCT "
            f"{summary.avg_jct_ratio:.3f}, p99 {summary.p99_jct_ratio:.3f}; vs SRTF oracle "
            f"{summary.oracle_ratio:.3f}",
        ]
        write_markdown(out / "report.md", f"{learned.name} on held-out windows", setup, reports)
    return summary


def _jobs_avg(results: Sequence[SimResult]) -> float:
    jct = np.concatenate([r.jct_s for r in results]) if results else np.zeros(0)
    return float(jct.mean()) if len(jct) else math.nan


def summarise(learned: str, runs: dict[str, list[SimResult]], labels: list[str]) -> Summary:
    avg = {n: _jobs_avg(rs) for n, rs in runs.items()}
    heuristics = [n for n in runs if n in NON_CLAIRVOYANT]
    best = min(heuristics, key=lambda n: avg[n]) if heuristics else learned
    per_window = []
    best_ratios, p99_ratios = [], []
    for i, label in enumerate(labels):
        m = {n: rs[i].metrics() for n, rs in runs.items()}
        row: dict[str, Any] = {"window": label, "jobs": m[learned].jobs}
        for n, mm in m.items():
            row[n] = {"avg_jct_s": mm.avg_jct_s, "p99_jct_s": mm.p99_jct_s}
        per_window.append(row)
        window_best = min((m[n].avg_jct_s for n in heuristics), default=math.nan)
        if window_best > 0:
            best_ratios.append(m[learned].avg_jct_s / window_best)
        if m[best].p99_jct_s > 0:
            p99_ratios.append(m[learned].p99_jct_s / m[best].p99_jct_s)
    ftf_l = np.nanmean([r.metrics().ftf_avg for r in runs[learned]])
    ftf_b = np.nanmean([r.metrics().ftf_avg for r in runs[best]])
    return Summary(
        policy=learned,
        best_heuristic=best,
        avg_jct_ratio=avg[learned] / avg[best] if avg[best] > 0 else math.nan,
        p99_jct_ratio=float(np.mean(p99_ratios)) if p99_ratios else math.nan,
        per_window_best_ratio=float(np.exp(np.mean(np.log(best_ratios))))
        if best_ratios
        else math.nan,
        oracle_ratio=avg[learned] / avg[ORACLE] if avg.get(ORACLE, 0) > 0 else math.nan,
        ftf_ratio=float(ftf_l / ftf_b) if ftf_b > 0 else math.nan,
        windows=len(labels),
        jobs=sum(int(r.done.sum()) for r in runs[learned]),
        avg_jct_s=avg,
        per_window=per_window,
    )
