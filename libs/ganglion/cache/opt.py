"""Belady's OPT (offline, for reference in benchmarks only) and trace loading.

OPT knows the future: on a miss with a full cache it drops whichever object, the newcomer
included, is next requested furthest in the future. No online policy can miss less with
unit-size objects, so it is the floor the eviction policies are compared against.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

_NEVER = 1 << 62


def load_trace(path: Path) -> list[int]:
    """A trace of one integer object id per line (libCacheSim's txt format)."""
    ids = np.loadtxt(path, dtype=np.int64, ndmin=1)
    return [int(x) for x in ids]


def next_uses(trace: Sequence[Hashable]) -> list[int]:
    """For each position, the index of the next request for the same key (or a sentinel)."""
    nxt = [_NEVER] * len(trace)
    seen: dict[Hashable, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        key = trace[i]
        nxt[i] = seen.get(key, _NEVER)
        seen[key] = i
    return nxt


def belady_misses(trace: Sequence[Hashable], capacity: int) -> int:
    """Misses of Belady's OPT on unit-size objects with room for ``capacity`` of them."""
    if capacity <= 0:
        return len(trace)
    nxt = next_uses(trace)
    resident: dict[Hashable, int] = {}  # key -> its next use, the heap's valid entry
    heap: list[tuple[int, int]] = []  # (-next use, position that pushed it); lazy deletion
    keys_at: dict[int, Hashable] = {}
    misses = 0
    for i, key in enumerate(trace):
        n = nxt[i]
        if key in resident:
            resident[key] = n
        else:
            misses += 1
            if len(resident) >= capacity:
                # Furthest next use among residents; stale heap entries are skipped.
                while True:
                    neg, pos = heap[0]
                    victim = keys_at[pos]
                    if resident.get(victim) == -neg:
                        break
                    heapq.heappop(heap)
                    del keys_at[pos]
                if -neg <= n:
                    continue  # the newcomer is needed last: OPT does not keep it
                heapq.heappop(heap)
                del keys_at[pos]
                del resident[victim]
            resident[key] = n
        heapq.heappush(heap, (-n, i))
        keys_at[i] = key
    return misses
