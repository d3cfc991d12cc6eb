"""The ``ganglion`` command: one entry point, one subcommand per module.

Each module in ``SUBCOMMANDS`` has ``add_parser(subparsers)``, which registers its parser and
sets ``run`` (``args -> exit code``) as a default.
"""

from __future__ import annotations

import argparse
import sys

from ganglion.cli import demo, loadgen
from ganglion.cli import eval as eval_cmd
from ganglion.cli import models as models_cmd
from ganglion.cli import sim as sim_cmd
from ganglion.cli import trace as trace_cmd
from ganglion.cli import train as train_cmd

SUBCOMMANDS = [demo, loadgen, sim_cmd, eval_cmd, trace_cmd, models_cmd, train_cmd]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ganglion", description="Ganglion: sense -> decide -> act for GPU clusters."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
    except OSError as exc:
        # A path or port the user named (an output that is a directory, a file where a folder
        # is expected, a port in use): the reason in one line, argparse's status, no traceback.
        print(f"ganglion {args.command}: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
