"""``TransferService`` over any blob store, and the client side of Fetch and Push.

The server reads and encodes the next chunk on a worker thread while the current one is sent
(lz4 and file reads release the GIL), so a link is kept busy by one stream. The client
decodes and verifies each frame, writes it to a resumable sink, and after a broken
connection asks again from the last verified offset; the whole blob is checked against its
sha256 id before the sink commits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from ganglion.cache.errors import (
    BlobBusyError,
    BlobNotFoundError,
    CacheError,
    IntegrityError,
    InvalidBlobIdError,
)
from ganglion.cache.store import check_blob_id
from ganglion.transport.errors import FrameError, TransferError
from ganglion.transport.frames import (
    DEFAULT_LIMITS,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    ChunkEncoder,
    Limits,
    TransportSettings,
    decode_frame,
)
from ganglion.v1 import data_pb2, data_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME: str = data_pb2.DESCRIPTOR.services_by_name["TransferService"].full_name
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)
"""Codes after which a transfer resumes from its last verified offset."""


class Readable(Protocol):
    """An open blob on the serving side."""

    size: int

    def pread(self, offset: int, n: int) -> bytes: ...

    def close(self) -> None: ...


class Sink(Protocol):
    """Where received chunks go, in order; ``offset`` is how much it already holds."""

    offset: int

    def write(self, data: bytes) -> None: ...


class WritableSink(Sink, Protocol):
    """A server-side sink for Push: commit verifies the whole blob."""

    def commit(self) -> bool: ...

    def abort(self, keep_partial: bool = True) -> None: ...


class BlobBackend(Protocol):
    """What a TransferService serves from and stores into."""

    async def open_blob(self, blob_id: str, tenant: str, local_only: bool) -> Readable:
        """Raises BlobNotFoundError."""
        ...

    def stat(self, blob_id: str, tenant: str = "", record: bool = False) -> tuple[int | None, int]:
        """(size if complete here else None, bytes of an interrupted push); ``record`` counts
        a hit for ``tenant`` when the blob is here."""
        ...

    def push_writer(self, blob_id: str, size: int, tenant: str) -> WritableSink:
        """A resumable writer; raises BlobBusyError when one is active."""
        ...

    def cache_stats(self) -> data_pb2.CacheStats: ...


def settings_for(request: data_pb2.FetchRequest, default: TransportSettings) -> TransportSettings:
    """The sender's settings for one Fetch: the request's choices over the server default."""
    chunk = request.chunk_bytes or default.chunk_bytes
    compress = default.compress
    if request.compression == data_pb2.COMPRESSION_NONE:
        compress = False
    elif request.compression == data_pb2.COMPRESSION_LZ4:
        compress = True
    return TransportSettings(
        chunk_bytes=chunk,
        compress=compress,
        lz4_level=request.lz4_level or default.lz4_level,
        min_saving=default.min_saving,
        probe_every=default.probe_every,
    )


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, msg: str
) -> NoReturn:
    await context.abort(code, msg)
    raise AssertionError("unreachable: abort raises")


async def encoded_frames(
    reader: Readable, start: int, settings: TransportSettings, encoder: ChunkEncoder | None = None
) -> AsyncGenerator[bytes, None]:
    """Frames of ``reader`` from ``start``; chunk k+1 is read and encoded while k is sent."""
    enc = encoder or ChunkEncoder(settings)
    step = settings.chunk_bytes

    def produce(offset: int) -> bytes:
        return enc.encode(reader.pread(offset, min(step, reader.size - offset)), offset)

    offset = start
    pending: asyncio.Future[bytes] | None = None
    if offset < reader.size:
        pending = asyncio.ensure_future(asyncio.to_thread(produce, offset))
    try:
        while pending is not None:
            frame = await pending
            offset = min(offset + step, reader.size)
            pending = (
                asyncio.ensure_future(asyncio.to_thread(produce, offset))
                if offset < reader.size
                else None
            )
            yield frame
    finally:
        if pending is not None:  # the reader must outlive the thread still using it
            with contextlib.suppress(Exception):
                await pending


class TransferServicer(data_pb2_grpc.TransferServiceServicer):
    """Translates TransferService calls to a :class:`BlobBackend`; errors -> status codes."""

    def __init__(
        self,
        backend: BlobBackend,
        settings: TransportSettings | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._backend = backend
        self.settings = settings or TransportSettings()
        self._limits = limits

    async def Fetch(
        self, request: data_pb2.FetchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[data_pb2.FetchResponse]:
        try:
            check_blob_id(request.blob_id)
        except InvalidBlobIdError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"blob_id: {exc}")
        if request.chunk_bytes and not MIN_CHUNK_BYTES <= request.chunk_bytes <= min(
            MAX_CHUNK_BYTES, self._limits.max_chunk_bytes
        ):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk_bytes: must be 0 or in [{MIN_CHUNK_BYTES}, {self._limits.max_chunk_bytes}]",
            )
        if not 0 <= request.lz4_level <= 16:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "lz4_level: must be in [0, 16]")
        settings = settings_for(request, self.settings)
        try:
            reader = await self._backend.open_blob(
                request.blob_id, request.tenant, request.local_only
            )
        except BlobNotFoundError as exc:
            await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except (TransferError, CacheError) as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, f"could not fetch: {exc}")
        try:
            if request.offset > reader.size:
                await _abort(
                    context,
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"offset: {request.offset} is past the blob's {reader.size} bytes",
                )
            info = data_pb2.BlobInfo(
                blob_id=request.blob_id, size=reader.size, offset=request.offset
            )
            yield data_pb2.FetchResponse(info=info)
            # aclosing: a cancelled stream finishes the chunk in flight before the reader closes.
            async with contextlib.aclosing(
                encoded_frames(reader, request.offset, settings)
            ) as frames:
                async for frame in frames:
                    yield data_pb2.FetchResponse(frame=frame)
        finally:
            reader.close()

    async def Push(
        self,
        request_iterator: AsyncIterator[data_pb2.PushRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> data_pb2.PushResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("info"):
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "info: the first message must carry it"
            )
        info = first.info
        try:
            check_blob_id(info.blob_id)
        except InvalidBlobIdError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"info.blob_id: {exc}")
        size, _ = self._backend.stat(info.blob_id)
        if size is not None:
            return data_pb2.PushResponse(
                blob_id=info.blob_id, size=size, created=False, cached=True
            )
        try:
            writer = self._backend.push_writer(info.blob_id, info.size, first.tenant)
        except BlobBusyError as exc:
            await _abort(context, grpc.StatusCode.ABORTED, str(exc))
        keep = True
        try:
            if writer.offset != info.offset:
                await _abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"info.offset: resume at {writer.offset}, not {info.offset}",
                )
            async for req in request_iterator:
                frame = await asyncio.to_thread(decode_frame, req.frame, self._limits)
                if frame.offset != writer.offset:
                    raise TransferError(f"frame at {frame.offset}, expected {writer.offset}")
                writer.write(frame.data)
            cached = await asyncio.to_thread(writer.commit)  # hashes checked, fsync: off-loop
        except FrameError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"frame: {exc}")
        except TransferError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except IntegrityError as exc:
            keep = False
            await _abort(context, grpc.StatusCode.DATA_LOSS, str(exc))
        finally:
            writer.abort(keep_partial=keep)  # no-op after commit
        return data_pb2.PushResponse(
            blob_id=info.blob_id, size=info.size, created=True, cached=cached
        )

    async def Stat(
        self, request: data_pb2.StatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> data_pb2.StatResponse:
        try:
            check_blob_id(request.blob_id)
        except InvalidBlobIdError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"blob_id: {exc}")
        size, partial = self._backend.stat(request.blob_id, request.tenant, request.record)
        return data_pb2.StatResponse(
            blob_id=request.blob_id,
            present=size is not None,
            size=size or 0,
            partial_bytes=partial,
        )

    async def GetCacheStats(
        self, request: data_pb2.GetCacheStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> data_pb2.CacheStats:
        return self._backend.cache_stats()


# --- client -----------------------------------------------------------------------------

S = TypeVar("S", bound=Sink)


@dataclass(frozen=True)
class TransferStats:
    """What one Fetch or Push moved."""

    size: int
    """Blob bytes."""
    payload_bytes: int
    """Frame payload bytes that crossed the wire in the end (headers not counted)."""
    attempts: int
    """Calls made (1 + resumes)."""
    seconds: float
    """Wall time of the whole transfer."""

    @property
    def goodput(self) -> float:
        """Blob bytes per second."""
        return self.size / self.seconds if self.seconds > 0 else float("inf")


READ_AHEAD = 4
"""Responses a client buffers ahead of its decoder. gRPC's flow-control window follows the
measured bandwidth-delay product, which is tiny on a LAN; without a reader draining the
stream while a chunk decodes, the sender would stall on every chunk."""

T = TypeVar("T")


async def read_ahead(source: AsyncIterable[T], depth: int) -> AsyncGenerator[T, None]:
    """Items of ``source``, pulled by a task up to ``depth`` ahead of the consumer."""
    queue: asyncio.Queue[tuple[bool, T | BaseException | None]] = asyncio.Queue(depth)

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put((True, item))
            await queue.put((False, None))
        except Exception as exc:  # handed to the consumer, in order
            await queue.put((False, exc))

    task = asyncio.create_task(pump())
    try:
        while True:
            more, item = await queue.get()
            if not more:
                if isinstance(item, BaseException):
                    raise item
                return
            yield item  # type: ignore[misc]  # more=True carries a T
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _accept(frame_bytes: bytes, sink: Sink, limits: Limits) -> int:
    """Decode and verify one frame, append it to ``sink``; its payload bytes."""
    frame = decode_frame(frame_bytes, limits)
    if frame.offset != sink.offset:
        raise TransferError(f"frame at {frame.offset}, expected {sink.offset}")
    sink.write(frame.data)
    return frame.stored_len


def _compression(settings: TransportSettings) -> data_pb2.Compression.ValueType:
    return data_pb2.COMPRESSION_LZ4 if settings.compress else data_pb2.COMPRESSION_NONE


async def fetch(
    stub: data_pb2_grpc.TransferServiceAsyncStub,
    blob_id: str,
    open_sink: Callable[[int], S],
    settings: TransportSettings | None = None,
    *,
    tenant: str = "",
    local_only: bool = False,
    retries: int = 3,
    backoff_s: float = 0.1,
    timeout_s: float | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[S, TransferStats]:
    """Fetch ``blob_id`` into the sink ``open_sink(size)`` returns; resumes up to ``retries``
    times from the sink's offset. The caller commits the sink (which verifies the sha256).

    Raises grpc.aio.AioRpcError for non-retryable codes (NOT_FOUND, ...) and
    :class:`TransferError` when the retries run out.
    """
    settings = settings or TransportSettings()
    check_blob_id(blob_id)
    sink: S | None = None
    size = -1
    payload = 0
    started = time.perf_counter()
    last: Exception | None = None
    for attempt in range(1, retries + 2):
        request = data_pb2.FetchRequest(
            blob_id=blob_id,
            offset=sink.offset if sink is not None else 0,
            chunk_bytes=settings.chunk_bytes,
            compression=_compression(settings),
            lz4_level=settings.lz4_level,
            tenant=tenant,
            local_only=local_only,
        )
        call = stub.Fetch(request, timeout=timeout_s)
        try:
            responses: AsyncIterable[data_pb2.FetchResponse] = call
            async with contextlib.aclosing(read_ahead(responses, READ_AHEAD)) as stream:
                async for resp in stream:
                    if resp.HasField("info"):
                        if sink is None:
                            size = resp.info.size
                            sink = open_sink(size)
                            if sink.offset != request.offset:
                                break  # the sink already held a partial: ask from there
                        elif resp.info.size != size:
                            raise TransferError(
                                f"blob {blob_id} changed size {size} -> {resp.info.size}"
                            )
                        continue
                    if sink is None:
                        raise TransferError("Fetch sent a frame before the blob info")
                    # Decode, verify and write on a worker thread while the next frames arrive.
                    payload += await asyncio.to_thread(_accept, resp.frame, sink, limits)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE:
                raise
            last = exc
        except FrameError as exc:  # a corrupt frame is dropped; ask again from before it
            last = exc
        finally:
            call.cancel()  # no-op once the stream ended; stops it after a break or an error
        if sink is not None and sink.offset == size:
            stats = TransferStats(size, payload, attempt, time.perf_counter() - started)
            return sink, stats
        if last is not None:
            log.info(
                "transfer interrupted, resuming: %s",
                last,
                extra={
                    "blob_id": blob_id,
                    "offset": sink.offset if sink else 0,
                    "attempt": attempt,
                },
            )
        await asyncio.sleep(backoff_s * attempt if last is not None else 0)
    raise TransferError(f"fetch of {blob_id} failed after {retries + 1} attempts: {last}")


async def push(
    stub: data_pb2_grpc.TransferServiceAsyncStub,
    blob_id: str,
    reader: Readable,
    settings: TransportSettings | None = None,
    *,
    tenant: str = "",
    retries: int = 3,
    backoff_s: float = 0.1,
    timeout_s: float | None = None,
) -> tuple[data_pb2.PushResponse, TransferStats]:
    """Push ``reader``'s bytes as ``blob_id``; resumes from what the server already holds."""
    settings = settings or TransportSettings()
    check_blob_id(blob_id)
    started = time.perf_counter()
    last: Exception | None = None
    for attempt in range(1, retries + 2):
        encoder = ChunkEncoder(settings)
        try:
            stat = await stub.Stat(data_pb2.StatRequest(blob_id=blob_id), timeout=timeout_s)
            if stat.present:
                resp = data_pb2.PushResponse(
                    blob_id=blob_id, size=stat.size, created=False, cached=True
                )
                return resp, TransferStats(stat.size, 0, attempt, time.perf_counter() - started)
            start = stat.partial_bytes if stat.partial_bytes <= reader.size else 0

            async def requests(
                start: int = start, encoder: ChunkEncoder = encoder
            ) -> AsyncIterator[data_pb2.PushRequest]:
                info = data_pb2.BlobInfo(blob_id=blob_id, size=reader.size, offset=start)
                yield data_pb2.PushRequest(info=info, tenant=tenant)
                async with contextlib.aclosing(
                    encoded_frames(reader, start, settings, encoder)
                ) as frames:
                    async for frame in frames:
                        yield data_pb2.PushRequest(frame=frame)

            resp = await stub.Push(requests(), timeout=timeout_s)
            return resp, TransferStats(
                reader.size, encoder.stored_bytes, attempt, time.perf_counter() - started
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE | {
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.ABORTED,
            }:
                raise
            last = exc
        await asyncio.sleep(backoff_s * attempt)
    raise TransferError(f"push of {blob_id} failed after {retries + 1} attempts: {last}")
