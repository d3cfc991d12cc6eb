"""Gang placement shared by every policy: which host(s) get a job of N GPUs.

A job of at most G GPUs (the largest host) goes on one host; a larger job takes whole, fully
free hosts. Placement never splits a small job across hosts.
"""

from __future__ import annotations

import enum
import functools
import itertools
from collections.abc import Mapping, Sequence
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

    @functools.cached_property
    def sizes(self) -> npt.NDArray[np.int64]:
        """``capacity`` as an array in ``hosts`` order."""
        return np.array([self.capacity[h] for h in self.hosts], dtype=np.int64)

    @functools.lru_cache(maxsize=1)  # noqa: B019 - one layout object per cluster, kept anyway
    def offsets_of(self, offsets: tuple[int, ...]) -> npt.NDArray[np.int64]:
        """``ClusterState.host_offsets`` as an array (the same for every state)."""
        return np.asarray(offsets, dtype=np.int64)


@functools.lru_cache(maxsize=16)
def _layout(hosts: tuple[str, ...], capacity: tuple[int, ...]) -> _Layout:
    # States of one cluster share it: the simulator asks for thousands of FreeMaps a second.
    return _Layout(hosts, dict(zip(hosts, capacity, strict=True)))


_NONE = np.iinfo(np.int64).max  # a per-host key that never wins


class FreeMap:
    """Free devices per host, updated as a policy places jobs within one decision.

    Held as columns: every known device in (host, device) order, a free flag per device, and
    a free count per host. Building one is a few numpy calls whatever the cluster's size (the
    simulator builds several per decision, the decision service one per request), finding a
    host is one comparison over the per-host counts, and a job that cannot fit anywhere is
    turned away by two integer comparisons (``largest``, ``total_free``).
    """

    def __init__(self, free: Mapping[str, Sequence[int]], capacity: Mapping[str, int]) -> None:
        """From free device indices per host (in cluster order) and GPUs per host."""
        lists = [sorted(free[h]) for h in free]
        counts = np.array([len(v) for v in lists], dtype=np.int64)
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        devices = np.fromiter(itertools.chain.from_iterable(lists), np.int64, int(offsets[-1]))
        layout = _Layout(tuple(free), dict(capacity))
        self._index(layout, offsets, devices, np.ones(len(devices), dtype=bool), counts)

    def _index(
        self,
        layout: _Layout,
        offsets: npt.NDArray[np.int64],
        devices: npt.NDArray[np.integer],
        is_free: npt.NDArray[np.bool_],
        counts: npt.NDArray[np.int64],
    ) -> None:
        self.capacity = layout.capacity
        """GPUs per host. Read only (shared by the maps of one cluster layout)."""
        self.max_host = layout.max_host
        self._hosts = layout.hosts
        self._position = layout.position
        self._sizes = layout.sizes
        self._offsets = offsets  # host i's devices are at [offsets[i], offsets[i + 1])
        self._devices = devices  # read only: may be the state's own column
        self._is_free = is_free
        self._counts = counts
        self.total_free = int(counts.sum())
        self.largest = int(counts.max()) if len(counts) else 0
        """The most GPUs free on one host."""
        self._last: tuple[tuple[Segment, ...], list[npt.NDArray[np.int64]]] | None = None

    @classmethod
    def from_state(
        cls, state: ClusterState, also_free: npt.NDArray[np.bool_] | None = None
    ) -> FreeMap:
        """Free GPUs of ``state`` (plus those where ``also_free`` is set, e.g. the GPUs of jobs
        a policy considers preempting): the same devices as ``state.free_by_host()``."""
        is_free = state.gpu_job < 0
        if also_free is not None:
            is_free |= also_free
        layout = _layout(state.hosts, state.host_capacity)
        counts = np.bincount(state.gpu_host[is_free], minlength=len(state.hosts))
        new = cls.__new__(cls)
        if state.host_offsets is not None:  # host-major columns (the simulator's): as they are
            offsets = layout.offsets_of(state.host_offsets)
            new._index(
                layout, offsets, state.gpu_index, is_free, counts.astype(np.int64, copy=False)
            )
            return new
        order = np.lexsort((state.gpu_index, state.gpu_host))
        offsets = np.searchsorted(state.gpu_host[order], np.arange(len(state.hosts) + 1))
        new._index(
            layout,
            offsets.astype(np.int64),
            state.gpu_index[order],
            is_free[order],
            counts.astype(np.int64, copy=False),
        )
        return new

    @property
    def free(self) -> dict[str, list[int]]:
        """Free device indices per host (ascending), every host, in cluster order."""
        devices = self._devices[self._is_free].tolist()  # host-major, so cut by counts
        cuts = [0, *itertools.accumulate(self._counts.tolist())]
        return {h: devices[cuts[i] : cuts[i + 1]] for i, h in enumerate(self._hosts)}

    @property
    def idle(self) -> int:
        """GPUs on hosts that are wholly free (what a job larger than a host may take)."""
        whole = (self._counts == self._sizes) & (self._sizes > 0)
        return int(self._sizes[whole].sum())

    def may_fit(self, gpus: int) -> bool:
        """Whether :meth:`choose` finds room for ``gpus`` GPUs (cheaper than asking it)."""
        if gpus > self.total_free:
            return False
        return gpus <= self.largest if gpus <= self.max_host else gpus <= self.idle

    def take(self, segments: tuple[Segment, ...]) -> None:
        """Mark the GPUs of ``segments`` used. GPUs this map does not hold as free (a choice
        made in another map of the same cluster may include some) are ignored."""
        last, self._last = self._last, None
        # This map's own last choice (nothing taken since): its positions are known and free.
        known = last[1] if last is not None and last[0] is segments else None
        for k, seg in enumerate(segments):
            i = self._position[seg.host]
            if known is not None:
                self._is_free[known[k]] = False
                taken = len(known[k])
            else:
                lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
                on_host = self._devices[lo:hi]
                wanted = np.asarray(seg.gpu_indices, dtype=np.int64)
                at = np.searchsorted(on_host, wanted)
                inside = at < len(on_host)
                at, wanted = at[inside], wanted[inside]
                at = lo + at[on_host[at] == wanted]
                before = int(np.count_nonzero(self._is_free[lo:hi]))
                self._is_free[at] = False
                taken = before - int(np.count_nonzero(self._is_free[lo:hi]))
            if taken:
                count = int(self._counts[i])
                self._counts[i] = count - taken
                self.total_free -= taken
                if count == self.largest:
                    self.largest = int(self._counts.max())

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
        # The two best hosts with room: first-fit in cluster order; best-fit by fewest free
        # GPUs, ties in cluster order (argmin returns the first of equal keys).
        counts = self._counts
        if fit is Fit.FIRST:
            hosts = np.flatnonzero(counts >= gpus)[:2].tolist()
        else:
            key = np.where(counts >= gpus, counts, _NONE)
            first = int(key.argmin())
            key[first] = _NONE
            second = int(key.argmin())
            hosts = [first] if key[second] == _NONE else [first, second]
        host = hosts[0]
        lo, hi = int(self._offsets[host]), int(self._offsets[host + 1])
        at = lo + np.flatnonzero(self._is_free[lo:hi])[:gpus]
        segments = (Segment(self._hosts[host], tuple(self._devices[at].tolist())),)
        self._last = (segments, [at])
        runner_host, runner_score = "", 0.0
        if len(hosts) > 1:
            runner = hosts[1]
            runner_host, runner_score = self._hosts[runner], float(gpus - int(counts[runner]))
        return Choice(segments, float(gpus - int(counts[host])), runner_host, runner_score)

    def _whole_hosts(self, gpus: int) -> Choice | None:
        whole = (self._counts == self._sizes) & (self._sizes > 0)
        if int(self._sizes[whole].sum()) < gpus:
            return None
        idle = np.flatnonzero(whole).tolist()
        segments: list[Segment] = []
        positions: list[npt.NDArray[np.int64]] = []
        need = gpus
        for i in idle:
            if need <= 0:
                break
            take = min(need, int(self._sizes[i]))
            lo = int(self._offsets[i])
            at = np.arange(lo, lo + take, dtype=np.int64)
            segments.append(Segment(self._hosts[i], tuple(self._devices[at].tolist())))
            positions.append(at)
            need -= take
        if need > 0:
            return None
        chosen = tuple(segments)
        self._last = (chosen, positions)
        spare = idle[len(segments)] if len(idle) > len(segments) else -1
        return Choice(chosen, float(-len(segments)), self._hosts[spare] if spare >= 0 else "", 0.0)
