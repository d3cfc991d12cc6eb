"""Start the services as separate OS processes on one machine (demo, end-to-end tests).

Each service prints one ready line on stdout (``... listening on ADDR ...``); everything
else they write goes to ``<run_dir>/<name>.log``. :meth:`LocalStack.close` stops them in
reverse order (SIGTERM, then SIGKILL of the process group) and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

_LISTENING = re.compile(r"listening on (\S+)")


class StackError(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    ready_line: str = ""
    address: str = ""
    _drain: asyncio.Task[None] | None = field(default=None, repr=False)


class LocalStack:
    def __init__(self, run_dir: Path, env: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.services: list[Service] = []

    async def start(
        self,
        name: str,
        module: str,
        args: list[str],
        env: dict[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> Service:
        """Run ``python -m module args`` and wait for its ready line."""
        log_path = self.run_dir / f"{name}.log"
        log_file = log_path.open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env={**self.env, **(env or {})},
                start_new_session=True,
            )
        finally:
            log_file.close()
        service = Service(name, proc, log_path)
        self.services.append(service)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
        except TimeoutError:
            raise StackError(
                f"{name} printed no ready line within {timeout_s}s; see {log_path}"
            ) from None
        if not line:
            await proc.wait()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise StackError(f"{name} exited with {proc.returncode} before it was ready:\n{tail}")
        service.ready_line = line.decode().strip()
        match = _LISTENING.search(service.ready_line)
        service.address = match.group(1) if match else ""
        service._drain = asyncio.create_task(self._drain_stdout(service))
        return service

    @staticmethod
    async def _drain_stdout(service: Service) -> None:
        assert service.proc.stdout is not None
        with service.log_path.open("ab") as out:
            while line := await service.proc.stdout.readline():
                out.write(line)

    def check_alive(self) -> None:
        for s in self.services:
            if s.proc.returncode is not None:
                raise StackError(f"{s.name} exited with {s.proc.returncode}; see {s.log_path}")

    async def stop(self, service: Service, grace_s: float = 10.0) -> None:
        proc = service.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        # Anything the service left in its process group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if service._drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(service._drain, 2.0)

    async def kill(self, service: Service) -> None:
        """SIGKILL the service (a crash), leaving the processes it started alone."""
        with contextlib.suppress(ProcessLookupError):
            service.proc.kill()
        await asyncio.wait_for(service.proc.wait(), 10.0)
        if service._drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(service._drain, 2.0)
        self.services.remove(service)

    async def close(self) -> None:
        for service in reversed(self.services):
            await self.stop(service)
