"""What a TransferService serves: a host's :class:`BlobStore` with read-through from other
TransferServices (peers, then an origin), or plain memory (benchmarks, tests, small origins).

Read-through is single-flight: concurrent requests for one missing blob wait for one fetch.
Sources are always asked with ``local_only`` so two executors missing the same blob never
ask each other in a loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc

from ganglion import rpc
from ganglion.cache.errors import BlobBusyError, BlobNotFoundError, IntegrityError
from ganglion.cache.proto import snapshot_to_proto
from ganglion.cache.store import BlobReader, BlobStore, BlobWriter, blob_id_of
from ganglion.transport.errors import TransferError
from ganglion.transport.frames import TransportSettings
from ganglion.transport.service import Readable, fetch
from ganglion.v1 import data_pb2, data_pb2_grpc

log = logging.getLogger(__name__)

Sources = Callable[[], Awaitable[Sequence[str]]]
"""Addresses (``host:port``) of TransferServices to read through to, in order of preference."""


async def no_sources() -> Sequence[str]:
    return ()


def _close_reader(fill: asyncio.Task[BlobReader]) -> None:
    """Close what a fill whose first caller went away opened (its pin would stay)."""
    if not fill.cancelled() and fill.exception() is None:  # exception(): retrieved, not logged
        fill.result().close()


class StoreBackend:
    """A :class:`BlobStore`, filled on a miss from ``sources``."""

    def __init__(
        self,
        store: BlobStore,
        host: str = "",
        sources: Sources = no_sources,
        settings: TransportSettings | None = None,
        fetch_timeout_s: float = 600.0,
    ) -> None:
        self.store = store
        self.host = host
        self._sources = sources
        self.settings = settings or TransportSettings()
        """Used for read-through fetches; TuneTransport may replace it."""
        self._fetch_timeout_s = fetch_timeout_s
        self._inflight: dict[str, asyncio.Task[BlobReader]] = {}
        self._waiting: dict[str, int] = {}  # callers awaiting each in-flight fill
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.sequence = 0
        self.upstream_bytes = 0
        """Payload bytes received from sources."""
        self.upstream_raw_bytes = 0
        """Blob bytes received from sources."""
        self.upstream_seconds = 0.0
        """Wall time spent fetching from sources."""

    async def open_blob(self, blob_id: str, tenant: str, local_only: bool) -> Readable:
        try:
            return self.store.open(blob_id, tenant, record=not local_only)
        except BlobNotFoundError:
            if local_only:
                raise
        flight = self._inflight.get(blob_id)
        while flight is not None and flight.cancelling():
            await asyncio.wait({flight})  # nobody wanted it: let it release the blob first
            flight = self._inflight.get(blob_id)
        first = flight is None
        if flight is None:
            # The fill is a task of its own, shared by every caller missing the blob: one
            # that gives up (its client's deadline) does not fail the others, and the fill
            # is cancelled (keeping its partial) only when nobody waits for it any more.
            flight = asyncio.create_task(self._fill(blob_id, tenant), name=f"fill-{blob_id}")
            self._inflight[blob_id] = flight
            self._waiting[blob_id] = 0
            flight.add_done_callback(lambda _: self._landed(blob_id))
        self._waiting[blob_id] += 1
        try:
            reader = await asyncio.shield(flight)
        except asyncio.CancelledError:
            if self._inflight.get(blob_id) is flight and self._waiting[blob_id] == 1:
                flight.cancel()
            if first:  # the fill's reader is this caller's: close it when the fill ends
                flight.add_done_callback(_close_reader)
            raise
        finally:
            if blob_id in self._waiting and self._inflight.get(blob_id) is flight:
                self._waiting[blob_id] -= 1
        return reader if first else self.store.open(blob_id, tenant, record=False)

    def _landed(self, blob_id: str) -> None:
        del self._inflight[blob_id], self._waiting[blob_id]

    async def _fill(self, blob_id: str, tenant: str) -> BlobReader:
        addresses = [a for a in await self._sources() if a]
        failed: list[str] = []  # sources that could not answer (not: do not have it)
        last_says_missing = False
        for address in addresses:
            stub = data_pb2_grpc.TransferServiceStub(self._channel(address))
            writer: BlobWriter | None = None
            committing = False
            keep_partial = True  # for a resume, unless this source's bytes were wrong

            def open_sink(size: int) -> BlobWriter:
                nonlocal writer
                writer = self.store.writer(blob_id, size, tenant)
                return writer

            try:
                _, stats = await fetch(
                    stub,
                    blob_id,
                    open_sink,
                    self.settings,
                    tenant=tenant,
                    local_only=True,
                    timeout_s=self._fetch_timeout_s,
                )
                assert writer is not None
                self.upstream_bytes += stats.payload_bytes
                self.upstream_raw_bytes += stats.size
                self.upstream_seconds += stats.seconds
                committing = True  # fsync and rename off the event loop
                return await asyncio.to_thread(writer.commit_and_open)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    last_says_missing = address == addresses[-1]
                else:
                    log.warning("source %s failed: %s", address, exc.details())
                    failed.append(f"{address}: {exc.code().name}")
            except (TransferError, BlobBusyError) as exc:
                log.warning("source %s failed: %s", address, exc)
                failed.append(f"{address}: {exc}")
            except IntegrityError as exc:  # bytes other than the id names: try the next source
                log.warning("source %s sent a corrupt copy: %s", address, exc)
                failed.append(f"{address}: corrupt copy")
                keep_partial = False  # the next source must not resume from it
            finally:
                # Also when the caller is cancelled mid-transfer: the id is released (it stayed
                # "being written" until a restart).
                if writer is not None and not committing:
                    writer.abort(keep_partial)
        # Retryable (UNAVAILABLE) when a source could not answer, unless the last one, the
        # origin when there is one, answered that it does not have the blob.
        if failed and not last_says_missing:
            raise TransferError(f"blob {blob_id}: no source could send it ({'; '.join(failed)})")
        raise BlobNotFoundError(blob_id)

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = rpc.channel(address)
        return ch

    async def close(self) -> None:
        fills = list(self._inflight.values())
        for fill in fills:
            fill.cancel()
        await asyncio.gather(*fills, return_exceptions=True)
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()

    def stat(self, blob_id: str, tenant: str = "", record: bool = False) -> tuple[int | None, int]:
        size = self.store.touch(blob_id, tenant) if record else self.store.size_of(blob_id)
        return size, self.store.partial_bytes(blob_id)

    def push_writer(self, blob_id: str, size: int, tenant: str) -> BlobWriter:
        return self.store.writer(blob_id, size, tenant, resume=True)

    def cache_stats(self) -> data_pb2.CacheStats:
        self.sequence += 1
        return snapshot_to_proto(self.host, self.store.snapshot(), self.sequence)


class BytesReader:
    """A :class:`Readable` over bytes."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def pread(self, offset: int, n: int) -> bytes:
        return self._data[offset : offset + n]

    def close(self) -> None:
        pass


class MemorySink:
    """Receives a blob into memory; :meth:`commit` verifies it against its id."""

    def __init__(
        self, blob_id: str, size: int, on_commit: Callable[[str, bytes], None] | None = None
    ) -> None:
        self.blob_id = blob_id
        self.size = size
        self._buf = bytearray()
        self._hash = hashlib.sha256()
        self._on_commit = on_commit
        self.offset = 0

    def write(self, data: bytes) -> None:
        if self.offset + len(data) > self.size:
            raise IntegrityError(f"blob {self.blob_id}: more than its {self.size} bytes")
        self._buf += data
        self._hash.update(data)
        self.offset += len(data)

    def value(self) -> bytes:
        """The verified blob. Raises :class:`IntegrityError`."""
        if self.offset != self.size or self._hash.hexdigest() != self.blob_id:
            raise IntegrityError(f"blob {self.blob_id}: received bytes do not match its id")
        return bytes(self._buf)

    def commit(self) -> bool:
        data = self.value()
        if self._on_commit is not None:
            self._on_commit(self.blob_id, data)
        return True

    def abort(self, keep_partial: bool = True) -> None:
        pass


class MemoryBackend:
    """Blobs in a dict: an origin for tests and benchmarks. Pushes are kept whole."""

    def __init__(self, blobs: Sequence[bytes] = ()) -> None:
        self.blobs: dict[str, bytes] = {}
        self._partials: dict[str, MemorySink] = {}
        for b in blobs:
            self.add(b)

    def add(self, data: bytes) -> str:
        blob_id = blob_id_of(data)
        self.blobs[blob_id] = data
        return blob_id

    async def open_blob(self, blob_id: str, tenant: str, local_only: bool) -> Readable:
        data = self.blobs.get(blob_id)
        if data is None:
            raise BlobNotFoundError(blob_id)
        return BytesReader(data)

    def stat(self, blob_id: str, tenant: str = "", record: bool = False) -> tuple[int | None, int]:
        data = self.blobs.get(blob_id)
        partial = self._partials.get(blob_id)
        return (None if data is None else len(data)), (partial.offset if partial else 0)

    def push_writer(self, blob_id: str, size: int, tenant: str) -> MemorySink:
        sink = self._partials.get(blob_id)
        if sink is None or sink.size != size:
            sink = self._partials[blob_id] = MemorySink(blob_id, size, self._committed)
        return sink

    def _committed(self, blob_id: str, data: bytes) -> None:
        self.blobs[blob_id] = data
        self._partials.pop(blob_id, None)

    def cache_stats(self) -> data_pb2.CacheStats:
        return data_pb2.CacheStats(
            time_s=time.time(), blobs=len(self.blobs), used_bytes=sum(map(len, self.blobs.values()))
        )
