"""``make bench``: run the benchmarks, write ``bench/results.json`` and ``bench/results.md``.

Every figure is a ratio against a baseline measured in the same process and run, because the
machines are noisy; absolute times are reported for context only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ganglion.convert import state_from_proto, state_to_proto
from ganglion.domain import ClusterState, Job, Segment
from ganglion.policies import create
from ganglion.v1 import cluster_pb2, telemetry_pb2


def best_of(fn: Callable[[], object], repeat: int, number: int) -> float:
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


def bench_columnar(num_gpus: int, repeat: int) -> dict[str, Any]:
    """Decode per-GPU state from the wire: packed columns vs one message per GPU."""
    columnar = state_to_proto(cluster(num_gpus)).SerializeToString()
    per_gpu = telemetry_pb2.HostSample(
        gpus=[
            telemetry_pb2.GpuSample(index=i % 8, gpu_utilization_percent=i % 100, fb_used_bytes=i)
            for i in range(num_gpus)
        ]
    ).SerializeToString()

    def decode_columns() -> None:
        state_from_proto(cluster_pb2.ClusterState.FromString(columnar))

    def decode_messages() -> None:
        msg = telemetry_pb2.HostSample.FromString(per_gpu)
        np.array([g.index for g in msg.gpus], dtype=np.int32)
        np.array([g.gpu_utilization_percent for g in msg.gpus], dtype=np.float32)
        np.array([g.fb_used_bytes for g in msg.gpus], dtype=np.int64)

    t_col = best_of(decode_columns, repeat, 50)
    t_msg = best_of(decode_messages, repeat, 50)
    return {
        "name": f"decode {num_gpus}-GPU state: columnar vs per-GPU messages",
        "value_us": t_col * 1e6,
        "baseline_us": t_msg * 1e6,
        "speedup": t_msg / t_col,
    }


def bench_policy(num_gpus: int, pending: int, repeat: int) -> dict[str, Any]:
    """One best-fit decision vs one FIFO first-fit decision on the same state (the baseline)."""
    state = cluster(num_gpus)
    jobs = [
        Job(id=f"p{i}", tenant="t", gpus=1 + (i % 4), submit_time_s=float(i))
        for i in range(pending)
    ]
    best, fifo = create("best-fit"), create("fifo")
    t_best = best_of(lambda: best.schedule(state, jobs), repeat, 10)
    t_fifo = best_of(lambda: fifo.schedule(state, jobs), repeat, 10)
    return {
        "name": f"best-fit vs fifo decision, {num_gpus} GPUs, {pending} pending",
        "value_us": t_best * 1e6,
        "baseline_us": t_fifo * 1e6,
        "speedup": t_fifo / t_best,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools.bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench"), help="output directory")
    p.add_argument("--repeat", type=int, default=7, help="batches per measurement")
    a = p.parse_args(argv)
    results = [bench_columnar(1024, a.repeat), bench_policy(1024, 64, a.repeat)]
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "time": time.time()}
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = ["| benchmark | value (us) | baseline (us) | baseline/value |", "|---|---:|---:|---:|"]
    lines += [
        f"| {r['name']} | {r['value_us']:.1f} | {r['baseline_us']:.1f} | {r['speedup']:.2f}x |"
        for r in results
    ]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
