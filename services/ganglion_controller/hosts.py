"""Which hosts exist, from the hosts KV bucket: executor registrations and latest telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from nats.js.kv import KeyValue

from ganglion.v1 import executor_pb2, telemetry_pb2

log = logging.getLogger(__name__)

_EXECUTOR = "executor."
_TELEMETRY = "telemetry."


@dataclass(frozen=True)
class HostView:
    name: str
    address: str
    gpu_count: int
    seen_s: float
    """Registration time written by the executor (unix seconds)."""


class HostDirectory:
    """Follows the bucket with a KV watcher, so a round never lists keys."""

    def __init__(self, kv: KeyValue, stale_s: float) -> None:
        self._kv = kv
        self._stale_s = stale_s
        self._executors: dict[str, executor_pb2.ExecutorInfo] = {}
        self._telemetry: dict[str, telemetry_pb2.HostSample] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.changed = asyncio.Event()
        """Set when a host appears or re-registers with a new address."""

    async def start(self) -> None:
        watcher = await self._kv.watchall()
        self._task = asyncio.create_task(self._run(watcher), name="host-directory")

    async def stop(self) -> None:
        # nats-py's watcher can swallow a cancel that races with an arriving entry (its
        # internal wait_for), so the loop also checks a flag and wakes at least every second.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 5.0)

    async def _run(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            while not self._stopping:
                try:
                    entry = await watcher.updates(timeout=1.0)  # type: ignore[no-untyped-call]
                except TimeoutError:
                    continue
                except Exception:
                    log.warning("hosts watcher error; retrying", exc_info=True)
                    await asyncio.sleep(0.5)
                    continue
                if entry is None:
                    continue  # "initial values delivered" marker
                self._on_entry(entry.key, entry.value, entry.operation)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _on_entry(self, key: str, value: bytes | None, operation: str | None) -> None:
        deleted = operation in ("DEL", "PURGE") or not value
        if key.startswith(_EXECUTOR):
            host = key[len(_EXECUTOR) :]
            if deleted:
                self._executors.pop(host, None)
                log.info("executor deregistered", extra={"host": host})
                return
            info = executor_pb2.ExecutorInfo.FromString(value or b"")
            old = self._executors.get(host)
            self._executors[host] = info
            if old is None or old.address != info.address or old.gpu_count != info.gpu_count:
                log.info(
                    "executor registered",
                    extra={"host": host, "address": info.address, "gpus": info.gpu_count},
                )
                self.changed.set()
        elif key.startswith(_TELEMETRY):
            host = key[len(_TELEMETRY) :]
            if deleted:
                self._telemetry.pop(host, None)
            else:
                self._telemetry[host] = telemetry_pb2.HostSample.FromString(value or b"")

    def live(self, now: float | None = None) -> dict[str, HostView]:
        """Hosts whose executor registration is fresh, sorted by name (stable cluster order)."""
        now = time.time() if now is None else now
        out: dict[str, HostView] = {}
        for host in sorted(self._executors):
            info = self._executors[host]
            if now - info.time_s <= self._stale_s:
                out[host] = HostView(host, info.address, info.gpu_count, info.time_s)
        return out

    def utilization(self) -> dict[tuple[str, int], float]:
        """Latest sampled utilisation per (host, GPU index); absent where unknown."""
        out: dict[tuple[str, int], float] = {}
        for host, sample in self._telemetry.items():
            for gpu in sample.gpus:
                if gpu.HasField("gpu_utilization_percent"):
                    out[(host, gpu.index)] = float(gpu.gpu_utilization_percent)
        return out
