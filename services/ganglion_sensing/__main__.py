"""``ganglion-sensing``: the per-host telemetry agent."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ganglion import rpc
from ganglion.observability import setup_logging, setup_tracing, shutdown_tracing
from ganglion_sensing.config import parse_args
from ganglion_sensing.service import serve

__all__ = ["main", "serve"]


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    setup_logging()
    setup_tracing("ganglion-sensing")
    try:
        with rpc.exit_on_os_error("ganglion-sensing"):
            asyncio.run(serve(config))
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
