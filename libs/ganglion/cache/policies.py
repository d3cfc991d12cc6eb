"""Eviction policies behind one interface: S3-FIFO (default), LRU and ARC, all size-aware.

A policy keeps only metadata (which keys are resident, in what order, how big); the owner
(:class:`ganglion.cache.partition.Partition`) keeps the budget and calls, for one request:

* ``key in policy`` -> ``on_hit(key)`` on a hit, else
* ``on_miss(key, size)``, then ``evict(skip)`` until the newcomer fits, then ``insert``.

``evict`` picks a victim, forgets it and returns ``(key, size)``; keys for which ``skip``
returns True (blobs being read) are passed over. It returns None when every resident key is
skipped, so a budget can stay exceeded until readers let go, but nothing being read is lost.

Sizes are in bytes (units in the trace simulator). S3-FIFO and ARC are the byte-weighted
versions libCacheSim uses: queue targets and ghost lists are measured in bytes, not entries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Protocol, runtime_checkable

from ganglion.cache.errors import UnknownEvictionPolicyError

Skip = Callable[[Hashable], bool] | None
"""Predicate for keys that must not be evicted now (pinned), or None for "none pinned"."""


@runtime_checkable
class EvictionPolicy(Protocol):
    """Which resident key to evict next. Not thread-safe: the owner serialises calls."""

    name: str

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...

    @property
    def used(self) -> int:
        """Bytes of resident entries."""
        ...

    def set_capacity(self, capacity: int) -> None:
        """New budget; the owner evicts until ``used <= capacity``."""
        ...

    def on_hit(self, key: Hashable) -> None: ...

    def on_miss(self, key: Hashable, size: int) -> None:
        """A miss for ``key``, before room is made for it (ghost lists adapt here)."""
        ...

    def insert(self, key: Hashable, size: int) -> None: ...

    def evict(self, skip: Skip = None) -> tuple[Hashable, int] | None: ...

    def remove(self, key: Hashable) -> int | None:
        """Forget a resident key (explicit delete); its size, or None when absent."""
        ...

    def resident(self) -> Iterator[Hashable]:
        """A snapshot of the resident keys."""
        ...


class LRU:
    """Least recently used: one ordered dict, oldest first."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        self._d: OrderedDict[Hashable, int] = OrderedDict()
        self._used = 0

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    @property
    def used(self) -> int:
        return self._used

    def set_capacity(self, capacity: int) -> None:
        pass  # LRU has no capacity-dependent state

    def on_hit(self, key: Hashable) -> None:
        self._d.move_to_end(key)

    def on_miss(self, key: Hashable, size: int) -> None:
        pass

    def insert(self, key: Hashable, size: int) -> None:
        self._d[key] = size
        self._used += size

    def evict(self, skip: Skip = None) -> tuple[Hashable, int] | None:
        victim = next(iter(self._d), None) if skip is None else _first(self._d, skip)
        if victim is None:
            return None
        size = self._d.pop(victim)
        self._used -= size
        return victim, size

    def remove(self, key: Hashable) -> int | None:
        size = self._d.pop(key, None)
        if size is not None:
            self._used -= size
        return size

    def resident(self) -> Iterator[Hashable]:
        return iter(list(self._d))


def _first(d: OrderedDict[Hashable, int], skip: Callable[[Hashable], bool]) -> Hashable | None:
    return next((k for k in d if not skip(k)), None)


def _trim(ghost: OrderedDict[Hashable, int], used: int, limit: int) -> int:
    """Drop the oldest ghosts until their bytes are within ``limit``; the new byte count."""
    while used > limit and ghost:
        used -= ghost.popitem(last=False)[1]
    return used


class S3FIFO:
    """S3-FIFO (Yang et al., SOSP'23): a small FIFO filters one-hit wonders, a main FIFO with
    2-bit-clock reinsertion keeps the rest, a ghost FIFO remembers recent small-queue victims.

    Parameters are libCacheSim's defaults: small queue 10% of the bytes, ghost 90%, promotion
    from small to main after 2 hits. As in libCacheSim, newcomers go straight to main while the
    small queue is full but nothing was evicted yet (filling an empty cache).
    """

    name = "s3fifo"

    def __init__(
        self,
        capacity: int,
        small_ratio: float = 0.10,
        ghost_ratio: float = 0.90,
        promote_at: int = 2,
    ) -> None:
        self._small_ratio = small_ratio
        self._ghost_ratio = ghost_ratio
        self._promote_at = promote_at
        self._small: OrderedDict[Hashable, int] = OrderedDict()
        self._main: OrderedDict[Hashable, int] = OrderedDict()
        self._ghost: OrderedDict[Hashable, int] = OrderedDict()
        self._freq: dict[Hashable, int] = {}
        self._small_used = self._main_used = self._ghost_used = 0
        self._ghost_hit = False
        self._has_evicted = False
        self.set_capacity(capacity)

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    @property
    def used(self) -> int:
        return self._small_used + self._main_used

    def set_capacity(self, capacity: int) -> None:
        self._small_cap = int(capacity * self._small_ratio)
        self._main_cap = capacity - self._small_cap
        self._ghost_cap = int(capacity * self._ghost_ratio)
        self._ghost_used = _trim(self._ghost, self._ghost_used, self._ghost_cap)

    def on_hit(self, key: Hashable) -> None:
        f = self._freq[key]
        if f < 3:
            self._freq[key] = f + 1

    def on_miss(self, key: Hashable, size: int) -> None:
        ghost_size = self._ghost.pop(key, None)
        self._ghost_hit = ghost_size is not None
        if ghost_size is not None:
            self._ghost_used -= ghost_size

    def insert(self, key: Hashable, size: int) -> None:
        to_main = self._ghost_hit or (not self._has_evicted and self._small_used >= self._small_cap)
        self._ghost_hit = False
        if to_main:
            self._main[key] = size
            self._main_used += size
        else:
            self._small[key] = size
            self._small_used += size
        self._freq[key] = 0

    def evict(self, skip: Skip = None) -> tuple[Hashable, int] | None:
        self._has_evicted = True
        # Each step evicts, moves one entry from small to main, or ages one main entry. Every
        # entry leaves small at most once and is aged at most 3 times (a full pass over main
        # per tick), so 5 steps per entry suffice to find a victim unless all are skipped.
        # When main holds only skipped entries, fall back to small after 4 passes over main.
        main_steps = 4 * len(self._main) + 1
        for _ in range(5 * (len(self._freq) + 1)):
            prefer_main = self._main_used > self._main_cap or not self._small
            if self._main and (prefer_main or not self._small) and main_steps > 0:
                main_steps -= 1
                victim = self._evict_main_step(skip)
            elif self._small:
                victim = self._evict_small_step(skip)
                main_steps += 4  # an entry moved to main may need its own passes
            else:
                return None
            if victim is not None:
                return victim
        return None

    def _evict_small_step(self, skip: Skip) -> tuple[Hashable, int] | None:
        key, size = self._small.popitem(last=False)
        self._small_used -= size
        if self._freq[key] >= self._promote_at or (skip is not None and skip(key)):
            self._main[key] = size
            self._main_used += size
            return None
        del self._freq[key]
        self._ghost[key] = size
        self._ghost_used = _trim(self._ghost, self._ghost_used + size, self._ghost_cap)
        return key, size

    def _evict_main_step(self, skip: Skip) -> tuple[Hashable, int] | None:
        key, size = self._main.popitem(last=False)
        f = self._freq[key]
        if f >= 1 or (skip is not None and skip(key)):
            self._main[key] = size  # reinserted at the head, one clock tick older
            if f >= 1:
                self._freq[key] = f - 1
            return None
        self._main_used -= size
        del self._freq[key]
        return key, size

    def remove(self, key: Hashable) -> int | None:
        if self._freq.pop(key, None) is None:
            return None
        size = self._small.pop(key, None)
        if size is not None:
            self._small_used -= size
            return size
        size = self._main.pop(key)
        self._main_used -= size
        return size

    def resident(self) -> Iterator[Hashable]:
        return iter(list(self._freq))


class ARC:
    """Adaptive Replacement Cache (Megiddo & Modha, FAST'03), byte-weighted.

    T1 holds keys seen once recently, T2 keys seen at least twice; B1/B2 are their ghosts.
    A hit in B1 grows the target ``p`` for T1, a hit in B2 shrinks it. Ghosts are bounded so
    that T1+B1 stays within the capacity and all four lists within twice the capacity.
    """

    name = "arc"

    def __init__(self, capacity: int) -> None:
        self._c = capacity
        self._p = 0.0
        self._t1: OrderedDict[Hashable, int] = OrderedDict()
        self._t2: OrderedDict[Hashable, int] = OrderedDict()
        self._b1: OrderedDict[Hashable, int] = OrderedDict()
        self._b2: OrderedDict[Hashable, int] = OrderedDict()
        self._t1_used = self._t2_used = self._b1_used = self._b2_used = 0
        self._dest_t2 = False
        self._in_b2 = False

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    @property
    def used(self) -> int:
        return self._t1_used + self._t2_used

    def set_capacity(self, capacity: int) -> None:
        self._c = capacity
        self._p = min(self._p, float(capacity))
        self._trim_ghosts(0)

    def on_hit(self, key: Hashable) -> None:
        size = self._t1.pop(key, None)
        if size is not None:
            self._t1_used -= size
            self._t2[key] = size
            self._t2_used += size
        else:
            self._t2.move_to_end(key)

    def on_miss(self, key: Hashable, size: int) -> None:
        self._in_b2 = False
        if key in self._b1:
            ratio = self._b2_used / self._b1_used if self._b1_used else 1.0
            self._p = min(float(self._c), self._p + size * max(1.0, ratio))
            self._b1_used -= self._b1.pop(key)
            self._dest_t2 = True
        elif key in self._b2:
            ratio = self._b1_used / self._b2_used if self._b2_used else 1.0
            self._p = max(0.0, self._p - size * max(1.0, ratio))
            self._b2_used -= self._b2.pop(key)
            self._dest_t2 = True
            self._in_b2 = True
        else:
            self._dest_t2 = False
            self._trim_ghosts(size)

    def _trim_ghosts(self, incoming: int) -> None:
        # L1 = T1 + B1 <= c and L1 + L2 <= 2c, counting the newcomer (ARC case IV).
        limit1 = max(0, self._c - self._t1_used - incoming)
        self._b1_used = _trim(self._b1, self._b1_used, limit1)
        limit2 = max(0, 2 * self._c - self.used - self._b1_used - incoming)
        self._b2_used = _trim(self._b2, self._b2_used, limit2)

    def insert(self, key: Hashable, size: int) -> None:
        if self._dest_t2:
            self._t2[key] = size
            self._t2_used += size
        else:
            self._t1[key] = size
            self._t1_used += size
        self._dest_t2 = self._in_b2 = False

    def evict(self, skip: Skip = None) -> tuple[Hashable, int] | None:
        from_t1 = bool(self._t1) and (
            self._t1_used > self._p or (self._in_b2 and self._t1_used >= self._p) or not self._t2
        )
        order = (True, False) if from_t1 else (False, True)
        for use_t1 in order:
            lst = self._t1 if use_t1 else self._t2
            key = next(iter(lst), None) if skip is None else _first(lst, skip)
            if key is None:
                continue
            size = lst.pop(key)
            if use_t1:
                self._t1_used -= size
                self._b1[key] = size
                self._b1_used += size
            else:
                self._t2_used -= size
                self._b2[key] = size
                self._b2_used += size
            self._trim_ghosts(0)
            return key, size
        return None

    def remove(self, key: Hashable) -> int | None:
        size = self._t1.pop(key, None)
        if size is not None:
            self._t1_used -= size
            return size
        size = self._t2.pop(key, None)
        if size is not None:
            self._t2_used -= size
        return size

    def resident(self) -> Iterator[Hashable]:
        return iter([*self._t1, *self._t2])


PolicyFactory = Callable[[int], EvictionPolicy]

_POLICIES: dict[str, PolicyFactory] = {"s3fifo": S3FIFO, "lru": LRU, "arc": ARC}

DEFAULT_EVICTION = "s3fifo"


def eviction_policy_names() -> list[str]:
    return sorted(_POLICIES)


def create_eviction_policy(name: str, capacity: int) -> EvictionPolicy:
    """A fresh policy by name (``s3fifo``, ``lru``, ``arc``) for a budget of ``capacity``."""
    try:
        factory = _POLICIES[name]
    except KeyError:
        raise UnknownEvictionPolicyError(name, list(_POLICIES)) from None
    return factory(capacity)
