"""DQN for the scheduling env, in one file (CleanRL's layout: Args -> env -> network -> loop).

The env's ``pick`` form: each step places one pending job (the row picked) or waits, so the
action set is "which job next, or wait" and Q-learning applies as written,

    Q(s, a) <- r + gamma * max_a' Q_target(s', a')        (a' over the valid actions of s')

with Q(s, pick j) the network's per-row score and Q(s, wait) its pooled head. Picks cost no
time (reward 0); waiting hands the decision to the simulator and earns minus the jobs in the
system times the time until the next decision. Epsilon-greedy exploration over valid
actions, a replay buffer, a target network copied every ``target_network_frequency`` steps.
A DQN model schedules without preemption (it only ever picks pending jobs).

Run: ``ganglion train --algo dqn`` (or ``python -m ganglion.rl.dqn --help``). Writes the same
files as PPO in ``runs/<run name>/``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ganglion.rl.decide import ActionForm
from ganglion.rl.features import NUM_FEATURES
from ganglion.rl.network import NetConfig, SchedulerNet
from ganglion.rl.training import (
    CommonArgs,
    EpisodeLog,
    fit_normalisation,
    make_env,
    progress,
    reset,
    run_dir,
    write_csv,
    write_curve,
)


@dataclass(frozen=True)
class Args(CommonArgs):
    """DQN's knobs (the shared ones in ``CommonArgs``)."""

    algo: str = "dqn"
    """Algorithm name (in run names and manifests)."""
    total_steps: int = 40_000
    """Environment steps (picks and waits) to train for."""
    learning_rate: float = 2.5e-4
    """Adam step size."""
    buffer_size: int = 20_000
    """Replay buffer capacity (transitions)."""
    gamma: float = 0.99
    """Discount per step."""
    tau: float = 1.0
    """Target network update rate (1: hard copy)."""
    target_network_frequency: int = 500
    """Steps between target network updates."""
    batch_size: int = 64
    """Transitions per gradient step."""
    start_e: float = 1.0
    """Initial exploration epsilon."""
    end_e: float = 0.05
    """Final exploration epsilon."""
    exploration_fraction: float = 0.5
    """Fraction of training over which epsilon decays linearly."""
    learning_starts: int = 1_000
    """Steps before learning starts."""
    train_frequency: int = 4
    """Steps between gradient steps."""
    reward_scale: float = 10.0
    """Rewards are multiplied by this (the env's are small)."""
    hidden: int = 64
    """Hidden width of the network."""


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    slope = (end_e - start_e) / max(duration, 1)
    return max(slope * t + start_e, end_e)


def q_values(net: SchedulerNet, obs: torch.Tensor) -> torch.Tensor:
    """(B, k, F+1) observations -> (B, k+1) Q-values (last: wait)."""
    x, mask = obs[..., :NUM_FEATURES], obs[..., NUM_FEATURES] > 0
    picks = net.scores(x, mask)
    picks = torch.where(torch.isfinite(picks), picks, torch.zeros_like(picks))
    return torch.cat([picks, net.value(x, mask).unsqueeze(-1)], -1)


class ReplayBuffer:
    """Fixed-size ring of transitions, stored as numpy arrays."""

    def __init__(self, size: int, k: int) -> None:
        self.obs = np.zeros((size, k, NUM_FEATURES + 1), np.float32)
        self.next_obs = np.zeros_like(self.obs)
        self.next_mask = np.zeros((size, k + 1), bool)
        self.actions = np.zeros(size, np.int64)
        self.rewards = np.zeros(size, np.float32)
        self.dones = np.zeros(size, np.float32)
        self.size, self.pos, self.full = size, 0, False

    def add(
        self, obs: np.ndarray, nxt: np.ndarray, mask: np.ndarray, a: int, r: float, d: bool
    ) -> None:
        i = self.pos
        self.obs[i], self.next_obs[i], self.next_mask[i] = obs, nxt, mask
        self.actions[i], self.rewards[i], self.dones[i] = a, r, float(d)
        self.pos = (i + 1) % self.size
        self.full = self.full or self.pos == 0

    def sample(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        idx = rng.integers(0, self.size if self.full else self.pos, n)
        return (
            torch.from_numpy(self.obs[idx]),
            torch.from_numpy(self.next_obs[idx]),
            torch.from_numpy(self.next_mask[idx]),
            torch.from_numpy(self.actions[idx]),
            torch.from_numpy(self.rewards[idx]),
            torch.from_numpy(self.dones[idx]),
        )


def train(args: Args) -> Path:
    """Train; returns the run directory (``final.pt`` holds the weights)."""
    out = run_dir(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    env = make_env(args, ActionForm.PICK)
    k = env.config.k
    q_net = SchedulerNet(NetConfig(NUM_FEATURES, args.hidden))
    mean, std = fit_normalisation(env.config, args.seed, max_steps=args.norm_steps)
    q_net.set_normalisation(torch.from_numpy(mean), torch.from_numpy(std))
    optimizer = torch.optim.Adam(q_net.parameters(), lr=args.learning_rate)
    target = SchedulerNet(NetConfig(NUM_FEATURES, args.hidden))
    target.load_state_dict(q_net.state_dict())
    buffer = ReplayBuffer(args.buffer_size, k)

    episodes = EpisodeLog(out, args.baseline, env.config)
    rows: list[dict[str, Any]] = []
    obs, info = reset(env, args.seed)
    started = time.perf_counter()
    loss_value = q_mean = 0.0
    step, epsilon = 0, args.start_e
    with progress(f"DQN {args.run_name()}", args.total_steps) as (bar, task):
        for step in range(1, args.total_steps + 1):
            if args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
                break
            mask = info["mask"]
            epsilon = linear_schedule(
                args.start_e, args.end_e, int(args.exploration_fraction * args.total_steps), step
            )
            if rng.random() < epsilon:
                action = int(rng.choice(np.flatnonzero(mask)))
            else:
                with torch.inference_mode():
                    q = q_values(q_net, torch.from_numpy(obs)[None])[0].numpy()
                action = int(np.argmax(np.where(mask, q, -np.inf)))
            nxt, reward, terminated, truncated, info = env.step(action)
            buffer.add(obs, nxt, info["mask"], action, reward * args.reward_scale, terminated)
            obs = nxt
            if terminated or truncated:
                if terminated and env.window is not None:
                    episodes.record(step, env.window, info)
                obs, info = reset(env)
            if step > args.learning_starts and step % args.train_frequency == 0:
                b_obs, b_next, b_mask, b_act, b_rew, b_done = buffer.sample(args.batch_size, rng)
                with torch.no_grad():
                    q_next = q_values(target, b_next).masked_fill(~b_mask, float("-inf"))
                    best = q_next.max(1).values
                    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
                    td_target = b_rew + args.gamma * best * (1.0 - b_done)
                q_taken = q_values(q_net, b_obs).gather(1, b_act[:, None]).squeeze(1)
                loss = F.smooth_l1_loss(q_taken, td_target)
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                nn.utils.clip_grad_norm_(q_net.parameters(), 10.0)
                optimizer.step()
                loss_value, q_mean = loss.item(), q_taken.mean().item()
            if step % args.target_network_frequency == 0:
                for tp, qp in zip(target.parameters(), q_net.parameters(), strict=True):
                    tp.data.copy_(args.tau * qp.data + (1.0 - args.tau) * tp.data)
            if step % 500 == 0:
                elapsed = time.perf_counter() - started
                rows.append(
                    {
                        "global_step": step,
                        "elapsed_s": round(elapsed, 1),
                        "steps_per_s": round(step / elapsed, 1),
                        "epsilon": round(epsilon, 3),
                        "td_loss": loss_value,
                        "q_mean": q_mean,
                    }
                )
                write_csv(out / "progress.csv", rows)
                bar.update(task, completed=step, description=f"DQN {episodes.summary()}")
            if args.checkpoint_every and step % (args.checkpoint_every * 1000) == 0:
                (out / "checkpoints").mkdir(exist_ok=True)
                torch.save(q_net.state_dict(), out / "checkpoints" / f"step_{step:07d}.pt")
    torch.save(q_net.state_dict(), out / "final.pt")
    elapsed = time.perf_counter() - started
    rows.append({"global_step": step, "elapsed_s": round(elapsed, 1),
                 "steps_per_s": round(step / max(elapsed, 1e-9), 1), "epsilon": round(epsilon, 3),
                 "td_loss": loss_value, "q_mean": q_mean})  # fmt: skip
    write_csv(out / "progress.csv", rows)
    write_curve(out, episodes, rows, "DQN", ("td_loss", "q_mean"))
    (out / "args.json").write_text(args.to_json())
    return out


def main(argv: list[str] | None = None) -> None:
    from ganglion.rl.training import parse_args

    args = parse_args(Args, argv, __doc__ or "")
    print(f"run written to {train(args)}")


if __name__ == "__main__":
    main()
