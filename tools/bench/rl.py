"""The learned policy's inference path.

- **Schedule latency**: the real ``ganglion-decision`` command (the shipped model, loaded
  before timing) answers the same 1,024-GPU request with 64 pending jobs, alternately with
  ``policy=rl`` and ``policy=best-fit``; median and p99 latency of each, in the same run.
  Ratio = best-fit / rl (below 1: the learned policy is slower, by what the network and its
  features cost).
- **Batching**: the model manager (in process, no gRPC) decides the same request from 16
  concurrent callers with batching on (concurrent observations in one forward pass) and
  off (one pass per request, on a worker thread); throughput ratio on / off.
- **Quality**: the shipped model on held-out Philly windows (November-December) against the
  best non-clairvoyant heuristic on the same windows (:mod:`ganglion.rl.evaluate`; target
  avg JCT <= 0.85x). Quick mode: one half-day window; full: six 2-day windows.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time

from ganglion import rpc
from ganglion.convert import job_from_proto, state_from_proto
from ganglion.loadgen.decision import synthetic_request
from ganglion.models import default_registry
from ganglion.v1 import decision_pb2_grpc
from ganglion_decision.models import ModelManager
from tools.bench.harness import Row, decision_command, row

GPUS, PENDING = 1024, 64
CONCURRENCY = 16


def run(quick: bool = False) -> list[Row]:
    return asyncio.run(_run(quick))


async def _run(quick: bool) -> list[Row]:
    rows = await _latency(calls=40 if quick else 300)
    rows.append(await _batching(rounds=3 if quick else 20))
    rows.append(_quality(quick))
    return rows


def _quality(quick: bool) -> Row:
    from ganglion.policies.rl import RlPolicy
    from ganglion.rl.evaluate import EvalSpec, evaluate
    from ganglion.traces import load, traces_dir

    path = traces_dir() / "philly" / "philly.csv"
    if not path.is_file():
        return row("rl held-out avg JCT vs best heuristic", math.nan, "x", math.nan, "x",
                   math.nan, f"skipped: no trace at {path}")  # fmt: skip
    spec = EvalSpec(windows=1, window_days=0.5) if quick else EvalSpec()
    summary = evaluate(RlPolicy(), spec, load(path))
    best = summary.avg_jct_s[summary.best_heuristic]
    return row(
        f"rl held-out avg JCT vs {summary.best_heuristic} ({summary.windows} Philly windows)",
        summary.avg_jct_s["rl"] / 3600, "h", best / 3600, "h", best / summary.avg_jct_s["rl"],
        f"target rl <= 0.85x best (ratio >= 1.18); p99 {summary.p99_jct_ratio:.2f}x; "
        f"SRTF oracle {summary.avg_jct_s['srtf'] / 3600:.2f} h; {summary.jobs} jobs",
    )  # fmt: skip


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _latency(calls: int) -> list[Row]:
    requests = {p: synthetic_request(GPUS, PENDING, policy=p) for p in ("rl", "best-fit")}
    times: dict[str, list[float]] = {p: [] for p in requests}
    async with decision_command() as server, rpc.channel(server.address) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        # Warm up: the first rl request loads the model.
        version = (await stub.Schedule(requests["rl"], timeout=120.0)).version
        await stub.Schedule(requests["best-fit"], timeout=30.0)
        for _ in range(calls):  # alternate, so both see the same machine noise
            for p, req in requests.items():
                t0 = time.perf_counter()
                await stub.Schedule(req, timeout=30.0)
                times[p].append(time.perf_counter() - t0)
    rl50, bf50 = statistics.median(times["rl"]), statistics.median(times["best-fit"])
    rl99, bf99 = _pct(times["rl"], 0.99), _pct(times["best-fit"], 0.99)
    label = f"{GPUS} GPUs, {PENDING} pending"
    note = f"real ganglion-decision, {calls} calls each, model {version}"
    return [
        row(f"Schedule p50, rl vs best-fit ({label})", rl50 * 1e3, "ms", bf50 * 1e3, "ms",
            bf50 / rl50, note),
        row(f"Schedule p99, rl vs best-fit ({label})", rl99 * 1e3, "ms", bf99 * 1e3, "ms",
            bf99 / rl99, note),
    ]  # fmt: skip


async def _decisions_per_s(batching: bool, rounds: int) -> float:
    request = synthetic_request(GPUS, PENDING, policy="rl")
    state = state_from_proto(request.cluster)
    pending = [job_from_proto(j) for j in request.pending]
    manager = ModelManager(default_registry(), batching=batching, poll_s=0)
    try:
        await manager.start(watch=False)
        await manager.decide("rl", state, pending)  # warm up

        async def caller() -> None:
            for _ in range(rounds):
                await manager.decide("rl", state, pending)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
        return CONCURRENCY * rounds / (time.perf_counter() - t0)
    finally:
        await manager.close()


async def _batching(rounds: int) -> Row:
    on = await _decisions_per_s(True, rounds)
    off = await _decisions_per_s(False, rounds)
    return row(
        f"rl decisions/s, batching on vs off ({CONCURRENCY} concurrent callers)",
        on, "decisions/s", off, "decisions/s", on / off,
        f"model manager in process, {GPUS} GPUs, {PENDING} pending, {rounds} rounds per caller",
    )  # fmt: skip
