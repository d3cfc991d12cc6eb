"""``ganglion.data``: how a job reads blobs (dataset shards, checkpoints) by content address.

::

    import ganglion.data
    with ganglion.data.open(blob_id) as f:     # a binary file
        header = f.read(1024)
    shard = ganglion.data.get(blob_id)          # bytes, verified against the sha256 id
    blob_id = ganglion.data.put(checkpoint)     # into this host's cache; peers can fetch it

Lookup order: the host cache directory (a hit is read straight from disk, after one small
``Stat`` RPC that tells the executor about the hit), then the local executor's
``TransferService`` (which reads through to peer executors and the origin and keeps the blob
for the next job), then any ``GANGLION_DATA_SOURCES``. Everything fetched is verified against
its sha256 before it is returned.

Environment (the executor sets the first two for every job it starts):

* ``GANGLION_CACHE_DIR``: the host cache (``<executor state dir>/cache``), read directly.
* ``GANGLION_EXECUTOR_ADDR``: ``host:port`` of this host's executor.
* ``GANGLION_DATA_SOURCES``: comma-separated ``host:port`` TransferServices to try after it
  (e.g. an origin, for a process run outside an executor).
* ``GANGLION_TENANT``: tenant charged in cache statistics and budgets (default ``""``).

Importing this module is cheap: gRPC and the transport load on the first remote call.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import os
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

if TYPE_CHECKING:
    from ganglion.transport.frames import TransportSettings

log = logging.getLogger(__name__)

ENV_CACHE_DIR = "GANGLION_CACHE_DIR"
ENV_EXECUTOR_ADDR = "GANGLION_EXECUTOR_ADDR"
ENV_SOURCES = "GANGLION_DATA_SOURCES"
ENV_TENANT = "GANGLION_TENANT"
TIMEOUT_S = 600.0
T = TypeVar("T")


class DataError(Exception):
    """Base of the client's errors."""


class BlobUnavailableError(DataError, KeyError):
    """No source has the blob."""

    def __str__(self) -> str:
        return str(self.args[0])


class _FileSink:
    """Receives into a file and verifies the sha256 as it goes."""

    def __init__(self, blob_id: str, size: int, file: BinaryIO) -> None:
        self.blob_id, self.size, self.file = blob_id, size, file
        self._hash = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self._hash.update(data)
        self.offset += len(data)

    def verify(self) -> None:
        if self.offset != self.size or self._hash.hexdigest() != self.blob_id:
            raise DataError(f"blob {self.blob_id}: received bytes do not match its sha256")


@dataclass(frozen=True)
class DataClient:
    """Where to look for blobs; :meth:`from_env` reads the variables the executor sets."""

    cache_dir: Path | None = None
    """Host cache directory read directly on a hit."""
    executor_addr: str = ""
    """This host's executor (TransferService)."""
    sources: tuple[str, ...] = ()
    """Further TransferServices, in order."""
    tenant: str = ""
    """Tenant charged for the reads."""
    settings: TransportSettings | None = field(default=None)
    """Chunk size and compression for fetches (``TuneTransport`` chooses them); None: defaults."""

    @classmethod
    def from_env(cls) -> DataClient:
        cache = os.environ.get(ENV_CACHE_DIR, "")
        sources = os.environ.get(ENV_SOURCES, "")
        return cls(
            cache_dir=Path(cache) if cache else None,
            executor_addr=os.environ.get(ENV_EXECUTOR_ADDR, ""),
            sources=tuple(s.strip() for s in sources.split(",") if s.strip()),
            tenant=os.environ.get(ENV_TENANT, ""),
        )

    # --- local -------------------------------------------------------------------------

    def _local(self, blob_id: str) -> BinaryIO | None:
        if self.cache_dir is None:
            return None
        try:
            # An open descriptor survives eviction (unlink), so the read cannot be cut short.
            return builtins.open(self.cache_dir / "blobs" / blob_id[:2] / blob_id, "rb")
        except FileNotFoundError:
            return None

    # --- async API -----------------------------------------------------------------------

    async def aopen(self, blob_id: str) -> BinaryIO:
        """A binary file with the blob's content, positioned at 0."""
        return (await self._open(blob_id))[0]

    async def _open(self, blob_id: str) -> tuple[BinaryIO, bool]:
        """The file, and whether it is the cache's own (a hit: not verified here)."""
        from ganglion.cache.store import check_blob_id

        check_blob_id(blob_id)
        if self.executor_addr and self.cache_dir is not None:
            if await self._stat_hit(blob_id) and (f := self._local(blob_id)) is not None:
                return f, True
        elif (f := self._local(blob_id)) is not None:
            return f, True
        return await self._fetched(blob_id, [self.executor_addr, *self.sources]), False

    async def _fetched(self, blob_id: str, addresses: list[str]) -> BinaryIO:
        import tempfile

        tmp = tempfile.TemporaryFile()  # noqa: SIM115  (returned to the caller)
        try:
            await self._fetch_into(blob_id, tmp, addresses)
        except BaseException:
            tmp.close()
            raise
        tmp.seek(0)
        return tmp

    async def aget(self, blob_id: str) -> bytes:
        """The blob's bytes, verified against its sha256 id: a fetched blob as it arrives, a
        cached copy here (a file changed on disk must not reach a job as the blob; the
        sources, not the executor that serves the same file, are then asked for it)."""
        f, cached = await self._open(blob_id)
        with f:
            data = f.read()
        if not cached or hashlib.sha256(data).hexdigest() == blob_id:
            return data
        log.warning("cached copy of blob %s does not match its sha256; fetching it", blob_id)
        if not self.sources:
            raise DataError(
                f"blob {blob_id}: the cached copy does not match its sha256 (changed or cut "
                f"short on disk?) and no {ENV_SOURCES} to fetch it from"
            )
        with await self._fetched(blob_id, list(self.sources)) as fetched:
            return fetched.read()

    async def aput(self, data: bytes) -> str:
        """Push ``data`` to this host's executor (or the first source); its blob id."""
        from ganglion import rpc
        from ganglion.cache.store import blob_id_of
        from ganglion.transport.backends import BytesReader
        from ganglion.transport.service import push
        from ganglion.v1 import data_pb2_grpc

        target = self.executor_addr or next(iter(self.sources), "")
        if not target:
            raise DataError(f"nowhere to put blobs: set {ENV_EXECUTOR_ADDR} or {ENV_SOURCES}")
        blob_id = blob_id_of(data)
        async with rpc.channel(target) as ch:
            stub = data_pb2_grpc.TransferServiceStub(ch)
            await push(stub, blob_id, BytesReader(data), self.settings, tenant=self.tenant)
        return blob_id

    async def _stat_hit(self, blob_id: str) -> bool:
        from ganglion import rpc
        from ganglion.v1 import data_pb2, data_pb2_grpc

        async with rpc.channel(self.executor_addr) as ch:
            stub = data_pb2_grpc.TransferServiceStub(ch)
            req = data_pb2.StatRequest(blob_id=blob_id, tenant=self.tenant, record=True)
            resp = await stub.Stat(req, timeout=10)
        return resp.present

    async def _fetch_into(self, blob_id: str, file: BinaryIO, addresses: list[str]) -> None:
        import grpc

        from ganglion import rpc
        from ganglion.transport.errors import TransferError
        from ganglion.transport.service import fetch
        from ganglion.v1 import data_pb2_grpc

        addresses = [a for a in addresses if a]
        if not addresses:
            raise BlobUnavailableError(
                f"blob {blob_id}: not in the cache and no {ENV_EXECUTOR_ADDR}/{ENV_SOURCES} set"
            )
        problems: list[str] = []
        sinks: list[_FileSink] = []
        for address in addresses:

            def open_sink(size: int) -> _FileSink:
                file.seek(0)
                file.truncate()
                sinks.append(_FileSink(blob_id, size, file))
                return sinks[-1]

            async with rpc.channel(address) as ch:
                try:
                    await fetch(
                        data_pb2_grpc.TransferServiceStub(ch),
                        blob_id,
                        open_sink,
                        self.settings,
                        tenant=self.tenant,
                        timeout_s=TIMEOUT_S,
                    )
                except grpc.aio.AioRpcError as exc:
                    problems.append(f"{address}: {exc.code().name} {exc.details()}")
                    continue
                except TransferError as exc:
                    problems.append(f"{address}: {exc}")
                    continue
            try:
                sinks[-1].verify()
            except DataError as exc:  # a corrupt copy there: the next source may have it right
                problems.append(f"{address}: {exc}")
                continue
            return
        raise BlobUnavailableError(f"blob {blob_id} unavailable: " + "; ".join(problems))

    # --- sync API ------------------------------------------------------------------------

    def open(self, blob_id: str) -> BinaryIO:
        return _run(self.aopen(blob_id))

    def get(self, blob_id: str) -> bytes:
        return _run(self.aget(blob_id))

    def put(self, data: bytes) -> str:
        return _run(self.aput(data))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise DataError("called from a running event loop: use `await client.aget(...)` instead")


def open(blob_id: str) -> BinaryIO:
    """The blob as a binary file (see the module docstring for where it comes from)."""
    return DataClient.from_env().open(blob_id)


def get(blob_id: str) -> bytes:
    """The blob's bytes, verified against its sha256 id."""
    return DataClient.from_env().get(blob_id)


def put(data: bytes) -> str:
    """Store ``data`` in this host's cache (through the executor); its blob id."""
    return DataClient.from_env().put(data)
