"""A job process for demos and tests: runs for a given time, reports its GPUs, exits.

``python -m ganglion.workload --seconds 3 [--exit-code N]``. It imports nothing heavy so
process start stays cheap; SIGTERM ends it early with exit code 143, like most trainers.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ganglion.workload")
    p.add_argument("--seconds", type=float, required=True, help="how long to run")
    p.add_argument("--exit-code", type=int, default=0, help="exit status at the end")
    a = p.parse_args(argv)
    if a.seconds < 0:
        p.error("--seconds must be >= 0")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    job = os.environ.get("GANGLION_JOB_ID", "?")
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    print(f"job {job} on GPUs [{gpus}] for {a.seconds:.2f}s", flush=True)
    deadline = time.monotonic() + a.seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))
    print(f"job {job} done", flush=True)
    return int(a.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
