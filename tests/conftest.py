"""Shared fixtures: a real nats-server per test on a free loopback port; tests of policies
that need the shared traces skip with a message where those are absent."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from ganglion.bus import NatsServer, connect, ensure_streams
from ganglion.policies.gittins import DEFAULT_SAMPLES
from ganglion.traces import traces_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRACES = ROOT.parent / "shared" / "traces"


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """A connected client with the streams and hosts bucket created."""
    client = await connect(nats_server.url, "test")
    await ensure_streams(client.jetstream())
    yield client
    await client.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Cases parametrised over ``gittins*`` need its job-size distribution from the shared
    traces: skip them, saying so, on a checkout without ``../shared``."""
    samples = traces_dir() / DEFAULT_SAMPLES
    if samples.exists():
        return
    skip = pytest.mark.skip(reason=f"gittins needs {samples} (shared traces absent)")
    for item in items:
        params = getattr(item, "callspec", None)
        if params and any(str(v).startswith("gittins") for v in params.params.values()):
            item.add_marker(skip)
