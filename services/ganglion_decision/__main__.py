"""``ganglion-decision``: the decision service as a process.

Prints one line on stdout when it accepts requests, for launchers to parse::

    ganglion-decision listening on 127.0.0.1:50051 policy=best-fit

With ``--workers N`` (N > 1) this process supervises N server processes on the one port and
the line ends with ``workers=N pids=PID,PID,...``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from ganglion import rpc
from ganglion.observability import setup_logging, setup_tracing, shutdown_tracing
from ganglion_decision.config import DecisionConfig
from ganglion_decision.server import WorkerError, serve, serve_workers

log = logging.getLogger("ganglion_decision")


def main(argv: Sequence[str] | None = None) -> None:
    config = DecisionConfig.from_args(argv)
    setup_logging()
    if config.workers > 1:
        _supervise(config)
        return
    setup_tracing("ganglion-decision")

    def ready(port: int) -> None:
        print(
            f"ganglion-decision listening on {config.address(port)} policy={config.policy}",
            flush=True,
        )

    try:
        with rpc.exit_on_os_error("ganglion-decision"):
            asyncio.run(serve(config, ready=ready))
    finally:
        shutdown_tracing()


def _supervise(config: DecisionConfig) -> None:
    """The parent of ``--workers N``: it serves nothing itself (each worker traces itself)."""

    def ready(port: int, pids: Sequence[int]) -> None:
        print(
            f"ganglion-decision listening on {config.address(port)} policy={config.policy} "
            f"workers={config.workers} pids={','.join(map(str, pids))}",
            flush=True,
        )

    try:
        asyncio.run(serve_workers(config, ready=ready))
    except WorkerError as exc:
        log.error("decision workers failed: %s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
