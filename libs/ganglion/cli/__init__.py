"""The ``ganglion`` command: one entry point, one subcommand per tool."""

from __future__ import annotations

import argparse
import sys

from ganglion.cli import demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ganglion", description="Ganglion: sense -> decide -> act for GPU clusters."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(sub)
    args = parser.parse_args(argv)
    sys.exit(args.run(args))
