"""Load on an executor's ``TransferService``: one blob pushed, then fetched over and over.

The blob is generated (seeded), partly compressible so the lz4-or-raw choice per chunk is
exercised, and pushed once through the transport client. Each load call is a whole ``Fetch``
through the same client code every consumer uses (frame decode and crc32 check per chunk,
no resume: a broken stream counts as a failure here instead of being retried). The received
bytes are counted, not kept or hashed, so the client costs little per byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from ganglion.loadgen.arrivals import OK, Call, Progress, Schedule, closed_loop, open_loop
from ganglion.loadgen.errors import LoadgenError, TargetUnavailableError
from ganglion.loadgen.report import LatencySummary, LoadReport
from ganglion.rpc import MAX_MESSAGE_BYTES
from ganglion.transport import DEFAULT_CHUNK_BYTES, TransferError, TransportSettings
from ganglion.transport.backends import BytesReader
from ganglion.transport.frames import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from ganglion.transport.service import fetch, push
from ganglion.v1 import data_pb2_grpc

MIB = 1024 * 1024
_BLOCK = 4096


@dataclass(frozen=True)
class TransferLoad:
    """One load run against a TransferService."""

    address: str
    """``host:port`` of an executor (or anything serving TransferService)."""
    rate: float | None = 10.0
    """Fetches per second on a fixed schedule; None = closed loop at full speed."""
    duration_s: float = 10.0
    """Measured window, seconds."""
    warmup_s: float = 1.0
    """Load before the window that is not recorded."""
    blob_bytes: int = 4 * MIB
    """Size of the blob fetched."""
    compressible: float = 0.5
    """Fraction of every 4 KiB block that is zeros (0 = random bytes, lz4 cannot help)."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Raw bytes per chunk asked for."""
    compress: bool = True
    """Let the server lz4 chunks that shrink enough."""
    concurrency: int = 16
    """Open loop: most fetches in flight. Closed loop: fetches in flight at all times."""
    connections: int = 4
    """TCP connections, used round-robin."""
    timeout_s: float = 60.0
    """Deadline of one whole fetch."""
    tenant: str = "loadgen"
    """Tenant the server's cache statistics charge."""
    seed: int = 0
    """Seed of the blob's bytes."""

    def __post_init__(self) -> None:
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        for name in ("blob_bytes", "concurrency", "connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.compressible <= 1:
            raise ValueError(f"compressible must be in [0, 1], got {self.compressible}")
        if not (self.duration_s > 0 and self.warmup_s >= 0 and self.timeout_s > 0):
            raise ValueError("duration and timeout must be > 0, warm-up >= 0")
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk size must be {MIN_CHUNK_BYTES // 1024} to {MAX_CHUNK_BYTES // 1024} KiB, "
                f"got {self.chunk_bytes / 1024:g} KiB"
            )


def make_blob(size: int, compressible: float, seed: int = 0) -> bytes:
    """``size`` seeded random bytes with the first ``compressible`` of each 4 KiB block zeroed."""
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    zeros = int(_BLOCK * compressible)
    if zeros:
        blocks = data[: size - size % _BLOCK].reshape(-1, _BLOCK)
        blocks[:, :zeros] = 0
        data[size - size % _BLOCK :][:zeros] = 0
    return data.tobytes()


class _CountingSink:
    """A fetch sink that only counts (frames are already crc-checked by the client)."""

    def __init__(self) -> None:
        self.offset = 0

    def write(self, data: bytes) -> None:
        self.offset += len(data)


async def load_transfer(config: TransferLoad, progress: Progress | None = None) -> LoadReport:
    settings = TransportSettings(chunk_bytes=config.chunk_bytes, compress=config.compress)
    channels = [
        grpc.aio.insecure_channel(
            config.address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel
            ],
        )
        for _ in range(config.connections)
    ]
    stubs: Iterator[data_pb2_grpc.TransferServiceAsyncStub] = itertools.cycle(
        [data_pb2_grpc.TransferServiceStub(ch) for ch in channels]
    )
    try:
        try:
            async with asyncio.timeout(10.0):
                await asyncio.gather(*(ch.channel_ready() for ch in channels))
        except TimeoutError:
            raise TargetUnavailableError(f"no gRPC server answered on {config.address}") from None
        blob = make_blob(config.blob_bytes, config.compressible, config.seed)
        blob_id = hashlib.sha256(blob).hexdigest()
        try:
            await push(
                next(stubs),
                blob_id,
                BytesReader(blob),
                settings,
                tenant=config.tenant,
                timeout_s=config.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                raise LoadgenError(f"no TransferService at {config.address}") from None
            raise LoadgenError(
                f"could not push the test blob to {config.address}: "
                f"{exc.code().name}: {exc.details()}"
            ) from None
        except TransferError as exc:
            raise LoadgenError(f"could not push the test blob to {config.address}: {exc}") from exc

        async def one() -> str:
            try:
                sink, _ = await fetch(
                    next(stubs),
                    blob_id,
                    lambda _size: _CountingSink(),
                    settings,
                    tenant=config.tenant,
                    retries=0,
                    timeout_s=config.timeout_s,
                )
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
            except TransferError:
                return "TRANSFER_ERROR"
            return OK if sink.offset == len(blob) else "SHORT_READ"

        call: Call = one
        schedule = Schedule(time.perf_counter() + 0.05, config.warmup_s, config.duration_s)
        drain_s = config.timeout_s + 1.0
        if config.rate is None:
            tally = await closed_loop(call, config.concurrency, schedule, drain_s, progress)
        else:
            tally = await open_loop(
                call, config.rate, schedule, config.concurrency, drain_s, progress
            )
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return LoadReport(
        target="transfer",
        address=config.address,
        mode="closed" if config.rate is None else "open",
        rate=config.rate or 0.0,
        concurrency=config.concurrency,
        duration_s=config.duration_s,
        warmup_s=config.warmup_s,
        sent=tally.sent,
        completed=tally.completed,
        ok=tally.ok,
        errors=dict(tally.errors),
        unfinished=tally.unfinished,
        achieved_per_s=tally.completed_in_window / config.duration_s,
        latency=LatencySummary.of(tally.histogram),
        histogram=tally.histogram.encode().decode("ascii"),
        params={
            "blob_bytes": config.blob_bytes,
            "compressible": config.compressible,
            "chunk_bytes": config.chunk_bytes,
            "compress": int(config.compress),
            "connections": config.connections,
            "goodput_mib_s": round(tally.ok * config.blob_bytes / config.duration_s / MIB, 1),
        },
    )
