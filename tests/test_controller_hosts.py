"""The controller's HostDirectory against a real NATS hosts bucket: catch-up from a fresh
start, live updates, deletions, staleness, and entries it cannot decode. Telemetry here is
simulated GPUs (made-up utilisation on made-up devices)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from ganglion import bus
from ganglion.bus import NatsServer
from ganglion.convert import pack_utilization
from ganglion.v1 import executor_pb2, telemetry_pb2
from ganglion_controller.hosts import HostDirectory

WAIT_S = 5.0


@pytest.fixture
async def kv(nc: NatsClient) -> KeyValue:
    return await nc.jetstream().key_value(bus.HOSTS_BUCKET)


@pytest.fixture
async def directory(kv: KeyValue) -> AsyncIterator[HostDirectory]:
    d = HostDirectory(kv, stale_s=60.0)
    yield d
    await asyncio.wait_for(d.stop(), WAIT_S)


async def eventually(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def register(kv: KeyValue, host: str, address: str, gpus: int, time_s: float) -> None:
    info = executor_pb2.ExecutorInfo(host=host, address=address, gpu_count=gpus, time_s=time_s)
    await kv.put(bus.executor_key(host), info.SerializeToString())


async def sample(
    kv: KeyValue, host: str, utilization: dict[int, int | None], packed: bool = False
) -> None:
    """A simulated sample: one GPU per entry, utilisation unset where None; ``packed`` adds
    the packed column as the sensing publisher does."""
    gpus = [
        telemetry_pb2.GpuSample(index=i, gpu_utilization_percent=u) for i, u in utilization.items()
    ]
    msg = telemetry_pb2.HostSample(
        host=host, backend=telemetry_pb2.COLLECTOR_BACKEND_SIM, gpus=gpus
    )
    if packed:
        pack_utilization(msg)
    await kv.put(bus.telemetry_key(host), msg.SerializeToString())


async def test_catches_up_then_follows_updates_and_deletions(
    kv: KeyValue, directory: HostDirectory
) -> None:
    now = time.time()
    await register(kv, "h2", "127.0.0.1:2", 4, now)
    await register(kv, "h1", "127.0.0.1:1", 2, now - 1)
    await register(kv, "h1", "127.0.0.1:11", 2, now)  # only the last value counts
    await sample(kv, "h1", {0: 75, 1: None})
    await sample(kv, "h2", {0: 0, 1: 30, 2: 100, 3: None})

    await directory.start()
    await eventually(lambda: len(directory.live()) == 2 and len(directory.utilization()) == 4)
    assert {h: (v.address, v.gpu_count) for h, v in directory.live().items()} == {
        "h1": ("127.0.0.1:11", 2),
        "h2": ("127.0.0.1:2", 4),
    }
    assert list(directory.live()) == ["h1", "h2"]  # sorted: a stable cluster order
    # A zero reading is a reading; an unset one is unknown and absent.
    assert directory.utilization() == {("h1", 0): 75, ("h2", 0): 0, ("h2", 1): 30, ("h2", 2): 100}
    assert directory.changed.is_set()

    directory.changed.clear()
    await register(kv, "h1", "127.0.0.1:12", 2, now + 1)
    await eventually(lambda: directory.live()["h1"].address == "127.0.0.1:12")
    assert directory.changed.is_set()

    directory.changed.clear()
    seen = directory.live()["h1"].seen_s
    await asyncio.sleep(0.01)
    await register(kv, "h1", "127.0.0.1:12", 2, now + 2)  # a heartbeat: same address
    await eventually(lambda: directory.live()["h1"].seen_s > seen)
    assert not directory.changed.is_set()

    await register(kv, "h0", "127.0.0.1:3", 1, now)
    await kv.delete(bus.executor_key("h2"))
    await kv.purge(bus.telemetry_key("h1"))
    await eventually(lambda: list(directory.live()) == ["h0", "h1"])
    await eventually(lambda: set(directory.utilization()) == {("h2", 0), ("h2", 1), ("h2", 2)})

    await sample(kv, "h2", {0: None, 1: 31, 2: None, 3: 5})  # readings come and go per GPU
    await eventually(lambda: directory.utilization() == {("h2", 1): 31, ("h2", 3): 5})


async def test_liveness_trusts_the_executors_clock_only_within_bounds(
    kv: KeyValue, directory: HostDirectory
) -> None:
    now = time.time()
    await register(kv, "slow", "127.0.0.1:1", 1, now - 120)  # a clock 2 minutes behind
    await register(kv, "fast", "127.0.0.1:2", 1, now + 3600)  # an hour ahead
    await register(kv, "died", "127.0.0.1:3", 1, now - 20)  # its last refresh, 20 s ago
    await directory.start()
    await eventually(lambda: {"slow", "fast"} <= set(directory.live()))
    views = directory.live(now=0)
    arrived = views["fast"].seen_s
    assert arrived <= time.time()  # not an hour ahead: it would stay live for an hour
    assert views["slow"].seen_s == pytest.approx(arrived - 30, abs=1)  # stale_s / 2 before
    assert views["died"].seen_s == pytest.approx(now - 20, abs=1)  # replayed: as old as it is
    assert list(directory.live(now=arrived + 59)) == ["fast"]  # stale_s = 60
    assert list(directory.live(now=arrived + 61)) == []  # no refresh: gone, fast or not
    await register(kv, "slow", "127.0.0.1:1", 1, time.time() - 120)  # refreshed: live again
    await eventually(lambda: directory.live(now=0)["slow"].seen_s > arrived - 30 + 0.001)
    assert "slow" in directory.live()


async def test_impossible_values_are_dropped_not_passed_on(
    kv: KeyValue, directory: HostDirectory
) -> None:
    now = time.time()
    await register(kv, "h1", "127.0.0.1:1", 4, now)
    await register(kv, "huge", "127.0.0.1:2", 2**32 - 1, now)  # would allocate 16 GiB a round
    nan = telemetry_pb2.HostSample(host="h1", backend=telemetry_pb2.COLLECTOR_BACKEND_SIM)
    nan.gpu_utilization_by_index.extend([10, float("nan"), float("inf"), 250])
    await kv.put(bus.telemetry_key("h1"), nan.SerializeToString())
    far = telemetry_pb2.HostSample(host="far", gpus=[telemetry_pb2.GpuSample(index=2**32 - 1)])
    await kv.put(bus.telemetry_key("far"), far.SerializeToString())  # 12 bytes
    await directory.start()
    await eventually(lambda: "h1" in directory.live() and ("h1", 0) in directory.utilization())
    await eventually(lambda: directory.rejected == 1)  # the registration of 2^32-1 GPUs
    assert list(directory.live()) == ["h1"]
    # A NaN made the decision service refuse every request, so every round fell back.
    assert directory.utilization_column({"h1": 4}).tolist() == [10, -1, -1, -1]
    assert directory.rejected == 2
    assert directory.utilization_column({"h1": 4}).tolist() == [10, -1, -1, -1]  # mended
    await eventually(lambda: "far" in directory._util)  # a 12-byte sample naming GPU 2^32-1
    assert len(directory._util["far"]) == bus.MAX_HOST_GPUS  # not a 16 GiB array
    await sample(kv, "h1", {0: 20, 1: 30})  # the directory still follows the bucket
    await eventually(lambda: directory.utilization() == {("h1", 0): 20, ("h1", 1): 30})


async def test_the_view_catches_up_soon_after_a_nats_restart(tmp_path: Path) -> None:
    server = await asyncio.to_thread(NatsServer(store_dir=tmp_path).start)
    nc = await bus.connect(server.url, "hosts-restart-test")
    directory = None
    try:
        kv = await bus.ensure_streams(nc.jetstream())
        directory = HostDirectory(kv, stale_s=60.0)
        await directory.start()
        await register(kv, "before", "127.0.0.1:1", 1, time.time())
        await eventually(lambda: "before" in directory.live())
        await asyncio.to_thread(server.stop)
        server = await asyncio.to_thread(NatsServer(port=server.port, store_dir=tmp_path).start)
        deadline = time.monotonic() + 20
        while not nc.is_connected:  # bounded by the deadline
            assert time.monotonic() < deadline, "no reconnection"
            await asyncio.sleep(0.05)
        back = time.monotonic()
        while True:  # the registration is retried as an executor's refresh would be
            with contextlib.suppress(Exception):
                await asyncio.wait_for(register(kv, "after", "127.0.0.1:2", 1, time.time()), 1)
            if "after" in directory.live():
                break
            assert time.monotonic() < deadline, "the directory never saw the new registration"
            await asyncio.sleep(0.2)
        # nats-py's 5 s heartbeat default took 10-15 s here; a 1 s heartbeat takes 2-4 s.
        assert time.monotonic() - back < 10.0
    finally:
        if directory is not None:
            await asyncio.wait_for(directory.stop(), WAIT_S)
        await nc.close()
        await asyncio.to_thread(server.stop)


async def test_an_undecodable_entry_is_skipped_and_counted(
    kv: KeyValue, directory: HostDirectory
) -> None:
    await kv.put(bus.telemetry_key("bad"), b"\xff\xff\xff not a protobuf")
    await directory.start()
    await eventually(lambda: directory.undecodable == 1)
    await sample(kv, "good", {0: 50})  # the directory still follows the bucket
    await eventually(lambda: directory.utilization() == {("good", 0): 50})


async def test_packed_column_reads_as_the_per_gpu_messages(
    kv: KeyValue, directory: HostDirectory
) -> None:
    now = time.time()
    for host, gpus in (("h1", 2), ("h2", 4), ("h3", 3)):
        await register(kv, host, f"127.0.0.1:{gpus}", gpus, now)
    await sample(kv, "h1", {0: 75, 1: None}, packed=True)
    await sample(kv, "h2", {2: 100, 0: 0, 1: 30}, packed=True)  # GPU 3 not in the sample
    packed = telemetry_pb2.HostSample()
    packed.gpus.add(index=2, gpu_utilization_percent=5)
    pack_utilization(packed)
    assert list(packed.gpu_utilization_by_index) == [-1, -1, 5]

    await directory.start()
    await eventually(lambda: len(directory.live()) == 3 and len(directory.utilization()) == 4)
    assert directory.utilization() == {("h1", 0): 75, ("h2", 0): 0, ("h2", 1): 30, ("h2", 2): 100}
    column = directory.utilization_column({"h1": 2, "h2": 4, "h3": 3})
    assert column.tolist() == [75, -1, 0, 30, 100, -1, -1, -1, -1]
    assert directory.utilization_column({"h2": 2}).tolist() == [0, 30]  # extra readings cut
