"""What ``Scheduler.allocate`` returns: the granted GPU ids, which are also the lease on them.

A :class:`Lease` is a read-only ``Sequence[int]`` of GPU ids, so code written as
``gpus = scheduler.allocate(gpus=2)`` can index it, iterate it, take ``len()`` of it and pass
``list(gpus)`` on, while the same object releases the GPUs: ``lease.release()``, or leave a
``with scheduler.allocate(gpus=2) as lease:`` block (``async with`` for the async twins).
Equality is identity (a lease is a grant, not a value); compare ``list(lease)`` or ``lease.gpus``.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import overload

from ganglion.domain import Segment


@dataclass(frozen=True)
class Grant:
    """The facts of one granted allocation."""

    lease_id: str
    """Lease id: the controller's job id in cluster mode."""
    segments: tuple[Segment, ...]
    """Host and GPU indices; one segment unless a cluster job spans hosts."""
    visible_devices: str
    """A ``CUDA_VISIBLE_DEVICES`` value for these GPUs (UUIDs on NVML hosts, else indices)."""
    decided_by: str
    """Policy and version that chose the GPUs (``best-fit:builtin-0.1.0``, ...)."""
    reason: str
    """The policy's reason for the choice."""
    granted_s: float
    """Unix seconds of the grant."""
    simulated: bool | None
    """True when the GPUs are simulated (no NVIDIA driver there); None when unknown (cluster
    mode without NATS cannot read the executor's registration)."""


class Lease(Sequence[int]):
    """GPU ids granted by :meth:`Scheduler.allocate <ganglion.sdk.Scheduler.allocate>`."""

    def __init__(
        self,
        grant: Grant,
        release: Callable[[Lease], None],
        release_async: Callable[[Lease], Awaitable[None]],
    ) -> None:
        self.grant = grant
        self._gpus = tuple(i for s in grant.segments for i in s.gpu_indices)
        self._release = release
        self._release_async = release_async
        self._ended = threading.Event()
        self._end_lock = threading.Lock()
        self.end_reason = ""
        """Why the lease ended: ``released``, ``replaced`` or what took it away."""

    # --- the facts ----------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.grant.lease_id

    @property
    def gpus(self) -> tuple[int, ...]:
        """The GPU indices (all segments, in order)."""
        return self._gpus

    @property
    def host(self) -> str:
        """The host of the GPUs (``a+b`` when a cluster job spans hosts)."""
        return "+".join(s.host for s in self.grant.segments)

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self.grant.segments

    @property
    def visible_devices(self) -> str:
        return self.grant.visible_devices

    @property
    def simulated(self) -> bool | None:
        return self.grant.simulated

    @property
    def active(self) -> bool:
        """True until released, replaced by a newer allocation, or lost."""
        return not self._ended.is_set()

    def mark_ended(self, reason: str) -> bool:
        """Record the end once; False when it had already ended (any thread)."""
        with self._end_lock:
            if self._ended.is_set():
                return False
            self.end_reason = reason
            self._ended.set()
            return True

    # --- Sequence[int] ----------------------------------------------------------------

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[int, ...]: ...
    def __getitem__(self, index: int | slice) -> int | tuple[int, ...]:
        return self._gpus[index]

    def __len__(self) -> int:
        return len(self._gpus)

    def __iter__(self) -> Iterator[int]:
        return iter(self._gpus)

    def __contains__(self, value: object) -> bool:
        return value in self._gpus

    def __repr__(self) -> str:
        state = "active" if self.active else f"ended: {self.end_reason}"
        sim = ", simulated" if self.simulated else ""
        return f"Lease({list(self._gpus)}, id={self.id!r}, host={self.host!r}{sim}, {state})"

    # --- releasing --------------------------------------------------------------------

    def release(self) -> None:
        """Give the GPUs back (idempotent)."""
        if self.active:
            self._release(self)

    async def release_async(self) -> None:
        if self.active:
            await self._release_async(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release_async()
