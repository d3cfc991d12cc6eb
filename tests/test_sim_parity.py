"""One code path: a Philly window through the in-process policy and through a live decision
service (in-process gRPC server on port 0) gives identical placements and preemptions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ganglion import policies, traces
from ganglion.cli import main
from ganglion.sim import ClusterSpec, SimConfig, simulate, simulate_remote
from ganglion_decision import DecisionConfig, serve
from tests.conftest import SHARED_TRACES

PHILLY = SHARED_TRACES / "philly" / "philly.csv"
WINDOW = "34:34.1"  # 148 jobs; on 4x8 GPUs queues build and tiresias preempts ~130 times
CLUSTER = ClusterSpec.uniform(4, 8)
TIMEOUT_S = 10.0
RUN_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def window() -> traces.Trace:
    if not PHILLY.exists():
        pytest.skip(f"shared trace {PHILLY} not found (set GANGLION_TRACES or add ../shared)")
    return traces.prepare(PHILLY, window=WINDOW)


async def start_decision() -> tuple[str, asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(DecisionConfig(port=0), stop, ready=port.set_result))
    either: list[asyncio.Future[Any]] = [task, port]
    done, _ = await asyncio.wait(either, timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert port in done, "decision service did not become ready"
    return f"127.0.0.1:{port.result()}", stop, task


@pytest.mark.parametrize("policy", ["fifo", "tiresias", "srtf-bestfit"])
async def test_in_process_and_service_place_identically(window: traces.Trace, policy: str) -> None:
    config = SimConfig(record_placements=True)
    local = simulate(window, CLUSTER, policies.create(policy), config)
    address, stop, task = await start_decision()
    try:
        remote = await asyncio.wait_for(
            simulate_remote(window, CLUSTER, address, policy, config), RUN_TIMEOUT_S
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)
    assert len(local.placements) >= len(window) > 100
    assert local.done.all()
    assert remote.placements == local.placements
    assert remote.preempted == local.preempted
    assert np.array_equal(remote.finish, local.finish)
    assert remote.calls == local.calls
    if policy == "tiresias":
        assert local.preempted, "the window should make tiresias preempt"


async def test_cli_decision_addr_matches_in_process(window: traces.Trace, tmp_path: Path) -> None:
    argv = ["sim", "--trace", str(PHILLY), "--window", WINDOW, "--policy", "tiresias"]
    argv += ["--hosts", "4", "--gpus-per-host", "8"]

    def cli(extra: list[str]) -> int:
        try:
            main(argv + extra)
        except SystemExit as done:
            return int(done.code or 0)
        return 0

    local_csv, remote_csv = tmp_path / "local.csv", tmp_path / "remote.csv"
    assert cli(["--json", str(tmp_path / "l.json"), "--placements", str(local_csv)]) == 0
    address, stop, task = await start_decision()
    try:
        extra = ["--json", str(tmp_path / "r.json"), "--placements", str(remote_csv)]
        code = await asyncio.wait_for(
            asyncio.to_thread(cli, [*extra, "--decision-addr", address]), RUN_TIMEOUT_S
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)
    assert code == 0
    assert remote_csv.read_text() == local_csv.read_text()
    assert "preempt" in local_csv.read_text()
    local, remote = (json.loads((tmp_path / n).read_text()) for n in ("l.json", "r.json"))
    assert remote["avg_jct_s"] == local["avg_jct_s"] and remote["jobs"] == local["jobs"]
