"""``FreeMap`` (the gang placement every policy shares) against a brute-force reference, on
random clusters: which host, which devices, the runner-up, and the free GPUs after each take."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ganglion.domain import ClusterState, Job, Segment
from ganglion.policies import FreeMap
from ganglion.policies.placement import Choice, Fit

Free = dict[str, list[int]]


def reference(free: Free, capacity: dict[str, int], gpus: int, fit: Fit) -> Choice | None:
    """The placement rule written as plainly as possible (module docstring of placement)."""
    if gpus > max(capacity.values(), default=0):
        idle = [h for h in free if capacity[h] > 0 and len(free[h]) == capacity[h]]
        segments, need = [], gpus
        for h in idle:
            if need <= 0:
                break
            take = min(need, capacity[h])
            segments.append(Segment(h, tuple(sorted(free[h])[:take])))
            need -= take
        if need > 0:
            return None
        spare = idle[len(segments)] if len(idle) > len(segments) else ""
        return Choice(tuple(segments), float(-len(segments)), spare, 0.0)
    order = list(free)
    roomy = [h for h in order if len(free[h]) >= gpus]
    if fit is Fit.BEST:
        roomy.sort(key=lambda h: (len(free[h]), order.index(h)))
    if not roomy:
        return None
    host = roomy[0]
    runner = (roomy[1], float(gpus - len(free[roomy[1]]))) if len(roomy) > 1 else ("", 0.0)
    segment = Segment(host, tuple(sorted(free[host])[:gpus]))
    return Choice((segment,), float(gpus - len(free[host])), *runner)


def random_state(rng: random.Random, host_major: bool) -> ClusterState:
    """Hosts of 0-8 GPUs, some held by running jobs; columns shuffled unless host-major."""
    sizes = {f"h{i}": rng.choice([0, 1, 2, 4, 8, 8]) for i in range(rng.randint(1, 12))}
    columns = [(h, d) for h, n in sizes.items() for d in range(n)]
    busy = [c for c in columns if rng.random() < 0.4]
    running = tuple(Job(f"r{k}", "t", 1, 0.0) for k in range(len(busy)))
    holder = {c: k for k, c in enumerate(busy)}
    if not host_major:
        rng.shuffle(columns)
    hosts = tuple(sizes)
    return ClusterState(
        now_s=0.0,
        hosts=hosts,
        gpu_host=np.array([hosts.index(h) for h, _ in columns], dtype=np.int32),
        gpu_index=np.array([d for _, d in columns], dtype=np.int32),
        gpu_job=np.array([holder.get(c, -1) for c in columns], dtype=np.int32),
        gpu_utilization=np.zeros(len(columns), dtype=np.float32),
        running=running,
    )


@pytest.mark.parametrize("fit", list(Fit))
@pytest.mark.parametrize("host_major", [True, False])
def test_choices_and_takes_match_the_reference(fit: Fit, host_major: bool) -> None:
    rng = random.Random(f"{fit.value}-{host_major}")
    for _ in range(150):
        state = random_state(rng, host_major)
        free_map = FreeMap.from_state(state)
        free, capacity = state.free_by_host(), state.capacity_by_host()
        assert free_map.free == free
        for _ in range(12):
            gpus = rng.randint(1, 20)
            want = reference(free, capacity, gpus, fit)
            assert free_map.may_fit(gpus) == (want is not None)
            got = free_map.choose(gpus, fit)
            assert got == want, (free, gpus)
            if got is None:
                continue
            free_map.take(got.segments)
            for seg in got.segments:
                free[seg.host] = [d for d in free[seg.host] if d not in seg.gpu_indices]
            assert free_map.free == free
            assert free_map.total_free == sum(map(len, free.values()))
            assert free_map.largest == max(map(len, free.values()), default=0)


def test_take_ignores_gpus_that_are_not_free_in_this_map() -> None:
    """A choice made in a map that also offers a running job's GPUs (a preemption) is taken
    from the map of free GPUs too: only its free GPUs go."""
    state = ClusterState.build(
        0.0,
        {"a": 4, "b": 4},
        allocations={"r": [Segment("a", (0, 1))]},
        running=[Job("r", "t", 2, 0.0)],
    )
    free_now = FreeMap.from_state(state)
    with_victim = FreeMap.from_state(state, also_free=state.gpu_job == 0)
    choice = with_victim.choose(4, Fit.FIRST)
    assert choice is not None and choice.segments == (Segment("a", (0, 1, 2, 3)),)
    free_now.take(choice.segments)
    with_victim.take(choice.segments)
    assert free_now.free == {"a": [], "b": [0, 1, 2, 3]}
    assert free_now.holds(Segment("b", (1, 3))) and not free_now.holds(Segment("a", (2,)))
    assert not free_now.holds(Segment("nowhere", (0,)))
    assert with_victim.free == free_now.free
    assert (free_now.total_free, with_victim.total_free) == (4, 4)


def test_literal_free_lists_are_kept_sorted_and_a_job_larger_than_a_host_takes_idle_hosts() -> None:
    free_map = FreeMap({"a": [3, 1, 2, 0], "b": [1], "c": [0, 1, 2, 3]}, {"a": 4, "b": 4, "c": 4})
    assert free_map.free == {"a": [0, 1, 2, 3], "b": [1], "c": [0, 1, 2, 3]}
    assert free_map.idle == 8
    choice = free_map.choose(6, Fit.BEST)
    assert choice is not None
    assert choice.segments == (Segment("a", (0, 1, 2, 3)), Segment("c", (0, 1)))
    assert free_map.choose(9, Fit.FIRST) is None
    with pytest.raises(ValueError, match="positive"):
        free_map.choose(0, Fit.FIRST)
