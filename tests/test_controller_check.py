"""The controller's guard against a bad decision: ``check_placements`` accepts only
placements consistent with its own view of the cluster (no GPU given twice, ever)."""

from __future__ import annotations

import pytest

from ganglion.domain import ClusterState, Job, Placement, Segment
from ganglion_controller.loop import check_placements

# Host a: GPUs 0-1 held by "r"; host b: 4 free GPUs.
STATE = ClusterState.build(
    0.0,
    {"a": 4, "b": 4},
    allocations={"r": [Segment("a", (0, 1))]},
    running=[Job("r", "t", 2, 0.0)],
)
PENDING = {"one": 1, "two": 2, "four": 4}


def place(job_id: str, *segments: tuple[str, tuple[int, ...]]) -> Placement:
    return Placement(job_id, tuple(Segment(h, d) for h, d in segments), score=0.0)


def ids(placements: list[Placement]) -> list[str]:
    return [p.job_id for p in placements]


def test_consistent_placements_are_accepted_in_order() -> None:
    good = [place("two", ("a", (2, 3))), place("four", ("b", (0, 1, 2, 3)))]
    assert check_placements(STATE, good, PENDING) == good


@pytest.mark.parametrize(
    "bad",
    [
        place("ghost", ("b", (0,))),  # not pending
        place("two", ("b", (0,))),  # fewer GPUs than it asked for
        place("one", ("b", (0, 1))),  # more
        place("two", ("b", (1, 1))),  # the same GPU twice
        place("two", ("b", (0,)), ("b", (1,))),  # two segments on one host
        place("two", ("a", (1, 2))),  # GPU a/1 is busy
        place("one", ("c", (0,))),  # no such host
        place("one", ("b", (7,))),  # no such GPU
    ],
    ids=["unknown", "short", "long", "duplicate", "split", "busy", "host", "device"],
)
def test_inconsistent_placements_are_rejected_and_the_rest_go_on(bad: Placement) -> None:
    after = place("four", ("b", (0, 1, 2, 3)))
    assert ids(check_placements(STATE, [bad, after], PENDING)) == ["four"]


def test_a_gpu_given_twice_in_one_decision_goes_to_the_first_only() -> None:
    first, second = place("two", ("b", (0, 1))), place("one", ("b", (1,)))
    assert ids(check_placements(STATE, [first, second], PENDING)) == ["two"]


def test_placements_onto_gpus_being_freed_by_a_preemption_wait() -> None:
    onto_victim = place("two", ("a", (0, 1)))
    got = check_placements(STATE, [onto_victim], PENDING, freeing={("a", 0), ("a", 1)})
    assert got == []
