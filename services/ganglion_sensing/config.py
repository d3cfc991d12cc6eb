"""Configuration of the sensing service: command-line flags into a frozen dataclass.

The NATS address is not a flag: ``GANGLION_NATS_URL`` (read by
:func:`ganglion.bus.nats_url_or_embedded`), else an embedded nats-server.
"""

from __future__ import annotations

import argparse
import math
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from ganglion.bus import check_host_name

BACKENDS = ("auto", "nvml", "sim")


@dataclass(frozen=True)
class SensingConfig:
    """One sensing agent: which host, which collector, how often, where /metrics listens."""

    host: str = field(default_factory=socket.gethostname)
    """Host name used in subjects (``ganglion.telemetry.<host>``), KV keys and labels."""
    backend: str = "auto"
    """``auto`` (NVML, else simulated GPUs when no driver), ``nvml`` or ``sim``."""
    sim_gpus: int = 4
    """Number of simulated GPUs when the backend is (or falls back to) ``sim``."""
    interval_s: float = 1.0
    """Seconds between samples."""
    metrics_port: int = 9400
    """Port of Prometheus ``/metrics`` (dcgm-exporter's); 0 picks a free one."""
    metrics_addr: str = "127.0.0.1"
    """Address ``/metrics`` binds to (``0.0.0.0`` to be scraped from other machines)."""
    publish_timeout_s: float = 2.0
    """How long one publish may wait for JetStream's acknowledgement."""
    seed: int = 0
    """Seed of the simulated GPUs' jitter."""

    def __post_init__(self) -> None:
        check_host_name(self.host)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.sim_gpus < 0:
            raise ValueError(f"sim_gpus must be >= 0, got {self.sim_gpus}")
        if not (self.interval_s > 0 and math.isfinite(self.interval_s)):
            raise ValueError(f"interval_s must be a finite number > 0, got {self.interval_s}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if not self.metrics_addr:
            raise ValueError("metrics_addr must not be empty")
        if not (self.publish_timeout_s > 0 and math.isfinite(self.publish_timeout_s)):
            raise ValueError(
                f"publish_timeout_s must be a finite number > 0, got {self.publish_timeout_s}"
            )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ganglion-sensing",
        description="Per-host GPU telemetry: NATS (JetStream + KV) and Prometheus /metrics.",
        epilog="NATS: $GANGLION_NATS_URL, else an embedded nats-server.",
    )
    defaults = SensingConfig(host="localhost")
    parser.add_argument("--host", default=None, help="host name (default: this machine's)")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=defaults.backend,
        help="auto: NVML, or simulated GPUs when no driver is found (default %(default)s)",
    )
    parser.add_argument(
        "--sim-gpus",
        type=_non_negative_int,
        default=defaults.sim_gpus,
        help="simulated GPUs for the sim backend (default %(default)s)",
    )
    parser.add_argument(
        "--interval",
        type=_positive_float,
        default=defaults.interval_s,
        help="seconds between samples (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=defaults.metrics_port,
        help="Prometheus port (default %(default)s; 0 picks a free one)",
    )
    parser.add_argument(
        "--metrics-addr",
        default=defaults.metrics_addr,
        help="address /metrics binds (default %(default)s)",
    )
    parser.add_argument(
        "--publish-timeout",
        type=_positive_float,
        default=defaults.publish_timeout_s,
        help="seconds a publish may wait for its ack (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="simulated GPUs' seed")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> SensingConfig:
    """Flags into a config; a bad value exits through argparse with the reason."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return SensingConfig(
            host=args.host if args.host is not None else socket.gethostname(),
            backend=args.backend,
            sim_gpus=args.sim_gpus,
            interval_s=args.interval,
            metrics_port=args.metrics_port,
            metrics_addr=args.metrics_addr,
            publish_timeout_s=args.publish_timeout,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
