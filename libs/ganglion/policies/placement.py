"""Gang placement shared by every policy: which host(s) get a job of N GPUs.

A job of at most G GPUs (the largest host) goes on one host; a larger job takes whole, fully
free hosts. Placement never splits a small job across hosts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ganglion.domain import Segment


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


class FreeMap:
    """Free device indices per host, updated as a policy places jobs within one decision."""

    def __init__(self, free: dict[str, list[int]], capacity: dict[str, int]) -> None:
        self.free = {h: list(v) for h, v in free.items()}
        self.capacity = dict(capacity)
        self.max_host = max(capacity.values(), default=0)
        self.total_free = sum(len(v) for v in self.free.values())

    def take(self, segments: tuple[Segment, ...]) -> None:
        for seg in segments:
            taken = set(seg.gpu_indices)
            before = len(self.free[seg.host])
            self.free[seg.host] = [i for i in self.free[seg.host] if i not in taken]
            self.total_free -= before - len(self.free[seg.host])

    def choose(self, gpus: int, fit: Fit) -> Choice | None:
        """Where a job of ``gpus`` GPUs fits now, or None. Does not take the GPUs."""
        if gpus <= 0:
            raise ValueError(f"gpus must be positive, got {gpus}")
        if gpus <= self.max_host:
            return self._single_host(gpus, fit)
        return self._whole_hosts(gpus)

    def _single_host(self, gpus: int, fit: Fit) -> Choice | None:
        # Score: minus the GPUs left free on the host after placing (tighter packing is better).
        candidates = [(h, -(len(f) - gpus)) for h, f in self.free.items() if len(f) >= gpus]
        if not candidates:
            return None
        if fit is Fit.BEST:
            candidates.sort(key=lambda c: -c[1])  # stable: ties keep cluster order
        host, score = candidates[0]
        runner_host, runner_score = candidates[1] if len(candidates) > 1 else ("", 0.0)
        seg = Segment(host, tuple(self.free[host][:gpus]))
        return Choice((seg,), float(score), runner_host, float(runner_score))

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
