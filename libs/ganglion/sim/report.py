"""PNG plots and the Markdown evaluation report.

matplotlib is imported inside the plotting functions (Agg backend), so importing this module,
and starting the CLI, stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ganglion.sim.result import Metrics, SimResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes

HOUR = 3600.0
_GRID = 2000  # points per timeline plot: enough for a figure, small for a PNG


def sample_timeline(
    result: SimResult, points: int = _GRID
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(hours, busy GPU fraction, pending jobs) on an even grid (the value in force at each
    grid time: the timeline is a step function)."""
    t, busy, queue = result.timeline
    if len(t) == 0:
        empty = np.zeros(0)
        return empty, empty, empty
    grid = np.linspace(float(t[0]), float(t[-1]), points)
    at = np.clip(np.searchsorted(t, grid, side="right") - 1, 0, len(t) - 1)
    return (
        grid / HOUR,
        busy[at].astype(np.float64) / result.cluster.num_gpus,
        queue[at].astype(np.float64),
    )


def _pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend, imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax: Axes, results: Sequence[SimResult]) -> None:
    for r in results:
        jct = np.sort(r.jct_s) / HOUR
        if len(jct) == 0:
            continue
        ax.plot(np.maximum(jct, 1e-3), np.arange(1, len(jct) + 1) / len(jct), label=r.policy)
    ax.set_xscale("log")
    ax.set_xlabel("JCT (hours, log scale)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title("JCT CDF")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _timelines(util_ax: Axes, queue_ax: Axes, results: Sequence[SimResult]) -> None:
    for r in results:
        hours, busy, queue = sample_timeline(r)
        util_ax.plot(hours, busy * 100, label=r.policy, linewidth=0.8)
        queue_ax.plot(hours, queue, label=r.policy, linewidth=0.8)
    util_ax.set_ylabel("GPUs allocated (%)")
    util_ax.set_title("GPU utilisation")
    queue_ax.set_ylabel("pending jobs")
    queue_ax.set_xlabel("simulated hours")
    queue_ax.set_title("queue length")
    for ax in (util_ax, queue_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")


def plot_run(result: SimResult, path: Path) -> None:
    """One run: JCT CDF, utilisation and queue length over time."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(8, 10), constrained_layout=True)
    _cdf(axes[0], [result])
    _timelines(axes[1], axes[2], [result])
    fig.suptitle(f"{result.policy} on {result.cluster.name}: {result.trace.source}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_cdf(results: Sequence[SimResult], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    _cdf(ax, results)
    ax.set_title(f"JCT CDF: {title}", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_timelines(results: Sequence[SimResult], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, constrained_layout=True)
    _timelines(axes[0], axes[1], results)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class WindowReport:
    """One window of an evaluation: its label, its runs and their plots."""

    label: str
    """e.g. ``days 14-28`` or ``whole trace``."""
    runs: tuple[SimResult, ...]
    """One run per policy, in the order asked."""
    cdf_png: str
    """File name of the JCT CDF plot, relative to the report."""
    timeline_png: str
    """File name of the utilisation/queue plot."""


def _h(seconds: float) -> str:
    return "-" if not math.isfinite(seconds) else f"{seconds / HOUR:.2f}"


def metrics_table(metrics: Sequence[Metrics]) -> list[str]:
    lines = [
        "| policy | jobs | avg JCT (h) | p50 | p95 | p99 | avg queue (h) | max wait (h) "
        "| makespan (h) | GPU util | preemptions | FTF avg | FTF worst tenant |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in metrics:
        unfinished = f" (+{m.unfinished} unfinished)" if m.unfinished else ""
        lines.append(
            f"| {m.policy} | {m.jobs}{unfinished} | {_h(m.avg_jct_s)} | {_h(m.p50_jct_s)} "
            f"| {_h(m.p95_jct_s)} | {_h(m.p99_jct_s)} | {_h(m.avg_queue_s)} "
            f"| {_h(m.max_wait_s)} | {_h(m.makespan_s)} | {m.gpu_utilization:.3f} "
            f"| {m.preemptions} | {m.ftf_avg:.2f} | {m.ftf_max_tenant:.2f} |"
        )
    return lines


def write_markdown(
    path: Path, title: str, setup: Sequence[str], windows: Sequence[WindowReport]
) -> None:
    """The report: setup, a summary over windows, then each window's table and plots."""
    policies = [r.policy for r in windows[0].runs] if windows else []
    lines = [f"# {title}", "", *[f"- {s}" for s in setup], ""]
    if len(windows) > 1:
        lines += ["## Summary over windows", "", "Mean of each window's average JCT (hours)."]
        base = policies[0] if policies else ""
        lines += ["", f"| policy | mean avg JCT (h) | vs {base} |", "|---|---:|---:|"]
        means = {
            p: float(np.mean([w.runs[i].metrics().avg_jct_s for w in windows]))
            for i, p in enumerate(policies)
        }
        for p in policies:
            ratio = means[p] / means[base] if means[base] > 0 else math.nan
            lines.append(f"| {p} | {_h(means[p])} | {ratio:.2f}x |")
        lines.append("")
    for w in windows:
        lines += [f"## {w.label}", ""]
        lines += metrics_table([r.metrics() for r in w.runs])
        lines += [
            "",
            f"![JCT CDF]({w.cdf_png})",
            "",
            f"![utilisation and queue]({w.timeline_png})",
            "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
