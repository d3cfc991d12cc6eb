"""Imitation pre-training: behaviour cloning of the SRTF oracle's order, non-clairvoyantly.

The oracle (``srtf``) ranks jobs by their true remaining run time, which the learned policy
never sees. Here the oracle is only the *teacher*: on decisions the student itself visits in
the training windows, the teacher's order (computed from ``Job.duration_hint_s``, which the
simulator sets) is the label, and the student's scores -- computed from the non-clairvoyant
features alone (:mod:`ganglion.rl.features`) -- are fitted to it by maximum likelihood under
the same Plackett-Luce model PPO samples from. The student so learns which *observable* jobs
tend to finish soon (GPUs asked, attained service, age, waiting time, tenant, load): a dense
target where PPO's one advantage per decision is spread over ~100 ranked positions.

Only the contested prefix of the teacher's order counts (the positions up to where the GPU
budget runs out; :func:`ganglion.rl.features.contested_prefix`): the order of the rest
decides nothing. States come from rolling the current student out with Gumbel noise
(``rounds`` > 1 is DAgger: the next round's states come from the fitted student).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F

from ganglion.domain import Job
from ganglion.policies.srtf import remaining_s
from ganglion.rl.env import SchedulingEnv
from ganglion.rl.features import NUM_FEATURES, contested_prefix
from ganglion.rl.network import SchedulerNet, plackett_luce_logp


@dataclass(frozen=True, eq=False)
class Demo:
    """One decision labelled by the teacher."""

    features: npt.NDArray[np.float32]
    """(n, NUM_FEATURES) the candidates' non-clairvoyant features."""
    order: npt.NDArray[np.int64]
    """(n,) the teacher's ranking of the rows."""
    prefix: int
    """Leading positions of ``order`` that decide the outcome (> 0)."""
    soon: npt.NDArray[np.float32]
    """(n,) 1 where the row's job finishes within its next ``FINISH_GPU_S`` GPU-seconds of
    service (the target of ``Target.FINISH``)."""


FINISH_GPU_S = 3250.0
"""Look-ahead of the finish-soon target: Tiresias-G's Gittins delta. Ranking by
P(finish within delta | features) is the numerator of a Gittins index conditioned on every
observable feature rather than on attained service alone."""


class Target(enum.Enum):
    """What the student is fitted to."""

    ORDER = "order"
    """The teacher's whole ranking (Plackett-Luce likelihood of its contested prefix)."""
    FINISH = "finish"
    """Per row, whether the job finishes within ``FINISH_GPU_S`` more GPU-seconds (logistic
    loss on the network's residual; the prior's tiers stay as they are)."""


def finishes_soon(jobs: Sequence[Job]) -> npt.NDArray[np.float32]:
    """Teacher labels of ``Target.FINISH`` (read true durations: training time only)."""
    out = np.zeros(len(jobs), dtype=np.float32)
    for i, j in enumerate(jobs):
        if j.duration_hint_s is not None:
            left = max(0.0, j.duration_hint_s * j.gpus - j.attained_service_s)
            out[i] = left <= FINISH_GPU_S
    return out


def teacher_order(jobs: Sequence[Job], running: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """The SRTF oracle's order (``ganglion.policies.srtf``): priority, true remaining run
    time, running jobs first on ties, submit time. Jobs without a hint rank last."""

    def key(i: int) -> tuple[float, float, int, float]:
        j = jobs[i]
        return (-j.priority, remaining_s(j), 0 if running[i] else 1, j.submit_time_s)

    return np.array(sorted(range(len(jobs)), key=key), dtype=np.int64)


def collect(
    env: SchedulingEnv,
    net: SchedulerNet,
    steps: int,
    generator: torch.Generator,
    obs_info: tuple[npt.NDArray[np.float32], dict[str, Any]],
    noise: float = 1.0,
) -> tuple[list[Demo], tuple[npt.NDArray[np.float32], dict[str, Any]]]:
    """Roll the student out for ``steps`` decisions (Gumbel-perturbed scores, scale
    ``noise``) and label every contested one; returns the demos and the env's current
    observation and info, to continue from."""
    from ganglion.rl.training import reset

    obs, info = obs_info
    demos: list[Demo] = []
    for _ in range(steps):
        candidates = env.candidates
        n = len(info.get("gpus", ()))
        if candidates is not None and n:
            jobs, running = candidates
            order = teacher_order(jobs[:n], running[:n])
            prefix = contested_prefix(info["gpus"], order.tolist(), info["capacity"])
            if prefix:
                soon = finishes_soon(jobs[:n])
                demos.append(Demo(obs[:n, :NUM_FEATURES].copy(), order, prefix, soon))
        x = torch.from_numpy(obs[:, :NUM_FEATURES])
        mask = torch.from_numpy(obs[:, NUM_FEATURES] > 0)
        with torch.inference_mode():
            logits = net.scores(x, mask)
        u = torch.rand(logits.shape, generator=generator).clamp_(1e-9, 1.0 - 1e-9)
        scores = logits - noise * torch.log(-torch.log(u))
        scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -1e9))
        obs, _, terminated, truncated, info = env.step(scores.numpy())
        if terminated or truncated:
            obs, info = reset(env)
    return demos, (obs, info)


def _batch(demos: Sequence[Demo]) -> tuple[torch.Tensor, ...]:
    """Pad a minibatch to its longest decision: features, mask, order (valid rows first),
    prefix."""
    width = max(len(d.order) for d in demos)
    x = np.zeros((len(demos), width, NUM_FEATURES), dtype=np.float32)
    mask = np.zeros((len(demos), width), dtype=bool)
    order = np.tile(np.arange(width, dtype=np.int64), (len(demos), 1))
    prefix = np.zeros(len(demos), dtype=np.int64)
    soon = np.zeros((len(demos), width), dtype=np.float32)
    for b, d in enumerate(demos):
        n = len(d.order)
        x[b, :n] = d.features
        mask[b, :n] = True
        order[b, :n] = d.order
        prefix[b] = d.prefix
        soon[b, :n] = d.soon
    return tuple(torch.from_numpy(a) for a in (x, mask, order, prefix, soon))


def fit(
    net: SchedulerNet,
    demos: Sequence[Demo],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    target: Target = Target.ORDER,
    max_grad_norm: float = 1.0,
) -> list[float]:
    """Fit the student's scores to the teacher (see :class:`Target`); ``ORDER``: mean per
    ranked position, so long prefixes do not dominate, training prior and actor; ``FINISH``:
    mean over candidate rows, training the actor (the residual) only. Returns each epoch's
    mean loss."""
    if not demos:
        return []
    params = [*net.actor.parameters()]
    if target is Target.ORDER:
        params = [*net.prior.parameters(), *params]
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    rng = np.random.default_rng(seed)
    # Minibatches of similar width waste less padding: bucket by length, shuffle buckets.
    by_len = sorted(range(len(demos)), key=lambda i: len(demos[i].order))
    chunks = [by_len[i : i + batch_size] for i in range(0, len(by_len), batch_size)]
    batches = [_batch([demos[i] for i in c]) for c in chunks]
    losses: list[float] = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for b in rng.permutation(len(batches)):
            x, mask, order, prefix, soon = batches[int(b)]
            if target is Target.ORDER:
                logp = plackett_luce_logp(net.scores(x, mask), order, prefix)
                loss = -(logp / prefix.to(logp.dtype)).mean()
            else:
                logit = net.residual(x)
                each = F.binary_cross_entropy_with_logits(logit, soon, reduction="none")
                loss = (each * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            total += loss.item() * len(x)
            count += len(x)
        losses.append(total / max(count, 1))
    return losses
