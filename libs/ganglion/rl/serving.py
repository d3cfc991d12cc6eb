"""Batched inference for concurrent decisions.

Requests that arrive while forward passes are running wait and go together in the next one:
one padded ``(B, k, F)`` tensor instead of B passes (at most ``passes`` run at once). There is no timer: an idle service runs
a lone request at once (no added latency), and batches form by themselves under load. The
pass runs on a worker thread so the event loop keeps accepting (and queueing) requests.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ganglion.rl.model import ScoringModel


@dataclass
class BatchStats:
    """How the batcher has been used."""

    passes: int = 0
    """Forward passes run."""
    requests: int = 0
    """Decisions scored."""
    largest: int = 0
    """Largest batch so far."""

    @property
    def mean_batch(self) -> float:
        return self.requests / self.passes if self.passes else 0.0


_Item = tuple[
    npt.NDArray[np.float32], npt.NDArray[np.bool_], "asyncio.Future[npt.NDArray[np.float32]]"
]


class InferenceBatcher:
    """Scores (k, F) observations of one model, batching concurrent callers."""

    def __init__(
        self, model: ScoringModel, max_batch: int = 64, batching: bool = True, passes: int = 2
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self.batching = batching
        self.passes = max(1, passes)
        """Forward passes allowed at once (torch releases the GIL while it computes, so on a
        machine with spare cores a second pass overlaps the first)."""
        self.stats = BatchStats()
        self._queue: list[_Item] = []
        self._runners: set[asyncio.Task[None]] = set()

    async def score(
        self, x: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.float32]:
        """The (k,) scores of one observation."""
        if not self.batching:
            batch, _ = await asyncio.to_thread(self.model.score, x[None], mask[None])
            self._count(1)
            one: npt.NDArray[np.float32] = batch[0]
            return one
        future: asyncio.Future[npt.NDArray[np.float32]] = asyncio.get_running_loop().create_future()
        self._queue.append((x, mask, future))
        if len(self._runners) < self.passes:
            runner = asyncio.create_task(self._drain())
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        scores: npt.NDArray[np.float32] = await future
        return scores

    def _count(self, n: int) -> None:
        self.stats.passes += 1
        self.stats.requests += n
        self.stats.largest = max(self.stats.largest, n)

    async def _drain(self) -> None:
        # Bounded: each pass takes at least one queued item, and the loop ends when none are.
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            live = [item for item in batch if not item[2].done()]  # cancelled callers
            if not live:
                continue
            x = np.stack([item[0] for item in live])
            mask = np.stack([item[1] for item in live])
            try:
                scores, _ = await asyncio.to_thread(self.model.score, x, mask)
            except asyncio.CancelledError:
                # Taken off the queue already: nobody else would answer these callers.
                for _, _, future in live:
                    future.cancel()
                raise
            except Exception as exc:
                for _, _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self._count(len(live))
            for i, (_, _, future) in enumerate(live):
                if not future.done():
                    future.set_result(scores[i])

    async def close(self) -> None:
        """Wait until every request queued or being scored has its answer (a version being
        unloaded still answers the requests it was given; each pass is bounded)."""
        while self._runners:
            await asyncio.gather(*self._runners, return_exceptions=True)
