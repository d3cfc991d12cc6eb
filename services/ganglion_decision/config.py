"""Flags (with ``GANGLION_DECISION_*`` environment defaults) -> a frozen config."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ganglion import policies
from ganglion.rpc import MAX_MESSAGE_BYTES
from ganglion_decision.servicer import OFFLOAD_WORK
from ganglion_decision.validation import DEFAULT_LIMITS, Limits

_T = TypeVar("_T")


def _flag(raw: str) -> bool:
    """An environment boolean: 1/true/yes/on or 0/false/no/off."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


@dataclass(frozen=True)
class DecisionConfig:
    """How one decision server runs."""

    port: int = 50051
    """TCP port; 0 picks a free one (printed in the ready line)."""
    bind: str = "127.0.0.1"
    """Address to listen on (``0.0.0.0`` in a container)."""
    policy: str = policies.DEFAULT_POLICY
    """Policy for requests that name none."""
    max_pending: int = DEFAULT_LIMITS.max_pending
    """Most pending jobs per request; more is RESOURCE_EXHAUSTED."""
    max_gpus: int = DEFAULT_LIMITS.max_gpus
    """Most GPUs (and hosts, running jobs) per request; more is RESOURCE_EXHAUSTED."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Largest request in bytes; gRPC rejects bigger ones with RESOURCE_EXHAUSTED."""
    offload_work: int = OFFLOAD_WORK
    """Pending jobs x hosts above which a request is decided off the event loop."""
    workers: int = 1
    """Server processes on the one port (SO_REUSEPORT): the kernel spreads connections over
    them, so one machine's cores all decide. 1 = this process serves."""
    reuse_port: bool = False
    """Listen with SO_REUSEPORT even as a single process (workers always do)."""
    models_dir: str = ""
    """Model registry directory (watched for new versions); empty: ``$GANGLION_MODELS_DIR``
    over the shipped default model, loaded on the first ``rl`` request."""
    models_nats_bucket: str = ""
    """Use this NATS JetStream object store as the model registry (``GANGLION_NATS_URL``)."""
    models_poll_s: float = 2.0
    """How often the registry is polled for new versions (hot reload)."""
    torch_threads: int = 1
    """torch intra-op threads for model inference."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not self.bind:
            raise ValueError("bind address must not be empty")
        if self.policy not in policies.names():
            raise ValueError(
                f"unknown policy {self.policy!r}; known: {', '.join(policies.names())}"
            )
        if self.models_dir and self.models_nats_bucket:
            raise ValueError("give --models-dir or --models-nats-bucket, not both")
        if not self.models_poll_s > 0:
            raise ValueError(f"models_poll_s must be > 0, got {self.models_poll_s}")
        for name in (
            "max_pending",
            "max_gpus",
            "max_message_bytes",
            "offload_work",
            "workers",
            "torch_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def limits(self) -> Limits:
        return Limits(max_gpus=self.max_gpus, max_pending=self.max_pending)

    def address(self, port: int | None = None) -> str:
        """``host:port`` (IPv6 bracketed) for ``port``, default the configured one."""
        host = f"[{self.bind}]" if ":" in self.bind and not self.bind.startswith("[") else self.bind
        return f"{host}:{self.port if port is None else port}"

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
    ) -> DecisionConfig:
        """Parse flags; a flag left out falls back to ``GANGLION_DECISION_<FLAG>``, then the default.

        Bad values exit with status 2 and a message naming the flag (argparse's convention).
        """
        env = os.environ if env is None else env
        parser = argparse.ArgumentParser(
            prog="ganglion-decision",
            description="Ganglion decision service (gRPC DecisionService).",
        )

        def default(flag: str, convert: Callable[[str], _T], fallback: _T) -> _T:
            var = "GANGLION_DECISION_" + flag.upper().replace("-", "_")
            raw = env.get(var)
            if raw is None or raw == "":
                return fallback
            try:
                return convert(raw)
            except ValueError:
                parser.error(f"{var}={raw!r} is not a valid --{flag}")

        d = cls
        parser.add_argument(
            "--port", type=int, default=default("port", int, d.port), help="0 picks a free port"
        )
        parser.add_argument("--bind", default=default("bind", str, d.bind), help="listen address")
        parser.add_argument(
            "--policy",
            default=default("policy", str, d.policy),
            help=f"default policy, one of: {', '.join(policies.names())}",
        )
        parser.add_argument(
            "--max-pending",
            type=int,
            default=default("max-pending", int, d.max_pending),
            help="more pending jobs in one request -> RESOURCE_EXHAUSTED (default %(default)s)",
        )
        parser.add_argument(
            "--max-gpus",
            type=int,
            default=default("max-gpus", int, d.max_gpus),
            help="more GPUs in one cluster state -> RESOURCE_EXHAUSTED (default %(default)s)",
        )
        parser.add_argument(
            "--max-message-bytes",
            type=int,
            default=default("max-message-bytes", int, d.max_message_bytes),
            help="largest request in bytes; gRPC answers RESOURCE_EXHAUSTED beyond (default %(default)s)",
        )
        parser.add_argument(
            "--offload-work",
            type=int,
            default=default("offload-work", int, d.offload_work),
            help="run a policy on a worker thread when pending x hosts exceeds this (default %(default)s)",
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=default("workers", int, d.workers),
            help="server processes sharing the port via SO_REUSEPORT (default %(default)s)",
        )
        parser.add_argument(
            "--reuse-port",
            action="store_true",
            default=default("reuse-port", _flag, d.reuse_port),
            help="listen with SO_REUSEPORT, so other processes may serve the same port",
        )
        parser.add_argument(
            "--models-dir",
            default=default("models-dir", str, d.models_dir),
            help="model registry directory, watched for new versions (default: the shipped model)",
        )
        parser.add_argument(
            "--models-nats-bucket",
            default=default("models-nats-bucket", str, d.models_nats_bucket),
            help="use this NATS object store bucket as the model registry",
        )
        parser.add_argument(
            "--models-poll",
            type=float,
            default=default("models-poll", float, d.models_poll_s),
            help="seconds between registry polls for new model versions (default %(default)s)",
        )
        parser.add_argument(
            "--torch-threads",
            type=int,
            default=default("torch-threads", int, d.torch_threads),
            help="torch threads for model inference (default %(default)s)",
        )
        args = parser.parse_args(argv)
        try:
            return cls(
                port=args.port,
                bind=args.bind,
                policy=args.policy,
                max_pending=args.max_pending,
                max_gpus=args.max_gpus,
                max_message_bytes=args.max_message_bytes,
                offload_work=args.offload_work,
                workers=args.workers,
                reuse_port=args.reuse_port,
                models_dir=args.models_dir,
                models_nats_bucket=args.models_nats_bucket,
                models_poll_s=args.models_poll,
                torch_threads=args.torch_threads,
            )
        except ValueError as exc:
            parser.error(str(exc))
