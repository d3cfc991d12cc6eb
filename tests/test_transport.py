"""Transport: frames (truncated, bit-flipped, oversized, lz4 bombs), and TransferService over
real gRPC on loopback, with a real TCP proxy that cuts the connection mid-transfer."""

from __future__ import annotations

import asyncio
import io
import os
import random
import struct
import threading
from collections.abc import AsyncIterator

import grpc
import lz4.frame
import pytest

from ganglion import rpc
from ganglion.cache.store import blob_id_of
from ganglion.transport import (
    HEADER_BYTES,
    ChunkEncoder,
    CorruptFrameError,
    FrameTooLargeError,
    Limits,
    TransportSettings,
    TruncatedFrameError,
    decode_frame,
    encode_frame,
    read_frame,
)
from ganglion.transport.backends import BytesReader, MemoryBackend, MemorySink
from ganglion.transport.frames import HEADER, MAGIC, VERSION
from ganglion.transport.proxy import BandwidthProxy
from ganglion.transport.service import SERVICE_NAME, TransferServicer, fetch, push
from ganglion.v1 import data_pb2, data_pb2_grpc

TIMEOUT = 20


def compressible(n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = [b"gpu_util", b"fb_used", b"node-%03d" % rng.randint(0, 9), b"power_w", b"temp"]
    out = bytearray()
    while len(out) < n:
        out += b"%s=%d," % (rng.choice(words), rng.randint(0, 100))
    return bytes(out[:n])


# --- frames ---------------------------------------------------------------------------


def test_chunks_go_lz4_when_smaller_and_raw_when_not() -> None:
    enc = ChunkEncoder(TransportSettings(chunk_bytes=64 * 1024, probe_every=4))
    text, noise = compressible(64 * 1024), os.urandom(64 * 1024)
    f1 = decode_frame(enc.encode(text, 0))
    assert f1.compressed and f1.data == text and f1.stored_len < len(text) // 2
    frames = [decode_frame(enc.encode(noise, 1 + i)) for i in range(5)]
    assert [f.compressed for f in frames] == [False] * 5
    assert all(f.data == noise for f in frames)
    # After the first incompressible chunk lz4 is only probed every 4th chunk.
    assert enc.attempts == 1 + 2
    off = decode_frame(ChunkEncoder(TransportSettings(compress=False)).encode(text, 7))
    assert not off.compressed and off.offset == 7


def test_truncated_frames_are_rejected() -> None:
    frame = ChunkEncoder(TransportSettings()).encode(compressible(10_000), 0)
    for cut in (0, 5, HEADER_BYTES - 1, HEADER_BYTES, len(frame) - 1):
        with pytest.raises(TruncatedFrameError):
            decode_frame(frame[:cut])
        with pytest.raises(TruncatedFrameError):
            read_frame(io.BytesIO(frame[:cut]).read) if cut else decode_frame(b"")
    assert read_frame(io.BytesIO(b"").read) is None  # clean end of stream
    with pytest.raises(CorruptFrameError):
        decode_frame(frame + b"x")  # trailing garbage


@pytest.mark.parametrize("data", [compressible(20_000), os.urandom(20_000)], ids=["lz4", "raw"])
def test_every_flipped_bit_sample_is_rejected(data: bytes) -> None:
    frame = ChunkEncoder(TransportSettings()).encode(data, 4096)
    rng = random.Random(1)
    positions = [*range(HEADER_BYTES), *rng.sample(range(HEADER_BYTES, len(frame)), 200)]
    for pos in positions:
        for bit in (0, 7):
            bad = bytearray(frame)
            bad[pos] ^= 1 << bit
            try:
                got = decode_frame(bytes(bad))
            except (CorruptFrameError, TruncatedFrameError, FrameTooLargeError):
                continue
            # Only the offset field can change without detection (it is checked by the
            # receiver against the expected position, not by the frame itself).
            assert 12 <= pos < 20 and got.data == data and got.offset != 4096, pos


def test_huge_claims_are_rejected_before_reading_the_payload() -> None:
    claim = (4 << 30) - 1  # the largest a u32 length can claim
    header = HEADER.pack(MAGIC, VERSION, 0, claim, claim, 0, 0)
    reads: list[int] = []
    stream = io.BytesIO(header + b"\0" * 1000)

    def read(n: int) -> bytes:
        reads.append(n)
        return stream.read(n)

    with pytest.raises(FrameTooLargeError):
        read_frame(read, Limits(max_chunk_bytes=1 << 20))
    assert sum(reads) == HEADER_BYTES  # nothing past the header was asked for
    with pytest.raises(FrameTooLargeError):
        decode_frame(header)


def test_lz4_bombs_are_capped_at_the_declared_length() -> None:
    big = b"\0" * (8 << 20)
    bomb = lz4.frame.compress(big)
    header = struct.pack("<2sBBIIQI", MAGIC, VERSION, 1, len(bomb), 1 << 20, 0, 0)
    with pytest.raises(CorruptFrameError, match="declared"):
        decode_frame(header + bomb)


# --- TransferService over gRPC ---------------------------------------------------------


@pytest.fixture
async def origin() -> AsyncIterator[tuple[MemoryBackend, int]]:
    backend = MemoryBackend()
    servicer = TransferServicer(backend)

    def register(server: grpc.aio.Server) -> None:
        data_pb2_grpc.add_TransferServiceServicer_to_server(servicer, server)

    server, port, _ = await rpc.start_server(register, [SERVICE_NAME], max_message_bytes=4 << 20)
    try:
        yield backend, port
    finally:
        await server.stop(grace=None)


async def test_fetch_verifies_and_counts_the_wire_bytes(origin: tuple[MemoryBackend, int]) -> None:
    backend, port = origin
    data = compressible(3 * 1024 * 1024 + 17)
    blob = backend.add(data)
    async with rpc.channel(f"127.0.0.1:{port}") as ch:
        stub = data_pb2_grpc.TransferServiceStub(ch)
        sink, stats = await fetch(
            stub,
            blob,
            lambda n: MemorySink(blob, n),
            TransportSettings(chunk_bytes=256 * 1024),
            timeout_s=TIMEOUT,
        )
        assert sink.value() == data
        assert stats.attempts == 1 and stats.payload_bytes < len(data) // 2
        raw, _ = await fetch(
            stub,
            blob,
            lambda n: MemorySink(blob, n),
            TransportSettings(compress=False),
            timeout_s=TIMEOUT,
        )
        assert raw.value() == data
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch(stub, "0" * 64, lambda n: MemorySink("0" * 64, n), timeout_s=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        call = stub.Fetch(data_pb2.FetchRequest(blob_id="nothex"), timeout=TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "blob_id" in (err.value.details() or "")


async def test_interrupted_fetch_resumes_from_the_last_verified_chunk(
    origin: tuple[MemoryBackend, int],
) -> None:
    backend, port = origin
    data = os.urandom(2 * 1024 * 1024)  # incompressible: the cut lands mid-blob
    blob = backend.add(data)
    async with (
        BandwidthProxy("127.0.0.1", port, None, cut_after_bytes=len(data) // 2) as proxy,
        rpc.channel(proxy.address) as ch,
    ):
        offsets: list[int] = []

        def open_sink(n: int) -> MemorySink:
            offsets.append(0)
            return MemorySink(blob, n)

        sink, stats = await fetch(
            data_pb2_grpc.TransferServiceStub(ch),
            blob,
            open_sink,
            TransportSettings(chunk_bytes=128 * 1024),
            backoff_s=0.01,
            timeout_s=TIMEOUT,
        )
    assert proxy.cuts == 1 and stats.attempts == 2 and offsets == [0]
    assert sink.value() == data
    # The second call asked only for the rest: less than the whole blob crossed twice.
    assert proxy.bytes_down < 2 * len(data)


async def test_fetch_from_an_offset_sends_only_the_rest(origin: tuple[MemoryBackend, int]) -> None:
    backend, port = origin
    data = os.urandom(300_000)
    blob = backend.add(data)
    half = MemorySink(blob, len(data))
    half.write(data[:100_000])
    async with rpc.channel(f"127.0.0.1:{port}") as ch:
        sink, stats = await fetch(
            data_pb2_grpc.TransferServiceStub(ch), blob, lambda n: half, timeout_s=TIMEOUT
        )
    assert sink.value() == data and stats.payload_bytes == 200_000


async def test_interrupted_push_resumes_and_a_lying_push_is_refused(
    origin: tuple[MemoryBackend, int],
) -> None:
    backend, port = origin
    data = os.urandom(1024 * 1024)
    blob = blob_id_of(data)
    async with (
        BandwidthProxy("127.0.0.1", port, None) as proxy,
        rpc.channel(proxy.address) as ch,
    ):
        stub = data_pb2_grpc.TransferServiceStub(ch)
        settings = TransportSettings(chunk_bytes=64 * 1024)

        loop = asyncio.get_running_loop()
        cut = threading.Event()

        class Cutting(BytesReader):
            """Kills the connection once half the blob has been read for sending."""

            def pread(self, offset: int, n: int) -> bytes:  # runs on a worker thread
                if offset >= len(data) // 2 and not cut.is_set():
                    cut.set()
                    loop.call_soon_threadsafe(proxy.cut)
                return super().pread(offset, n)

        resp, stats = await push(
            stub, blob, Cutting(data), settings, backoff_s=0.05, timeout_s=TIMEOUT
        )
        assert resp.created and backend.blobs[blob] == data
        assert stats.attempts >= 2 and stats.payload_bytes < len(data)
        again, _ = await push(stub, blob, BytesReader(data), settings, timeout_s=TIMEOUT)
        assert not again.created

        liar = os.urandom(100_000)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await push(stub, blob_id_of(b"other"), BytesReader(liar), settings, timeout_s=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS


async def test_hostile_push_frames_are_refused(origin: tuple[MemoryBackend, int]) -> None:
    backend, port = origin
    blob = blob_id_of(b"x" * 10)

    async def requests(frame: bytes) -> AsyncIterator[data_pb2.PushRequest]:
        yield data_pb2.PushRequest(info=data_pb2.BlobInfo(blob_id=blob, size=10))
        yield data_pb2.PushRequest(frame=frame)

    claim = HEADER.pack(MAGIC, VERSION, 0, 1 << 31, 1 << 31, 0, 0)
    async with rpc.channel(f"127.0.0.1:{port}") as ch:
        stub = data_pb2_grpc.TransferServiceStub(ch)
        for frame, code in (
            (claim, grpc.StatusCode.INVALID_ARGUMENT),
            (encode_frame(b"x" * 10, 0)[:-3], grpc.StatusCode.INVALID_ARGUMENT),
            # Bigger than the server's message limit: gRPC refuses it before the servicer.
            (b"\0" * (5 << 20), grpc.StatusCode.RESOURCE_EXHAUSTED),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Push(requests(frame), timeout=TIMEOUT)
            assert err.value.code() == code, err.value.details()
    assert blob not in backend.blobs


async def test_token_bucket_caps_the_rate(origin: tuple[MemoryBackend, int]) -> None:
    backend, port = origin
    data = os.urandom(400_000)
    blob = backend.add(data)
    rate = 1_000_000.0
    async with (
        BandwidthProxy("127.0.0.1", port, rate, burst_bytes=32 * 1024) as proxy,
        rpc.channel(proxy.address) as ch,
    ):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sink, _ = await fetch(
            data_pb2_grpc.TransferServiceStub(ch),
            blob,
            lambda n: MemorySink(blob, n),
            timeout_s=TIMEOUT,
        )
        elapsed = loop.time() - t0
    assert sink.value() == data
    # A lower bound only (the cap can make it slower, never faster): bytes / rate - burst.
    assert elapsed >= (len(data) - 2 * 32 * 1024) / rate
