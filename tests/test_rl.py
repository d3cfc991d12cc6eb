"""The learned-policy pieces: features (non-clairvoyant), the Plackett-Luce log-probability,
the gymnasium env (its return is exactly minus the total JCT), and smoke runs of the real
PPO and DQN scripts and of ``ganglion sim --policy rl`` on real trace windows."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ganglion import policies
from ganglion.domain import ClusterState, Job, Segment
from ganglion.models import LocalRegistry, ModelRef, verify
from ganglion.policies.rl import RlPolicy
from ganglion.policies.srtf import Srtf
from ganglion.rl.env import EnvConfig, SchedulingEnv
from ganglion.rl.features import FEATURES, NUM_FEATURES, ActionForm, contested_prefix, observe
from ganglion.rl.imitate import Target, collect, finishes_soon, fit, teacher_order
from ganglion.rl.model import EXPECTED_SCHEMA, ScoringModel, to_artifact
from ganglion.rl.network import NetConfig, SchedulerNet, plackett_luce_logp
from ganglion.sim import ClusterSpec
from ganglion.traces import Trace
from tests.conftest import ROOT, SHARED_TRACES

PHILLY = SHARED_TRACES / "philly" / "philly.csv"
needs_philly = pytest.mark.skipif(
    not PHILLY.is_file(), reason=f"the Philly trace is not at {PHILLY} (shared traces absent)"
)
GANGLION = [str(Path(sys.executable).parent / "ganglion")]
SMOKE_TIMEOUT_S = 110


def small_trace(n: int = 12) -> Trace:
    rng = np.random.default_rng(0)
    return Trace(
        job_id=tuple(f"j{i}" for i in range(n)),
        submit_s=np.sort(rng.uniform(0, 600, n)),
        duration_s=rng.uniform(60, 3000, n),
        num_gpus=rng.choice([1, 2, 4], n).astype(np.int32),
        tenant=tuple("ab"[i % 2] for i in range(n)),
        priority=np.zeros(n, dtype=np.int32),
        source="synthetic (test)",
    )


def state() -> tuple[ClusterState, list[Job]]:
    running = [Job("r", "a", 2, 0.0, attained_service_s=5000.0, duration_hint_s=9e9)]
    s = ClusterState.build(4000.0, {"h1": 4, "h2": 4}, {"r": [Segment("h1", (0, 1))]}, running)
    pending = [Job(f"p{i}", "b", 1 + i, 100.0 * i, duration_hint_s=10.0 * i) for i in range(3)]
    return s, pending


def test_features_never_read_true_durations() -> None:
    s, pending = state()
    a = observe(s, pending, 8)
    blind = [dataclasses.replace(j, duration_hint_s=None) for j in pending]
    b = observe(s, blind, 8)
    assert a.features.shape == (4, NUM_FEATURES) and len(FEATURES) == NUM_FEATURES
    np.testing.assert_array_equal(a.features, b.features)
    # Candidates in base order: pending jobs (under 1 GPU-hour) before the running one.
    assert [j.id for j in a.jobs] == ["p0", "p1", "p2", "r"]
    assert a.features[3, FEATURES.index("running")] == 1.0
    policy = policies.create("rl")
    d1 = policy.schedule(s, pending)
    d2 = policy.schedule(s, blind)
    assert d1.placements == d2.placements and d1.preemptions == d2.preemptions
    assert d1.version.startswith("scheduler@")


def test_plackett_luce_probabilities_sum_to_one() -> None:
    logits = torch.tensor([[0.3, -1.0, 2.0, float("-inf")]])
    total = 0.0
    for perm in itertools.permutations(range(3)):
        order = torch.tensor([[*perm, 3]])
        total += math.exp(float(plackett_luce_logp(logits, order, torch.tensor([3]))[0]))
    assert total == pytest.approx(1.0, abs=1e-6)
    # Only the contested prefix counts: 2 GPUs of demand per job, 4 GPUs -> 2 positions.
    assert contested_prefix([2, 2, 2], [0, 1, 2], 4) == 2
    assert contested_prefix([1, 1], [0, 1], 4) == 0


@pytest.mark.parametrize("form", [ActionForm.RANK, ActionForm.PICK])
def test_env_return_is_minus_total_jct(form: ActionForm) -> None:
    config = EnvConfig(
        cluster=ClusterSpec.uniform(1, 4), windows=(small_trace(),), form=form, k=8, quantum_s=120.0
    )
    env = SchedulingEnv(config)
    obs, info = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape
    total = 0.0
    rng = np.random.default_rng(1)
    for _ in range(10_000):
        if form is ActionForm.RANK:
            action = rng.normal(size=config.k).astype(np.float32)
        else:
            action = int(rng.integers(config.k + 1))  # invalid rows count as waiting
        obs, reward, terminated, truncated, info = env.step(action)
        total += reward
        if terminated:
            break
    assert terminated and not truncated
    assert info["jobs"] == 12
    assert total == pytest.approx(-info["avg_jct_s"] * 12 / config.reward_scale_s, rel=1e-9)


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, check=False
    )


SMOKE = [
    "--windows", "2", "--window-days", "0.3", "--train-window", "2017-10-10:2017-10-14",
    "--hosts", "4", "--k", "16", "--baseline", "", "--checkpoint-every", "1", "--norm-steps", "50",
]  # fmt: skip


def ganglion_main(args: list[str]) -> int:
    """``ganglion ARGS`` in this process (torch and the parsed trace are then shared)."""
    from ganglion.cli import main

    with pytest.raises(SystemExit) as done:
        main(args)
    return int(done.value.code or 0)


@needs_philly
def test_ppo_smoke_through_ganglion_train(tmp_path: Path) -> None:
    args = [
        "train", "--algo", "ppo", *SMOKE, "--total-steps", "128", "--num-steps", "64",
        "--bc-steps", "20", "--bc-epochs", "1", "--bc-target", "finish",
        "--out-dir", str(tmp_path / "runs"), "--run-tag", "smoke", "--models-dir",
        str(tmp_path / "models"), "--eval-windows", "1", "--eval-days", "0.05",
    ]  # fmt: skip
    assert ganglion_main(args) == 0
    run = tmp_path / "runs" / "smoke"
    for name in ("final.pt", "progress.csv", "episodes.csv", "learning_curve.png", "args.json"):
        assert (run / name).is_file(), name
    with (run / "imitation.csv").open() as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["1"]
    assert list((run / "checkpoints").glob("update_*.pt"))
    with (run / "progress.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(math.isfinite(float(r["value_loss"])) for r in rows)
    artifact = LocalRegistry(tmp_path / "models").fetch_sync(ModelRef("scheduler", 1))
    verify(artifact, EXPECTED_SCHEMA)
    m = artifact.manifest
    assert m.training["algo"] == "ppo" and m.training["seed"] == 1
    assert m.evaluation["windows"] == 1 and m.evaluation["best_heuristic"] in policies.names()
    assert json.loads((run / "eval" / "summary.json").read_text())["policy"] == "rl"


@needs_philly
def test_dqn_smoke_through_the_script(tmp_path: Path) -> None:
    from ganglion.rl import dqn

    dqn.main([
        *SMOKE, "--total-steps", "200", "--learning-starts", "50", "--batch-size", "16",
        "--out-dir", str(tmp_path), "--run-tag", "dqn",
    ])  # fmt: skip
    for name in ("final.pt", "episodes.csv", "learning_curve.png", "progress.csv"):
        assert (tmp_path / "dqn" / name).is_file(), name


@needs_philly
def test_ganglion_sim_with_the_shipped_model(tmp_path: Path) -> None:
    out = tmp_path / "rl.json"
    args = [
        *GANGLION, "sim", "--trace", str(PHILLY), "--window", "2017-11-06:2017-11-07", "--max-jobs", "30",
        "--hosts", "4", "--gpus-per-host", "8", "--policy", "rl", "--json", str(out),
    ]  # fmt: skip
    done = run_cli(args, ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics["policy"] == "rl" and metrics["jobs"] > 0 and metrics["unfinished"] == 0


def test_pick_form_model_places_without_preempting() -> None:
    torch.manual_seed(0)
    artifact = to_artifact(
        SchedulerNet(NetConfig(hidden=8)), form=ActionForm.PICK, k=8, quantum_s=300.0, training={}
    )
    policy = RlPolicy("rl", model=ScoringModel(artifact))
    assert policy.quantum_s is None  # a pick model never preempts: no quantum needed
    s, pending = state()
    decision = policy.schedule(s, pending)
    assert decision.preemptions == ()
    placed = {p.job_id for p in decision.placements}
    assert placed <= {j.id for j in pending}
    used = [
        (seg.host, i) for p in decision.placements for seg in p.segments for i in seg.gpu_indices
    ]
    assert len(used) == len(set(used)) and ("h1", 0) not in used and ("h1", 1) not in used
    # On an idle cluster it must place something (waiting there would wait forever).
    idle = ClusterState.build(0.0, {"h1": 4, "h2": 4})
    assert policy.schedule(idle, pending).placements


@pytest.mark.parametrize("target", list(Target))
def test_imitation_learns_from_the_oracle_it_never_shows_the_policy(target: Target) -> None:
    s, pending = state()
    obs = observe(s, pending, 8)
    order = teacher_order(obs.jobs, obs.running)
    # The teacher is the srtf oracle's rank (remaining run time), not the observation's order.
    keys = [
        *Srtf.rank([j for j in obs.jobs if j.id == "r"], True, s.now_s),
        *Srtf.rank([j for j in obs.jobs if j.id != "r"], False, s.now_s),
    ]
    by_id = dict(zip(["r", *(j.id for j in obs.jobs if j.id != "r")], keys, strict=True))
    assert [obs.jobs[i].id for i in order] == sorted(by_id, key=lambda i: by_id[i])
    assert finishes_soon(obs.jobs).tolist() == [1.0, 1.0, 1.0, 0.0]

    config = EnvConfig(
        cluster=ClusterSpec.uniform(1, 4), windows=(small_trace(40),), k=48, quantum_s=120.0
    )
    env = SchedulingEnv(config)
    torch.manual_seed(0)
    net = SchedulerNet(NetConfig(hidden=8))
    demos, _ = collect(env, net, 40, torch.Generator().manual_seed(0), env.reset(seed=0))
    assert demos and all(d.prefix > 0 for d in demos)
    assert all(sorted(d.order.tolist()) == list(range(len(d.features))) for d in demos)
    losses = fit(net, demos, 8, 8, 1e-2, 0, target)
    assert len(losses) == 8 and losses[-1] < losses[0]
