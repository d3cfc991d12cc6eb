"""``ganglion demo``: the whole loop on one machine, on a real (time-compressed) trace.

NATS, the decision service, the controller and N hosts (each an executor and a sensing
agent) run as separate processes. The jobs of ``tiresias/60_job.csv`` are submitted at their
trace times divided by ``--time-scale``; each is a real process running for its duration
divided by the same factor. At the end it prints a summary and stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nats.aio.msg import Msg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ganglion import bus, policies, rpc
from ganglion.cli.stack import LocalStack
from ganglion.policies import UnknownPolicyError
from ganglion.traces import traces_dir
from ganglion.v1 import cluster_pb2, controller_pb2, controller_pb2_grpc, telemetry_pb2

DEFAULT_TRACE = "tiresias/60_job.csv"
_BACKEND = re.compile(r"backend=(\w+)")
TERMINAL = {
    cluster_pb2.JOB_STATE_SUCCEEDED,
    cluster_pb2.JOB_STATE_FAILED,
    cluster_pb2.JOB_STATE_CANCELLED,
}


@dataclass(frozen=True)
class TraceJob:
    job_id: str
    submit_s: float
    duration_s: float
    gpus: int


_TIRESIAS_COLUMNS = frozenset({"job_id", "num_gpu", "submit_time", "duration"})


def load_tiresias(path: Path) -> list[TraceJob]:
    """Tiresias simulator CSV: ``job_id,num_gpu,submit_time,...,duration,...``."""
    jobs: list[TraceJob] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = _TIRESIAS_COLUMNS.difference(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path}: not a Tiresias-format job CSV (no {', '.join(sorted(missing))} "
                "column); the demo replays that format only (`ganglion sim` reads the others)"
            )
        for line, row in enumerate(reader, start=2):
            try:
                jobs.append(
                    TraceJob(
                        f"j{row['job_id']}",
                        float(row["submit_time"]),
                        float(row["duration"]),
                        int(row["num_gpu"]),
                    )
                )
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: bad row ({exc})") from None
    return jobs


def builtin_workload() -> list[TraceJob]:
    """12 small jobs, used when the shared traces are absent."""
    gpus = [1, 2, 1, 4, 1, 2, 8, 1, 1, 2, 4, 1]
    return [TraceJob(f"b{i}", 20.0 * i, 60.0 + 30.0 * (i % 4), g) for i, g in enumerate(gpus)]


@dataclass(frozen=True)
class DemoConfig:
    hosts: int = 2
    """Hosts (an executor and a sensing agent each)."""
    gpus_per_host: int = 4
    """Simulated GPUs per host when NVML finds none."""
    time_scale: float = 60.0
    """Trace seconds per wall second (submit times and durations are divided by it)."""
    max_jobs: int = 0
    """Submit only the first N jobs (0: all)."""
    trace: Path | None = None
    """Tiresias-format CSV; default ``../shared/traces/tiresias/60_job.csv``."""
    policy: str = ""
    """Policy for the decision service (empty: its default)."""
    backend: str = "auto"
    """auto | nvml | sim for sensing and executors."""
    timeout_s: float = 900.0
    """Give up (exit 1) if the jobs are not all done by then."""
    run_dir: Path | None = None
    """Where logs go (default: a new temporary directory, kept)."""


def add_parser(sub: Any) -> None:
    d = DemoConfig()
    p = sub.add_parser("demo", help="run the whole loop on one machine", description=__doc__)
    p.add_argument(
        "--hosts", type=int, default=d.hosts, help="hosts to start (default %(default)s)"
    )
    p.add_argument(
        "--gpus-per-host", type=int, default=d.gpus_per_host, help="simulated GPUs per host"
    )
    p.add_argument(
        "--time-scale", type=float, default=d.time_scale, help="trace seconds per wall second"
    )
    p.add_argument("--max-jobs", type=int, default=d.max_jobs, help="submit only the first N jobs")
    p.add_argument("--trace", type=Path, default=None, help="Tiresias-format job CSV")
    p.add_argument("--policy", default=d.policy, help="decision policy (default: the service's)")
    p.add_argument("--backend", choices=["auto", "nvml", "sim"], default=d.backend)
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds before giving up")
    p.add_argument("--run-dir", type=Path, default=None, help="directory for service logs")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for name in ("hosts", "gpus_per_host"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if not args.time_scale > 0 or args.max_jobs < 0 or not args.timeout > 0:
        print("--time-scale and --timeout must be > 0, --max-jobs >= 0", file=sys.stderr)
        return 2
    if args.policy and args.policy not in policies.names():
        # The registry's own message (args[0]: str() of this KeyError would quote it).
        print(UnknownPolicyError(args.policy, policies.names()).args[0], file=sys.stderr)
        return 2
    config = DemoConfig(
        hosts=args.hosts,
        gpus_per_host=args.gpus_per_host,
        time_scale=args.time_scale,
        max_jobs=args.max_jobs,
        trace=args.trace,
        policy=args.policy,
        backend=args.backend,
        timeout_s=args.timeout,
        run_dir=args.run_dir,
    )
    return asyncio.run(run_demo(config))


def pick_workload(config: DemoConfig, console: Console) -> tuple[list[TraceJob], str]:
    path = config.trace or traces_dir() / DEFAULT_TRACE
    if path.exists():
        try:
            jobs, label = load_tiresias(path), str(path)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    elif config.trace is not None:
        raise SystemExit(f"trace not found: {path}")
    else:
        console.print(
            f"[yellow]{path} not found: using the small BUILT-IN workload (12 jobs) instead[/]"
        )
        jobs, label = builtin_workload(), "built-in workload"
    jobs.sort(key=lambda j: j.submit_s)
    return (jobs[: config.max_jobs] if config.max_jobs else jobs), label


async def run_demo(config: DemoConfig) -> int:
    console = Console(stderr=True)
    jobs, label = pick_workload(config, console)
    capacity = config.hosts * config.gpus_per_host
    run_dir = config.run_dir or Path(tempfile.mkdtemp(prefix="ganglion-demo-"))
    console.print(
        f"[bold]Ganglion demo[/]: {len(jobs)} jobs from {label}, time compressed {config.time_scale:g}x, "
        f"{config.hosts} hosts; logs in {run_dir}"
    )
    with bus.NatsServer(store_dir=run_dir / "nats") as nats_server:
        stack = LocalStack(run_dir, env={bus.ENV_NATS_URL: nats_server.url})
        try:
            return await _run(config, jobs, stack, nats_server.url, console, capacity)
        finally:
            await stack.close()
            console.print("all services stopped")


async def _run(
    config: DemoConfig,
    jobs: list[TraceJob],
    stack: LocalStack,
    nats_url: str,
    console: Console,
    capacity: int,
) -> int:
    decision = await stack.start(
        "decision",
        "ganglion_decision",
        ["--port", "0", *(["--policy", config.policy] if config.policy else [])],
    )
    hosts = [f"host-{chr(ord('a') + i)}" for i in range(config.hosts)]
    for host in hosts:
        common = [
            "--host",
            host,
            "--backend",
            config.backend,
            "--sim-gpus",
            str(config.gpus_per_host),
        ]
        await stack.start(
            f"executor-{host}",
            "ganglion_executor",
            [
                *common,
                "--port",
                "0",
                "--state-dir",
                str(stack.run_dir / host),
                "--stop-jobs-on-exit",
            ],
        )
        await stack.start(f"sensing-{host}", "ganglion_sensing", [*common, "--metrics-port", "0"])
    controller = await stack.start(
        "controller", "ganglion_controller", ["--port", "0", "--decision-addr", decision.address]
    )
    for s in stack.services:
        console.print(f"  [green]up[/] {s.ready_line}")
    backends = {
        m.group(1)
        for s in stack.services
        if s.name.startswith("executor") and (m := _BACKEND.search(s.ready_line))
    }
    gpu_kind = "SIMULATED GPUs" if backends == {"sim"} else "GPUs via " + "+".join(sorted(backends))

    too_big = [j for j in jobs if j.gpus > capacity]
    if too_big:
        console.print(
            f"[yellow]{len(too_big)} jobs ask more than the {capacity} GPUs here and are left out[/]"
        )
        jobs = [j for j in jobs if j.gpus <= capacity]

    utils: list[float] = []
    nc = await bus.connect(nats_url, "ganglion-demo")

    async def on_telemetry(msg: Msg) -> None:
        for sample in telemetry_pb2.TelemetryBatch.FromString(msg.data).samples:
            utils.extend(
                g.gpu_utilization_percent
                for g in sample.gpus
                if g.HasField("gpu_utilization_percent")
            )

    # One token after the prefix: host batches only, not `<host>.cache` or `<host>.jobs.<id>`.
    await nc.subscribe(f"{bus.TELEMETRY_SUBJECT}.*", cb=on_telemetry)
    channel = rpc.channel(controller.address)
    stub = controller_pb2_grpc.JobServiceStub(channel)
    try:
        t0 = time.time()
        submitted = await _submit_and_wait(config, jobs, stub, stack, console, t0)
        infos = {
            j.job.id: j for j in (await stub.List(controller_pb2.ListRequest(), timeout=10)).jobs
        }
        stats = await stub.Stats(controller_pb2.StatsRequest(), timeout=10)
    finally:
        await channel.close()
        await nc.drain()
    return _summary(
        config,
        [infos[i] for i in submitted if i in infos],
        stats,
        utils,
        capacity,
        gpu_kind,
        console,
    )


async def _submit_and_wait(
    config: DemoConfig,
    jobs: list[TraceJob],
    stub: controller_pb2_grpc.JobServiceAsyncStub,
    stack: LocalStack,
    console: Console,
    t0: float,
) -> list[str]:
    submitted: list[str] = []
    deadline = t0 + config.timeout_s
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        sub_task = progress.add_task("submitted", total=len(jobs))
        done_task = progress.add_task("finished ", total=len(jobs))
        pending = list(jobs)
        while time.time() < deadline:
            stack.check_alive()
            now = time.time() - t0
            while pending and pending[0].submit_s / config.time_scale <= now:
                j = pending.pop(0)
                seconds = j.duration_s / config.time_scale
                resp = await stub.Submit(
                    controller_pb2.SubmitRequest(
                        job_id=j.job_id,
                        tenant="demo",
                        gpus=j.gpus,
                        command=[
                            sys.executable,
                            "-m",
                            "ganglion.workload",
                            "--seconds",
                            f"{seconds:.3f}",
                        ],
                    ),
                    timeout=10,
                )
                submitted.append(resp.job_id)
                progress.advance(sub_task)
            listing = await stub.List(controller_pb2.ListRequest(), timeout=10)
            finished = sum(1 for j in listing.jobs if j.state in TERMINAL)
            progress.update(done_task, completed=finished)
            if not pending and finished >= len(jobs):
                return submitted
            await asyncio.sleep(0.25)
    console.print(f"[red]timed out after {config.timeout_s:g}s[/]")
    return submitted


def _summary(
    config: DemoConfig,
    infos: list[controller_pb2.JobInfo],
    stats: controller_pb2.StatsResponse,
    utils: list[float],
    capacity: int,
    gpu_kind: str,
    console: Console,
) -> int:
    done = [i for i in infos if i.state == cluster_pb2.JOB_STATE_SUCCEEDED]
    failed = [i for i in infos if i.state != cluster_pb2.JOB_STATE_SUCCEEDED]
    jct = np.array([i.end_time_s - i.job.submit_time_s for i in done]) if done else np.zeros(1)
    wait = np.array([i.start_time_s - i.job.submit_time_s for i in done]) if done else np.zeros(1)
    first = min((i.job.submit_time_s for i in infos), default=0.0)
    last = max((i.end_time_s for i in done), default=first)
    busy = sum(i.job.gpus * (i.end_time_s - i.start_time_s) for i in done)
    alloc_util = busy / (capacity * (last - first)) if last > first else 0.0
    scale = config.time_scale
    table = Table(title="Ganglion demo summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("jobs done / failed", f"{len(done)} / {len(failed)}")
    table.add_row("avg JCT (wall s | trace s)", f"{jct.mean():.2f} | {jct.mean() * scale:.0f}")
    table.add_row(
        "p99 JCT (wall s | trace s)",
        f"{np.percentile(jct, 99):.2f} | {np.percentile(jct, 99) * scale:.0f}",
    )
    table.add_row("avg queueing delay (wall s)", f"{wait.mean():.2f}")
    table.add_row("makespan (wall s)", f"{last - first:.1f}")
    table.add_row("GPU utilisation (allocated)", f"{alloc_util:.1%}")
    table.add_row(
        "GPU utilisation (sampled by sensing)", f"{np.mean(utils):.1f}%" if utils else "n/a"
    )
    table.add_row(
        "decision latency p50 / p99",
        f"{stats.decision_latency_p50_ms:.2f} / {stats.decision_latency_p99_ms:.2f} ms",
    )
    table.add_row("decisions / fallbacks", f"{stats.decisions} / {stats.fallbacks}")
    table.add_row("preemptions asked by the policy", str(stats.preemptions))
    table.add_row("cluster", f"{stats.hosts} hosts, {stats.gpus} {gpu_kind}")
    Console().print(table)
    for i in failed[:10]:
        console.print(
            f"[red]job {i.job.id}: state {cluster_pb2.JobState.Name(i.state)} exit {i.exit_code} {i.message}[/]"
        )
    return 0 if infos and not failed else 1
