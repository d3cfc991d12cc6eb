"""Gang placement shared by every policy: which host(s) get a job of N GPUs.

A job of at most G GPUs (the largest host) goes on one host; a larger job takes whole, fully
free hosts. Placement never splits a small job across hosts.
"""

from __future__ import annotations

import bisect
import enum
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from ganglion.domain import ClusterState, Segment


class Fit(enum.Enum):
    FIRST = "first-fit"
    """The first host (in cluster order) with room."""
    BEST = "best-fit"
    """The host left with the fewest free GPUs (consolidation: keeps big holes for big jobs)."""


class Choice(NamedTuple):
    segments: tuple[Segment, ...]
    score: float
    runner_up_host: str
    runner_up_score: float


@dataclass(frozen=True, eq=False)
class _Layout:
    """What every ``FreeMap`` of one cluster shares: its hosts and their sizes."""

    hosts: tuple[str, ...]
    """In cluster order."""
    capacity: dict[str, int]
    """GPUs per host."""

    @functools.cached_property
    def position(self) -> dict[str, int]:
        """Index of each host in ``hosts``."""
        return {h: i for i, h in enumerate(self.hosts)}

    @functools.cached_property
    def max_host(self) -> int:
        return max(self.capacity.values(), default=0)

    @functools.cached_property
    def sizes(self) -> list[int]:
        """``capacity`` in ``hosts`` order."""
        return [self.capacity[h] for h in self.hosts]


@functools.lru_cache(maxsize=16)
def _layout(hosts: tuple[str, ...], capacity: tuple[int, ...]) -> _Layout:
    # States of one cluster share it: the simulator asks for thousands of FreeMaps a second.
    return _Layout(hosts, dict(zip(hosts, capacity, strict=True)))


def _position(candidate: tuple[int, int]) -> int:
    return candidate[1]


_Columns = tuple[npt.NDArray[np.integer], npt.NDArray[np.bool_], Sequence[int]]
"""Devices in (host, device) order, whether each is free, and where each host starts."""


class FreeMap:
    """Free devices per host, updated as a policy places jobs within one decision.

    Built from a state with a few numpy calls whatever the cluster's size (a decision builds
    one, or up to three when it may preempt): free counts per host, and each host's list of
    free devices only once a job goes there. Finding a host looks at an index of hosts by
    free count (a few buckets, not every host), and a job of at most one host's GPUs that fits
    nowhere is turned away by two integer comparisons (``largest``, ``total_free``).
    The per-job steps are plain Python on purpose: a handful of numpy calls per job cost more
    than they save on clusters of tens of hosts.
    """

    def __init__(self, free: Mapping[str, Sequence[int]], capacity: Mapping[str, int]) -> None:
        """From free device indices per host (in cluster order; each list is sorted) and GPUs
        per host (every host of ``free`` must be in ``capacity``)."""
        lists = [sorted(free[h]) for h in free]
        layout = _Layout(tuple(free), dict(capacity))
        self._index(layout, [len(v) for v in lists], dict(enumerate(lists)), None)

    def _index(
        self,
        layout: _Layout,
        counts: list[int],
        lists: dict[int, list[int]],
        columns: _Columns | None,
    ) -> None:
        self.capacity = layout.capacity
        """GPUs per host. Read only (shared by the maps of one cluster layout)."""
        self.max_host = layout.max_host
        self._hosts = layout.hosts
        self._position = layout.position
        self._sizes = layout.sizes
        self._counts = counts
        self._lists = lists  # host position -> its free devices, ascending; see _free_on
        self._columns = columns
        self.total_free = sum(counts)
        self.largest = max(counts, default=0)
        """The most GPUs free on one host."""
        # Hosts by free count, each bucket in cluster order.
        self._by_free: list[list[int]] = [[] for _ in range(max(self.max_host, self.largest) + 1)]
        for i, count in enumerate(counts):
            self._by_free[count].append(i)

    @classmethod
    def from_state(
        cls, state: ClusterState, also_free: npt.NDArray[np.bool_] | None = None
    ) -> FreeMap:
        """Free GPUs of ``state`` (plus those where ``also_free`` is set, e.g. the GPUs of jobs
        a policy considers preempting): the same devices as ``state.free_by_host()``."""
        is_free = state.gpu_job < 0
        if also_free is not None:
            is_free |= also_free
        hosts = state.hosts
        counts = np.bincount(state.gpu_host[is_free], minlength=len(hosts)).tolist()
        columns: _Columns
        if state.host_offsets is not None:  # host-major columns (the simulator's): as they are
            columns = (state.gpu_index, is_free, state.host_offsets)
        else:
            order = np.lexsort((state.gpu_index, state.gpu_host))
            offsets = np.searchsorted(state.gpu_host[order], np.arange(len(hosts) + 1))
            columns = (state.gpu_index[order], is_free[order], offsets.tolist())
        new = cls.__new__(cls)
        new._index(_layout(hosts, state.host_capacity), counts, {}, columns)
        return new

    def _free_on(self, i: int) -> list[int]:
        """The free devices of host ``i`` (ascending), from the state's columns on first use."""
        devices = self._lists.get(i)
        if devices is None:
            assert self._columns is not None  # a map built from lists has every host's
            column, is_free, offsets = self._columns
            lo, hi = offsets[i], offsets[i + 1]
            devices = self._lists[i] = column[lo:hi][is_free[lo:hi]].tolist()
        return devices

    def holds(self, segment: Segment) -> bool:
        """Whether every device of ``segment`` is free here (False for an unknown host)."""
        i = self._position.get(segment.host)
        return i is not None and set(segment.gpu_indices) <= set(self._free_on(i))

    @property
    def free(self) -> dict[str, list[int]]:
        """Free device indices per host (ascending), every host, in cluster order."""
        return {h: list(self._free_on(i)) for i, h in enumerate(self._hosts)}

    def _idle_hosts(self) -> list[int]:
        sizes, counts = self._sizes, self._counts
        return [i for i, size in enumerate(sizes) if size > 0 and counts[i] == size]

    @property
    def idle(self) -> int:
        """GPUs on hosts that are wholly free (what a job larger than a host may take)."""
        return sum(self._sizes[i] for i in self._idle_hosts())

    def may_fit(self, gpus: int) -> bool:
        """Whether :meth:`choose` finds room for ``gpus`` GPUs (cheaper than asking it)."""
        if gpus <= 0 or gpus > self.total_free:
            return False
        return gpus <= self.largest if gpus <= self.max_host else gpus <= self.idle

    def take(self, segments: tuple[Segment, ...]) -> None:
        """Mark the GPUs of ``segments`` used. GPUs this map does not hold as free (a choice
        made in another map of the same cluster may include some) are ignored."""
        for seg in segments:
            i = self._position[seg.host]
            devices = self._free_on(i)
            taken = seg.gpu_indices
            if tuple(devices[: len(taken)]) == taken:  # what choose() hands out: the first ones
                left = devices[len(taken) :]
            else:
                held = set(taken)
                left = [d for d in devices if d not in held]
            self._lists[i] = left
            before, after = len(devices), len(left)
            if after == before:
                continue
            self._counts[i] = after
            self.total_free -= before - after
            bucket = self._by_free[before]
            del bucket[bisect.bisect_left(bucket, i)]
            bisect.insort(self._by_free[after], i)
            if before == self.largest and not bucket:
                self.largest = next(c for c in range(before, -1, -1) if self._by_free[c] or c == 0)

    def choose(self, gpus: int, fit: Fit) -> Choice | None:
        """Where a job of ``gpus`` GPUs fits now, or None. Does not take the GPUs."""
        if gpus <= 0:
            raise ValueError(f"gpus must be positive, got {gpus}")
        if gpus > self.total_free:
            return None
        if gpus <= self.max_host:
            return self._single_host(gpus, fit) if gpus <= self.largest else None
        return self._whole_hosts(gpus)

    def _single_host(self, gpus: int, fit: Fit) -> Choice:
        # Score: minus the GPUs left free on the host after placing (tighter packing is better).
        # The two best hosts with room, as (free GPUs, cluster position): best-fit takes the
        # fewest free GPUs first, ties in cluster order; first-fit takes cluster order alone.
        best: list[tuple[int, int]] = []
        by_free = self._by_free
        for count in range(gpus, self.largest + 1):
            bucket = by_free[count]
            if bucket:
                best.append((count, bucket[0]))
                if len(bucket) > 1:
                    best.append((count, bucket[1]))
                if fit is Fit.BEST and len(best) >= 2:
                    break
        if fit is Fit.FIRST:
            best.sort(key=_position)
        count, position = best[0]
        runner_host, runner_score = "", 0.0
        if len(best) > 1:
            runner_count, runner = best[1]
            runner_host, runner_score = self._hosts[runner], float(gpus - runner_count)
        segment = Segment(self._hosts[position], tuple(self._free_on(position)[:gpus]))
        return Choice((segment,), float(gpus - count), runner_host, runner_score)

    def _whole_hosts(self, gpus: int) -> Choice | None:
        idle = self._idle_hosts()
        if sum(self._sizes[i] for i in idle) < gpus:
            return None
        segments: list[Segment] = []
        need = gpus
        for i in idle:
            if need <= 0:
                break
            take = min(need, self._sizes[i])
            segments.append(Segment(self._hosts[i], tuple(self._free_on(i)[:take])))
            need -= take
        spare = idle[len(segments)] if len(idle) > len(segments) else -1
        return Choice(
            tuple(segments), float(-len(segments)), self._hosts[spare] if spare >= 0 else "", 0.0
        )
