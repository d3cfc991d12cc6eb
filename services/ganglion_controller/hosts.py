"""Which hosts exist, from the hosts KV bucket: executor registrations and latest telemetry.

The bucket is followed by one ordered JetStream consumer over all its keys (last value per
key first, then every update), with the messages handled in the subscription's callback.
That is what nats-py's KV watcher does underneath, minus its per-entry metadata parse, queue
hop and ``wait_for`` (which together cost several times the decoding): a controller that
starts on a cluster of thousands of hosts reads the whole bucket in one pass.

Each entry is decoded once, when it arrives, into what a scheduling round reads: a
:class:`HostView` per executor, and per telemetry sample a float32 array of utilisation by GPU
index (-1: unknown), so a round concatenates arrays instead of walking protobuf messages or
``(host, gpu)`` pairs GPU by GPU (:meth:`HostDirectory.utilization_column`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.kv import KeyValue

from ganglion.bus import MAX_HOST_GPUS
from ganglion.convert import utilization_by_index
from ganglion.v1 import executor_pb2, telemetry_pb2

log = logging.getLogger(__name__)

_EXECUTOR = "executor."
_TELEMETRY = "telemetry."
_KV_OPERATION = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"  # nats-server 2.11+: server-placed expiry markers
_GONE_REASONS = frozenset({"MaxAge", "Purge", "Remove"})
_INACTIVE_S = 300.0  # the server drops the consumer this long after the directory is gone
_HEARTBEAT_S = 1.0


class HostView(NamedTuple):
    """One registered executor, as the scheduling loop sees it. A NamedTuple rather than a
    frozen dataclass: one is built per registration refresh, thousands per pass over the
    bucket, and a tuple is built in a fifth of the time."""

    name: str
    """Host name (the bucket key's suffix)."""
    address: str
    """``host:port`` of its ExecutorService."""
    gpu_count: int
    """GPUs it manages."""
    seen_s: float
    """When the executor last registered, on this controller's clock (unix seconds): the
    executor's own time, bounded to [arrival - stale time / 2, arrival]."""


def _bucket(kv: KeyValue) -> tuple[JetStreamContext, str, str]:
    """The JetStream context, stream name and subject prefix behind a bucket. nats-py keeps
    them as private fields and offers no accessor; the names themselves (stream
    ``KV_<bucket>``, subjects ``$KV.<bucket>.<key>``) are fixed by the NATS KV protocol."""
    return kv._js, kv._stream, kv._pre


class HostDirectory:
    """Follows the bucket from a fresh start, so a round never lists keys."""

    def __init__(self, kv: KeyValue, stale_s: float) -> None:
        self._kv = kv
        self._stale_s = stale_s
        self._views: dict[str, HostView] = {}
        self._sorted: list[str] | None = []  # host names in order; None after a change
        # Per host, the utilisation of its latest sample by GPU index (-1: not reported).
        self._util: dict[str, npt.NDArray[np.float32]] = {}
        self._sub: Subscription | None = None
        self._prefix = ""
        self.undecodable = 0
        """Entries skipped because their value was not the expected protobuf."""
        self.rejected = 0
        """Entries skipped or readings dropped because their values cannot be true (more
        than ``MAX_HOST_GPUS`` GPUs, a utilisation that is NaN, infinite or above 100%)."""
        self._warned: set[tuple[str, str]] = set()  # (host, what): one warning each
        self.changed = asyncio.Event()
        """Set when a host appears or re-registers with a new address."""

    async def start(self) -> None:
        js, stream, self._prefix = _bucket(self._kv)
        self._sub = await js.subscribe(
            f"{self._prefix}>",
            stream=stream,
            cb=self._on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=_INACTIVE_S,
            # An ordered consumer re-creates itself after two missed heartbeats: nats-py's
            # default of 5 s left the view frozen for 10-15 s after a NATS restart, long
            # enough for live hosts to go stale.
            idle_heartbeat=_HEARTBEAT_S,
        )

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        """One bucket entry: a value, or (KV-Operation / expiry marker header) a deletion."""
        value: bytes | None = msg.data
        headers = msg.headers
        if headers:
            reason = headers.get(_MARKER_REASON)
            if _KV_OPERATION in headers or reason in _GONE_REASONS:
                value = None  # DEL or PURGE
            elif reason is not None:
                return  # a marker of a kind this code does not know: not a value
        key = msg.subject[len(self._prefix) :]
        try:
            if key.startswith(_TELEMETRY):
                self._on_telemetry(key[len(_TELEMETRY) :], value or None)
            elif key.startswith(_EXECUTOR):
                self._on_executor(key[len(_EXECUTOR) :], value or None)
        except DecodeError:
            # One bad writer must not stop the directory: count it, say so, keep following.
            self.undecodable += 1
            log.warning("undecodable hosts-bucket entry skipped", extra={"key": key})
        except Exception:  # a bug here must not stop the directory either
            self.undecodable += 1
            log.exception("hosts-bucket entry skipped", extra={"key": key})

    def _reject(self, host: str, what: str, message: str) -> None:
        self.rejected += 1
        if (host, what) not in self._warned:  # a broken writer repeats itself every second
            self._warned.add((host, what))
            log.warning(message, extra={"host": host})

    def _on_executor(self, host: str, value: bytes | None) -> None:
        if value is None:
            if self._views.pop(host, None) is not None:
                self._sorted = None
                log.info("executor deregistered", extra={"host": host})
            return
        info = executor_pb2.ExecutorInfo.FromString(value)
        if info.gpu_count > MAX_HOST_GPUS:
            self._reject(
                host,
                "registration",
                f"executor registration skipped: {info.gpu_count} GPUs, more than {MAX_HOST_GPUS}",
            )
            if self._views.pop(host, None) is not None:
                self._sorted = None
            return
        # When the executor wrote it, as far as this controller can tell: its own clock's
        # time_s, but never later than arrival (a fast clock kept a dead host live) nor more
        # than half the stale time before it (a slow clock made a live host stale). A
        # registration replayed when the controller starts is as old as time_s says, within
        # that bound, rather than new.
        now = time.time()
        seen = min(now, max(info.time_s, now - self._stale_s / 2))
        view = HostView(host, info.address, info.gpu_count, seen)
        old = self._views.get(host)
        self._views[host] = view
        if old is None:
            self._sorted = None
        if old is None or old.address != view.address or old.gpu_count != view.gpu_count:
            log.info(
                "executor registered",
                extra={"host": host, "address": view.address, "gpus": view.gpu_count},
            )
            self.changed.set()

    def _on_telemetry(self, host: str, value: bytes | None) -> None:
        if value is None:
            self._util.pop(host, None)
            return
        sample = telemetry_pb2.HostSample.FromString(value)
        packed = sample.gpu_utilization_by_index
        if len(packed) > MAX_HOST_GPUS:
            self._reject(
                host,
                "sample",
                f"telemetry sample skipped: {len(packed)} GPUs, more than {MAX_HOST_GPUS}",
            )
            return
        if packed:  # the packed column: no per-GPU decoding (fromiter: 4x np.array's speed)
            util = np.fromiter(packed, np.float32, len(packed))
        else:  # a publisher that does not pack (older sensing): read the per-GPU messages
            util = np.array(utilization_by_index(sample, MAX_HOST_GPUS), dtype=np.float32)
        self._util[host] = util  # impossible readings are dropped by utilization_column

    def live(self, now: float | None = None) -> dict[str, HostView]:
        """Hosts whose executor registration is fresh, sorted by name (stable cluster order)."""
        now = time.time() if now is None else now
        if self._sorted is None:
            self._sorted = sorted(self._views)
        views, oldest = self._views, now - self._stale_s
        return {h: v for h in self._sorted if (v := views[h]).seen_s >= oldest}

    def utilization(self) -> Mapping[tuple[str, int], float]:
        """Latest sampled utilisation per (host, GPU index); absent where unknown (a snapshot,
        for inspection: rounds use :meth:`utilization_column`)."""
        return {
            (host, i): float(u)
            for host, util in self._util.items()
            for i, u in enumerate(util.tolist())
            if u >= 0
        }

    def utilization_column(self, gpus_by_host: Mapping[str, int]) -> npt.NDArray[np.float32]:
        """Utilisation of every GPU of ``gpus_by_host`` (host order, then GPU index; the
        layout of ``ClusterState``), -1 where unknown: one concatenation, not a loop per GPU."""
        missing = self._missing
        parts = []
        for host, n in gpus_by_host.items():
            util = self._util.get(host)
            if util is None:
                parts.append(missing(n))
            elif len(util) == n:
                parts.append(util)
            elif len(util) > n:  # readings for GPUs the executor does not offer
                parts.append(util[:n])
            else:
                parts.append(np.concatenate([util, missing(n - len(util))]))
        if not parts:
            return np.zeros(0, dtype=np.float32)
        column = np.concatenate(parts)
        # NaN, infinity or more than 100% is no reading, and the decision service refuses a
        # whole request over one NaN (every round would fall back). One reduction per round
        # finds any (max propagates NaN); only then are the hosts' arrays mended.
        if not column.max() <= 100:
            self._drop_impossible(gpus_by_host)
            column[~(np.isfinite(column) & (column <= 100))] = -1.0
        return column

    def _drop_impossible(self, hosts: Mapping[str, int]) -> None:
        for host in hosts:
            util = self._util.get(host)
            if util is None:
                continue
            impossible = ~(np.isfinite(util) & (util <= 100))
            if impossible.any():
                util[impossible] = -1.0
                self._reject(
                    host, "utilization", "telemetry readings dropped: NaN, infinite or above 100%"
                )

    @staticmethod
    def _missing(n: int) -> npt.NDArray[np.float32]:
        return np.full(n, -1.0, dtype=np.float32)
