"""The lease holder: the job a cluster-mode ``allocate()`` submits to keep GPUs for its caller.

``python -m ganglion.sdk.holder [--ttl SECONDS]``. The executor starts it like any job, with
``CUDA_VISIBLE_DEVICES`` set to the granted GPUs; while it runs, the controller counts those
GPUs as taken. It ends when:

- the lease is released (``Cancel`` -> the executor's SIGTERM): exit 0;
- the client stopped sending keepalives for ``--ttl`` seconds (it crashed, or lost NATS):
  exit 3, so a crashed training process never strands cluster GPUs;
- it cannot reach NATS to hear keepalives: exit 2 (better a failed lease than a stranded one).

With ``--ttl 0`` (the client has no NATS) it holds until cancelled. NATS comes from the
executor's environment (``GANGLION_NATS_URL``). Standard library plus nats-py only: it must
start fast, so it imports no grpc, numpy or protobuf.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time

EXIT_RELEASED = 0
EXIT_NO_NATS = 2
EXIT_EXPIRED = 3
KEEPALIVE_SUBJECT = "ganglion.sdk.leases"
"""Core NATS (no stream captures it): ``ganglion.sdk.leases.<lease id>.keepalive``."""


def keepalive_subject(lease_id: str) -> str:
    return f"{KEEPALIVE_SUBJECT}.{lease_id}.keepalive"


def _say(text: str) -> None:
    print(f"ganglion-holder: {text}", flush=True)


async def hold(lease_id: str, ttl_s: float, nats_url: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ttl_s <= 0:
        _say("no keepalive expected (--ttl 0): holding until released")
        await stop.wait()
        _say("released")
        return EXIT_RELEASED
    if not nats_url:
        _say("GANGLION_NATS_URL is not set: cannot hear keepalives, giving the GPUs back")
        return EXIT_NO_NATS
    from ganglion import bus  # nats-py only; deferred so --ttl 0 imports nothing

    try:
        nc = await asyncio.wait_for(bus.connect(nats_url, f"ganglion-holder-{lease_id}"), 10)
    except Exception as exc:
        _say(f"cannot connect to NATS at {nats_url} ({type(exc).__name__}): giving the GPUs back")
        return EXIT_NO_NATS
    last = time.monotonic()

    async def on_beat(_msg: object) -> None:
        nonlocal last
        last = time.monotonic()

    try:
        await nc.subscribe(keepalive_subject(lease_id), cb=on_beat)
        _say(f"keepalive every <{ttl_s:g}s expected on {keepalive_subject(lease_id)}")
        while not stop.is_set():
            left = ttl_s - (time.monotonic() - last)
            if left <= 0:
                _say(f"no keepalive for {ttl_s:g}s: the client is gone, giving the GPUs back")
                return EXIT_EXPIRED
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(left, 1.0))
        _say("released")
        return EXIT_RELEASED
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ganglion.sdk.holder", description=__doc__.split("\n")[0])
    p.add_argument(
        "--ttl",
        type=float,
        default=30.0,
        help="seconds without keepalive before giving up (0: never)",
    )
    p.add_argument("--lease", default="", help="lease id (default: $GANGLION_JOB_ID)")
    a = p.parse_args(argv)
    lease_id = a.lease or os.environ.get("GANGLION_JOB_ID", "")
    if not lease_id:
        p.error("no lease id: pass --lease or run under an executor (GANGLION_JOB_ID)")
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    host = os.environ.get("GANGLION_HOST", "?")
    _say(f"lease {lease_id} holds GPUs [{gpus}] on {host}")
    return asyncio.run(hold(lease_id, a.ttl, os.environ.get("GANGLION_NATS_URL", "")))


if __name__ == "__main__":
    sys.exit(main())
