"""Job events to JetStream through a small outbox, so a NATS blip delays events but loses none.

:meth:`EventOutbox.publish` is synchronous and never fails: it serialises the event, captures
the current trace context into the headers (so the event links to the span that caused it,
e.g. ``executor.start_process``) and queues it. One task sends the queue in order, retrying
each event with exponential backoff until JetStream acknowledges it. ``Nats-Msg-Id`` is
``<job>:<host>:<state>``, so a retry after a lost ack, or a republish after a restart, is
stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from ganglion.bus import events_subject
from ganglion.convert import job_state_to_proto
from ganglion.observability import inject_headers
from ganglion.v1 import executor_pb2
from ganglion_executor.model import JobView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Pending:
    subject: str
    data: bytes
    headers: dict[str, str]
    msg_id: str


def job_event(host: str, view: JobView) -> executor_pb2.JobEvent:
    return executor_pb2.JobEvent(
        job_id=view.job_id,
        host=host,
        state=job_state_to_proto(view.state),
        exit_code=view.exit_code,
        time_s=view.change_time_s,
        gpu_indices=list(view.gpu_indices),
        message=view.message,
    )


class EventOutbox:
    """Queue of job events drained to JetStream by one background task."""

    def __init__(
        self,
        js: JetStreamContext,
        host: str,
        *,
        publish_timeout_s: float = 2.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self._js = js
        self._host = host
        self._subject = events_subject(host)
        self._timeout_s = publish_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def publish(self, view: JobView) -> None:
        msg_id = f"{view.job_id}:{self._host}:{view.state.name}"
        data = job_event(self._host, view).SerializeToString()
        self._queue.put_nowait(
            _Pending(self._subject, data, inject_headers({"Nats-Msg-Id": msg_id}), msg_id)
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="executor-event-outbox")

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def _send(self, item: _Pending) -> None:
        delay = self._backoff_initial_s
        attempt = 1
        while True:
            try:
                await self._js.publish(
                    item.subject, item.data, timeout=self._timeout_s, headers=item.headers
                )
                return
            except (NatsError, TimeoutError, OSError) as exc:
                log.warning(
                    "job event not acknowledged (attempt %d, retry in %.1fs): %s",
                    attempt,
                    delay,
                    exc,
                    extra={"msg_id": item.msg_id},
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max_s)
            attempt += 1

    async def _drain(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._send(item)
            finally:
                self._queue.task_done()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (for at most ``timeout_s``), then stop the sender."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            log.error("job events left unsent at shutdown", extra={"count": self._queue.qsize()})
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
