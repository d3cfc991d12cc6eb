"""The sensing loop: sample every interval, publish the batch, refresh the host's KV key.

Each batch goes to JetStream on ``ganglion.telemetry.<host>`` (the telemetry stream keeps it for
its age limit: history for training) with ``Nats-Msg-Id = <host>:<boot id>:<sequence>``, so a
retried publish is stored once and a restarted publisher never collides with its previous
life. The latest ``HostSample`` goes into the hosts KV bucket (whose TTL makes a dead host
disappear). A slow or unreachable NATS costs one interval's data, logged, never the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from opentelemetry import trace

from ganglion import bus
from ganglion.convert import pack_utilization
from ganglion.observability import inject_headers
from ganglion.v1 import telemetry_pb2
from ganglion_sensing.collectors import Collector

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


@dataclass(frozen=True)
class PublisherConfig:
    """How often and how patiently the loop publishes."""

    host: str
    """Host name: the subject suffix, KV key suffix and sample's host."""
    interval_s: float = 1.0
    """Seconds between samples."""
    publish_timeout_s: float = 2.0
    """How long one publish (stream or KV) may wait for its acknowledgement."""

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        if self.publish_timeout_s <= 0:
            raise ValueError(f"publish_timeout_s must be > 0, got {self.publish_timeout_s}")


class LatestSample:
    """The newest sample, shared with the metrics endpoint (read from its HTTP thread)."""

    def __init__(self) -> None:
        self._sample: telemetry_pb2.HostSample | None = None

    def set(self, sample: telemetry_pb2.HostSample) -> None:
        # Rebinding one attribute is atomic; readers see the old or the new sample, whole.
        self._sample = sample

    def get(self) -> telemetry_pb2.HostSample | None:
        return self._sample


class Publisher:
    """Samples ``collector`` and publishes; :meth:`run` loops until ``stop`` is set."""

    def __init__(
        self,
        config: PublisherConfig,
        collector: Collector,
        js: JetStreamContext,
        kv: KeyValue,
        latest: LatestSample | None = None,
        boot_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._collector = collector
        self._js = js
        self._kv = kv
        self.latest = latest or LatestSample()
        self.boot_id = boot_id or uuid.uuid4().hex[:12]
        self._clock = clock
        self.sequence = 0
        """Sequence number of the last batch built."""
        self.published = 0
        """Batches the stream acknowledged."""
        self.failures = 0
        """Intervals whose sampling or publishing failed."""

    async def tick(self) -> bool:
        """Sample once and publish; False (logged) when any step failed."""
        host = self.config.host
        try:
            sample = await asyncio.to_thread(self._collector.sample)
        except Exception:
            self.failures += 1
            log.exception("sampling failed", extra={"host": host})
            return False
        pack_utilization(sample)  # the packed column the controller reads
        self.latest.set(sample)
        self.sequence += 1
        seq = self.sequence
        batch = telemetry_pb2.TelemetryBatch(samples=[sample], sequence=seq)
        timeout = self.config.publish_timeout_s
        with tracer.start_as_current_span("sensing.publish") as span:
            span.set_attribute("ganglion.host", host)
            span.set_attribute("ganglion.sequence", seq)
            try:
                await self._js.publish(
                    bus.telemetry_subject(host),
                    batch.SerializeToString(),
                    timeout=timeout,
                    headers=inject_headers({"Nats-Msg-Id": f"{host}:{self.boot_id}:{seq}"}),
                )
                self.published += 1
                await asyncio.wait_for(
                    self._kv.put(bus.telemetry_key(host), sample.SerializeToString()), timeout
                )
            except Exception as exc:
                # Includes timeouts and "no responders" while NATS is away: the next interval
                # publishes a fresh sample, so nothing is queued up here.
                self.failures += 1
                log.warning(
                    "telemetry publish failed: %s: %s",
                    type(exc).__name__,
                    exc,
                    extra={"host": host, "sequence": seq},
                )
                return False
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``interval_s`` (on a fixed schedule, not drifting) until ``stop``."""
        interval = self.config.interval_s
        next_at = self._clock()
        while not stop.is_set():
            await self.tick()
            next_at += interval
            delay = next_at - self._clock()
            if delay < 0:
                # Fell behind (slow NATS): skip the missed ticks rather than burst.
                next_at = self._clock()
                delay = 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
