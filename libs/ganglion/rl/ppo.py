"""PPO for the scheduling env, in one file (CleanRL's layout: Args -> env -> network -> loop).

The policy ranks candidate jobs: it samples a Plackett-Luce ranking from the network's
per-job logits (Gumbel-perturbed logits, sorted) and the env turns the ranking into a
decision with the shared preemptive machinery. The log-probability of an action is that of
the ranking's *contested prefix* (the positions up to where the GPU budget runs out): later
positions, and decisions where every job fits, change nothing and carry no signal.

Run: ``ganglion train --algo ppo`` (or ``python -m ganglion.rl.ppo --help``). Writes, in
``runs/<run name>/``: ``progress.csv`` (one row per update), ``episodes.csv`` (one row per
episode, with the avg JCT of a heuristic baseline on the same window), ``learning_curve.png``,
``checkpoints/`` and ``final.pt``; with ``--bc-steps``, ``imitation.csv`` (imitation
pre-training of the scorer from the SRTF oracle first: :mod:`ganglion.rl.imitate`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ganglion.rl import imitate
from ganglion.rl.decide import ActionForm
from ganglion.rl.env import SchedulingEnv
from ganglion.rl.features import NUM_FEATURES, contested_prefix
from ganglion.rl.network import NetConfig, SchedulerNet, first_pick_entropy, plackett_luce_logp
from ganglion.rl.training import (
    CommonArgs,
    EpisodeLog,
    RunningMeanStd,
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
    """PPO's knobs (the shared ones -- trace, windows, cluster, seed -- in ``CommonArgs``)."""

    algo: str = "ppo"
    """Algorithm name (in run names and manifests)."""
    total_steps: int = 150_000
    """Environment steps (scheduling decisions) to train for."""
    num_steps: int = 1024
    """Steps per rollout before each update."""
    learning_rate: float = 1e-3
    """Adam step size (annealed linearly to 0 when ``anneal_lr``)."""
    anneal_lr: bool = True
    """Decay the learning rate linearly over training."""
    gamma: float = 0.99
    """Discount per decision."""
    gae_lambda: float = 0.95
    """GAE's lambda."""
    num_minibatches: int = 8
    """Minibatches per epoch."""
    update_epochs: int = 4
    """Passes over each rollout."""
    clip_coef: float = 0.2
    """PPO's ratio clip."""
    ent_coef: float = 0.001
    """Weight of the first-pick entropy bonus."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    max_grad_norm: float = 0.5
    """Gradient clip (actor and critic clipped separately)."""
    target_kl: float = 0.05
    """Stop an update's epochs early past this approximate KL (0: never)."""
    hidden: int = 64
    """Hidden width of the network."""
    bc_steps: int = 0
    """Imitation pre-training before PPO: decisions rolled out per round and labelled by the
    SRTF oracle (the teacher only; the policy never sees durations). 0: none."""
    bc_rounds: int = 1
    """Imitation rounds (more than 1: DAgger, later rounds roll out the fitted student)."""
    bc_epochs: int = 20
    """Passes over each round's demos (all rounds' demos so far)."""
    bc_learning_rate: float = 3e-3
    """Adam step size of imitation pre-training."""
    bc_target: str = "order"
    """Imitation target: 'order' (the oracle's ranking) or 'finish' (whether each job
    finishes within the next 3,250 GPU-seconds, a residual on the prior's tiers)."""
    extra: dict[str, str] = field(default_factory=dict)
    """Free-form notes recorded in the manifest."""


def sample_ranking(
    logits: torch.Tensor, gpus: list[int], capacity: int, generator: torch.Generator
) -> tuple[np.ndarray, torch.Tensor, int]:
    """A Plackett-Luce ranking of the valid rows: (perturbed scores for the env, the order
    as a (k,) tensor with valid rows first, the contested prefix length)."""
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-9, 1.0 - 1e-9)
    perturbed = logits - torch.log(-torch.log(u))
    order = torch.argsort(perturbed, descending=True, stable=True)
    n = len(gpus)
    prefix = contested_prefix(gpus, order[:n].tolist(), capacity)
    scores = torch.where(torch.isfinite(perturbed), perturbed, torch.full_like(perturbed, -1e9))
    return scores.numpy(), order, prefix


def train(args: Args) -> Path:
    """Train; returns the run directory (``final.pt`` holds the weights)."""
    target = imitate.Target(args.bc_target)  # a bad name fails now, not after the rollouts
    out = run_dir(args)
    # Seeding: Python, numpy and torch generators, and the env's own generator via reset().
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)

    env = make_env(args, ActionForm.RANK)
    k = env.config.k
    net = SchedulerNet(NetConfig(NUM_FEATURES, args.hidden))
    mean, std = fit_normalisation(env.config, args.seed, max_steps=args.norm_steps)
    net.set_normalisation(torch.from_numpy(mean), torch.from_numpy(std))
    obs, info = reset(env, args.seed)
    if args.bc_steps > 0:
        obs, info = pretrain(net, env, args, target, generator, out, (obs, info))
    actor_params = [*net.prior.parameters(), *net.actor.parameters()]
    critic_params = [*net.embed.parameters(), *net.critic.parameters()]
    optimizer = torch.optim.Adam(
        [{"params": actor_params}, {"params": critic_params}], lr=args.learning_rate, eps=1e-5
    )

    obs_buf = torch.zeros((args.num_steps, k, NUM_FEATURES))
    mask_buf = torch.zeros((args.num_steps, k), dtype=torch.bool)
    order_buf = torch.zeros((args.num_steps, k), dtype=torch.int64)
    prefix_buf = torch.zeros(args.num_steps, dtype=torch.int64)
    logp_buf = torch.zeros(args.num_steps)
    reward_buf = torch.zeros(args.num_steps)
    done_buf = torch.zeros(args.num_steps)
    value_buf = torch.zeros(args.num_steps)
    returns_rms = RunningMeanStd()
    discounted = 0.0

    episodes = EpisodeLog(out, args.baseline, env.config)
    progress_rows: list[dict[str, Any]] = []
    num_updates = args.total_steps // args.num_steps
    started = time.perf_counter()
    global_step = 0
    with progress(f"PPO {args.run_name()}", num_updates) as (bar, task):
        for update in range(1, num_updates + 1):
            if args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
                break
            if args.anneal_lr:
                for group in optimizer.param_groups:
                    group["lr"] = args.learning_rate * (1.0 - (update - 1.0) / num_updates)
            for step in range(args.num_steps):
                global_step += 1
                x = torch.from_numpy(obs[:, :NUM_FEATURES])
                mask = torch.from_numpy(obs[:, NUM_FEATURES] > 0)
                with torch.inference_mode():
                    logits = net.scores(x, mask)
                    value = net.value(x, mask)
                scores, order, prefix = sample_ranking(
                    logits, info["gpus"], info["capacity"], generator
                )
                with torch.inference_mode():
                    logp = plackett_luce_logp(logits[None], order[None], torch.tensor([prefix]))[0]
                obs_buf[step], mask_buf[step], order_buf[step] = x, mask, order
                prefix_buf[step], logp_buf[step], value_buf[step] = prefix, logp, value
                obs, reward, terminated, truncated, info = env.step(scores)
                # Reward scaling by the running std of the discounted return (CleanRL's
                # NormalizeReward): windows differ in load by orders of magnitude.
                discounted = discounted * args.gamma + reward
                returns_rms.update(discounted)
                reward_buf[step] = reward / returns_rms.std
                done = terminated or truncated
                done_buf[step] = float(done)
                if done:
                    discounted = 0.0
                    if terminated and env.window is not None:
                        episodes.record(global_step, env.window, info)
                    obs, info = reset(env)
            with torch.inference_mode():
                x = torch.from_numpy(obs[:, :NUM_FEATURES])
                mask = torch.from_numpy(obs[:, NUM_FEATURES] > 0)
                next_value = net.value(x, mask)
            advantages = torch.zeros(args.num_steps)
            last = 0.0
            for t in reversed(range(args.num_steps)):
                nonterminal = 1.0 - done_buf[t]
                nxt = next_value if t == args.num_steps - 1 else value_buf[t + 1]
                delta = reward_buf[t] + args.gamma * nxt * nonterminal - value_buf[t]
                last = float(delta + args.gamma * args.gae_lambda * nonterminal * last)
                advantages[t] = last
            returns = advantages + value_buf

            stats = _update(
                net,
                optimizer,
                args,
                actor_params,
                critic_params,
                obs_buf,
                mask_buf,
                order_buf,
                prefix_buf,
                logp_buf,
                advantages,
                returns,
            )
            elapsed = time.perf_counter() - started
            row = {
                "update": update,
                "global_step": global_step,
                "elapsed_s": round(elapsed, 1),
                "steps_per_s": round(global_step / elapsed, 1),
                "contested": float((prefix_buf > 0).float().mean()),
                **stats,
            }
            progress_rows.append(row)
            write_csv(out / "progress.csv", progress_rows)
            if args.checkpoint_every and update % args.checkpoint_every == 0:
                (out / "checkpoints").mkdir(exist_ok=True)
                torch.save(net.state_dict(), out / "checkpoints" / f"update_{update:04d}.pt")
            bar.update(task, advance=1, description=f"PPO {episodes.summary()}")
    torch.save(net.state_dict(), out / "final.pt")
    write_csv(out / "progress.csv", progress_rows)
    write_curve(out, episodes, progress_rows, "PPO", ("policy_loss", "value_loss", "entropy"))
    (out / "args.json").write_text(args.to_json())
    return out


def pretrain(
    net: SchedulerNet,
    env: SchedulingEnv,
    args: Args,
    target: imitate.Target,
    generator: torch.Generator,
    out: Path,
    obs_info: tuple[np.ndarray, dict[str, Any]],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Imitation of the SRTF oracle (:mod:`ganglion.rl.imitate`); writes ``imitation.csv``
    (one row per round: demos, the epochs' first and last loss)."""
    demos: list[imitate.Demo] = []
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with progress("imitating srtf", args.bc_rounds * args.bc_steps) as (bar, task):
        for r in range(args.bc_rounds):
            chunk = max(args.bc_steps // 20, 1)
            done = 0
            while done < args.bc_steps:
                n = min(chunk, args.bc_steps - done)
                new, obs_info = imitate.collect(env, net, n, generator, obs_info)
                demos.extend(new)
                done += n
                bar.update(task, advance=n, description=f"imitating srtf: round {r + 1}")
            losses = imitate.fit(
                net,
                demos,
                args.bc_epochs,
                256,
                args.bc_learning_rate,
                args.seed + r,
                target,
            )
            rows.append(
                {
                    "round": r + 1,
                    "demos": len(demos),
                    "first_loss": round(losses[0], 4) if losses else math.nan,
                    "last_loss": round(losses[-1], 4) if losses else math.nan,
                    "elapsed_s": round(time.perf_counter() - started, 1),
                }
            )
            write_csv(out / "imitation.csv", rows)
    return obs_info


def _update(
    net: SchedulerNet,
    optimizer: torch.optim.Optimizer,
    args: Args,
    actor_params: list[nn.Parameter],
    critic_params: list[nn.Parameter],
    obs: torch.Tensor,
    masks: torch.Tensor,
    orders: torch.Tensor,
    prefixes: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
) -> dict[str, float]:
    n = len(obs)
    batch = max(n // args.num_minibatches, 1)
    clipfracs: list[float] = []
    pg = vl = ent = kl = 0.0
    for _ in range(args.update_epochs):
        perm = torch.randperm(n)
        for start in range(0, n, batch):
            idx = perm[start : start + batch]
            logits = net.scores(obs[idx], masks[idx])
            logp = plackett_luce_logp(logits, orders[idx], prefixes[idx])
            log_ratio = logp - old_logp[idx]
            ratio = log_ratio.exp()
            with torch.no_grad():
                kl = float(((ratio - 1) - log_ratio).mean())
                clipfracs.append(float(((ratio - 1.0).abs() > args.clip_coef).float().mean()))
            adv = advantages[idx]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            pg_loss = torch.max(
                -adv * ratio, -adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
            ).mean()
            value = net.value(obs[idx], masks[idx])
            v_loss = 0.5 * ((value - returns[idx]) ** 2).mean()
            entropy = first_pick_entropy(logits).mean()
            loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(actor_params, args.max_grad_norm)
            nn.utils.clip_grad_norm_(critic_params, args.max_grad_norm)
            optimizer.step()
            pg, vl, ent = pg_loss.item(), v_loss.item(), entropy.item()
        if args.target_kl and kl > args.target_kl:
            break
    return {
        "policy_loss": pg,
        "value_loss": vl,
        "entropy": ent,
        "approx_kl": kl,
        "clipfrac": float(np.mean(clipfracs)) if clipfracs else 0.0,
    }


def main(argv: list[str] | None = None) -> None:
    from ganglion.rl.training import parse_args

    args = parse_args(Args, argv, __doc__ or "")
    out = train(args)
    print(f"run written to {out}")


if __name__ == "__main__":
    main()
