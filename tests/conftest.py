"""Shared fixtures: a real nats-server per test on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from ganglion.bus import NatsServer, connect, ensure_streams

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
