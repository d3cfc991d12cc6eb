"""Every built-in policy's placements and preemptions on one real Philly window, pinned.

A change meant to be a speed-up or a refactor (the simulator's columns, the shared
placement, the LAS family's ranking) must leave what every policy decides exactly as it was.
These digests were computed before this session's refactors and again after them (equal). A
change that is meant to alter decisions updates them, and says so in its commit.
"""

from __future__ import annotations

import hashlib

import pytest

from ganglion import policies, traces
from ganglion.sim import ClusterSpec, SimConfig, simulate
from tests.conftest import SHARED_TRACES

WINDOW = "30:30.25"  # 75 jobs from day 30 of the Philly trace, on 8 hosts x 8 GPUs
GOLDEN = {
    # policy: (digest of (placements, preemptions), placements, preemptions)
    "fifo": ("f4b49ae3601d0398", 75, 0),
    "best-fit": ("081722b22dbbca43", 75, 0),
    "srtf": ("3ba4dfb1c5828898", 79, 4),
    "srgt": ("081722b22dbbca43", 75, 0),  # no preemption pays off in this light window
    "las": ("749a03836b5a0915", 4541, 4466),
    "tiresias": ("7cd2badf721c7a28", 88, 13),
    "tiresias-bestfit": ("7cd2badf721c7a28", 88, 13),
    "gittins": ("c52c61b08a39df88", 143, 68),
}


@pytest.mark.parametrize("name", GOLDEN)
def test_decisions_on_a_philly_window_are_unchanged(name: str) -> None:
    path = SHARED_TRACES / "philly" / "philly.csv"
    if not path.exists():
        pytest.skip(f"shared trace {path} not found (set GANGLION_TRACES or add ../shared)")
    if name.startswith("gittins") and not (SHARED_TRACES / "tiresias").exists():
        pytest.skip("gittins needs ../shared/traces/tiresias/yarn-gput10000.csv")
    trace = traces.prepare(path, window=WINDOW)
    result = simulate(
        trace, ClusterSpec.uniform(8, 8), policies.create(name), SimConfig(record_placements=True)
    )
    digest = hashlib.sha256(repr((result.placements, result.preempted)).encode()).hexdigest()
    assert (digest[:16], len(result.placements), len(result.preempted)) == GOLDEN[name]
