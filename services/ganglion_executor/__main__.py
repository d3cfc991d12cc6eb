"""``ganglion-executor``: one per GPU host. See :mod:`ganglion_executor.config` for flags."""

from __future__ import annotations

import asyncio
import sys

from ganglion import rpc
from ganglion.bus import nats_url_or_embedded
from ganglion.observability import setup_logging, setup_tracing, shutdown_tracing
from ganglion_executor.app import serve
from ganglion_executor.config import parse_args


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging()
    setup_tracing("ganglion-executor")
    try:
        with rpc.exit_on_os_error("ganglion-executor"), nats_url_or_embedded() as url:
            asyncio.run(serve(config, url))
    finally:
        shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
