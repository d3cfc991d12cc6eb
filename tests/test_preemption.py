"""Live preemption: the controller acts on a policy's ``Decision.preemptions``.

A real NATS, a real executor running real processes on simulated GPUs, and the controller
deciding in-process with a small LAS-like test policy (registered for the test only).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from ganglion import bus
from ganglion.bus import NatsServer, events_subject
from ganglion.domain import ClusterState, Decision, Job, JobState, Placement, Segment, queue_key
from ganglion.policies import FreeMap
from ganglion.policies import base as policy_base
from ganglion.policies.placement import Fit
from ganglion.v1 import cluster_pb2, controller_pb2, controller_pb2_grpc, executor_pb2
from ganglion_controller.config import ControllerConfig
from ganglion_controller.hosts import HostDirectory
from ganglion_controller.jobs import JobTable, parse_run_id, run_id
from ganglion_controller.loop import SchedulingLoop, _Executor
from ganglion_executor import ExecutorConfig
from tests.test_controller import running_controller
from tests.test_executor import running_executor

SUCCEEDED = cluster_pb2.JOB_STATE_SUCCEEDED
FAILED = cluster_pb2.JOB_STATE_FAILED
RUNNING = cluster_pb2.JOB_STATE_RUNNING
PREEMPTED = cluster_pb2.JOB_STATE_PREEMPTED
# Sleeps on its first run; a later run (GANGLION_JOB_ID "<id>~<attempt>") ends at once.
RESTARTABLE = "import os, sys, time; os.environ['GANGLION_JOB_ID'].count('~') or time.sleep(30)"


class PreemptLongest:
    """Least attained service first; when the head of the queue does not fit, preempt the
    running job that has received the most service (if it has had > 1 GPU-s more)."""

    name = "test-preempter"
    version = "test"

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision:
        free = FreeMap(state.free_by_host(), state.capacity_by_host())
        order = sorted(pending, key=lambda j: (j.attained_service_s, j.submit_time_s, j.id))
        placements, preemptions, waiting = [], [], False
        for job in order:
            choice = free.choose(job.gpus, Fit.FIRST)
            if choice is None:
                waiting = True
                victim = max(state.running, key=lambda r: r.attained_service_s, default=None)
                if victim and victim.attained_service_s > job.attained_service_s + 1.0:
                    preemptions.append(victim.id)
                break
            free.take(choice.segments)
            placements.append(Placement(job.id, choice.segments, choice.score))
        return Decision(
            tuple(placements),
            self.name,
            self.version,
            preemptions=tuple(preemptions),
            next_decision_s=state.now_s + 0.2 if waiting else None,
        )


def test_run_ids_round_trip() -> None:
    assert run_id("a", 0) == "a" and run_id("a", 3) == "a~3"
    for job_id, attempt in (("a", 0), ("a", 3), ("x-1", 12)):
        assert parse_run_id(run_id(job_id, attempt)) == (job_id, attempt)
    assert parse_run_id("a~0") == ("a~0", 0)  # never produced; not an attempt
    assert parse_run_id("a~") == ("a~", 0)


async def get(stub: controller_pb2_grpc.JobServiceAsyncStub, job_id: str) -> controller_pb2.JobInfo:
    return (await stub.Get(controller_pb2.GetRequest(job_id=job_id), timeout=5)).job


async def wait_state(
    stub: controller_pb2_grpc.JobServiceAsyncStub, job_id: str, state: int, timeout_s: float = 30
) -> controller_pb2.JobInfo:
    deadline = time.monotonic() + timeout_s
    while True:
        info = await get(stub, job_id)
        if info.state == state:
            return info
        assert time.monotonic() < deadline, f"{job_id} never reached {state}: {info}"
        await asyncio.sleep(0.05)


async def test_policy_preemption_requeues_and_restarts_the_job(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(policy_base._REGISTRY, PreemptLongest.name, PreemptLongest)
    executor_config = ExecutorConfig(
        host="h1",
        state_dir=tmp_path / "state",
        port=0,
        backend="sim",
        sim_gpus=2,
        grace_s=2.0,
        stop_jobs_on_exit=True,
        poll_interval_s=0.05,
    )
    config = ControllerConfig(port=0, interval_s=0.1, fallback_policy=PreemptLongest.name)
    async with running_executor(executor_config, nats_server.url) as ex:
        async with running_controller(nats_server.url, config) as stub:
            long = controller_pb2.SubmitRequest(
                job_id="long", gpus=2, command=[sys.executable, "-c", RESTARTABLE]
            )
            await stub.Submit(long, timeout=5)
            await wait_state(stub, "long", RUNNING)
            await asyncio.sleep(1.0)  # > 1 GPU-s of service, so the policy will preempt it
            short = controller_pb2.SubmitRequest(job_id="short", gpus=2, command=["true"])
            await stub.Submit(short, timeout=5)

            done_short = await wait_state(stub, "short", SUCCEEDED)
            done_long = await wait_state(stub, "long", SUCCEEDED)
            stats = await stub.Stats(controller_pb2.StatsRequest(), timeout=5)
            status = await ex.stub.Status(executor_pb2.StatusRequest(), timeout=5)

        runs = {j.job_id: j for j in status.jobs}
        assert set(runs) == {"long", "long~1", "short"}
        assert runs["long"].state == PREEMPTED and runs["long~1"].state == SUCCEEDED
        # The short job ran on the GPUs the preempted run gave up, never beside it.
        assert runs["short"].start_time_s >= runs["long"].end_time_s
        assert runs["long~1"].start_time_s >= runs["short"].end_time_s
        assert done_short.attempt == 0 and done_long.attempt == 1
        # The first run's service carried over: 2 GPUs for about a second or more.
        assert done_long.job.attained_service_s >= 2.0
        assert stats.preemptions == 1

        # A restarted controller replays the same history.
        async with running_controller(nats_server.url, config) as stub:
            again = await get(stub, "long")
            assert again.state == SUCCEEDED and again.attempt == 1
            assert again.job.attained_service_s == done_long.job.attained_service_s


async def publish_event(
    nc: NatsClient, table: JobTable, rid: str, state: int, t: float, seen: Callable[[], bool]
) -> None:
    """Publish an executor event on the events stream and wait until ``table`` applied it."""
    ev = executor_pb2.JobEvent(job_id=rid, host="h1", state=state, time_s=t)
    await nc.jetstream().publish(events_subject("h1"), ev.SerializeToString(), timeout=5)
    deadline = time.monotonic() + 5
    while not seen():
        assert time.monotonic() < deadline, f"event {rid} {state} not applied"
        await asyncio.sleep(0.01)


def assert_reads_match_a_full_scan(table: JobTable) -> None:
    """The table's per-round reads (kept over the jobs not yet ended) say what a scan of
    every job it knows would."""
    everyone = table.all()
    queued = [r for r in everyone if r.state is JobState.QUEUED]
    assert table.queued() == sorted(queued, key=lambda r: queue_key(r.job))
    assert {id(r) for r in table.active()} == {id(r) for r in everyone if r.holds_gpus}
    stopping = {id(r) for r in everyone if r.preempt_requested and r.holds_gpus}
    assert {id(r) for r in table.preempting()} == stopping


async def test_job_table_preemption_history_replays(nc: NatsClient) -> None:
    """Preempted, requeued as attempt 1, events of the old run ignored; a job cancelled while
    stopped is cancelled, not queued again; a fresh table replays the same."""
    js = nc.jetstream()
    table = JobTable(js)
    await table.start()
    for job_id in ("a", "b"):
        await table.submit(Job(job_id, "t", 2, submit_time_s=100.0, command=("true",)))
        await table.mark_placed(job_id, (Segment("h1", (0, 1)),), "test")
        record = table.get(job_id)
        await publish_event(
            nc, table, job_id, RUNNING, 200.0, lambda r=record: r.state is JobState.RUNNING
        )
        assert await table.request_preemption(job_id, "test")
        assert not await table.request_preemption(job_id, "test")  # already stopping
        assert_reads_match_a_full_scan(table)
        await publish_event(nc, table, job_id, PREEMPTED, 210.0, lambda r=record: r.restart_due)
    assert table.active() == []  # stopped runs hold no GPUs
    await table.cancel("b")
    assert_reads_match_a_full_scan(table)
    assert await table.requeue_preempted() == 1
    assert_reads_match_a_full_scan(table)

    a = table.get("a")
    assert a.state is JobState.QUEUED and a.attempt == 1 and a.run_id == "a~1"
    assert a.job.attained_service_s == 20.0 and a.job.queued_since_s == 210.0
    # A late event of the old run changes nothing (applied, but ignored).
    await publish_event(nc, table, "a", SUCCEEDED, 220.0, lambda: True)
    await asyncio.sleep(0.1)
    assert table.get("a").state is JobState.QUEUED
    assert table.get("b").state is JobState.CANCELLED
    assert_reads_match_a_full_scan(table)
    await table.stop()

    replayed = JobTable(js)
    await replayed.start()
    a2, b2 = replayed.get("a"), replayed.get("b")
    assert (a2.state, a2.attempt, a2.job.attained_service_s) == (JobState.QUEUED, 1, 20.0)
    assert b2.state is JobState.CANCELLED
    assert await replayed.requeue_preempted() == 0
    assert_reads_match_a_full_scan(replayed)
    await replayed.stop()


@pytest.mark.parametrize("ended", [SUCCEEDED, FAILED])
async def test_a_run_asked_to_stop_is_requeued_however_it_ended(nc: NatsClient, ended: int) -> None:
    """The executor was down when the job exited on its SIGTERM: on restart it reports only
    the exit code (0 or 143). The job was preempted, so it goes back to the queue."""
    table = JobTable(nc.jetstream())
    await table.start()
    await table.submit(Job("p", "t", 1, submit_time_s=100.0, command=("true",)))
    await table.mark_placed("p", (Segment("h1", (0,)),), "test")
    record = table.get("p")
    await publish_event(nc, table, "p", RUNNING, 200.0, lambda: record.state is JobState.RUNNING)
    assert await table.request_preemption("p", "test")
    await publish_event(nc, table, "p", ended, 205.0, lambda: record.restart_due)
    assert await table.requeue_preempted() == 1
    assert (table.get("p").state, table.get("p").attempt) == (JobState.QUEUED, 1)
    await table.stop()


async def test_a_passed_decision_deadline_does_not_spin_the_loop(nc: NatsClient) -> None:
    """A policy's next_decision_s that passes while nothing waits is dropped, so the loop
    goes back to its interval instead of waking with a zero timeout."""
    js = nc.jetstream()
    table = JobTable(js)
    await table.start()
    hosts = HostDirectory(await js.key_value(bus.HOSTS_BUCKET), stale_s=60.0)
    config = ControllerConfig(port=0, interval_s=0.5)
    loop = SchedulingLoop(config, table, hosts)
    loop._next_decision_at = time.time() - 1.0
    assert loop._wait_s() == 0.0
    await asyncio.wait_for(loop.round(), 5)
    assert loop._wait_s() == config.interval_s
    await loop.close()
    await table.stop()


async def test_a_host_whose_apply_fails_is_held_off_instead_of_retried_at_once(
    nc: NatsClient,
) -> None:
    """An executor that is registered but does not answer: each failed Apply requeues the
    job and wakes the loop; without a hold-off the job went back to that host hundreds of
    times a second, writing two durable records each time."""
    js = nc.jetstream()
    kv = await js.key_value(bus.HOSTS_BUCKET)
    dead = executor_pb2.ExecutorInfo(
        host="dead", address=f"127.0.0.1:{bus.free_port()}", gpu_count=2, time_s=time.time()
    )
    await kv.put(bus.executor_key("dead"), dead.SerializeToString())
    table = JobTable(js)
    await table.start()
    hosts = HostDirectory(kv, stale_s=60.0)
    await hosts.start()
    for _ in range(100):  # until the directory has read the registration (bounded: ~5 s)
        if "dead" in hosts.live():
            break
        await asyncio.sleep(0.05)
    await table.submit(Job("w", "t", 1, submit_time_s=100.0, command=("true",)))
    loop = SchedulingLoop(ControllerConfig(port=0, interval_s=0.1), table, hosts)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.wait_for(running, 10)
    # Tries at about 0, 0.5, 1.5 s (0.5 s doubling): a handful, not hundreds.
    assert 1 <= loop.stats.jobs_placed <= 4
    assert table.get("w").state is JobState.QUEUED
    await loop.close()
    await hosts.stop()
    await table.stop()


async def test_a_cancelled_job_whose_apply_failed_ends_cancelled(nc: NatsClient) -> None:
    """Placed, cancelled before it ran, then taken back because its Apply failed: it was
    queued again (and could run), though its Cancel had been answered."""
    js = nc.jetstream()
    table = JobTable(js)
    await table.start()
    await table.submit(Job("c", "t", 1, submit_time_s=100.0, command=("true",)))
    await table.mark_placed("c", (Segment("h1", (0,)),), "test")
    await table.cancel("c")
    assert table.get("c").state is JobState.SCHEDULED  # the executor may have started it
    assert [r.job.id for r in table.stopping()] == ["c"]  # so each round asks it to stop
    await table.requeue("c", "apply failed; requeued")
    assert table.get("c").state is JobState.CANCELLED and table.stopping() == []
    assert_reads_match_a_full_scan(table)
    await table.stop()
    replayed = JobTable(js)
    await replayed.start()
    assert replayed.get("c").state is JobState.CANCELLED
    assert replayed.queued() == []
    await replayed.stop()


async def test_the_does_not_fit_note_follows_the_live_capacity(nc: NatsClient) -> None:
    table = JobTable(nc.jetstream())
    await table.start()
    await table.submit(Job("big", "t", 8, submit_time_s=100.0, command=("true",)))
    table.note_unfit(table.queued(), 4)
    assert table.get("big").message == "waiting, does not fit: needs 8 GPUs, the live hosts have 4"
    table.note_unfit(table.queued(), 16)  # a host came: the note goes
    assert table.get("big").message == ""
    table.get("big").message = "preempted (attempt 1); queued again"
    table.note_unfit(table.queued(), 16)  # another message is left as it is
    assert table.get("big").message == "preempted (attempt 1); queued again"
    await table.stop()


async def test_a_placement_taken_back_runs_again_under_a_new_run_id(nc: NatsClient) -> None:
    """Its Apply failed (perhaps after the executor carried it out): queued again as the next
    attempt. Under the same run id, an executor that had the old run took the next placement
    for it, and the job waited SCHEDULED for ever."""
    js = nc.jetstream()
    table = JobTable(js)
    await table.start()
    await table.submit(Job("u", "t", 1, submit_time_s=100.0, command=("true",)))
    await table.mark_placed("u", (Segment("h1", (0,)),), "test")
    await table.requeue("u", "apply failed; requeued")
    record = table.get("u")
    assert (record.state, record.attempt, record.run_id) == (JobState.QUEUED, 1, "u~1")
    assert record.message == "apply failed; requeued"
    # An event of the undone run changes nothing.
    await publish_event(nc, table, "u", RUNNING, 200.0, lambda: True)
    await asyncio.sleep(0.1)
    assert table.get("u").state is JobState.QUEUED
    await table.stop()
    replayed = JobTable(js)
    await replayed.start()
    assert (replayed.get("u").state, replayed.get("u").attempt) == (JobState.QUEUED, 1)
    await replayed.stop()


async def test_a_job_cancelled_after_its_placement_was_written_is_not_applied(
    nc: NatsClient,
) -> None:
    """The Cancel's write lands while the placement's is under way: the placement is taken
    (SCHEDULED), then the cancel. Its Apply was still sent and the job started."""
    js = nc.jetstream()
    table = JobTable(js)
    await table.start()
    await table.submit(Job("late", "t", 1, submit_time_s=100.0, command=("true",)))
    await table.mark_placed("late", (Segment("h1", (0,)),), "test")
    await table.cancel("late")
    hosts = HostDirectory(await js.key_value(bus.HOSTS_BUCKET), stale_s=60.0)
    loop = SchedulingLoop(ControllerConfig(port=0), table, hosts)
    record = table.get("late")
    # No executor is known for h1: an Apply attempt would fail (False) and undo the job.
    assert await asyncio.wait_for(loop._apply("h1", [(record, record.segments[0])]), 5)
    assert table.get("late").state is JobState.CANCELLED
    await table.stop()


async def test_a_cancelled_run_no_executor_has_ends_cancelled(
    nats_server: NatsServer, nc: NatsClient, tmp_path: Path
) -> None:
    """Its executor came back without it (a new state dir): the Preempt sent every round was
    answered NOT_FOUND for ever, with a warning each time, and the job held its GPUs."""
    js = nc.jetstream()
    table = JobTable(js)
    await table.start()
    await table.submit(Job("gone", "t", 1, submit_time_s=100.0, command=("true",)))
    await table.mark_placed("gone", (Segment("h1", (0,)),), "test")
    await table.cancel("gone")
    hosts = HostDirectory(await js.key_value(bus.HOSTS_BUCKET), stale_s=60.0)
    loop = SchedulingLoop(ControllerConfig(port=0), table, hosts)
    executor_config = ExecutorConfig(
        host="h1", state_dir=tmp_path / "state", port=0, backend="sim", sim_gpus=1
    )
    async with running_executor(executor_config, nats_server.url):
        await hosts.start()
        for _ in range(100):  # bounded: until the executor's registration is read
            if "h1" in hosts.live():
                break
            await asyncio.sleep(0.05)
        loop._executors["h1"] = _Executor(hosts.live()["h1"])  # known, not re-synced
        await asyncio.wait_for(loop._stop_run("gone", table.get("gone").segments), 10)
        assert table.get("gone").state is JobState.CANCELLED
    await hosts.stop()
    await table.stop()


async def test_a_preempted_run_no_executor_has_is_queued_again(
    nats_server: NatsServer, nc: NatsClient, tmp_path: Path
) -> None:
    """As for a cancel: a policy's preemption of a run its executor lost was asked again
    every round, and the job held its GPUs for ever."""
    js = nc.jetstream()
    table = JobTable(js)
    await table.start()
    await table.submit(Job("lost", "t", 1, submit_time_s=100.0, command=("true",)))
    await table.mark_placed("lost", (Segment("h1", (0,)),), "test")
    assert await table.request_preemption("lost", "test")
    hosts = HostDirectory(await js.key_value(bus.HOSTS_BUCKET), stale_s=60.0)
    loop = SchedulingLoop(ControllerConfig(port=0), table, hosts)
    executor_config = ExecutorConfig(
        host="h1", state_dir=tmp_path / "state", port=0, backend="sim", sim_gpus=1
    )
    async with running_executor(executor_config, nats_server.url):
        await hosts.start()
        for _ in range(100):  # bounded: until the executor's registration is read
            if "h1" in hosts.live():
                break
            await asyncio.sleep(0.05)
        loop._executors["h1"] = _Executor(hosts.live()["h1"])  # known, not re-synced
        await asyncio.wait_for(loop._stop_run("lost", table.get("lost").segments), 10)
        record = table.get("lost")
        assert (record.state, record.attempt) == (JobState.QUEUED, 1)
        assert table.stopping() == []
    await hosts.stop()
    await table.stop()
