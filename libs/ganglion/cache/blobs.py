"""Blob files: content addresses, and the reader and writer of one blob in a
:class:`ganglion.cache.store.BlobStore` (pinned reads; verified, resumable, atomic writes)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ganglion.cache.errors import IntegrityError, InvalidBlobIdError

if TYPE_CHECKING:
    from ganglion.cache.store import BlobStore

BLOB_ID_PATTERN = re.compile(r"[0-9a-f]{64}")
_READ_BYTES = 1 << 20


def check_blob_id(blob_id: str) -> str:
    if not BLOB_ID_PATTERN.fullmatch(blob_id):
        raise InvalidBlobIdError(blob_id)
    return blob_id


def blob_id_of(data: bytes | memoryview) -> str:
    """The content address of ``data``: its sha256 in lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobReader:
    """A pinned, open blob: read it, then :meth:`close` (or use ``with``)."""

    def __init__(self, store: BlobStore, blob_id: str, size: int, file: BinaryIO) -> None:
        self.blob_id = blob_id
        self.size = size
        self.file = file
        self._store: BlobStore | None = store

    def read(self, n: int = -1) -> bytes:
        return self.file.read(n)

    def pread(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (no shared file position: safe across threads)."""
        return os.pread(self.file.fileno(), n, offset)

    def close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            self.file.close()
            store._unpin(self.blob_id)

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlobWriter:
    """Fills one blob; resumable: an aborted writer leaves ``tmp/<id>.partial`` behind and the
    next writer for the same id continues from its length (re-hashing what is there)."""

    def __init__(
        self, store: BlobStore, blob_id: str, size: int, tenant: str, resume: bool
    ) -> None:
        self.blob_id = blob_id
        self.size = size
        self.tenant = tenant
        self._store: BlobStore | None = store
        self.partial = store.tmp_dir / f"{blob_id}.partial"
        self._hash = hashlib.sha256()
        if not resume:
            self.partial.unlink(missing_ok=True)
        self._file = open(self.partial, "ab+")  # noqa: SIM115  (closed in commit/abort)
        self._file.seek(0)
        offset = 0
        while chunk := self._file.read(_READ_BYTES):
            self._hash.update(chunk)
            offset += len(chunk)
        if offset > size:  # a partial longer than the blob is garbage: start over
            self._file.truncate(0)
            self._hash, offset = hashlib.sha256(), 0
        self.offset = offset

    def write(self, data: bytes | memoryview) -> None:
        if self.offset + len(data) > self.size:
            raise IntegrityError(
                f"blob {self.blob_id}: {self.offset + len(data)} bytes exceed its size {self.size}"
            )
        self._file.write(data)
        self._hash.update(data)
        self.offset += len(data)

    def commit(self) -> bool:
        """Verify and publish; True when the blob was admitted to its tenant's budget.

        Raises :class:`IntegrityError` (the partial is deleted) on a wrong length or hash.
        """
        return self._commit(pin=False)[0]

    def commit_and_open(self) -> BlobReader:
        """Like :meth:`commit`, then the blob opened and pinned: it stays readable until the
        reader closes even when it did not fit the tenant's budget (it is deleted then)."""
        reader = self._commit(pin=True)[1]
        assert reader is not None
        return reader

    def _commit(self, pin: bool) -> tuple[bool, BlobReader | None]:
        store = self._take()
        if self.offset != self.size:
            self._discard()
            raise IntegrityError(f"blob {self.blob_id}: got {self.offset} of {self.size} bytes")
        if self._hash.hexdigest() != self.blob_id:
            self._discard()
            raise IntegrityError(f"blob {self.blob_id}: content hashes to {self._hash.hexdigest()}")
        self._file.flush()
        if store.durable:
            os.fsync(self._file.fileno())
        self._file.close()
        return store._publish(self.blob_id, self.size, self.tenant, self.partial, pin)

    def abort(self, keep_partial: bool = True) -> None:
        """Stop writing; keep what arrived for a later resume unless ``keep_partial`` is False."""
        if self._store is None:
            return
        self._take()
        if keep_partial:
            self._file.close()
        else:
            self._discard()

    def _take(self) -> BlobStore:
        store, self._store = self._store, None
        if store is None:
            raise RuntimeError("writer already committed or aborted")
        store._writer_done(self.blob_id)
        return store

    def _discard(self) -> None:
        self._file.close()
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._store is not None:
            self.abort(keep_partial=exc_type is not IntegrityError)
