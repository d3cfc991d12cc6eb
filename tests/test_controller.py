"""Controller: JobService against a real NATS (JetStream) and real gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest
from nats.aio.client import Client as NatsClient

from ganglion import rpc
from ganglion.bus import NatsServer
from ganglion.domain import Job
from ganglion.v1 import cluster_pb2, controller_pb2, controller_pb2_grpc
from ganglion_controller.__main__ import serve
from ganglion_controller.config import ControllerConfig
from ganglion_controller.jobs import JobTable

CONFIG = ControllerConfig(port=0, interval_s=0.1)


@contextlib.asynccontextmanager
async def running_controller(
    nats_url: str, config: ControllerConfig = CONFIG
) -> AsyncIterator[controller_pb2_grpc.JobServiceAsyncStub]:
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, nats_url, stop=stop, ready=port.set_result))
    try:
        done, _ = await asyncio.wait({task, port}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert port in done, "controller did not start in time"
        channel = rpc.channel(f"127.0.0.1:{port.result()}")
        try:
            yield controller_pb2_grpc.JobServiceStub(channel)
        finally:
            await channel.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def submit(job_id: str, gpus: int = 1) -> controller_pb2.SubmitRequest:
    return controller_pb2.SubmitRequest(job_id=job_id, tenant="t", gpus=gpus, command=["true"])


async def test_submit_get_list(nats_server: NatsServer) -> None:
    async with running_controller(nats_server.url) as stub:
        resp = await stub.Submit(submit("a", 2), timeout=5)
        assert resp.job_id == "a"
        generated = await stub.Submit(
            controller_pb2.SubmitRequest(gpus=1, command=["true"]), timeout=5
        )
        assert generated.job_id and generated.job_id != "a"
        got = (await stub.Get(controller_pb2.GetRequest(job_id="a"), timeout=5)).job
        assert got.job.gpus == 2 and got.job.tenant == "t"
        # No hosts registered: the job waits in the queue.
        assert got.state == cluster_pb2.JOB_STATE_QUEUED
        listing = await stub.List(
            controller_pb2.ListRequest(states=[cluster_pb2.JOB_STATE_QUEUED]), timeout=5
        )
        assert {j.job.id for j in listing.jobs} == {"a", generated.job_id}
        # Re-submitting an id is deduplicated, not queued twice.
        assert (await stub.Submit(submit("a", 2), timeout=5)).job_id == "a"
        assert len((await stub.List(controller_pb2.ListRequest(), timeout=5)).jobs) == 2


async def test_a_job_larger_than_the_live_hosts_says_why_it_waits(
    nats_server: NatsServer,
) -> None:
    """It waited with an empty message; every policy skips it, so nothing else told."""
    async with running_controller(nats_server.url) as stub:
        await stub.Submit(submit("big", 9), timeout=5)
        for _ in range(100):  # bounded: rounds run every interval (0.5 s by default)
            got = (await stub.Get(controller_pb2.GetRequest(job_id="big"), timeout=5)).job
            if got.message:
                break
            await asyncio.sleep(0.1)
        assert got.state == cluster_pb2.JOB_STATE_QUEUED
        assert got.message == "waiting, does not fit: needs 9 GPUs, the live hosts have 0"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (controller_pb2.SubmitRequest(gpus=0, command=["true"]), "gpus"),
        (controller_pb2.SubmitRequest(gpus=100_000, command=["true"]), "gpus"),
        (controller_pb2.SubmitRequest(gpus=1), "command"),
        (controller_pb2.SubmitRequest(gpus=1, command=["true"], job_id="has space"), "job_id"),
        (controller_pb2.SubmitRequest(gpus=1, command=["true"], job_id="a~1"), "job_id"),
        (controller_pb2.SubmitRequest(gpus=1, command=["true"], job_id="a/b"), "job_id"),
        (controller_pb2.SubmitRequest(gpus=1, command=["true"], env={"A=B": "x"}), "env"),
        # 128 characters but 256 bytes: the executor could not name the run's files, failed
        # the Apply after holding its GPUs, and plans to that host failed from then on.
        (controller_pb2.SubmitRequest(gpus=1, command=["true"], job_id="\u00e9" * 128), "job_id"),
        # The executor refuses a whole host's plan over a NUL, so the job poisoned the queue.
        (controller_pb2.SubmitRequest(gpus=1, command=["echo", "a\0b"]), "command[1]"),
        (controller_pb2.SubmitRequest(gpus=1, command=["true"], env={"A": "a\0b"}), "env"),
        # Counted in characters these were 0 bytes, and overflowed the NATS message limit.
        (controller_pb2.SubmitRequest(gpus=1, command=["true", *[""] * 70_000]), "command"),
        (controller_pb2.SubmitRequest(gpus=1, command=["true"], tenant="t" * 2_000), "tenant"),
    ],
)
async def test_bad_submissions_are_invalid_argument(
    nats_server: NatsServer, request_: controller_pb2.SubmitRequest, field: str
) -> None:
    async with running_controller(nats_server.url) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Submit(request_, timeout=5)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert field in (err.value.details() or "")


async def test_unknown_job_is_not_found(nats_server: NatsServer) -> None:
    async with running_controller(nats_server.url) as stub:
        for call in (
            stub.Get(controller_pb2.GetRequest(job_id="nope"), timeout=5),
            stub.Cancel(controller_pb2.CancelRequest(job_id="nope"), timeout=5),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() is grpc.StatusCode.NOT_FOUND


async def test_cancel_queued_job_and_watch(nats_server: NatsServer) -> None:
    async with running_controller(nats_server.url) as stub:
        await stub.Submit(submit("c"), timeout=5)
        stream = stub.Watch(controller_pb2.WatchRequest(job_id="c"), timeout=10)
        first = await asyncio.wait_for(stream.read(), 5)
        assert first.job.state == cluster_pb2.JOB_STATE_QUEUED
        cancelled = await stub.Cancel(controller_pb2.CancelRequest(job_id="c"), timeout=5)
        assert cancelled.job.state == cluster_pb2.JOB_STATE_CANCELLED
        update = await asyncio.wait_for(stream.read(), 5)
        assert update.job.state == cluster_pb2.JOB_STATE_CANCELLED
        assert await asyncio.wait_for(stream.read(), 5) is grpc.aio.EOF


async def test_acknowledged_submission_survives_controller_and_nats_restart(
    nats_server: NatsServer,
) -> None:
    async with running_controller(nats_server.url) as stub:
        await stub.Submit(submit("durable", 4), timeout=5)
        await stub.Submit(submit("gone"), timeout=5)
        await stub.Cancel(controller_pb2.CancelRequest(job_id="gone"), timeout=5)
    # Controller is down; now restart NATS itself over the same store directory.
    nats_server.stop()
    nats_server.start()
    async with running_controller(nats_server.url) as stub:
        job = (await stub.Get(controller_pb2.GetRequest(job_id="durable"), timeout=5)).job
        assert job.state == cluster_pb2.JOB_STATE_QUEUED and job.job.gpus == 4
        gone = (await stub.Get(controller_pb2.GetRequest(job_id="gone"), timeout=5)).job
        assert gone.state == cluster_pb2.JOB_STATE_CANCELLED


async def test_a_submit_that_failed_while_nats_was_down_never_lands(
    nats_server: NatsServer,
) -> None:
    # nats-py buffers a publish made while it reconnects and sends it once the server is back:
    # a Submit answered UNAVAILABLE would then queue its job anyway, and a client that retried
    # without a job id would run it twice.
    async with running_controller(nats_server.url) as stub:
        nats_server.stop()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Submit(submit("lost"), timeout=10)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        nats_server.start()
        for _ in range(100):  # until the controller has reconnected (bounded: ~20 s)
            try:
                await stub.Submit(submit("after"), timeout=5)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        else:
            pytest.fail("the controller did not reconnect to the restarted nats-server")
    async with running_controller(nats_server.url) as stub:  # replays the stream
        await stub.Get(controller_pb2.GetRequest(job_id="after"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Get(controller_pb2.GetRequest(job_id="lost"), timeout=5)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND


async def test_stats_without_decision_service(nats_server: NatsServer) -> None:
    async with running_controller(nats_server.url, replace(CONFIG, decision_addr="")) as stub:
        stats = await stub.Stats(controller_pb2.StatsRequest(), timeout=5)
        assert stats.hosts == 0 and stats.decisions == 0


async def test_queue_order_is_priority_then_submit_time_then_id(nc: NatsClient) -> None:
    table = JobTable(nc.jetstream())
    await table.start()
    for job_id, priority, submit in (("c", 0, 1.0), ("b", 0, 1.0), ("a", 0, 2.0), ("z", 5, 3.0)):
        await table.submit(Job(job_id, "t", 1, submit, priority=priority, command=("true",)))
    assert [r.job.id for r in table.queued()] == ["z", "b", "c", "a"]
    await table.stop()
