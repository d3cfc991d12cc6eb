"""``ganglion-decision``: the decision service as a process.

Prints one line on stdout when it accepts requests, for launchers to parse::

    ganglion-decision listening on 127.0.0.1:50051 policy=best-fit
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ganglion.observability import setup_logging, setup_tracing, shutdown_tracing
from ganglion_decision.config import DecisionConfig
from ganglion_decision.server import serve


def main(argv: Sequence[str] | None = None) -> None:
    config = DecisionConfig.from_args(argv)
    setup_logging()
    setup_tracing("ganglion-decision")

    def ready(port: int) -> None:
        print(
            f"ganglion-decision listening on {config.address(port)} policy={config.policy}",
            flush=True,
        )

    try:
        asyncio.run(serve(config, ready=ready))
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
