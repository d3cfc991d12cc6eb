"""The on-disk, content-addressed blob store of one host, within a byte budget.

Layout under ``root``: ``blobs/<id[:2]>/<id>`` holds complete, verified blobs (the id is the
sha256 of the content); ``tmp/`` holds blobs being written (``<id>.partial``), renamed into
``blobs/`` only after their length and sha256 check out, so a reader never sees a torn blob.

Budgets are per tenant: a tenant with an explicit budget has its own :class:`Partition`,
every other tenant shares the pool of whatever capacity is left. One file on disk can belong
to several partitions (two tenants reading the same shard); it is deleted when no partition
holds it and nobody reads it.

Readers pin: a blob opened with :meth:`BlobStore.open` is never chosen for eviction until its
reader closes, so shrinking a budget under concurrent reads loses nothing being read (the
partition stays over budget and is trimmed when the last reader lets go). Jobs that open the
files directly are covered by POSIX semantics instead: an unlinked file stays readable
through a descriptor opened before.

Thread-safe: metadata changes under one lock; file reads and writes happen outside it.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ganglion.cache.blobs import (
    BLOB_ID_PATTERN,
    BlobReader,
    BlobWriter,
    blob_id_of,
    check_blob_id,
    fsync_dir,
)
from ganglion.cache.errors import (
    BlobBusyError,
    BlobNotFoundError,
    BudgetError,
    IntegrityError,
)
from ganglion.cache.partition import Counters, Partition, PartitionSnapshot
from ganglion.cache.policies import DEFAULT_EVICTION
from ganglion.cache.shards import MissRatioCurve, Shards

SHARED = ""
"""Name of the shared partition (tenants without an explicit budget)."""

__all__ = [
    "SHARED",
    "BlobReader",
    "BlobStore",
    "BlobWriter",
    "CacheSnapshot",
    "TenantSnapshot",
    "blob_id_of",
    "check_blob_id",
]


@dataclass(frozen=True)
class TenantSnapshot:
    """One tenant's requests since the store opened."""

    tenant: str
    """Tenant name."""
    partition: str
    """Partition charged for it: its own name, or ``""`` for the shared pool."""
    hits: int
    """Requests served from this host."""
    misses: int
    """Requests not found here."""
    hit_bytes: int
    """Bytes served from this host."""
    miss_bytes: int
    """Bytes written here after misses."""
    curve: MissRatioCurve
    """SHARDS estimate of its LRU miss ratio against cache size."""


@dataclass(frozen=True)
class CacheSnapshot:
    """The whole store at one instant."""

    capacity: int
    """Host budget in bytes."""
    used: int
    """Bytes of distinct blobs on disk (pinned leftovers of a shrink included)."""
    blobs: int
    """Distinct blobs on disk."""
    policy: str
    """Eviction policy of every partition."""
    partitions: tuple[PartitionSnapshot, ...]
    """Shared pool first, then tenant partitions by name."""
    tenants: tuple[TenantSnapshot, ...]
    """Tenants by name."""
    time_s: float
    """Unix time of the snapshot."""


class _File:
    __slots__ = ("pins", "refs", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.refs: set[str] = set()
        self.pins = 0


class _Tenant:
    def __init__(self, shards: Shards) -> None:
        self.hits = self.misses = self.hit_bytes = self.miss_bytes = 0
        self.shards = shards


class BlobStore:
    """See the module docstring."""

    def __init__(
        self,
        root: Path,
        capacity: int,
        policy: str = DEFAULT_EVICTION,
        *,
        shards_rate: float = 1.0,
        shards_max_keys: int = 8192,
        durable: bool = True,
    ) -> None:
        if capacity < 0:
            raise BudgetError(f"capacity must be >= 0, got {capacity}")
        self.root = root
        self.blobs_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.policy = policy
        self.durable = durable
        self._capacity = capacity
        self._shards_rate = shards_rate
        self._shards_max_keys = shards_max_keys
        self._lock = threading.RLock()
        self._files: dict[str, _File] = {}
        self._budgets: dict[str, int] = {}
        self._parts: dict[str, Partition] = {SHARED: Partition(SHARED, capacity, policy)}
        self._tenants: dict[str, _Tenant] = {}
        # Who last used each blob of the shared pool: it moves with them to their own budget.
        self._owner: dict[str, str] = {}
        self._writing: set[str] = set()
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._adopt_existing()

    # --- lookups --------------------------------------------------------------------

    def path(self, blob_id: str) -> Path:
        return self.blobs_dir / blob_id[:2] / blob_id

    def contains(self, blob_id: str) -> bool:
        with self._lock:
            return blob_id in self._files

    def size_of(self, blob_id: str) -> int | None:
        with self._lock:
            f = self._files.get(blob_id)
            return None if f is None else f.size

    def sample(self, n: int, rng: random.Random | None = None) -> list[str]:
        """Up to ``n`` random cached blob ids (to measure what the cache holds)."""
        with self._lock:
            ids = list(self._files)
        return (rng or random.Random()).sample(ids, min(n, len(ids)))

    def partial_bytes(self, blob_id: str) -> int:
        """Bytes of an interrupted write of ``blob_id`` kept for resume (0 when none)."""
        try:
            return (self.tmp_dir / f"{check_blob_id(blob_id)}.partial").stat().st_size
        except FileNotFoundError:
            return 0

    def open(self, blob_id: str, tenant: str = "", record: bool = True) -> BlobReader:
        """Open and pin a cached blob; raises :class:`BlobNotFoundError` (a miss).

        ``record`` counts the request for ``tenant`` (hit/miss, MRC, recency); peers probing
        for a blob pass False so their probes do not distort this host's statistics.
        """
        check_blob_id(blob_id)
        with self._lock:
            f = self._files.get(blob_id)
            if record:
                self._record(blob_id, tenant, f)
            if f is None:
                raise BlobNotFoundError(blob_id)
            try:
                file = open(self.path(blob_id), "rb")  # noqa: SIM115  (BlobReader closes it)
            except FileNotFoundError:  # removed behind our back: forget it, report a miss
                for name in f.refs:
                    if (part := self._parts.get(name)) is not None:
                        part.remove(blob_id)
                del self._files[blob_id]
                raise BlobNotFoundError(blob_id) from None
            f.pins += 1
            return BlobReader(self, blob_id, f.size, file)

    def touch(self, blob_id: str, tenant: str = "") -> int | None:
        """Count a hit for ``tenant`` if the blob is here (a client reading the file itself);
        its size, or None (nothing counted: the fetch that follows counts the miss)."""
        check_blob_id(blob_id)
        with self._lock:
            f = self._files.get(blob_id)
            if f is not None:
                self._record(blob_id, tenant, f)
            return None if f is None else f.size

    def read(self, blob_id: str, tenant: str = "") -> bytes:
        with self.open(blob_id, tenant) as r:
            return r.read()

    def _record(self, blob_id: str, tenant: str, f: _File | None) -> None:
        t = self._tenant(tenant)
        part = self._partition_for(tenant)
        if f is None:
            part.lookup(blob_id)
            t.misses += 1
            return
        t.hits += 1
        t.hit_bytes += f.size
        t.shards.record(blob_id, f.size)
        if not part.lookup(blob_id, f.size):
            # Local, but charged to another partition: charge this tenant too (no disk cost).
            self._admit(part, blob_id, f, tenant)
        elif part.name == SHARED:
            self._owner[blob_id] = tenant

    # --- writes ---------------------------------------------------------------------

    def writer(self, blob_id: str, size: int, tenant: str = "", resume: bool = True) -> BlobWriter:
        """A writer for a missing blob; raises :class:`BlobBusyError` if one is active."""
        check_blob_id(blob_id)
        if size < 0:
            raise IntegrityError(f"size must be >= 0, got {size}")
        with self._lock:
            if blob_id in self._writing:
                raise BlobBusyError(blob_id)
            self._writing.add(blob_id)
        try:
            return BlobWriter(self, blob_id, size, tenant, resume)
        except BaseException:
            self._writer_done(blob_id)
            raise

    def put(self, data: bytes, tenant: str = "") -> str:
        """Store ``data`` (not counted as a request); returns its blob id."""
        blob_id = blob_id_of(data)
        if self.contains(blob_id):
            return blob_id
        with self.writer(blob_id, len(data), tenant, resume=False) as w:
            w.write(data)
            w.commit()
        return blob_id

    def _writer_done(self, blob_id: str) -> None:
        with self._lock:
            self._writing.discard(blob_id)

    def _publish(
        self, blob_id: str, size: int, tenant: str, partial: Path, pin: bool
    ) -> tuple[bool, BlobReader | None]:
        dest = self.path(blob_id)
        dest.parent.mkdir(exist_ok=True)
        os.replace(partial, dest)
        if self.durable:
            fsync_dir(dest.parent)
        with self._lock:
            t = self._tenant(tenant)
            t.miss_bytes += size
            t.shards.record(blob_id, size)
            f = self._files.setdefault(blob_id, _File(size))
            reader = None
            if pin:  # before admission, so a blob too big for the budget survives its reader
                reader = BlobReader(self, blob_id, size, open(dest, "rb"))  # noqa: SIM115
                f.pins += 1
            part = self._partition_for(tenant)
            admitted = part.name in f.refs or self._admit(part, blob_id, f, tenant)
            if not f.refs and f.pins == 0:
                self._delete(blob_id)
            return admitted, reader

    def _admit(self, part: Partition, blob_id: str, f: _File, tenant: str) -> bool:
        admitted, evicted = part.admit(blob_id, f.size, self._pinned)
        self._release(part.name, evicted)
        if admitted:
            f.refs.add(part.name)
            if part.name == SHARED:
                self._owner[blob_id] = tenant
        return admitted

    # --- eviction and budgets -------------------------------------------------------

    def _pinned(self, key: Hashable) -> bool:
        f = self._files.get(str(key))
        return f is not None and f.pins > 0

    def _release(self, part: str, evicted: list[tuple[Hashable, int]]) -> None:
        for key, _ in evicted:
            f = self._files.get(str(key))
            if f is None:
                continue
            f.refs.discard(part)
            if part == SHARED:
                self._owner.pop(str(key), None)
            if not f.refs and f.pins == 0:
                self._delete(str(key))

    def _delete(self, blob_id: str) -> None:
        del self._files[blob_id]
        self._owner.pop(blob_id, None)
        self.path(blob_id).unlink(missing_ok=True)

    def _unpin(self, blob_id: str) -> None:
        with self._lock:
            f = self._files.get(blob_id)
            if f is None:
                return
            f.pins -= 1
            if f.pins > 0:
                return
            if not f.refs:
                self._delete(blob_id)
                return
            for name in list(f.refs):
                part = self._parts.get(name)
                if part is not None and part.used > part.capacity:
                    self._release(name, part.trim(self._pinned))

    @property
    def capacity(self) -> int:
        return self._capacity

    def budgets(self) -> dict[str, int]:
        """Explicit per-tenant budgets (the shared pool gets the rest of the capacity)."""
        with self._lock:
            return dict(self._budgets)

    def set_budgets(self, budgets: Mapping[str, int], capacity: int | None = None) -> bool:
        """Replace the explicit per-tenant budgets (and optionally the host capacity).

        Declarative, hence idempotent: applying the same budgets again changes nothing.
        Shrinking evicts unpinned entries at once; pinned ones go when their reader closes.
        Tenants that lose their budget move, with their entries, to the shared pool.
        Returns whether anything changed; raises :class:`BudgetError` when budgets are
        negative, name the shared pool, or add up to more than the capacity.
        """
        cap = self._capacity if capacity is None else capacity
        if cap < 0:
            raise BudgetError(f"capacity must be >= 0, got {cap}")
        for tenant, b in budgets.items():
            if tenant == SHARED:
                raise BudgetError("budgets[''] : the shared pool gets what is left, not a budget")
            if b < 0:
                raise BudgetError(f"budgets[{tenant!r}] must be >= 0, got {b}")
        total = sum(budgets.values())
        if total > cap:
            raise BudgetError(f"budgets add up to {total} bytes, more than the capacity {cap}")
        with self._lock:
            if dict(budgets) == self._budgets and cap == self._capacity:
                return False
            self._capacity = cap
            old = self._budgets
            self._budgets = dict(budgets)
            # Tenants with a new budget take their blobs out of the shared pool with them
            # before it shrinks; tenants that lose theirs move into it once it has its size.
            for tenant, b in budgets.items():
                part = self._parts.get(tenant)
                if part is None:
                    self._parts[tenant] = Partition(tenant, b, self.policy)
                    self._claim(tenant)
                else:
                    self._release(tenant, part.resize(b, self._pinned))
            self._release(SHARED, self._parts[SHARED].resize(cap - total, self._pinned))
            for tenant in [t for t in old if t not in budgets]:
                self._dissolve(tenant)
            return True

    def _claim(self, tenant: str) -> None:
        part, shared = self._parts[tenant], self._parts[SHARED]
        for blob_id in [b for b, owner in self._owner.items() if owner == tenant]:
            f = self._files[blob_id]
            shared.remove(blob_id)
            f.refs.discard(SHARED)
            del self._owner[blob_id]
            self._admit(part, blob_id, f, tenant)
            if not f.refs and f.pins == 0:
                self._delete(blob_id)

    def _dissolve(self, tenant: str) -> None:
        part = self._parts.pop(tenant)
        shared = self._parts[SHARED]
        for key in part.policy.resident():
            f = self._files.get(str(key))
            if f is None:
                continue
            f.refs.discard(tenant)
            if SHARED not in f.refs:
                self._admit(shared, str(key), f, tenant)
            if not f.refs and f.pins == 0:
                self._delete(str(key))

    def _partition_for(self, tenant: str) -> Partition:
        return self._parts[tenant] if tenant in self._budgets else self._parts[SHARED]

    def _tenant(self, tenant: str) -> _Tenant:
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = _Tenant(Shards(self._shards_rate, self._shards_max_keys))
        return t

    # --- startup and stats ----------------------------------------------------------

    def _adopt_existing(self) -> None:
        """Blobs from an earlier run join the shared pool, oldest first; partials are dropped
        (their disk use is not budgeted, and a fresh fetch is cheap next to a stale one)."""
        for p in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
        found: list[tuple[float, str, int]] = []
        for p in self.blobs_dir.glob("*/*"):
            if BLOB_ID_PATTERN.fullmatch(p.name) and p.parent.name == p.name[:2]:
                st = p.stat()
                found.append((st.st_mtime, p.name, st.st_size))
        shared = self._parts[SHARED]
        with self._lock:
            for _, blob_id, size in sorted(found):
                f = self._files[blob_id] = _File(size)
                self._admit(shared, blob_id, f, SHARED)
                if not f.refs:
                    self._delete(blob_id)
            shared.counters = Counters()  # adoption is not traffic

    def snapshot(self) -> CacheSnapshot:
        with self._lock:
            parts = [self._parts[SHARED], *(self._parts[t] for t in sorted(self._budgets))]
            tenants = tuple(
                TenantSnapshot(
                    tenant=name,
                    partition=name if name in self._budgets else SHARED,
                    hits=t.hits,
                    misses=t.misses,
                    hit_bytes=t.hit_bytes,
                    miss_bytes=t.miss_bytes,
                    curve=t.shards.curve(),
                )
                for name, t in sorted(self._tenants.items())
            )
            return CacheSnapshot(
                capacity=self._capacity,
                used=sum(f.size for f in self._files.values()),
                blobs=len(self._files),
                policy=self.policy,
                partitions=tuple(p.snapshot() for p in parts),
                tenants=tenants,
                time_s=time.time(),
            )
