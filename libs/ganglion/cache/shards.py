"""SHARDS miss-ratio curves (Waldspurger et al., FAST'15), fixed-size variant, byte-weighted.

A request is sampled when a hash of its key falls below a threshold ``T`` out of ``P``
(spatial sampling: every request for a sampled key is seen, so reuse distances among sampled
keys are exact). A sampled reuse distance, divided by the sampling rate ``R = T/P``, estimates
the LRU stack distance in bytes; the histogram of those distances is the LRU miss-ratio curve
for every cache size at once.

Memory stays bounded: at most ``max_keys`` sampled keys are tracked. When a new key would
exceed that, ``T`` drops to the largest tracked hash and the keys at or above it are dropped,
and the histogram is rescaled by the rate ratio (the paper's fixed-size SHARDS). ``curve``
applies SHARDS-adj: the difference between the expected and the actual number of sampled
requests is credited to the smallest distance, which removes most of the sampling bias.

Reuse distances come from a Fenwick tree over access times holding each tracked key's size at
its last access, compacted when its index space runs out (O(log n) per sampled request).
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

_P = 1 << 24
_MASK64 = (1 << 64) - 1


def key_hash(key: Hashable) -> int:
    """A uniform hash of ``key`` in ``[0, 2**24)``, stable across processes."""
    if isinstance(key, int):
        # splitmix64 finaliser: integer ids from traces are sequential, not random.
        z = (key + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return (z ^ (z >> 31)) % _P
    data = key.encode() if isinstance(key, str) else repr(key).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") % _P


@dataclass(frozen=True)
class MissRatioCurve:
    """Estimated LRU miss ratio as a function of cache size in bytes."""

    sizes: tuple[int, ...]
    """Cache sizes in bytes, ascending; the first is 0 (miss ratio 1)."""
    miss_ratios: tuple[float, ...]
    """Miss ratio at each size, non-increasing."""
    requests: int
    """Requests the curve was estimated from (all of them, sampled or not)."""
    sample_rate: float
    """Final SHARDS sampling rate ``T/P``."""

    def miss_ratio_at(self, size: float) -> float:
        """Linear interpolation between points; flat beyond the last point."""
        if not self.sizes:
            return 1.0
        if size >= self.sizes[-1]:
            return self.miss_ratios[-1]
        lo, hi = 0, len(self.sizes) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.sizes[mid] <= size:
                lo = mid
            else:
                hi = mid
        s0, s1 = self.sizes[lo], self.sizes[hi]
        m0, m1 = self.miss_ratios[lo], self.miss_ratios[hi]
        if s1 == s0:
            return m1
        return m0 + (m1 - m0) * (size - s0) / (s1 - s0)


EMPTY_CURVE = MissRatioCurve((0,), (1.0,), 0, 1.0)


class _Fenwick:
    def __init__(self, n: int) -> None:
        self.n = n
        self.tree = [0] * (n + 1)

    def add(self, i: int, delta: int) -> None:
        tree, n = self.tree, self.n
        while i <= n:
            tree[i] += delta
            i += i & -i

    def prefix(self, i: int) -> int:
        tree, total = self.tree, 0
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total


class Shards:
    """Online SHARDS estimator for one request stream (one tenant)."""

    def __init__(self, rate: float = 0.1, max_keys: int = 8192, bins_per_octave: int = 8) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        if max_keys < 2:
            raise ValueError(f"max_keys must be >= 2, got {max_keys}")
        self._threshold = max(1, round(rate * _P))
        self._max_keys = max_keys
        self._bins_per_octave = bins_per_octave
        self._last: dict[Hashable, tuple[int, int, int]] = {}  # key -> (time, size, hash)
        self._by_hash: list[tuple[int, Hashable]] = []  # max-heap of (-hash, key), lazy
        self._tree = _Fenwick(2 * max_keys + 16)
        self._now = 0
        self._hist: dict[int, float] = {}  # distance bin -> weight (at the current rate)
        self._cold = 0.0  # first references (infinite distance), same weighting
        self._sampled = 0.0
        self.requests = 0

    @property
    def rate(self) -> float:
        return self._threshold / _P

    def record(self, key: Hashable, size: int = 1, hashed: int | None = None) -> None:
        """One request for ``key`` of ``size`` bytes (``hashed``: a precomputed key_hash)."""
        self.requests += 1
        h = key_hash(key) if hashed is None else hashed
        if h >= self._threshold:
            return
        self._sampled += 1
        prev = self._last.get(key)
        if self._now >= self._tree.n:
            self._compact()
        self._now += 1
        if prev is None:
            self._cold += 1
            heapq.heappush(self._by_hash, (-h, key))
        else:
            t, old_size, _ = prev
            # Bytes of distinct keys touched since, plus the key itself: its LRU stack depth.
            between = self._tree.prefix(self._now - 1) - self._tree.prefix(t)
            distance = (between + size) / self.rate
            b = self._bin(distance)
            self._hist[b] = self._hist.get(b, 0.0) + 1.0
            self._tree.add(t, -old_size)
        self._tree.add(self._now, size)
        self._last[key] = (self._now, size, h)
        if len(self._last) > self._max_keys:
            self._lower_threshold()

    def _bin(self, distance: float) -> int:
        return 0 if distance <= 1 else math.ceil(math.log2(distance) * self._bins_per_octave)

    def _bin_upper(self, b: int) -> int:
        return math.ceil(2 ** (b / self._bins_per_octave))

    def _compact(self) -> None:
        live = sorted(self._last.items(), key=lambda kv: kv[1][0])
        self._tree = _Fenwick(self._tree.n)
        for i, (key, (_, size, h)) in enumerate(live, start=1):
            self._last[key] = (i, size, h)
            self._tree.add(i, size)
        self._now = len(live)

    def _lower_threshold(self) -> None:
        old = self._threshold
        while len(self._last) > self._max_keys:
            neg, key = heapq.heappop(self._by_hash)
            entry = self._last.get(key)
            if entry is None or entry[2] != -neg:
                continue  # stale heap entry
            self._threshold = min(self._threshold, -neg)
            del self._last[key]
            self._tree.add(entry[0], -entry[1])
        # Drop every other key at or above the new threshold too.
        while self._by_hash and -self._by_hash[0][0] >= self._threshold:
            neg, key = heapq.heappop(self._by_hash)
            entry = self._last.pop(key, None)
            if entry is not None:
                self._tree.add(entry[0], -entry[1])
        scale = self._threshold / old
        self._hist = {b: w * scale for b, w in self._hist.items()}
        self._cold *= scale
        self._sampled *= scale

    def curve(self, sizes: Sequence[int] | None = None) -> MissRatioCurve:
        """The miss-ratio curve at ``sizes`` (default: every histogram bin edge)."""
        if self.requests == 0:
            return EMPTY_CURVE
        expected = self.requests * self.rate
        # SHARDS-adj: credit the sampling shortfall (or excess) to the shortest distance.
        adj = expected - self._sampled
        total = self._sampled + adj
        if total <= 0:
            return EMPTY_CURVE
        bins = sorted(self._hist)
        edges = [self._bin_upper(b) for b in bins]
        points = sorted({0, *edges} if sizes is None else {0, *sizes})
        ratios: list[float] = []
        hits, j = adj, 0
        for size in points:
            while j < len(bins) and edges[j] <= size:
                hits += self._hist[bins[j]]
                j += 1
            ratio = 1.0 if size == 0 else 1.0 - hits / total
            ratios.append(min(1.0, max(0.0, ratio)))
        for i in range(1, len(ratios)):  # estimation noise must not make the curve rise
            ratios[i] = min(ratios[i], ratios[i - 1])
        return MissRatioCurve(tuple(points), tuple(ratios), self.requests, self.rate)
