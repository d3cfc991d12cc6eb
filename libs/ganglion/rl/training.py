"""What the training scripts share: the common arguments, the env factory over real trace
windows, feature normalisation, episode logs against a baseline, the progress bar and the
learning-curve plot."""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import dataclasses
import functools
import inspect
import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ganglion import policies, traces
from ganglion.rl.decide import ActionForm
from ganglion.rl.env import EnvConfig, SchedulingEnv, make_windows
from ganglion.rl.features import FEATURES, NUM_FEATURES
from ganglion.sim import ClusterSpec, SimConfig, simulate

PHILLY = "philly/philly.csv"


@dataclass(frozen=True)
class CommonArgs:
    """Arguments every trainer takes."""

    algo: str = ""
    """Algorithm name (set by each trainer)."""
    seed: int = 1
    """Seeds Python, numpy, torch and the window draws."""
    trace: str = ""
    """Trace file; empty: the Philly trace in the shared traces folder."""
    train_window: str = "2017-09-04:2017-11-01"
    """Dates the training windows are drawn from (Philly September-October)."""
    window_days: float = 1.0
    """Length of each training window in days."""
    windows: int = 24
    """Training windows drawn (random starts, seeded); episodes cycle through them."""
    hosts: int = 16
    """Simulated hosts."""
    gpus_per_host: int = 8
    """GPUs per simulated host."""
    load_scale: float = 1.0
    """Multiply the trace's arrival rate."""
    k: int = 192  # DEFAULT_K; a literal, because `ganglion train` reads these defaults from source
    """Candidate jobs per observation."""
    quantum_s: float = 300.0
    """Seconds between re-decisions while jobs wait (the policy's quantum)."""
    restart_penalty_s: float = 30.0
    """Seconds a preempted job loses per restart."""
    fairness_weight: float = 0.0
    """Weight of the fairness term in the reward (0: average JCT only)."""
    max_episode_steps: int = 0
    """Truncate episodes after this many steps (0: whole windows)."""
    baseline: str = "tiresias"
    """Heuristic simulated on every training window, for the learning curve ('' for none)."""
    threads: int = 1
    """torch threads (the machine is shared; 1 is fastest for these small tensors)."""
    time_budget_s: float = 0.0
    """Stop after this many seconds even if steps remain (0: no limit)."""
    norm_steps: int = 3000
    """Decisions simulated (Tiresias-like order) to fit the feature normalisation."""
    checkpoint_every: int = 10
    """Save weights every N updates (0: only at the end)."""
    out_dir: str = "runs"
    """Runs are written to OUT_DIR/<run name>/."""
    run_tag: str = ""
    """Fixed run name (default: algo, seed and start time)."""

    def run_name(self) -> str:
        return self.run_tag or f"{self.algo}__seed{self.seed}__{int(time.time())}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n"

    def trace_path(self) -> Path:
        return Path(self.trace) if self.trace else traces.traces_dir() / PHILLY


@functools.lru_cache(maxsize=2)
def load_trace(path: Path) -> traces.Trace:
    """Parsing the Philly CSV takes seconds; training and evaluation share one copy."""
    return traces.load(path)


def make_env(args: CommonArgs, form: ActionForm) -> SchedulingEnv:
    """The env over ``args.windows`` random windows of the training dates."""
    trace = load_trace(args.trace_path())
    start, end = args.train_window.split(":", 1) if ":" in args.train_window else ("", "")
    windows = make_windows(trace, start, end, args.window_days, args.windows, args.seed)
    windows = tuple(w.scale_load(args.load_scale) for w in windows)
    config = EnvConfig(
        cluster=ClusterSpec.uniform(args.hosts, args.gpus_per_host),
        windows=windows,
        form=form,
        k=args.k,
        quantum_s=args.quantum_s,
        restart_penalty_s=args.restart_penalty_s,
        fairness_weight=args.fairness_weight,
        max_steps=args.max_episode_steps,
    )
    return SchedulingEnv(config)


def reset(
    env: SchedulingEnv, seed: int | None = None
) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
    """``env.reset`` until an episode has a decision to make (some windows never contest
    the cluster: with uncontested decisions skipped, they end at once)."""
    for attempt in range(1000):
        obs, info = env.reset(seed=seed if attempt == 0 else None)
        if not info.get("empty"):
            return obs, info
    raise RuntimeError("no training window ever contests the cluster; use a smaller cluster")


def fit_normalisation(
    config: EnvConfig, seed: int, max_rows: int = 50_000, max_steps: int = 3_000
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Mean and std of every feature over states a least-attained-service ranking visits."""
    env = SchedulingEnv(dataclasses.replace(config, form=ActionForm.RANK, max_steps=0))
    rows: list[npt.NDArray[np.float32]] = []
    count = 0
    obs, _ = reset(env, seed)
    att, run = FEATURES.index("log_attained_gpu_h"), FEATURES.index("running")
    for _ in range(max_steps):
        valid = obs[:, NUM_FEATURES] > 0
        rows.append(obs[valid, :NUM_FEATURES])
        count += int(valid.sum())
        if count >= max_rows:
            break
        obs, _, term, trunc, _ = env.step(2.0 * obs[:, run] - obs[:, att])
        if term or trunc:
            obs, _ = reset(env)
    data = np.concatenate(rows) if rows else np.zeros((1, NUM_FEATURES), np.float32)
    return data.mean(0).astype(np.float32), data.std(0).astype(np.float32)


class RunningMeanStd:
    """Running variance of a scalar (Welford), for reward scaling."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) + 1e-8 if self.n > 1 else 1.0


class EpisodeLog:
    """``episodes.csv``: each finished episode's avg/p99 JCT and, when a baseline is set,
    the baseline's on the same window (simulated once per window, cached)."""

    FIELDS = (
        "global_step",
        "window",
        "jobs",
        "avg_jct_s",
        "p99_jct_s",
        "baseline_avg_jct_s",
        "ratio",
    )

    def __init__(self, out: Path, baseline: str, config: EnvConfig) -> None:
        self.path = out / "episodes.csv"
        self.baseline = baseline
        self.config = config
        self.rows: list[dict[str, Any]] = []
        self._cache: dict[str, float] = {}
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerow(self.FIELDS)

    def _baseline(self, window: traces.Trace) -> float:
        if not self.baseline:
            return math.nan
        key = window.source
        if key not in self._cache:
            sim = SimConfig(restart_penalty_s=self.config.restart_penalty_s)
            result = simulate(window, self.config.cluster, policies.create(self.baseline), sim)
            self._cache[key] = result.metrics().avg_jct_s
        return self._cache[key]

    def record(self, global_step: int, window: traces.Trace, info: dict[str, Any]) -> None:
        base = self._baseline(window)
        avg = float(info.get("avg_jct_s", math.nan))
        row = {
            "global_step": global_step,
            "window": window.source.rsplit("window ", 1)[-1],
            "jobs": info.get("jobs", 0),
            "avg_jct_s": round(avg, 1),
            "p99_jct_s": round(float(info.get("p99_jct_s", math.nan)), 1),
            "baseline_avg_jct_s": round(base, 1),
            "ratio": round(avg / base, 4) if base and math.isfinite(base) else math.nan,
        }
        self.rows.append(row)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writerow(row)

    def summary(self) -> str:
        ratios = [r["ratio"] for r in self.rows[-10:] if math.isfinite(r["ratio"])]
        if not ratios:
            return f"{len(self.rows)} episodes"
        return f"{len(self.rows)} ep, JCT/{self.baseline} {np.mean(ratios):.3f}"


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[tuple[Progress, TaskID]]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as bar:
        yield bar, bar.add_task(description, total=total)


def run_dir(args: CommonArgs) -> Path:
    out = Path(args.out_dir) / args.run_name()
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows with the same keys as one CSV (rewritten whole: a few hundred rows at most)."""
    if not rows:
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_curve(
    out: Path,
    episodes: EpisodeLog,
    updates: list[dict[str, Any]],
    title: str,
    keys: tuple[str, ...],
) -> Path:
    """``learning_curve.png``: episode JCT (vs the baseline) and the losses over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["global_step"] for r in episodes.rows]
    ratios = [r["ratio"] for r in episodes.rows]
    if any(math.isfinite(r) for r in ratios):
        ax1.scatter(steps, ratios, s=10, alpha=0.5, label="episode")
        if len(ratios) >= 5:
            smooth = np.convolve(np.nan_to_num(ratios, nan=1.0), np.ones(5) / 5, mode="valid")
            ax1.plot(steps[4:], smooth, color="C1", label="mean of 5")
        ax1.axhline(1.0, color="grey", ls="--", lw=1)
        ax1.set_ylabel(f"avg JCT / {episodes.baseline} (same window)")
    else:
        ax1.plot(steps, [r["avg_jct_s"] / 3600 for r in episodes.rows], ".")
        ax1.set_ylabel("avg JCT (h)")
    ax1.set_xlabel("environment steps")
    ax1.set_title(f"{title}: training windows")
    if any(math.isfinite(r) for r in ratios):
        ax1.legend(loc="upper right")
    x = [r["global_step"] for r in updates]
    for key in keys:
        if updates and key in updates[0]:
            ax2.plot(x, [r[key] for r in updates], label=key)
    ax2.set_xlabel("environment steps")
    ax2.set_title("losses")
    if ax2.get_lines():
        ax2.legend(loc="upper right")
    fig.tight_layout()
    path = out / "learning_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- Args dataclass -> argparse, with each field's docstring as its help ---------------------

A = TypeVar("A", bound=CommonArgs)


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after an annotated field), up the MRO."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for prev, node in itertools.pairwise(body):
            if (
                isinstance(prev, ast.AnnAssign)
                and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def add_arguments(parser: argparse.ArgumentParser, cls: type[CommonArgs]) -> None:
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("algo", "extra"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {default!r})"
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)


def args_from(cls: type[A], ns: argparse.Namespace) -> A:
    names = {f.name for f in dataclasses.fields(cls)} - {"algo", "extra"}
    return cls(**{n: getattr(ns, n) for n in names if hasattr(ns, n)})


def parse_args(cls: type[A], argv: list[str] | None, description: str) -> A:
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    add_arguments(parser, cls)
    return args_from(cls, parser.parse_args(argv))
