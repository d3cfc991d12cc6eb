"""``ClusterState``'s checks, the layout facts they find on the way (``host_offsets``), and a
state whose running jobs come later (``ClusterState.lazy``) checked like any other."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from ganglion.domain import ClusterState, Job, JobColumns, JobQueue, StaleQueueError

RUNNING = (Job("r0", "t", 2, 1.0), Job("r1", "u", 1, 2.0, attained_service_s=5.0))

Columns = tuple[list[int], list[int], list[int], tuple[str, ...]]

# (gpu_host, gpu_index, gpu_job, hosts), each valid, against two running jobs.
HOST_MAJOR: Columns = ([0, 0, 1, 1, 1], [0, 1, 0, 1, 2], [0, 0, -1, 1, -1], ("a", "b"))
SHUFFLED: Columns = ([1, 0, 1, 0, 1], [2, 1, 0, 0, 1], [-1, 0, -1, 0, 1], ("a", "b"))
GAPS: Columns = ([0, 0, 2], [1, 3, 0], [-1, 1, 0], ("a", "b", "c"))  # host b has no GPUs

# Each breaks one rule; some only in an order the host-major shortcut sees first.
BAD: dict[str, Columns] = {
    "a GPU listed twice, host-major order": ([0, 0, 1], [0, 0, 0], [-1, -1, -1], ("a", "b")),
    "a GPU listed twice, apart": ([0, 1, 0], [0, 0, 0], [-1, -1, -1], ("a", "b")),
    "gpu_host past hosts, last": ([0, 0, 2], [0, 1, 0], [-1, -1, -1], ("a", "b")),
    "gpu_host past hosts, unordered": ([2, 0, 0], [0, 1, 0], [-1, -1, -1], ("a", "b")),
    "gpu_host negative, first": ([-1, 0, 1], [0, 0, 0], [-1, -1, -1], ("a", "b")),
    "gpu_host negative, unordered": ([0, -1, 1], [0, 0, 0], [-1, -1, -1], ("a", "b")),
    "gpu_job past running": ([0, 0], [0, 1], [2, -1], ("a",)),
    "gpu_job below -1": ([0, 0], [0, 1], [-1, -2], ("a",)),
    "duplicate host names": ([0, 1], [0, 0], [-1, -1], ("a", "a")),
    "a column too short": ([0, 0], [0], [-1, -1], ("a",)),
}


def arrays(
    columns: Columns,
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    gpu_host, gpu_index, gpu_job, hosts = columns
    return (
        hosts,
        np.array(gpu_host, np.int32),
        np.array(gpu_index, np.int32),
        np.array(gpu_job, np.int32),
        np.full(len(gpu_host), -1.0, np.float32),
    )


def eager(columns: Columns, running: tuple[Job, ...] = RUNNING) -> ClusterState:
    return ClusterState(5.0, *arrays(columns), running)


def lazy(
    columns: Columns,
    running: Callable[[], tuple[Job, ...]] = lambda: RUNNING,
    running_columns: Callable[[], JobColumns] | None = None,
    num_running: int = len(RUNNING),
) -> ClusterState:
    return ClusterState.lazy(5.0, *arrays(columns), num_running, running, running_columns)


def offsets_by_definition(state: ClusterState) -> tuple[int, ...] | None:
    """``host_offsets`` from its docstring: bounds per host when the columns are host-major."""
    pairs = list(zip(state.gpu_host.tolist(), state.gpu_index.tolist(), strict=True))
    if pairs != sorted(set(pairs)):
        return None
    return tuple(sum(1 for h, _ in pairs if h < i) for i in range(len(state.hosts) + 1))


@pytest.mark.parametrize("columns", [HOST_MAJOR, SHUFFLED, GAPS], ids=["major", "shuffled", "gaps"])
@pytest.mark.parametrize("make", [eager, lazy], ids=["constructor", "lazy"])
def test_host_offsets_found_by_the_checks_match_their_definition(
    columns: Columns, make: Callable[[Columns], ClusterState]
) -> None:
    state = make(columns)
    assert state.host_offsets == offsets_by_definition(state)
    assert state.host_capacity == tuple(
        state.gpu_host.tolist().count(i) for i in range(len(state.hosts))
    )


def test_an_empty_cluster_has_zero_offsets() -> None:
    state = eager(([], [], [], ("a", "b")), ())
    assert state.host_offsets == (0, 0, 0)


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("make", [eager, lazy], ids=["constructor", "lazy"])
def test_inconsistent_columns_are_refused(
    case: str, make: Callable[[Columns], ClusterState]
) -> None:
    with pytest.raises(ValueError):
        make(BAD[case])


def test_a_lazy_state_builds_its_running_jobs_once_on_first_read() -> None:
    calls: list[str] = []

    def jobs() -> tuple[Job, ...]:
        calls.append("jobs")
        return RUNNING

    def columns() -> JobColumns:
        calls.append("columns")
        return JobColumns.of(RUNNING)

    state = lazy(HOST_MAJOR, jobs, columns)
    assert calls == []  # checked without building either
    assert state.running == RUNNING and state.running is state.running
    assert state.running_columns is state.running_columns
    assert calls == ["jobs", "columns"]


def test_a_lazy_state_without_a_columns_builder_derives_them_from_its_jobs() -> None:
    got, want = lazy(HOST_MAJOR).running_columns, JobColumns.of(RUNNING)
    for name in ("ids", "priority", "gpus", "submit_time_s", "attained_service_s"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist()


def test_a_lazy_state_checks_gpu_job_against_the_count_it_was_given() -> None:
    with pytest.raises(ValueError, match="not in running"):
        lazy(HOST_MAJOR, num_running=1)  # gpu_job refers to job 1


def test_a_builder_that_breaks_its_count_fails_on_first_read() -> None:
    state = lazy(HOST_MAJOR, lambda: RUNNING[:1], lambda: JobColumns.of(RUNNING[:1]))
    with pytest.raises(ValueError, match="came to 1, not 2"):
        state.running  # noqa: B018 - the read is the test
    with pytest.raises(ValueError, match="came to 1, not 2"):
        state.running_columns  # noqa: B018


def test_one_state_building_its_running_jobs_does_not_hold_up_another() -> None:
    """A large request decided on a worker thread builds its running jobs there; another
    state read meanwhile on the event loop must not wait for it (a lock shared by every
    instance, as ``functools.cached_property`` holds on Python 3.11, made it wait)."""
    building, other_read, built = threading.Event(), threading.Event(), threading.Event()

    def slow_jobs() -> tuple[Job, ...]:
        building.set()
        other_read.wait(10.0)  # released once the other state has been read
        built.set()
        return RUNNING

    big, small = lazy(HOST_MAJOR, slow_jobs), lazy(HOST_MAJOR)
    worker = threading.Thread(target=lambda: big.running)
    worker.start()
    try:
        assert building.wait(10.0)
        assert small.running == RUNNING and len(small.running_columns) == 2
        assert not built.is_set()  # read while the other was still building: no wait
        other_read.set()
    finally:
        other_read.set()
        worker.join(10.0)
    assert not worker.is_alive() and big.running == RUNNING


def test_a_job_queue_view_is_readable_until_its_owner_changes_the_queue() -> None:
    jobs = [Job("a", "t", 1, 0.0), Job("b", "t", 2, 1.0)]
    version = [0]
    seen = version[0]
    queue = JobQueue.view(jobs, lambda: version[0] == seen)
    assert len(queue) == 2 and queue[1].id == "b" and queue == tuple(jobs)
    assert queue == JobQueue.of(reversed(jobs))  # compares as tuples do
    assert queue.columns.ids.tolist() == ["a", "b"]
    jobs.pop(0)
    version[0] += 1
    for read in (len, list, lambda q: q.columns, lambda q: q[0]):
        with pytest.raises(StaleQueueError):
            read(queue)
    assert repr(queue) == "JobQueue(<stale view>)"  # logs and debuggers do not raise
