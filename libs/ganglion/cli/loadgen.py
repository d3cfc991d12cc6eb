"""``ganglion loadgen``: load-test a running Ganglion.

``decision``   open-loop (``--rate``) or closed-loop (``--max``) load on
               ``DecisionService.Schedule`` with synthetic cluster states;
``telemetry``  simulated sensing for N GPUs across hosts, published into NATS;
``transfer``   load on the executors' ``TransferService`` (when this build has it).

Each prints a short text report (and ``--json OUT`` writes the full one, histogram included).
Exit status: 0 when every call succeeded, 1 when some failed, 2 when the run could not be
done (bad flags, nothing listening, service not in this build).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ganglion.bus import ENV_NATS_URL
from ganglion.loadgen import (
    DecisionLoad,
    LoadgenError,
    LoadReport,
    TelemetryLoad,
    load_telemetry,
    plot_percentiles,
    run_decision_load,
    transfer_available,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("loadgen", help="load-test the services", description=__doc__)
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    _add_decision(targets)
    _add_telemetry(targets)
    _add_transfer(targets)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, metavar="OUT", help="write the full report (JSON) here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_decision(targets: Any) -> None:
    d = DecisionLoad(address="")
    p = targets.add_parser(
        "decision",
        help="load on DecisionService.Schedule",
        description="Open-loop (--rate) or closed-loop (--max) load on Schedule. In open loop "
        "each call's latency counts from its scheduled start, so a stalled server cannot hide.",
    )
    p.add_argument("--addr", required=True, help="decision service host:port")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="calls per second on a fixed schedule")
    mode.add_argument("--max", action="store_true", help="closed loop: as fast as it answers")
    p.add_argument("--duration", type=float, default=d.duration_s, help="measured seconds")
    p.add_argument("--warmup", type=float, default=d.warmup_s, help="seconds not recorded first")
    p.add_argument("--state-gpus", type=int, default=d.state_gpus, help="GPUs in each state")
    p.add_argument("--pending", type=int, default=d.pending, help="pending jobs in each call")
    p.add_argument("--gpus-per-host", type=int, default=d.gpus_per_host)
    p.add_argument("--policy", default=d.policy, help="policy to ask for (default: server's)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=d.concurrency,
        help="most calls in flight (--max: calls kept in flight) (default %(default)s)",
    )
    p.add_argument("--connections", type=int, default=d.connections, help="TCP connections")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="per-call deadline, s")
    p.add_argument(
        "--client-procs", type=int, default=1, help="load-generating processes (default 1)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the synthetic state")
    p.add_argument("--plot", type=Path, metavar="PNG", help="latency-by-percentile plot")
    _common(p)
    p.set_defaults(run=run_decision)


def _add_telemetry(targets: Any) -> None:
    d = TelemetryLoad(nats_url="")
    p = targets.add_parser(
        "telemetry",
        help="simulated sensing for many GPUs over NATS",
        description="Publish TelemetryBatch protobufs (and KV updates) for N simulated GPUs "
        "across hosts, out of phase, at --hz per host.",
    )
    p.add_argument(
        "--nats", default=os.environ.get(ENV_NATS_URL), help=f"NATS URL (default ${ENV_NATS_URL})"
    )
    p.add_argument("--gpus", type=int, default=d.gpus, help="simulated GPUs in all")
    p.add_argument("--gpus-per-host", type=int, default=d.gpus_per_host)
    p.add_argument("--hz", type=float, default=d.hz, help="samples per second per host")
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds to publish")
    p.add_argument("--no-kv", action="store_true", help="stream only; leave the KV bucket")
    p.add_argument("--max-inflight", type=int, default=d.max_inflight, help="unacked publishes")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="ack deadline, s")
    _common(p)
    p.set_defaults(run=run_telemetry)


def _add_transfer(targets: Any) -> None:
    p = targets.add_parser(
        "transfer",
        help="load on TransferService (if this build has it)",
        description="Push one generated blob to a TransferService, then Fetch it on an "
        "open-loop schedule (--rate) or back-to-back (--max). Exits 2 when this build of "
        "Ganglion has no TransferService.",
    )
    p.add_argument("--addr", required=True, help="executor host:port serving TransferService")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="fetches per second on a fixed schedule")
    mode.add_argument("--max", action="store_true", help="closed loop: as fast as it answers")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds not recorded first")
    p.add_argument("--blob-mib", type=float, default=4.0, help="blob size in MiB")
    p.add_argument(
        "--compressible", type=float, default=0.5, help="zero fraction of each 4 KiB block"
    )
    p.add_argument("--chunk-kib", type=int, default=0, help="chunk size (default: transport's)")
    p.add_argument("--no-lz4", action="store_true", help="ask for raw chunks only")
    p.add_argument("--concurrency", type=int, default=16, help="fetches in flight at most")
    p.add_argument("--connections", type=int, default=4, help="TCP connections")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of one fetch, s")
    _common(p)
    p.set_defaults(run=run_transfer)


@contextmanager
def _progress(total_s: float, label: str, quiet: bool) -> Iterator[Callable[[float], None]]:
    if quiet:
        yield lambda _elapsed: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total_s)
        yield lambda elapsed: bar.update(task, completed=min(elapsed, total_s))


def _finish(report: LoadReport, args: argparse.Namespace) -> int:
    print(report.text())
    if args.json is not None:
        report.write(args.json)
        print(f"  report: {args.json}")
    return 1 if report.failed else 0


def run_decision(args: argparse.Namespace) -> int:
    try:
        config = DecisionLoad(
            address=args.addr,
            rate=None if args.max else args.rate,
            duration_s=args.duration,
            warmup_s=args.warmup,
            state_gpus=args.state_gpus,
            pending=args.pending,
            gpus_per_host=args.gpus_per_host,
            policy=args.policy,
            concurrency=args.concurrency,
            connections=args.connections,
            timeout_s=args.timeout,
            client_processes=args.client_procs,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"ganglion loadgen decision: {exc}", file=sys.stderr)
        return 2
    quiet = args.quiet or config.client_processes > 1  # children cannot drive one bar
    try:
        with _progress(config.warmup_s + config.duration_s, "Schedule load", quiet) as progress:
            report = run_decision_load(config, progress)
    except LoadgenError as exc:
        print(f"ganglion loadgen decision: {exc}", file=sys.stderr)
        return 2
    if args.plot is not None:
        plot_percentiles({f"Schedule @ {args.addr}": report}, args.plot, "Schedule latency")
    return _finish(report, args)


def run_telemetry(args: argparse.Namespace) -> int:
    if not args.nats:
        print(f"ganglion loadgen telemetry: give --nats or set {ENV_NATS_URL}", file=sys.stderr)
        return 2
    try:
        config = TelemetryLoad(
            nats_url=args.nats,
            gpus=args.gpus,
            gpus_per_host=args.gpus_per_host,
            hz=args.hz,
            duration_s=args.duration,
            kv=not args.no_kv,
            max_inflight=args.max_inflight,
            timeout_s=args.timeout,
        )
    except ValueError as exc:
        print(f"ganglion loadgen telemetry: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        with _progress(config.duration_s, "telemetry load", args.quiet) as progress:
            report = asyncio.run(load_telemetry(config, progress))
    except LoadgenError as exc:
        print(f"ganglion loadgen telemetry: {exc}", file=sys.stderr)
        return 2
    code = _finish(report, args)
    print(f"  {report.ok:,} batches acknowledged in {time.perf_counter() - started:.1f} s")
    return code


def run_transfer(args: argparse.Namespace) -> int:
    if not transfer_available():
        print(
            "ganglion loadgen transfer: TransferService not available in this build "
            "(no ganglion.v1.data_pb2 / ganglion.transport)",
            file=sys.stderr,
        )
        return 2
    from ganglion.loadgen.transfer import MIB, TransferLoad, load_transfer

    try:
        config = TransferLoad(
            address=args.addr,
            rate=None if args.max else args.rate,
            duration_s=args.duration,
            warmup_s=args.warmup,
            blob_bytes=int(args.blob_mib * MIB),
            compressible=args.compressible,
            compress=not args.no_lz4,
            concurrency=args.concurrency,
            connections=args.connections,
            timeout_s=args.timeout,
            chunk_bytes=args.chunk_kib * 1024 if args.chunk_kib else TransferLoad.chunk_bytes,
        )
    except ValueError as exc:
        print(f"ganglion loadgen transfer: {exc}", file=sys.stderr)
        return 2
    try:
        with _progress(config.warmup_s + config.duration_s, "Fetch load", args.quiet) as progress:
            report = asyncio.run(load_transfer(config, progress))
    except LoadgenError as exc:
        print(f"ganglion loadgen transfer: {exc}", file=sys.stderr)
        return 2
    return _finish(report, args)
