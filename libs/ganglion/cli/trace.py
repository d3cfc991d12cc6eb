"""``ganglion trace import``: convert a public trace into the canonical CSV.

The canonical CSV has the header ``job_id,submit_s,duration_s,num_gpus,tenant,priority``
(``submit_s`` from the trace start) and, when the source has wall-clock times, a first line
``# origin=<ISO datetime>``. ``ganglion sim`` and ``ganglion eval`` read it with
``--format csv`` (or ``auto``), so any other trace can be converted into it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from rich.console import Console

from ganglion import traces
from ganglion.cli.sim import UsageError, guarded


def add_parser(sub: Any) -> None:
    p = sub.add_parser("trace", help="work with job traces", description=__doc__)
    actions = p.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    imp = actions.add_parser(
        "import",
        help="convert a trace (philly, tiresias, csv) into the canonical CSV",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("src", type=Path, help="source trace file")
    imp.add_argument("-o", "--output", type=Path, required=True, help="canonical CSV to write")
    imp.add_argument(
        "--format",
        choices=traces.FORMATS,
        default="auto",
        help="source format (default: from the header)",
    )
    imp.add_argument(
        "--window",
        default=None,
        help="keep START:END (days from the trace start, or ISO dates); re-based to 0",
    )
    imp.add_argument(
        "--load-scale", type=float, default=1.0, help="multiply the arrival rate (default 1)"
    )
    imp.add_argument("--max-jobs", type=int, default=0, help="keep only the first N jobs")
    imp.add_argument("--skip-bad", action="store_true", help="skip malformed rows, count them")
    imp.set_defaults(run=guarded(run_import))


def run_import(args: argparse.Namespace) -> int:
    console = Console(stderr=True, soft_wrap=True)
    if not (math.isfinite(args.load_scale) and args.load_scale > 0):
        raise UsageError(f"--load-scale must be > 0, got {args.load_scale}")
    if args.max_jobs < 0:
        raise UsageError("--max-jobs must be >= 0")
    try:
        trace = traces.prepare(
            args.src,
            args.format,
            window=args.window,
            load_scale=args.load_scale,
            max_jobs=args.max_jobs,
            skip_bad=args.skip_bad,
        )
    except (ValueError, traces.TraceError) as exc:
        raise UsageError(str(exc)) from None
    trace.write_csv(args.output)
    skipped = f"; skipped {trace.skipped} malformed rows" if args.skip_bad else ""
    console.print(
        f"wrote {len(trace)} jobs ({trace.source}) to {args.output}{skipped}", highlight=False
    )
    return 0
