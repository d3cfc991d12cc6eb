"""``bus.connect`` through a NATS outage: logged once each way, and a client that does not
buffer fails a publish at once instead of sending it late."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from nats.errors import OutboundBufferLimitError

from ganglion.bus import NatsServer, connect


async def _until(condition: object, what: str) -> None:
    for _ in range(200):  # bounded: ~10 s
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting until {what}")


async def test_an_outage_is_logged_once_each_way_and_unbuffered_publishes_fail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ganglion.bus")
    caplog.set_level(logging.INFO, logger="nats.aio.client")
    server = await asyncio.to_thread(NatsServer(store_dir=tmp_path).start)
    nc = await connect(server.url, "outage-test", buffer_while_reconnecting=False)
    try:
        await asyncio.to_thread(server.stop)
        await _until(lambda: not nc.is_connected, "the client saw the outage")
        with pytest.raises(OutboundBufferLimitError):
            await nc.publish("ganglion.test", b"late")
        await asyncio.sleep(1.2)  # a few reconnect tries, every 0.5 s
        server = await asyncio.to_thread(NatsServer(port=server.port, store_dir=tmp_path).start)
        # is_connected turns true a flush before nats-py calls back about the reconnection.
        await _until(
            lambda: any(r.getMessage() == "NATS connection back" for r in caplog.records),
            "the client reconnected",
        )
    finally:
        await nc.close()
        await asyncio.to_thread(server.stop)
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    lost = said.count((logging.WARNING, "NATS connection lost; reconnecting"))
    back = said.count((logging.INFO, "NATS connection back"))
    # About 2 s down with a try every 0.5 s: a line or two each way, not one per try.
    assert 1 <= lost <= 2 and back == lost, said
    assert len([m for level, m in said if level >= logging.WARNING]) <= 2 * lost + 1, said
    assert not [m for level, m in said if level >= logging.ERROR], said
