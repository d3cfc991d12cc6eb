"""A loopback TCP proxy with a token-bucket bandwidth cap, for benchmarks and tests.

It stands in for a slow link between two hosts: every byte in each direction waits for a
token, tokens refill at ``rate_bytes_per_s`` up to ``burst_bytes``. ``cut_after_bytes`` makes
it drop the connection once that many bytes went downstream (server -> client), to test that
an interrupted transfer resumes. It relays any TCP protocol (gRPC over HTTP/2 here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

log = logging.getLogger(__name__)

_READ_BYTES = 16 * 1024


class TokenBucket:
    """Tokens are bytes; ``take`` waits until enough have accrued."""

    def __init__(self, rate_bytes_per_s: float, burst_bytes: int) -> None:
        if rate_bytes_per_s <= 0 or burst_bytes <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = rate_bytes_per_s
        self.burst = burst_bytes
        self._tokens = float(burst_bytes)
        self._at = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self._lock:  # FIFO among connections sharing the link
            while n > 0:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
                self._at = now
                part = min(n, self.burst)
                if self._tokens >= part:
                    self._tokens -= part
                    n -= part
                    continue
                await asyncio.sleep((part - self._tokens) / self.rate)


class BandwidthProxy:
    """``127.0.0.1:<port>`` -> ``target``, capped; use ``async with`` or start()/close()."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        rate_bytes_per_s: float | None,
        burst_bytes: int = 64 * 1024,
        cut_after_bytes: int | None = None,
    ) -> None:
        self._target = (target_host, target_port)
        self._up = TokenBucket(rate_bytes_per_s, burst_bytes) if rate_bytes_per_s else None
        self._down = TokenBucket(rate_bytes_per_s, burst_bytes) if rate_bytes_per_s else None
        self._cut_after = cut_after_bytes
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.bytes_up = 0
        """Bytes relayed client -> server."""
        self.bytes_down = 0
        """Bytes relayed server -> client."""
        self.cuts = 0
        """Connections dropped by ``cut_after_bytes``."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> BandwidthProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                await t
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def cut(self) -> None:
        """Drop every open connection now (a link failure)."""
        self.cuts += 1
        for w in list(self._writers):
            w.transport.abort()

    async def __aenter__(self) -> BandwidthProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(*self._target)
        except OSError as exc:
            log.warning("proxy: cannot reach %s:%s: %s", *self._target, exc)
            c_writer.close()
            return
        self._writers.update((c_writer, s_writer))
        pair = (c_writer, s_writer)
        up = asyncio.create_task(self._pump(c_reader, s_writer, self._up, False, pair))
        down = asyncio.create_task(self._pump(s_reader, c_writer, self._down, True, pair))
        for t in (up, down):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        bucket: TokenBucket | None,
        downstream: bool,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await reader.read(_READ_BYTES):
                if bucket is not None:
                    await bucket.take(len(data))
                if downstream:
                    self.bytes_down += len(data)
                    if self._cut_after is not None and self.bytes_down >= self._cut_after:
                        self._cut_after = None  # once: the retry must get through
                        self.cut()
                        return
                else:
                    self.bytes_up += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for w in pair:
                self._writers.discard(w)
                w.close()
