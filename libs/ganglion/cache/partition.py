"""One budget, one eviction policy and its counters: the bookkeeping core of the cache.

The on-disk :class:`ganglion.cache.store.BlobStore` keeps one :class:`Partition` per tenant
budget, and the trace simulator (:func:`simulate`) drives the very same class with unit-size
objects, so the miss ratios in the benchmarks are those of the code the executor runs.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from ganglion.cache.policies import DEFAULT_EVICTION, Skip, create_eviction_policy


@dataclass
class Counters:
    """Cumulative request counters (mutable; :meth:`Partition.snapshot` copies them)."""

    hits: int = 0
    """Requests served from the cache."""
    misses: int = 0
    """Requests that had to be fetched."""
    hit_bytes: int = 0
    """Bytes served from the cache."""
    miss_bytes: int = 0
    """Bytes fetched on misses (counted when the size is known, i.e. on admission)."""
    evictions: int = 0
    """Entries evicted to make room or to shrink."""
    evicted_bytes: int = 0
    """Bytes evicted."""
    rejected: int = 0
    """Misses not admitted: larger than the budget, or every resident entry pinned."""

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def miss_ratio(self) -> float:
        return self.misses / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class PartitionSnapshot:
    """A partition's state at one instant."""

    name: str
    """Tenant name, or ``""`` for the shared pool."""
    policy: str
    """Eviction policy name."""
    capacity: int
    """Budget in bytes."""
    used: int
    """Bytes resident (may exceed the budget while pinned entries block a shrink)."""
    entries: int
    """Resident entries."""
    counters: Counters
    """A copy of the counters."""


class Partition:
    """A budget enforced by an eviction policy. Not thread-safe: the owner serialises calls."""

    def __init__(self, name: str, capacity: int, policy: str = DEFAULT_EVICTION) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.policy = create_eviction_policy(policy, capacity)
        self.counters = Counters()

    def __contains__(self, key: object) -> bool:
        return key in self.policy

    @property
    def used(self) -> int:
        return self.policy.used

    def lookup(self, key: Hashable, size: int = 0) -> bool:
        """Count one request; True (and the policy told) on a hit. ``size``: bytes served."""
        if key in self.policy:
            self.policy.on_hit(key)
            self.counters.hits += 1
            self.counters.hit_bytes += size
            return True
        self.counters.misses += 1
        return False

    def admit(
        self, key: Hashable, size: int, skip: Skip = None
    ) -> tuple[bool, list[tuple[Hashable, int]]]:
        """Insert a missed key, evicting as needed: (admitted, evicted entries)."""
        self.counters.miss_bytes += size
        if key in self.policy:  # raced in meanwhile: nothing to do
            return True, []
        self.policy.on_miss(key, size)
        if size > self.capacity:
            self.counters.rejected += 1
            return False, []
        evicted = self._evict_until(self.capacity - size, skip)
        if self.policy.used + size > self.capacity:
            self.counters.rejected += 1
            return False, evicted
        self.policy.insert(key, size)
        return True, evicted

    def resize(self, capacity: int, skip: Skip = None) -> list[tuple[Hashable, int]]:
        """New budget; evicts unskipped entries until it is met (or nothing else can go)."""
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.policy.set_capacity(capacity)
        return self._evict_until(capacity, skip)

    def trim(self, skip: Skip = None) -> list[tuple[Hashable, int]]:
        """Evict what a shrink had to leave (pinned then, maybe released now)."""
        return self._evict_until(self.capacity, skip)

    def remove(self, key: Hashable) -> int | None:
        return self.policy.remove(key)

    def _evict_until(self, target: int, skip: Skip) -> list[tuple[Hashable, int]]:
        evicted: list[tuple[Hashable, int]] = []
        while self.policy.used > target:
            victim = self.policy.evict(skip)
            if victim is None:
                break
            evicted.append(victim)
            self.counters.evictions += 1
            self.counters.evicted_bytes += victim[1]
        return evicted

    def snapshot(self) -> PartitionSnapshot:
        c = self.counters
        return PartitionSnapshot(
            name=self.name,
            policy=self.policy.name,
            capacity=self.capacity,
            used=self.policy.used,
            entries=len(self.policy),
            counters=Counters(**vars(c)),
        )


def simulate(policy: str, trace: Iterable[Hashable], capacity: int) -> Counters:
    """Replay a trace of unit-size objects through a :class:`Partition`; its counters."""
    part = Partition("sim", capacity, policy)
    lookup, admit = part.lookup, part.admit
    for key in trace:
        if not lookup(key, 1):
            admit(key, 1)
    return part.counters
