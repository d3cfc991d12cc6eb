"""In-process benchmarks of the typed core: wire decoding and one policy decision."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ganglion.convert import state_from_proto, state_to_proto
from ganglion.domain import ClusterState, Job, Segment
from ganglion.policies import create
from ganglion.v1 import cluster_pb2, telemetry_pb2
from tools.bench.harness import Row, row


def run(quick: bool = False, out_dir: Path | None = None) -> list[Row]:
    del out_dir
    repeat = 3 if quick else 7
    return [bench_columnar(1024, repeat), bench_policy(1024, 64, repeat)]


def median_time(fn: Callable[[], object], repeat: int, number: int) -> float:
    """Median seconds per call over ``repeat`` batches of ``number`` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def cluster(num_gpus: int, per_host: int = 8, busy_every: int = 3) -> ClusterState:
    hosts = {f"h{i:04d}": per_host for i in range(num_gpus // per_host)}
    running = []
    allocations = {}
    for i, h in enumerate(hosts):
        if i % busy_every == 0:
            job = Job(id=f"r{i}", tenant="t", gpus=4, submit_time_s=0.0)
            running.append(job)
            allocations[job.id] = (Segment(h, (0, 1, 2, 3)),)
    return ClusterState.build(1.0, hosts, allocations, running)


def bench_columnar(num_gpus: int, repeat: int) -> Row:
    """Decode per-GPU state from the wire: packed columns vs one message per GPU."""
    columnar = state_to_proto(cluster(num_gpus)).SerializeToString()
    per_gpu = telemetry_pb2.HostSample(
        gpus=[
            telemetry_pb2.GpuSample(index=i % 8, gpu_utilization_percent=i % 100, fb_used_bytes=i)
            for i in range(num_gpus)
        ]
    ).SerializeToString()

    def decode_columns() -> None:
        # .running: the running jobs are converted when first read; count them here.
        _ = state_from_proto(cluster_pb2.ClusterState.FromString(columnar)).running

    def decode_messages() -> None:
        msg = telemetry_pb2.HostSample.FromString(per_gpu)
        np.array([g.index for g in msg.gpus], dtype=np.int32)
        np.array([g.gpu_utilization_percent for g in msg.gpus], dtype=np.float32)
        np.array([g.fb_used_bytes for g in msg.gpus], dtype=np.int64)

    t_col = median_time(decode_columns, repeat, 50)
    t_msg = median_time(decode_messages, repeat, 50)
    return row(
        f"decode {num_gpus}-GPU state: columnar vs per-GPU messages",
        t_col * 1e6,
        "us",
        t_msg * 1e6,
        "us",
        t_msg / t_col,
        "no target, shown for context; ratio = baseline / value (speed-up); columnar includes "
        "the running jobs' messages",
    )


def bench_policy(num_gpus: int, pending: int, repeat: int) -> Row:
    """One best-fit decision vs one FIFO first-fit decision on the same state (the baseline)."""
    state = cluster(num_gpus)
    jobs = [
        Job(id=f"p{i}", tenant="t", gpus=1 + (i % 4), submit_time_s=float(i))
        for i in range(pending)
    ]
    best, fifo = create("best-fit"), create("fifo")
    t_best = median_time(lambda: best.schedule(state, jobs), repeat, 10)
    t_fifo = median_time(lambda: fifo.schedule(state, jobs), repeat, 10)
    return row(
        f"best-fit vs fifo decision, {num_gpus} GPUs, {pending} pending",
        t_best * 1e6,
        "us",
        t_fifo * 1e6,
        "us",
        t_fifo / t_best,
        "no target, shown for context; ratio = baseline / value; best-fit also scores the "
        "runner-up host",
    )
