"""The heuristic policies and the registry, on literal cluster states."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from ganglion import policies
from ganglion.domain import ClusterState, Decision, Job, JobQueue, Segment, queue_key
from ganglion.policies import UnknownPolicyError
from ganglion.policies.priority import PreemptivePolicy, schedule_by_ranks
from tests.conftest import SHARED_TRACES

BUSY = Job("busy", "t", 1, 0.0)


def job(job_id: str, gpus: int, submit: float = 0.0, priority: int = 0) -> Job:
    return Job(job_id, "t", gpus, submit, priority=priority)


def state(
    host_gpus: dict[str, int], busy: dict[str, tuple[int, ...]] | None = None
) -> ClusterState:
    """``busy``: host -> device indices held by one running job."""
    segments = [Segment(h, idx) for h, idx in (busy or {}).items()]
    return ClusterState.build(
        100.0,
        host_gpus,
        allocations={BUSY.id: segments} if segments else None,
        running=[BUSY] if segments else (),
    )


def schedule(name: str, s: ClusterState, pending: list[Job]) -> Decision:
    return policies.create(name).schedule(s, pending)


def layout(d: Decision) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    return [(p.job_id, [(s.host, s.gpu_indices) for s in p.segments]) for p in d.placements]


# --- FIFO -------------------------------------------------------------------------------------


def test_fifo_places_in_submit_order_first_fit() -> None:
    pending = [job("c", 2, submit=3), job("a", 2, submit=1), job("b", 2, submit=2)]
    d = schedule("fifo", state({"h1": 4, "h2": 4}), pending)
    assert layout(d) == [
        ("a", [("h1", (0, 1))]),
        ("b", [("h1", (2, 3))]),
        ("c", [("h2", (0, 1))]),
    ]
    assert (d.policy, d.version) == ("fifo", policies.create("fifo").version)


def test_fifo_priority_before_submit_time() -> None:
    pending = [job("early", 4, submit=1), job("urgent", 4, submit=2, priority=5)]
    d = schedule("fifo", state({"h1": 4}), pending)
    assert layout(d) == [("urgent", [("h1", (0, 1, 2, 3))])]


def test_fifo_first_fit_takes_first_host_with_room() -> None:
    # h1 has 3 free, h2 has 2 free: first-fit takes h1 although h2 is the tighter fit.
    s = state({"h1": 4, "h2": 4}, busy={"h1": (0,), "h2": (0, 1)})
    d = schedule("fifo", s, [job("j", 2)])
    assert layout(d) == [("j", [("h1", (1, 2))])]
    assert d.placements[0].runner_up_host == "h2"


def test_fifo_head_of_line_blocks_the_rest() -> None:
    s = state({"h1": 4, "h2": 4}, busy={"h1": (0, 1, 2), "h2": (0, 1)})
    pending = [job("big", 4, submit=0), job("small", 1, submit=1)]
    assert schedule("fifo", s, pending).placements == ()


# --- best-fit -----------------------------------------------------------------------------------


def test_best_fit_picks_tightest_host() -> None:
    s = state({"h1": 4, "h2": 4, "h3": 4}, busy={"h1": (0,), "h2": (0, 1)})
    d = schedule("best-fit", s, [job("j", 2)])
    assert layout(d) == [("j", [("h2", (2, 3))])]
    p = d.placements[0]
    assert p.score == 0.0  # no GPU left free on h2
    assert (p.runner_up_host, p.runner_up_score) == ("h1", -1.0)
    assert "best-fit" in p.reason and "h2" in p.reason


def test_best_fit_backfills_past_a_blocked_job() -> None:
    s = state({"h1": 4, "h2": 4}, busy={"h1": (0, 1, 2), "h2": (0, 1)})
    pending = [job("big", 4, submit=0), job("small", 1, submit=1)]
    d = schedule("best-fit", s, pending)
    assert layout(d) == [("small", [("h1", (3,))])]


# --- gang placement ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fifo", "best-fit"])
def test_job_larger_than_a_host_takes_whole_free_hosts(name: str) -> None:
    d = schedule(name, state({"h1": 4, "h2": 4}), [job("wide", 8)])
    assert layout(d) == [("wide", [("h1", (0, 1, 2, 3)), ("h2", (0, 1, 2, 3))])]
    assert d.placements[0].reason == "whole hosts h1+h2 for 8 GPUs"


@pytest.mark.parametrize("name", ["fifo", "best-fit"])
def test_job_larger_than_a_host_never_uses_a_partly_busy_host(name: str) -> None:
    s = state({"h1": 4, "h2": 4, "h3": 4}, busy={"h2": (0,)})
    d = schedule(name, s, [job("wide", 8)])
    assert layout(d) == [("wide", [("h1", (0, 1, 2, 3)), ("h3", (0, 1, 2, 3))])]


@pytest.mark.parametrize("name", ["fifo", "best-fit"])
def test_job_larger_than_the_cluster_is_skipped(name: str) -> None:
    pending = [job("huge", 9, submit=0), job("ok", 2, submit=1)]
    d = schedule(name, state({"h1": 4, "h2": 4}), pending)
    assert [p.job_id for p in d.placements] == ["ok"]


@pytest.mark.parametrize("name", ["fifo", "best-fit"])
def test_empty_cluster_and_empty_queue(name: str) -> None:
    assert schedule(name, state({}), [job("j", 1)]).placements == ()
    assert schedule(name, state({"h1": 4}), []).placements == ()


def test_exact_fit_reason_says_zero_left_free() -> None:
    d = schedule("best-fit", state({"h1": 4}), [job("j", 4)])
    assert d.placements[0].reason == "best-fit on h1 (0 GPUs left free there)"


# --- properties over random states ------------------------------------------------------------


def random_case(rng: random.Random) -> tuple[ClusterState, list[Job]]:
    host_gpus = {f"h{i}": rng.choice([1, 2, 4, 8]) for i in range(rng.randint(1, 6))}
    running: list[Job] = []
    allocations: dict[str, list[Segment]] = {}
    for h, n in host_gpus.items():
        held = [i for i in range(n) if rng.random() < 0.4]
        if held:
            r = Job(f"r-{h}", "t", len(held), 0.0)
            running.append(r)
            allocations[r.id] = [Segment(h, tuple(held))]
    s = ClusterState.build(50.0, host_gpus, allocations, running)
    pending = [
        job(f"p{i}", rng.choice([1, 1, 2, 3, 4, 8, 12, 16, 40]), submit=rng.uniform(0, 50))
        for i in range(rng.randint(0, 12))
    ]
    return s, pending


@pytest.mark.parametrize("name", policies.names())
def test_no_gpu_given_twice_and_only_free_gpus(name: str) -> None:
    rng = random.Random(1234)
    placed_any = 0
    for _ in range(300):
        s, pending = random_case(rng)
        free = {(h, i) for h, idx in s.free_by_host().items() for i in idx}
        asked = {j.id: j.gpus for j in pending}
        d = schedule(name, s, pending)
        seen: set[tuple[str, int]] = set()
        assert len({p.job_id for p in d.placements}) == len(d.placements)
        for p in d.placements:
            gpus = [(seg.host, i) for seg in p.segments for i in seg.gpu_indices]
            assert len(gpus) == asked[p.job_id], p
            assert set(gpus) <= free, (p, free)
            assert not seen & set(gpus), p
            seen.update(gpus)
            assert p.reason
        placed_any += len(d.placements)
    assert placed_any > 100  # the random states exercised placement, not just rejection


@pytest.mark.parametrize("name", policies.names())
def test_deterministic_and_independent_of_input_order(name: str) -> None:
    rng = random.Random(7)
    for _ in range(50):
        s, pending = random_case(rng)
        first = schedule(name, s, pending)
        assert schedule(name, s, pending) == first
        shuffled = list(pending)
        rng.shuffle(shuffled)
        assert policies.create(name).schedule(s, shuffled) == first


@pytest.mark.parametrize("name", policies.names())
def test_a_job_queue_gets_the_same_answer_as_any_order(name: str) -> None:
    # A JobQueue is walked as given (FIFO does not sort it): the same decision as a list in
    # any order, including priorities and submit-time ties broken by id.
    rng = random.Random(11)
    for _ in range(50):
        s, pending = random_case(rng)
        pending = [
            Job(
                j.id,
                j.tenant,
                j.gpus,
                float(int(j.submit_time_s) // 10),
                priority=rng.randint(0, 2),
            )
            for j in pending
        ]
        queue = JobQueue.of(pending)
        assert [queue_key(j) for j in queue] == sorted(queue_key(j) for j in pending)
        rng.shuffle(pending)
        assert schedule(name, s, list(queue)) == schedule(name, s, pending)
        assert policies.create(name).schedule(s, queue) == schedule(name, s, pending)


@pytest.mark.parametrize("name", ["fifo", "best-fit", "tiresias", "srtf"])
def test_columns_in_any_gpu_order_place_the_same(name: str) -> None:
    # ClusterState.host_offsets is None unless the columns are host-major; placement must not
    # depend on which path split the free GPUs by host.
    rng = random.Random(5)
    for _ in range(50):
        s, pending = random_case(rng)
        assert s.host_offsets is not None
        perm = np.array(rng.sample(range(s.num_gpus), s.num_gpus), dtype=np.int64)
        shuffled = ClusterState(
            s.now_s,
            s.hosts,
            s.gpu_host[perm],
            s.gpu_index[perm],
            s.gpu_job[perm],
            s.gpu_utilization[perm],
            s.running,
        )
        if s.num_gpus > 1 and not np.array_equal(perm, np.sort(perm)):
            assert shuffled.host_offsets is None
        assert schedule(name, shuffled, pending) == schedule(name, s, pending)


def preemptive_case(rng: random.Random) -> tuple[ClusterState, list[Job]]:
    """Running and waiting jobs with what the LAS family ranks by: attained service around
    the thresholds, preempted jobs (queued since), hints or none, priorities, and submit
    times that tie (then ids decide, not in submit order)."""
    host_gpus = {f"h{i}": rng.choice([2, 4, 8]) for i in range(rng.randint(1, 5))}

    def make(job_id: str, gpus: int, ran: bool) -> Job:
        submit = float(rng.randint(0, 4))
        return Job(
            job_id,
            "t",
            gpus,
            submit,
            priority=rng.choice([0, 0, 1]),
            attained_service_s=rng.choice([0.0, 500.0, 3599.0, 3600.0, 9000.0, 40000.0])
            if ran or rng.random() < 0.4
            else 0.0,
            duration_hint_s=rng.choice([None, 300.0, 5000.0]),
            queued_since_s=None if ran or rng.random() < 0.5 else submit + rng.uniform(0, 40),
        )

    running: list[Job] = []
    allocations: dict[str, list[Segment]] = {}
    for h, n in host_gpus.items():
        free = list(range(n))
        while free and rng.random() < 0.7:
            take, free = free[: rng.randint(1, len(free))], free[len(free) :]
            r = make(f"r{rng.randint(0, 99):02d}-{h}", len(take), True)
            running.append(r)
            allocations[r.id] = [Segment(h, tuple(take))]
    s = ClusterState.build(50.0, host_gpus, allocations, running)
    pending = [
        make(f"p{rng.randint(0, 99):02d}-{i}", rng.choice([1, 1, 2, 4, 8, 16]), False)
        for i in range(rng.randint(0, 12))
    ]
    return s, pending


@pytest.mark.parametrize("name", ["las", "tiresias", "gittins", "srtf", "srgt", "tiresias-bestfit"])
def test_ranking_by_levels_agrees_with_sorting_the_rank_tuples(name: str) -> None:
    # The LAS family ranks by numpy columns (lexsort, ids only on ties); the generic path
    # sorts the same rank tuples in Python. Same decisions, preemptions and next change.
    if name == "gittins" and not (SHARED_TRACES / "tiresias" / "yarn-gput10000.csv").exists():
        pytest.skip("gittins needs tiresias/yarn-gput10000.csv in the shared traces")
    policy: Any = policies.create(name)
    assert isinstance(policy, PreemptivePolicy)
    next_change = getattr(policy, "next_change", None)
    rng = random.Random(17)
    preempted = due = 0
    for _ in range(200):
        s, pending = preemptive_case(rng)
        expected = schedule_by_ranks(s, pending, policy.rank, policy.fit, name, next_change)
        assert policy.schedule(s, pending) == expected
        assert policy.schedule(s, JobQueue.of(pending)) == expected
        preempted += len(expected.preemptions)
        due += expected.next_decision_s is not None
    assert preempted > 0
    assert (due > 0) == (next_change is not None)


# --- registry ---------------------------------------------------------------------------------


def test_registry_lists_builtins_and_default() -> None:
    assert {"fifo", "best-fit"} <= set(policies.names())
    assert policies.names() == sorted(policies.names())
    assert policies.DEFAULT_POLICY in policies.names()
    assert policies.FALLBACK_POLICY in policies.names()
    for name in policies.names():
        p = policies.create(name)
        assert isinstance(p, policies.Policy)
        assert p.name == name and p.version


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(UnknownPolicyError) as err:
        policies.create("nope")
    assert isinstance(err.value, KeyError)
    assert err.value.name == "nope"
    assert set(err.value.known) == set(policies.names())
    assert "'nope'" in str(err.value)
    for name in policies.names():
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("gpu_host", "gpu_index", "gpu_job", "hosts"),
    [
        ([0, 0], [0, 0], [-1, -1], ("a",)),  # one GPU listed twice
        ([0, 0], [0, 1], [-7, -1], ("a",)),  # gpu_job below -1
        ([0, 1], [0, 0], [-1, -1], ("a", "a")),  # duplicate host names
    ],
)
def test_cluster_state_rejects_states_that_would_double_book(
    gpu_host: list[int], gpu_index: list[int], gpu_job: list[int], hosts: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError):
        ClusterState(
            0.0,
            hosts,
            np.array(gpu_host, np.int32),
            np.array(gpu_index, np.int32),
            np.array(gpu_job, np.int32),
            np.full(len(gpu_host), -1.0, np.float32),
        )
