"""Arrival processes: open loop (a fixed schedule) and closed loop (as fast as answers come).

Open loop is the honest one for latency. Call ``i`` is *intended* to start at
``t0 + i / rate`` whatever happened to the calls before it, and its latency is measured from
that intended time. A closed-loop client that waits for each answer before sending the next
sends less when the server stalls, so the stall never shows in its percentiles ("coordinated
omission"); here a stall shows as every call scheduled during it being late. When more than
``max_inflight`` calls are outstanding the generator waits, but the late calls still count
from their intended time, so client-side queueing is charged too.

Closed loop (``--max``) answers a different question, the most a server sustains: ``N`` loops
each send the next call as soon as the previous one returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

from ganglion.loadgen.report import new_histogram, record_us

Call = Callable[[], Awaitable[str]]
"""One request; returns ``"OK"`` or the name of the status it failed with. Anything it raises
is a bug in the load generator and stops the run."""

Progress = Callable[[float], None]
"""Told the seconds elapsed since the start (warm-up included), a few times a second."""

OK = "OK"
_PROGRESS_EVERY_S = 0.2


@dataclass(frozen=True)
class Schedule:
    """When a run starts, warms up and measures (``time.perf_counter`` seconds)."""

    start: float
    """Intended start of the first call (of the warm-up, if any)."""
    warmup_s: float
    """Seconds of load that are not recorded."""
    duration_s: float
    """Length of the measured window that follows the warm-up."""

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ValueError(f"duration must be > 0, got {self.duration_s}")
        if self.warmup_s < 0:
            raise ValueError(f"warm-up must be >= 0, got {self.warmup_s}")

    @property
    def window_start(self) -> float:
        return self.start + self.warmup_s

    @property
    def window_end(self) -> float:
        return self.window_start + self.duration_s

    def in_window(self, t: float) -> bool:
        return self.window_start <= t < self.window_end


@dataclass
class Tally:
    """What the calls of a run's measured window did."""

    histogram: HdrHistogram = field(default_factory=new_histogram)
    sent: int = 0
    completed: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    unfinished: int = 0
    completed_in_window: int = 0
    """Calls (of any start time) that finished inside the window: the throughput."""

    def finish(self, status: str, intended: float, done: float, schedule: Schedule) -> None:
        if schedule.in_window(done):
            self.completed_in_window += 1
        if not schedule.in_window(intended):
            return
        self.completed += 1
        record_us(self.histogram, done - intended)
        if status == OK:
            self.ok += 1
        else:
            self.errors[status] = self.errors.get(status, 0) + 1


class _Inflight:
    """Outstanding call tasks; the first unexpected exception of any of them is kept."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.failure: BaseException | None = None

    def add(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()

    async def drain(self, timeout_s: float) -> int:
        """Wait for outstanding calls; cancel those still running after ``timeout_s``."""
        if not self.tasks:
            return 0
        _, pending = await asyncio.wait(set(self.tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        return len(pending)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


async def open_loop(
    call: Call,
    rate: float,
    schedule: Schedule,
    max_inflight: int,
    drain_s: float,
    progress: Progress | None = None,
) -> Tally:
    """Start call ``i`` at ``schedule.start + i / rate`` (catching up in bursts when the event
    loop wakes late), never more than ``max_inflight`` at once."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if max_inflight < 1:
        raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
    tally = Tally()
    slots = asyncio.Semaphore(max_inflight)
    inflight = _Inflight()
    unfinished_in_window: set[float] = set()

    async def one(intended: float) -> None:
        unfinished_in_window.add(intended)
        try:
            status = await call()
        finally:
            slots.release()
        unfinished_in_window.discard(intended)
        tally.finish(status, intended, time.perf_counter(), schedule)

    total = int((schedule.warmup_s + schedule.duration_s) * rate)
    interval = 1.0 / rate
    last_progress = 0.0
    i = 0
    while i < total and inflight.failure is None:
        now = time.perf_counter()
        due = min(total, int((now - schedule.start) * rate) + 1)
        while i < due:
            intended = schedule.start + i * interval
            await slots.acquire()
            if schedule.in_window(intended):
                tally.sent += 1
            inflight.add(one(intended))
            i += 1
        if progress is not None and now - last_progress >= _PROGRESS_EVERY_S:
            progress(now - schedule.start)
            last_progress = now
        # Sleep to the next intended start; sleep(0) still lets answers be processed.
        await asyncio.sleep(max(0.0, schedule.start + i * interval - time.perf_counter()))
    await inflight.drain(drain_s)
    inflight.raise_failure()
    tally.unfinished = sum(1 for t in unfinished_in_window if schedule.in_window(t))
    return tally


async def closed_loop(
    call: Call,
    concurrency: int,
    schedule: Schedule,
    drain_s: float,
    progress: Progress | None = None,
) -> Tally:
    """``concurrency`` loops, each starting its next call when the previous one returns,
    until the window ends. Latency is from each call's actual start."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    tally = Tally()
    inflight = _Inflight()
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            if started >= schedule.window_end:
                return
            if schedule.in_window(started):
                tally.sent += 1
            status = await call()
            tally.finish(status, started, time.perf_counter(), schedule)

    for _ in range(concurrency):
        inflight.add(loop())
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(schedule.window_end - time.perf_counter()):
            while inflight.tasks and inflight.failure is None:
                if progress is not None:
                    progress(time.perf_counter() - schedule.start)
                await asyncio.sleep(_PROGRESS_EVERY_S)
    stop.set()
    tally.unfinished = await inflight.drain(drain_s)
    inflight.raise_failure()
    return tally
