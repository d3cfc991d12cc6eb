"""A private asyncio loop on a daemon thread, so synchronous callers can use async clients.

Cluster mode (gRPC aio) and NATS publishing are asyncio code, and they must keep running
(keepalives, metric publishes) while the caller's thread is busy training. Every coroutine of
the SDK runs on this one loop: the sync API waits on it with :meth:`Portal.call`, the async
twins await it from any other loop with :meth:`Portal.call_async`. gRPC channels and NATS
connections are bound to the loop that created them, so they are only ever touched here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ganglion.sdk.errors import SchedulerClosedError

T = TypeVar("T")


class Portal:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coro.close()
            raise SchedulerClosedError
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the portal loop and wait for it (cancelled on timeout/interrupt)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking SDK call from the SDK's own loop would deadlock")
        future = self.submit(coro)
        try:
            return future.result(timeout_s)
        except BaseException:
            future.cancel()
            raise

    async def call_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` running on the portal loop from another loop; cancellation propagates."""
        return await asyncio.wrap_future(self.submit(coro))

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel what still runs there, stop the loop, join the thread, close the loop."""
        if self._closed:
            return
        self._closed = True

        async def _cancel_all() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout_s)
            await self.loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_all(), self.loop).result(timeout_s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()
