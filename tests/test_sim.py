"""The simulator on literal traces with hand-computed answers, the preemptive policies on
literal cluster states, and smoke runs of ``ganglion sim`` / ``ganglion eval``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ganglion import policies, traces
from ganglion.cli import main
from ganglion.domain import (
    ClusterState,
    Decision,
    Job,
    JobColumns,
    JobQueue,
    Placement,
    Segment,
    StaleQueueError,
    queue_key,
)
from ganglion.policies.gittins import Gittins, GittinsConfig, GittinsTable
from ganglion.policies.las import Las, Tiresias, TiresiasConfig
from ganglion.policies.placement import Fit
from ganglion.sim import (
    ClusterSpec,
    SimConfig,
    SimResult,
    Simulation,
    SimulationError,
    simulate,
)
from ganglion.sim.runner import resolve
from ganglion.traces import Trace
from tests.conftest import SHARED_TRACES

Row = tuple[str, float, float, int] | tuple[str, float, float, int, str]
BASELINES = ["fifo", "srtf", "las", "tiresias", "gittins"]


def trace(*rows: Row) -> Trace:
    """(id, submit, duration, gpus[, tenant]) rows, already in submit order."""
    return Trace(
        tuple(r[0] for r in rows),
        np.array([r[1] for r in rows], dtype=np.float64),
        np.array([r[2] for r in rows], dtype=np.float64),
        np.array([r[3] for r in rows], dtype=np.int32),
        tuple(r[4] if len(r) == 5 else "t" for r in rows),
        np.zeros(len(rows), dtype=np.int32),
        None,
        "literal",
    )


def jct_by_id(t: Trace, finish: np.ndarray) -> dict[str, float]:
    return {j: float(f - s) for j, s, f in zip(t.job_id, t.submit_s, finish, strict=True)}


def run(
    t: Trace, policy: str, hosts: int, gpus: int, **config: Any
) -> tuple[dict[str, float], SimResult]:
    result = simulate(
        t, ClusterSpec.uniform(hosts, gpus), policies.create(policy), SimConfig(**config)
    )
    return jct_by_id(t, result.finish), result


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared trace {path} not found (set GANGLION_TRACES or add ../shared)")
    return path


# -- the engine, by hand ------------------------------------------------------------------------


def test_fifo_by_hand_the_head_blocks_and_frees_in_order() -> None:
    t = trace(("a", 0, 100, 2), ("b", 10, 50, 1), ("c", 20, 10, 1))
    jct, result = run(t, "fifo", 1, 2)
    assert jct == {"a": 100.0, "b": 140.0, "c": 90.0}
    m = result.metrics()
    assert m.jobs == 3 and m.avg_jct_s == pytest.approx(110.0)
    assert m.avg_queue_s == pytest.approx((0 + 90 + 80) / 3) and m.max_wait_s == 90.0
    assert m.makespan_s == 150.0
    # busy GPU-seconds: a 2x100, b 1x50, c 1x10 over 2 GPUs x 150 s
    assert m.gpu_utilization == pytest.approx(260 / 300)
    assert m.preemptions == 0 and m.unfinished == 0


def test_a_gang_larger_than_a_host_waits_for_whole_idle_hosts() -> None:
    t = trace(("small", 0, 100, 1), ("big", 1, 10, 3))
    jct, result = run(t, "fifo", 2, 2, record_placements=True)
    assert jct == {"small": 100.0, "big": 109.0}  # needs both hosts idle: after "small"
    placements = {job: segs for _, job, segs in result.placements}
    assert placements["big"] == (("h000", (0, 1)), ("h001", (0,)))


def test_jobs_larger_than_the_cluster_are_dropped_and_counted() -> None:
    t = trace(("ok", 0, 10, 2), ("huge", 1, 10, 9))
    m = run(t, "fifo", 2, 4)[1].metrics()
    assert (m.jobs, m.dropped, m.unfinished) == (1, 1, 0)


def test_srtf_preempts_and_the_restart_penalty_is_paid_once_per_restart() -> None:
    t = trace(("long", 0, 1000, 1), ("short", 100, 10, 1))
    jct, result = run(t, "srtf", 1, 1, restart_penalty_s=30.0, record_placements=True)
    # long runs 0-100, short 100-110, long restarts at 110, loses 30 s, has 900 s left.
    assert jct == {"short": 10.0, "long": 110 + 30 + 900}
    assert result.preempted == ((100.0, "long"),)
    assert result.metrics().preemptions == 1


def test_fifo_never_preempts_the_same_trace() -> None:
    t = trace(("long", 0, 1000, 1), ("short", 100, 10, 1))
    assert run(t, "fifo", 1, 1)[0] == {"long": 1000.0, "short": 910.0}


def test_tiresias_demotes_at_the_threshold_and_a_new_job_preempts() -> None:
    # 1 GPU, threshold 3600 GPU-s: "old" crosses it at t=3600, then "new" (Q0) takes over
    # without waiting for it, and "old" resumes after "new" with the restart penalty.
    t = trace(("old", 0, 5000, 1), ("new", 1000, 100, 1))
    jct, result = run(t, "tiresias", 1, 1, restart_penalty_s=20.0, record_placements=True)
    assert jct == {"new": 3600 - 1000 + 100, "old": 3700 + 20 + 1400}
    assert result.preempted == ((3600.0, "old"),)


def test_las_shares_by_levels_of_attained_service() -> None:
    # LAS with 600 GPU-s levels on one GPU: "b" arrives while "a" (level 0) runs; a keeps the
    # GPU until it reaches 600 GPU-s, then b (level 0) preempts it.
    t = trace(("a", 0, 2000, 1), ("b", 100, 300, 1))
    jct, result = run(t, "las", 1, 1, restart_penalty_s=0.0, record_placements=True)
    assert result.preempted == ((600.0, "a"),)
    assert jct == {"b": 900 - 100, "a": 2300.0}


def test_an_explicit_quantum_re_asks_on_a_fixed_period() -> None:
    t = trace(("a", 0, 2000, 1), ("b", 100, 300, 1))
    result = run(t, "las", 1, 1, restart_penalty_s=0.0, quantum_s=400.0)[1]
    timed = run(t, "las", 1, 1, restart_penalty_s=0.0)[1]
    assert result.calls > timed.calls
    # asked at 100 (b arrives), then 500 (a at level 0 still), 900: a preempted at 900
    assert result.finish.tolist() == [2300.0, 1200.0]


def test_runs_are_deterministic() -> None:
    rows = [
        (f"j{i}", float(i * 7 % 50 + i), float(30 + (i * 37) % 400), 1 + i % 3) for i in range(60)
    ]
    t = trace(*sorted(rows, key=lambda r: r[1]))
    first = run(t, "tiresias", 2, 4, record_placements=True, seed=3)[1]
    second = run(t, "tiresias", 2, 4, record_placements=True, seed=3)[1]
    assert first.placements == second.placements
    assert first.preempted == second.preempted
    assert np.array_equal(first.finish, second.finish)


def test_finish_time_fairness_and_tenant_shares() -> None:
    # Two tenants on 2 GPUs; each gets a fair share of 1 GPU while both are present.
    t = trace(("a", 0, 100, 2, "x"), ("b", 0, 100, 1, "y"))
    m = run(t, "fifo", 1, 2)[1].metrics()
    x, y = m.per_tenant["x"], m.per_tenant["y"]
    assert x.share == pytest.approx(2 / 3) and y.share == pytest.approx(1 / 3)
    # a: alone it gets 1 of 2 GPUs when 2 tenants are active -> T_id = 100 x 2 = 200; JCT 100
    assert x.ftf_avg == pytest.approx(100 / 200)
    # b: waits for a (100 s) then runs 100 s -> JCT 200, T_id = 100 (1 GPU fits its share)
    assert y.ftf_avg == pytest.approx(2.0) and m.ftf_max_tenant == pytest.approx(2.0)


class _Bad:
    """Places the same GPU twice: the simulator must refuse it."""

    name = "bad"
    version = "0"

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision:
        seg = (Segment(state.hosts[0], (0,)),)
        return Decision(tuple(Placement(j.id, seg, 0.0) for j in pending), self.name, self.version)


def test_an_impossible_decision_is_a_simulation_error() -> None:
    t = trace(("a", 0, 10, 1), ("b", 0, 10, 1))
    with pytest.raises(SimulationError, match="busy GPU"):
        simulate(t, ClusterSpec.uniform(1, 2), _Bad())
    sim = Simulation(t, ClusterSpec.uniform(1, 2))
    with pytest.raises(SimulationError, match="without a pending request"):
        sim.apply(Decision((), "x", "0"))


def test_pending_is_handed_over_in_queue_order() -> None:
    # Priorities, submit-time ties out of id order and preempted jobs re-queued: the queue
    # the simulator hands over is always a JobQueue in queue_key order (FIFO relies on it).
    rows = [
        (f"j{(7 * i) % 23:02d}", float(i // 3 * 50), 400.0 + 97 * (i % 5), 1 + i % 3)
        for i in range(23)
    ]
    t = Trace(
        tuple(r[0] for r in rows),
        np.array([r[1] for r in rows]),
        np.array([r[2] for r in rows]),
        np.array([r[3] for r in rows], dtype=np.int32),
        ("t",) * len(rows),
        np.array([i % 4 == 0 for i in range(len(rows))], dtype=np.int32),
        None,
        "literal",
    )
    policy = Tiresias(config=TiresiasConfig(thresholds_gpu_s=(300.0,), promote_knob=2.0))
    sim = Simulation(t, ClusterSpec.uniform(2, 4), resolve(SimConfig(), policy))
    requests = 0
    while (request := sim.next_request()) is not None:
        assert isinstance(request.pending, JobQueue)
        keys = [queue_key(j) for j in request.pending]
        assert keys == sorted(keys)
        sim.apply(policy.schedule(request.state, request.pending))
        requests += 1
    result = sim.result()
    assert result.preemptions.sum() > 0 and requests > 10
    assert np.isfinite(result.finish).all()


def _same_columns(got: JobColumns, jobs: Sequence[Job]) -> None:
    want = JobColumns.of(jobs)
    for name in ("ids", "priority", "gpus", "submit_time_s", "attained_service_s"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert np.array_equal(got.queued_since_s, want.queued_since_s)
    assert np.array_equal(got.duration_hint_s, want.duration_hint_s, equal_nan=True)


def test_states_hand_over_columns_that_match_their_jobs() -> None:
    # The simulator seeds the running and waiting jobs' columns and builds the running Job
    # values only when read: they must agree, also for a state read after the run moved on
    # (attained service as of that state's instant), through preemptions and re-queueing.
    rows = [(f"j{i:02d}", float(i // 2 * 40), 300.0 + 150 * (i % 4), 1 + i % 2) for i in range(16)]
    policy = Tiresias(config=TiresiasConfig(thresholds_gpu_s=(200.0,), promote_knob=2.0))
    sim = Simulation(trace(*rows), ClusterSpec.uniform(1, 3), resolve(SimConfig(), policy))
    seen = []
    while (request := sim.next_request()) is not None:
        seen.append(request)
        # Every other queue's columns are read before the policy runs, the others' by it.
        if len(seen) % 2:
            _same_columns(request.pending.columns, request.pending)
        sim.apply(policy.schedule(request.state, request.pending))
    assert sim.result().preemptions.sum() > 0
    for request in seen:
        state = request.state
        _same_columns(state.running_columns, state.running)
        assert state.running is state.running  # built once: the same Job values every read
    # The queue is a view of the simulator's own list: read after the run moved on, it says
    # so instead of answering with a later queue (policies read it during schedule only).
    with pytest.raises(StaleQueueError, match="changed since"):
        list(seen[0].pending)
    served = [j.attained_service_s for r in seen for j in r.state.running if j.id == "j00"]
    assert len(served) > 1 and served == sorted(served)  # it accrues service while it runs


# -- the policies on literal states -------------------------------------------------------------


def _state(
    now: float, running: list[tuple[Job, str, tuple[int, ...]]], hosts: dict[str, int]
) -> ClusterState:
    return ClusterState.build(
        now, hosts, {j.id: [Segment(h, idx)] for j, h, idx in running}, [j for j, _, _ in running]
    )


def test_tiresias_promotes_a_starved_job_and_preempts_a_lower_queue() -> None:
    old = Job("old", "t", 1, 0.0, attained_service_s=5000.0)  # Q1, running
    starved = Job("starved", "t", 1, 0.0, attained_service_s=4000.0, queued_since_s=1000.0)
    fresh = Job("fresh", "t", 1, 50.0)
    policy = Tiresias(config=TiresiasConfig(thresholds_gpu_s=(3600.0,), promote_knob=2.0))
    # at t=9000 starved has waited 8000 s >= 2 x 4000 s run: promoted to Q0, ahead of "old"
    state = _state(9000.0, [(old, "h", (0,))], {"h": 1})
    d = policy.schedule(state, [starved])
    assert d.preemptions == ("old",) and [p.job_id for p in d.placements] == ["starved"]
    # at t=5000 it is not promoted yet, and a fresh job (Q0) wins
    d = policy.schedule(_state(5000.0, [(old, "h", (0,))], {"h": 1}), [starved, fresh])
    assert d.preemptions == ("old",) and [p.job_id for p in d.placements] == ["fresh"]
    # and it says when the starved job will be promoted: 1000 + 2 x 4000 = 9000
    assert d.next_decision_s == 9000.0
    # the wait counts from its last preemption (1000), not its submit time (0): not yet
    d = policy.schedule(_state(8500.0, [(old, "h", (0,))], {"h": 1}), [starved])
    assert d.placements == () and d.preemptions == () and d.next_decision_s == 9000.0


def test_tied_running_jobs_rank_by_id_whatever_their_order() -> None:
    # Same queue, priority and submit time: the id decides which one a new top-queue job
    # preempts (the later in queue order), in whatever order the state lists them.
    b = Job("b", "t", 1, 7.0, attained_service_s=5000.0)
    a = Job("a", "t", 1, 7.0, attained_service_s=5000.0)
    for running in ([(b, "h", (0,)), (a, "h", (1,))], [(a, "h", (1,)), (b, "h", (0,))]):
        d = Tiresias().schedule(_state(100.0, running, {"h": 2}), [Job("n", "t", 1, 50.0)])
        assert d.preemptions == ("b",) and d.placements[0].segments == (Segment("h", (0,)),)


def test_tiresias_keeps_a_running_job_against_its_own_queue() -> None:
    running = Job("r", "t", 1, 100.0, attained_service_s=10.0)
    waiting = Job("w", "t", 1, 0.0)
    d = Tiresias().schedule(_state(200.0, [(running, "h", (0,))], {"h": 1}), [waiting])
    assert d.placements == () and d.preemptions == ()
    assert d.next_decision_s == 200.0 + 3600 - 10  # when "r" drops to Q1


def test_preemption_only_when_a_placement_needs_the_gpus() -> None:
    # Two hosts of 2; the low-ranked job holds h0:0-1; a new 1-GPU job fits on free h1.
    low = Job("low", "t", 2, 0.0, attained_service_s=1e6)
    d = Tiresias().schedule(
        _state(10.0, [(low, "h0", (0, 1))], {"h0": 2, "h1": 2}), [Job("n", "t", 1, 5.0)]
    )
    assert d.preemptions == () and d.placements[0].segments == (Segment("h1", (0,)),)


def test_best_fit_variants_consolidate() -> None:
    r = Job("r", "t", 1, 0.0, attained_service_s=1.0)
    state = _state(10.0, [(r, "h1", (0,))], {"h0": 2, "h1": 2})
    first = policies.create("tiresias").schedule(state, [Job("n", "t", 1, 5.0)])
    best = policies.create("tiresias-bestfit").schedule(state, [Job("n", "t", 1, 5.0)])
    assert first.placements[0].segments[0].host == "h0"
    assert best.placements[0].segments[0].host == "h1"  # fills the partly used host


def test_las_next_change_is_when_a_runner_overtakes_the_least_served_waiter() -> None:
    policy = Las("las", Fit.FIRST)
    running = Job("r", "t", 2, 0.0, attained_service_s=100.0)
    waiting = Job("w", "t", 1, 0.0, attained_service_s=700.0)  # level 1 of 600 GPU-s
    d = policy.schedule(_state(50.0, [(running, "h", (0, 1))], {"h": 2}), [waiting])
    assert d.placements == () and d.next_decision_s == 50.0 + (1200 - 100) / 2


def test_srtf_without_hints_falls_back_to_submit_order() -> None:
    jobs = [
        Job("b", "t", 1, 2.0),
        Job("a", "t", 1, 1.0),
        Job("h", "t", 1, 3.0, duration_hint_s=5.0),
    ]
    d = policies.create("srtf").schedule(_state(10.0, [], {"h0": 2}), jobs)
    assert [p.job_id for p in d.placements] == ["h", "a"]


def test_srgt_orders_by_remaining_gpu_time_where_srtf_orders_by_time() -> None:
    # Room for one of them: "wide" ends sooner (50 s), "narrow" holds fewer GPU-seconds (100
    # against 4 x 50); a running job is preempted for the narrower one by the same rule.
    wide = Job("wide", "t", 4, 0.0, duration_hint_s=50.0)
    narrow = Job("narrow", "t", 1, 1.0, duration_hint_s=100.0)
    state = _state(10.0, [], {"h0": 4})
    for name, first in (("srtf", "wide"), ("srgt", "narrow")):
        d = policies.create(name).schedule(state, [wide, narrow])
        assert [p.job_id for p in d.placements] == [first]
    held = Job("held", "t", 4, 0.0, duration_hint_s=60.0, attained_service_s=4 * 10.0)
    busy = _state(10.0, [(held, "h0", (0, 1, 2, 3))], {"h0": 4})
    assert policies.create("srgt").schedule(busy, [narrow]).preemptions == ("held",)
    assert policies.create("srtf").schedule(busy, [narrow]).preemptions == ()


def test_gittins_index_by_hand() -> None:
    table = GittinsTable([10.0, 20.0], delta=10.0)
    # a=0: P(S<=10)=1/2, E[min(S,10)]=10 -> 0.05; a in [10,20): P=1, E=10 -> 0.1; beyond: 0
    assert table.index(0.0) == pytest.approx(0.05)
    assert table.index(15.0) == pytest.approx(0.1)
    assert table.index(25.0) == 0.0


def _gittins_next_change_by_loop(
    policy: Gittins, now: float, jobs: JobColumns, running: np.ndarray
) -> float | None:
    """``Gittins.next_change`` as first written: one running job and one quantum at a time."""
    due = policy._queues.next_change(now, jobs, running)
    if running.all() or not running.any():
        return due
    table, delta = policy.table, policy.config.delta_gpu_s
    thresholds = policy.config.thresholds_gpu_s
    attained = jobs.attained_service_s
    queues = policy._queues.queues(jobs, False, now)
    top = int(queues[~running].min())
    best = float(table.quantum_indices(attained[~running & (queues == top)]).max())
    same = running & (np.searchsorted(thresholds, attained, side="right") == top)
    end = thresholds[top] if top < len(thresholds) else math.inf
    for a, gpus in zip(attained[same].tolist(), jobs.gpus[same].tolist(), strict=True):
        boundary = (math.floor(a / delta) + 1) * delta
        for _ in range(64):
            if boundary >= end:
                break
            if table.index(boundary) < best:
                at = now + (boundary - a) / gpus
                due = at if due is None else min(due, at)
                break
            boundary += delta
    return due


@pytest.mark.parametrize("delta", [3250.0, 700.0])
def test_gittins_next_change_matches_the_job_by_job_loop(delta: float) -> None:
    rng = np.random.default_rng(int(delta))
    samples = rng.lognormal(8.0, 1.5, 400)
    policy = Gittins(config=GittinsConfig(delta_gpu_s=delta, thresholds_gpu_s=(20_000.0,)))
    policy.__dict__["table"] = GittinsTable(samples, delta)
    found = 0
    for case in range(300):
        n = int(rng.integers(2, 12))
        jobs = JobColumns.of(
            [
                Job(
                    f"j{k}",
                    "t",
                    int(rng.choice([1, 2, 4, 8])),
                    0.0,
                    attained_service_s=float(rng.choice([0.0, rng.uniform(0, 40_000)])),
                    queued_since_s=float(rng.uniform(0, 500)),
                )
                for k in range(n)
            ]
        )
        running = rng.random(n) < 0.5
        now = 1000.0 + case
        want = _gittins_next_change_by_loop(policy, now, jobs, running)
        assert policy.next_change(now, jobs, running) == want, case
        found += want != policy._queues.next_change(now, jobs, running)
    assert found > 20  # cases where the look-ahead, not Tiresias' part, decides


def test_gittins_uses_the_shared_distribution() -> None:
    need(SHARED_TRACES / "tiresias" / "yarn-gput10000.csv")
    policy = policies.create("gittins")
    fresh, served = Job("f", "t", 1, 0.0), Job("s", "t", 1, 0.0, attained_service_s=50_000.0)
    d = policy.schedule(_state(10.0, [], {"h": 1}), [served, fresh])
    assert [p.job_id for p in d.placements] == ["f"]


# -- real traces and the CLI --------------------------------------------------------------------


def test_every_baseline_finishes_a_philly_window() -> None:
    t = traces.prepare(need(SHARED_TRACES / "philly" / "philly.csv"), window="30:30.25")
    cluster = ClusterSpec.uniform(8, 8)
    avg = {}
    for name in BASELINES:
        m = simulate(t, cluster, policies.create(name)).metrics()
        assert m.jobs == len(t) and m.unfinished == 0, name
        assert 0 < m.gpu_utilization <= 1 and math.isfinite(m.p99_jct_s)
        avg[name] = m.avg_jct_s
    assert avg["srtf"] <= avg["fifo"]


def test_cluster_specs() -> None:
    assert ClusterSpec.parse("64x8").num_gpus == 512
    spec = ClusterSpec.parse("n32g4", need(SHARED_TRACES / "tiresias"))
    assert (len(spec.hosts), spec.max_gpus_per_host, spec.name) == (32, 4, "n32g4")
    assert len(ClusterSpec.parse("n160g8").hosts) == 160
    with pytest.raises(ValueError, match="unknown cluster"):
        ClusterSpec.parse("huge")


def test_cli_sim_writes_metrics_and_a_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    argv = ["sim", "--trace", str(need(SHARED_TRACES / "tiresias" / "60_job.csv"))]
    argv += ["--policy", "tiresias", "--cluster", "n32g4", "--json", str(out), "--plot", str(png)]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    m = json.loads(out.read_text())
    for key in (
        "jobs",
        "avg_jct_s",
        "p50_jct_s",
        "p99_jct_s",
        "avg_queue_s",
        "makespan_s",
        "gpu_utilization",
        "wall_s",
        "events",
    ):
        assert key in m, key
    assert m["jobs"] == 60 and m["policy"] == "tiresias" and m["gpus"] == 128
    assert m["dropped"] == 0 and m["per_tenant"]["default"]["jobs"] == 60
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_sim_rejects_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sim", "--trace", str(tmp_path / "none.csv"), "--json", str(tmp_path / "x.json")]
    for extra, message in [
        (["--policy", "nope", "--hosts", "1", "--gpus-per-host", "1"], "unknown policy"),
        (["--policy", "fifo", "--hosts", "1", "--gpus-per-host", "1"], "trace not found"),
        (["--policy", "fifo", "--hosts", "1"], "--hosts and --gpus-per-host"),
    ]:
        with pytest.raises(SystemExit) as done:
            main(base + extra)
        assert done.value.code == 2
        assert message in capsys.readouterr().err


def test_cli_output_paths_it_cannot_write_exit_2_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = str(need(SHARED_TRACES / "tiresias" / "60_job.csv"))
    with pytest.raises(SystemExit) as done:
        main(
            [
                "sim",
                "--trace",
                trace,
                "--cluster",
                "n32g4",
                "--policy",
                "fifo",
                "--json",
                str(tmp_path),
            ]
        )
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    assert f"ganglion sim: error: [Errno 21] Is a directory: '{tmp_path}'" in err


def test_cli_eval_rejects_repeated_policies_and_identical_windows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["eval", "--trace", str(need(SHARED_TRACES / "tiresias" / "60_job.csv"))]
    base += ["--cluster", "n32g4", "-o", str(tmp_path / "out")]
    for extra, said in [
        (["--policies", "fifo,las,fifo"], "--policies names fifo more than once"),
        (["--policies", "fifo", "--windows", "2", "--window-days", "30"], "room for one window"),
    ]:
        with pytest.raises(SystemExit) as done:
            main(base + extra)
        assert done.value.code == 2
        assert said in capsys.readouterr().err


def test_cli_eval_writes_a_report(tmp_path: Path) -> None:
    argv = ["eval", "--trace", str(need(SHARED_TRACES / "philly" / "philly.csv"))]
    argv += [
        "--window",
        "34:34.2",
        "--policies",
        "fifo,srtf",
        "--hosts",
        "4",
        "--gpus-per-host",
        "8",
    ]
    argv += ["--windows", "2", "--window-days", "0.05", "-o", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## Summary over windows" in report and "| srtf |" in report
    for name in ("w0_jct_cdf.png", "w0_timeline.png", "w1_jct_cdf.png", "w1_timeline.png"):
        assert (tmp_path / "r" / name).read_bytes()[:4] == b"\x89PNG"
    records = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [r["policy"] for r in records] == ["fifo", "srtf", "fifo", "srtf"]
