"""Gang placement shared by every policy: which host(s) get a job of N GPUs.

A job of at most G GPUs (the largest host) goes on one host; a larger job takes whole, fully
free hosts. Placement never splits a small job across hosts.
"""

from __future__ import annotations

import bisect
import enum
import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ganglion.domain import ClusterState, Segment


class Fit(enum.Enum):
    FIRST = "first-fit"
    """The first host (in cluster order) with room."""
    BEST = "best-fit"
    """The host left with the fewest free GPUs (consolidation: keeps big holes for big jobs)."""


@dataclass(frozen=True)
class Choice:
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

    @functools.lru_cache(maxsize=1)  # noqa: B019 - one layout object per cluster, kept anyway
    def offsets_of(self, offsets: tuple[int, ...]) -> npt.NDArray[np.int64]:
        """``ClusterState.host_offsets`` as an array (the same for every state)."""
        return np.asarray(offsets, dtype=np.int64)


@functools.lru_cache(maxsize=16)
def _layout(hosts: tuple[str, ...], capacity: tuple[int, ...]) -> _Layout:
    # States of one cluster share it: the simulator asks for thousands of FreeMaps a second.
    return _Layout(hosts, dict(zip(hosts, capacity, strict=True)))


class FreeMap:
    """Free device indices per host, updated as a policy places jobs within one decision."""

    def __init__(self, free: dict[str, list[int]], capacity: dict[str, int]) -> None:
        self._index({h: list(v) for h, v in free.items()}, _Layout(tuple(free), dict(capacity)))

    def _index(self, free: dict[str, list[int]], layout: _Layout) -> None:
        self.free = free
        """Free devices per host, in cluster order. Read it; change it only through take()."""
        self.capacity = layout.capacity
        """GPUs per host. Read only (shared by the maps of one cluster layout)."""
        self.max_host = layout.max_host
        counts = list(map(len, free.values()))
        self.total_free = sum(counts)
        # An index for choose(): hosts by how many GPUs they have free, each bucket sorted by
        # cluster position. Finding a host is then a look at a few buckets instead of a scan
        # of every host per job (that scan made a decision O(pending x hosts)).
        self._hosts = layout.hosts
        self._position = layout.position
        top = max(self.max_host, max(counts, default=0))
        self._by_free: list[list[int]] = [[] for _ in range(top + 1)]
        for i, count in enumerate(counts):
            self._by_free[count].append(i)

    @classmethod
    def from_state(
        cls, state: ClusterState, also_free: npt.NDArray[np.bool_] | None = None
    ) -> FreeMap:
        """Free GPUs of ``state`` (plus those where ``also_free`` is set, e.g. the GPUs of jobs
        a policy considers preempting), the same lists as ``state.free_by_host()`` but built
        with numpy: the simulator asks for this on every event."""
        mask = state.gpu_job < 0
        if also_free is not None:
            mask = mask | also_free
        idx = np.flatnonzero(mask)
        layout = _layout(state.hosts, state.host_capacity)
        if state.host_offsets is None:
            idx = idx[np.lexsort((state.gpu_index[idx], state.gpu_host[idx]))]
            bounds = np.searchsorted(state.gpu_host[idx], np.arange(len(state.hosts) + 1))
        else:  # host-major columns: the free GPUs are in (host, device) order already
            bounds = np.searchsorted(idx, layout.offsets_of(state.host_offsets))
        b = bounds.tolist()
        devices = state.gpu_index[idx].tolist()
        # Fresh lists (slices), adopted without the copy __init__ makes of a caller's.
        free = {h: devices[lo:hi] for h, lo, hi in zip(state.hosts, b[:-1], b[1:], strict=True)}
        new = cls.__new__(cls)
        new._index(free, layout)
        return new

    def take(self, segments: tuple[Segment, ...]) -> None:
        for seg in segments:
            taken = set(seg.gpu_indices)
            before = len(self.free[seg.host])
            self.free[seg.host] = [i for i in self.free[seg.host] if i not in taken]
            after = len(self.free[seg.host])
            self.total_free -= before - after
            if after != before:
                position = self._position[seg.host]
                bucket = self._by_free[before]
                del bucket[bisect.bisect_left(bucket, position)]
                bisect.insort(self._by_free[after], position)

    def choose(self, gpus: int, fit: Fit) -> Choice | None:
        """Where a job of ``gpus`` GPUs fits now, or None. Does not take the GPUs."""
        if gpus <= 0:
            raise ValueError(f"gpus must be positive, got {gpus}")
        if gpus <= self.max_host:
            return self._single_host(gpus, fit)
        return self._whole_hosts(gpus)

    def _single_host(self, gpus: int, fit: Fit) -> Choice | None:
        # Score: minus the GPUs left free on the host after placing (tighter packing is better).
        # The two best hosts with room, as (free GPUs, cluster position): best-fit takes the
        # fewest free GPUs first, ties in cluster order; first-fit takes cluster order alone.
        best: list[tuple[int, int]] = []
        for count in range(gpus, len(self._by_free)):
            bucket = self._by_free[count]
            best.extend((count, position) for position in bucket[:2])
            if fit is Fit.BEST and len(best) >= 2:
                break
        if not best:
            return None
        if fit is Fit.FIRST:
            best.sort(key=lambda c: c[1])
        (count, position), *rest = best
        host = self._hosts[position]
        runner_host, runner_score = "", 0.0
        if rest:
            runner_host, runner_score = self._hosts[rest[0][1]], float(gpus - rest[0][0])
        seg = Segment(host, tuple(self.free[host][:gpus]))
        return Choice((seg,), float(gpus - count), runner_host, runner_score)

    def _whole_hosts(self, gpus: int) -> Choice | None:
        idle = [
            h for h, f in self.free.items() if len(f) == self.capacity[h] and self.capacity[h] > 0
        ]
        segments: list[Segment] = []
        need = gpus
        for h in idle:
            if need <= 0:
                break
            take = min(need, self.capacity[h])
            segments.append(Segment(h, tuple(self.free[h][:take])))
            need -= take
        if need > 0:
            return None
        spare = [h for h in idle if h not in {s.host for s in segments}]
        return Choice(tuple(segments), float(-len(segments)), spare[0] if spare else "", 0.0)
