"""One NATS connection on the portal loop: job-metric publishes and cluster lease keepalives.

``update()`` must never stall or crash a training loop because NATS is slow or away, so
records go into a bounded queue that one task publishes to JetStream (acknowledged, with a
``Nats-Msg-Id`` so a retried publish is stored once). When the queue is full the oldest record
is dropped and counted; :meth:`NatsLink.flush` waits until everything queued was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient

from ganglion import bus
from ganglion.sdk.holder import keepalive_subject
from ganglion.sdk.metrics import (
    JOB_METRICS_TYPE,
    TYPE_HEADER,
    JobMetricsRecord,
    job_metrics_subject,
)
from ganglion.sdk.portal import Portal

log = logging.getLogger(__name__)


@dataclass
class LinkStats:
    """Counters of one link (read them from any thread)."""

    published: int = 0
    """Metric records acknowledged by JetStream."""
    failed: int = 0
    """Records whose publish failed (logged)."""
    dropped: int = 0
    """Records dropped because the queue was full."""


class NatsLink:
    def __init__(
        self,
        portal: Portal,
        url: str,
        name: str,
        publish_timeout_s: float = 2.0,
        queue_max: int = 10_000,
        retry_s: float = 2.0,
    ) -> None:
        self.url = url
        self.stats = LinkStats()
        self._portal = portal
        self._name = name
        self._publish_timeout_s = publish_timeout_s
        self._retry_s = retry_s
        self._queue: asyncio.Queue[JobMetricsRecord] = asyncio.Queue(maxsize=queue_max)
        self._boot = uuid.uuid4().hex[:8]
        self._nc: NatsClient | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._keepalives: dict[str, asyncio.Task[None]] = {}

    # --- connection (portal loop only) --------------------------------------------------

    async def client(self) -> NatsClient:
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._nc is None or self._nc.is_closed:
                self._nc = await bus.connect(self.url, self._name)
            return self._nc

    # --- metrics ----------------------------------------------------------------------

    def publish_metrics(self, record: JobMetricsRecord) -> None:
        """Queue ``record`` for publishing; returns at once (any thread)."""
        self._portal.loop.call_soon_threadsafe(self._enqueue, record)

    def _enqueue(self, record: JobMetricsRecord) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self._queue.task_done()
            self.stats.dropped += 1
        self._queue.put_nowait(record)
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_forever(), name="sdk-metrics")

    async def _publish_forever(self) -> None:
        while True:
            record = await self._queue.get()
            try:
                await self._publish(record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.failed += 1
                log.warning(
                    "job metrics publish failed (%s: %s); retrying the connection in %.0fs",
                    type(exc).__name__,
                    exc,
                    self._retry_s,
                    extra={"job": record.job_id, "sequence": record.sequence},
                )
                await asyncio.sleep(self._retry_s)
            finally:
                self._queue.task_done()

    async def _publish(self, record: JobMetricsRecord) -> None:
        nc = await self.client()
        await nc.jetstream().publish(
            job_metrics_subject(record.host, record.job_id),
            record.to_proto().SerializeToString(),
            timeout=self._publish_timeout_s,
            headers={
                "Nats-Msg-Id": f"{record.job_id}:{self._boot}:{record.sequence}",
                TYPE_HEADER: JOB_METRICS_TYPE,
            },
        )
        self.stats.published += 1

    async def flush(self) -> None:
        """Until every queued record was published or failed."""
        await self._queue.join()

    # --- lease keepalives (cluster mode) ----------------------------------------------

    def start_keepalive(self, lease_id: str, interval_s: float) -> None:
        """Publish a keepalive for ``lease_id`` every ``interval_s`` (portal loop only)."""
        if lease_id not in self._keepalives:
            self._keepalives[lease_id] = asyncio.create_task(
                self._keepalive(lease_id, interval_s), name=f"sdk-keepalive-{lease_id}"
            )

    async def stop_keepalive(self, lease_id: str) -> None:
        task = self._keepalives.pop(lease_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keepalive(self, lease_id: str, interval_s: float) -> None:
        subject = keepalive_subject(lease_id)
        while True:
            try:
                # Core NATS: a lost beat is replaced by the next; the holder allows several.
                await (await self.client()).publish(subject, b"")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease keepalive failed: %s", exc, extra={"lease": lease_id})
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        for lease_id in list(self._keepalives):
            await self.stop_keepalive(lease_id)
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()
