"""Ganglion executor service: runs the jobs that allocation plans assign to one GPU host.

Public API: :func:`serve` (run in-process), :class:`ExecutorConfig`, and the console script
``ganglion-executor`` (:mod:`ganglion_executor.__main__`).
"""

from __future__ import annotations

from ganglion_executor.app import serve
from ganglion_executor.config import ExecutorConfig, parse_args

__all__ = ["ExecutorConfig", "parse_args", "serve"]
