"""``ganglion sim``: run one policy over a trace on a simulated cluster; write JSON (and a plot).

The simulator replays the trace's arrivals on the cluster and asks the policy (the same
object the decision service serves) whenever something changed. ``--decision-addr HOST:PORT``
sends every decision to a live decision service instead (``DecisionService.Schedule``, the
policy named in the request): the parity path. The trace, cluster and simulator flags are
shared with ``ganglion eval``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ganglion import policies, traces
from ganglion.policies import PolicyError
from ganglion.sim import ClusterSpec, SimConfig, SimResult, simulate, simulate_remote
from ganglion.sim.report import metrics_table, plot_run


class UsageError(Exception):
    """A bad flag value; the CLI prints it and exits with status 2."""


def add_trace_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", type=Path, required=True, help="trace file")
    p.add_argument(
        "--format",
        choices=traces.FORMATS,
        default="auto",
        help="trace format (default: from the header)",
    )
    p.add_argument(
        "--window",
        default=None,
        help="START:END in days from the trace start, or ISO dates (2017-10-01:2017-10-15)",
    )
    p.add_argument(
        "--load-scale", type=float, default=1.0, help="multiply the arrival rate (default 1)"
    )
    p.add_argument("--max-jobs", type=int, default=0, help="keep only the first N jobs (0: all)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed rows (and count them)")


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster",
        default=None,
        help="Tiresias spec name (n32g4, n160g8, n256g8, n1g4), HOSTSxGPUS, or a spec CSV",
    )
    p.add_argument("--hosts", type=int, default=None, help="hosts (with --gpus-per-host)")
    p.add_argument("--gpus-per-host", type=int, default=None, help="GPUs per host")


def add_sim_flags(p: argparse.ArgumentParser) -> None:
    d = SimConfig()
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default %(default)s)")
    p.add_argument(
        "--restart-penalty",
        type=float,
        default=d.restart_penalty_s,
        help="seconds a preempted job loses on each restart (default %(default)s)",
    )
    p.add_argument(
        "--quantum",
        type=float,
        default=None,
        help="re-ask a preemptive policy every this many seconds (default: when the policy "
        "says its order next changes)",
    )


def load_trace(args: argparse.Namespace) -> traces.Trace:
    if not (math.isfinite(args.load_scale) and args.load_scale > 0):
        raise UsageError(f"--load-scale must be > 0, got {args.load_scale}")
    if args.max_jobs < 0:
        raise UsageError("--max-jobs must be >= 0")
    try:
        trace = traces.prepare(
            args.trace,
            args.format,
            window=args.window,
            load_scale=args.load_scale,
            max_jobs=args.max_jobs,
            skip_bad=args.skip_bad,
        )
    except ValueError as exc:  # bad --window text and malformed rows alike
        raise UsageError(str(exc)) from None
    except traces.TraceError as exc:
        raise UsageError(str(exc)) from None
    if len(trace) == 0:
        raise UsageError(f"no jobs in {trace.source}")
    return trace


def cluster_of(args: argparse.Namespace) -> ClusterSpec:
    shape = args.hosts is not None or args.gpus_per_host is not None
    if (args.cluster is None) == (not shape):
        raise UsageError("give either --cluster or --hosts and --gpus-per-host")
    try:
        if args.cluster is not None:
            return ClusterSpec.parse(args.cluster)
        if args.hosts is None or args.gpus_per_host is None:
            raise UsageError("--hosts and --gpus-per-host go together")
        return ClusterSpec.uniform(args.hosts, args.gpus_per_host)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def sim_config(args: argparse.Namespace, record: bool = False) -> SimConfig:
    try:
        return SimConfig(
            restart_penalty_s=args.restart_penalty,
            quantum_s=args.quantum,
            seed=args.seed,
            record_placements=record,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print a :class:`UsageError` on stderr and exit 2, argparse's convention."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except UsageError as exc:
            Console(stderr=True, soft_wrap=True).print(
                f"[red]error:[/] {escape(str(exc))}", highlight=False
            )
            return 2

    return wrapper


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sim",
        help="simulate one policy over a trace",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_trace_flags(p)
    p.add_argument("--policy", required=True, help=f"policy, one of: {', '.join(policies.names())}")
    add_cluster_flags(p)
    add_sim_flags(p)
    p.add_argument("--json", type=Path, required=True, help="write the metrics here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG (JCT CDF, timelines)")
    p.add_argument(
        "--placements",
        type=Path,
        default=None,
        help="write every placement and preemption as CSV (time_s,event,job_id,gpus)",
    )
    p.add_argument(
        "--decision-addr",
        default=None,
        metavar="HOST:PORT",
        help="ask this decision service instead of running the policy in-process",
    )
    p.set_defaults(run=guarded(run))


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, soft_wrap=True)
    if args.decision_addr is None and args.policy not in policies.names():
        raise UsageError(f"unknown policy {args.policy!r}; known: {', '.join(policies.names())}")
    cluster = cluster_of(args)  # flags first: a typo should not wait for a large trace
    trace = load_trace(args)
    config = sim_config(args, record=args.placements is not None)
    skipped = f", {trace.skipped} malformed rows skipped" if trace.skipped else ""
    console.print(
        f"[bold]ganglion sim[/]: {args.policy} on {cluster.name} ({cluster.num_gpus} GPUs), "
        f"{len(trace)} jobs from {trace.source}{skipped}",
        highlight=False,
    )
    with progress_bar(console) as bar:
        task = bar.add_task("jobs finished", total=len(trace))

        def advance(done: int) -> None:
            bar.update(task, completed=done)

        try:
            if args.decision_addr:
                result = asyncio.run(
                    simulate_remote(
                        trace, cluster, args.decision_addr, args.policy, config, advance
                    )
                )
            else:
                result = simulate(trace, cluster, policies.create(args.policy), config, advance)
        except grpc.aio.AioRpcError as exc:
            raise UsageError(
                f"decision service {args.decision_addr}: {exc.code().name}: {exc.details()}"
            ) from None
        except PolicyError as exc:
            raise UsageError(f"policy {args.policy}: {exc}") from None
        bar.update(task, completed=result.done.sum())
    metrics = result.metrics()
    metrics.write_json(args.json)
    if args.plot is not None:
        plot_run(result, args.plot)
    if args.placements is not None:
        write_placements(result, args.placements)
    console.print("\n".join(metrics_table([metrics])), highlight=False)
    console.print(
        f"{metrics.events} events in {metrics.wall_s:.1f} s "
        f"({metrics.events_per_s:,.0f} events/s, {metrics.calls} decisions); "
        f"metrics in {args.json}",
        highlight=False,
    )
    if metrics.dropped:
        console.print(
            f"[yellow]{metrics.dropped} jobs ask for more GPUs than the cluster has: dropped[/]"
        )
    if metrics.unfinished:
        console.print(f"[yellow]{metrics.unfinished} jobs never finished[/]")
    return 0


def write_placements(result: SimResult, path: Path) -> None:
    """time_s,event,job_id,gpus (``host:i+j+...`` segments joined by ``;``)."""
    rows = [
        (t, "place", job, ";".join(f"{h}:{'+'.join(map(str, idx))}" for h, idx in segs))
        for t, job, segs in result.placements
    ] + [(t, "preempt", job, "") for t, job in result.preempted]
    rows.sort(key=lambda r: (r[0], r[1] == "place"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["time_s", "event", "job_id", "gpus"])
        w.writerows(rows)
