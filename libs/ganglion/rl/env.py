"""``SchedulingEnv``: a gymnasium environment over the trace-driven simulator.

Each episode is one trace window on a simulated cluster, driven through the simulator's step
protocol (``next_request`` / ``apply``), so the learned policy is trained on exactly what the
decision service will hand it.

- **Observation** ``(k, F + 1)``: features of up to ``k`` candidate jobs (running and pending;
  :mod:`ganglion.rl.features`), each row ending in a validity flag (1 = a real row).
- **Action**, by ``EnvConfig.form``:
  ``rank`` -- ``k`` scores, one per row; the rows ranked by score go through the shared
  preemptive select/place/backfill (one step per scheduling decision);
  ``pick`` -- ``Discrete(k + 1)``: the row of the pending job to place next, or ``k`` to
  wait (one step per placement; an invalid row counts as waiting). ``info["mask"]`` says
  which rows may be picked.
- **Reward**: ``-(jobs in system) x elapsed time`` until the next decision (in units of
  ``reward_scale_s`` job-seconds), so the return is minus the total JCT and maximising it
  minimises the average JCT (Little's law). Jobs that arrive between decisions count from
  their submit time; jobs that finish between decisions are counted to the midpoint, and the
  last step adds the exact remainder, so an episode's return is exactly
  ``-sum(JCT) / reward_scale_s``. Optional fairness term: ``fairness_weight`` x hours x
  (1 - Jain's index of the GPUs held per tenant with jobs in the system).
- **Non-clairvoyant**: the observation never includes a job's true duration (the simulator
  knows it; the reward uses only what happened).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import numpy.typing as npt

from ganglion.domain import ClusterState, Decision, Job
from ganglion.policies.priority import Rank, schedule_by_rank
from ganglion.rl.decide import FIT, ActionForm, Picker, rank_decision, rank_order
from ganglion.rl.features import DEFAULT_K, NUM_FEATURES, Observation, base_key, observe, pad
from ganglion.sim import ClusterSpec, Request, SimConfig, Simulation
from ganglion.traces import Trace

ENV_POLICY_NAME = "rl-train"


@dataclass(frozen=True)
class EnvConfig:
    """How episodes run."""

    cluster: ClusterSpec
    """The simulated cluster."""
    windows: tuple[Trace, ...]
    """Trace windows; each episode draws one uniformly."""
    form: ActionForm = ActionForm.RANK
    """Action form (see the module docstring)."""
    k: int = DEFAULT_K
    """Candidate rows per observation."""
    quantum_s: float = 300.0
    """Seconds between re-decisions while jobs wait (rank form; pick never preempts)."""
    restart_penalty_s: float = 30.0
    """Seconds a preempted job loses on restart (as in ``SimConfig``)."""
    reward_scale_s: float = 36_000.0
    """Job-seconds per unit of reward."""
    fairness_weight: float = 0.0
    """Weight of the fairness term (0: pure average JCT)."""
    max_steps: int = 0
    """Truncate an episode after this many steps (0: run the window to the end)."""
    skip_uncontested: bool = True
    """Rank form: decide by themselves (in the base order) the decisions where
    every job fits at once, whose outcome no ranking changes; their cost is added to the
    next step's reward. Saves most steps (and network passes) in lightly loaded periods."""

    def __post_init__(self) -> None:
        if not self.windows or any(len(w) == 0 for w in self.windows):
            raise ValueError("need at least one non-empty trace window")
        if self.k < 1 or self.quantum_s <= 0 or self.reward_scale_s <= 0:
            raise ValueError("k, quantum_s and reward_scale_s must be positive")


class SchedulingEnv(gym.Env[npt.NDArray[np.float32], Any]):
    """See the module docstring."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012  (gymnasium's convention)

    def __init__(self, config: EnvConfig) -> None:
        self.config = config
        k = config.k
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (k, NUM_FEATURES + 1), np.float32)
        self.action_space: gym.Space[Any]
        if config.form is ActionForm.RANK:
            self.action_space = gym.spaces.Box(-np.inf, np.inf, (k,), np.float32)
        else:
            self.action_space = gym.spaces.Discrete(k + 1)
        self._sim: Simulation | None = None
        self._request: Request | None = None
        self._obs: Observation | None = None
        self._picker: Picker | None = None
        self._accounted = 0.0  # job-seconds charged so far this episode
        self._steps = 0
        self.window: Trace | None = None

    # -- gymnasium API -----------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
        super().reset(seed=seed)
        c = self.config
        self.window = c.windows[int(self.np_random.integers(len(c.windows)))]
        sim_config = SimConfig(
            restart_penalty_s=c.restart_penalty_s,
            quantum_s=c.quantum_s if c.form is ActionForm.RANK else None,
            preemptive=c.form is ActionForm.RANK,
        )
        self._sim = Simulation(self.window, c.cluster, sim_config, policy_name=ENV_POLICY_NAME)
        self._accounted = 0.0
        self._steps = 0
        self._request = self._sim.next_request()
        if self._request is not None:
            self._set_request(self._request)
            if self._picker is not None and self._picker.done:
                self._advance(Decision((), ENV_POLICY_NAME, ""))
            elif self._picker is None and c.skip_uncontested and _uncontested(self._request):
                self._advance(_base_decision(self._request))
        # What passed before the first step is charged with the last one (the exact total
        # is known then): the return stays exactly -sum(JCT) / reward_scale_s.
        self._accounted = 0.0
        if self._request is None:  # nothing ever waits: an episode with no decision to make
            return self._empty(), {"mask": np.zeros(c.k + 1, bool), "empty": True}
        return self._observation(), self._info()

    def step(
        self, action: Any
    ) -> tuple[npt.NDArray[np.float32], float, bool, bool, dict[str, Any]]:
        if self._sim is None or self._request is None or self._obs is None:
            raise RuntimeError("call reset() first (or the episode is over)")
        self._steps += 1
        if self.config.form is ActionForm.RANK:
            scores = np.asarray(action, dtype=np.float32).reshape(-1)
            order = rank_order(scores, len(self._obs.jobs))
            decision = rank_decision(
                self._request.state, self._request.pending, self._obs, order, ENV_POLICY_NAME, ""
            )
            return self._finish(decision)
        assert self._picker is not None
        row = int(action)
        valid = row < self.config.k and row < len(self._picker.valid) and self._picker.valid[row]
        if not valid and not self._picker.may_wait:
            row, valid = int(np.flatnonzero(self._picker.valid)[0]), True  # see Picker.may_wait
        if valid:
            self._picker.pick(row)
            if not self._picker.done:
                return self._observation(), 0.0, False, self._truncated(), self._info()
        return self._finish(self._picker.decision(ENV_POLICY_NAME, ""))

    @property
    def candidates(self) -> tuple[tuple[Job, ...], npt.NDArray[np.bool_]] | None:
        """The current decision's candidate jobs (the observation's rows) and whether each
        runs; ``None`` between episodes. For a *teacher* at training time only
        (:mod:`ganglion.rl.imitate`): the jobs carry the simulator's true durations, which the
        observation never does."""
        if self._obs is None or self._request is None:
            return None
        return self._obs.jobs, self._obs.running

    # -- internals ---------------------------------------------------------------------------

    def _finish(
        self, decision: Decision
    ) -> tuple[npt.NDArray[np.float32], float, bool, bool, dict[str, Any]]:
        """Apply a complete decision and run the simulator to the next one."""
        assert self._sim is not None
        reward = self._advance(decision)
        if self._request is None:
            # The exact total JCT is known now: charge what the per-step estimates missed.
            result = self._sim.result()
            total = float(np.sum(result.jct_s))
            reward -= (total - self._accounted) / self.config.reward_scale_s
            self._accounted = total
            metrics = result.metrics()
            info = {
                "mask": np.zeros(self.config.k + 1, bool),
                "avg_jct_s": metrics.avg_jct_s,
                "p99_jct_s": metrics.p99_jct_s,
                "jobs": metrics.jobs,
            }
            return self._empty(), reward, True, False, info
        return self._observation(), reward, False, self._truncated(), self._info()

    def _advance(self, decision: Decision) -> float:
        """Apply ``decision``, then move to the next request that has a choice to make (pick
        form: one where some pending job fits). Returns the reward earned meanwhile."""
        assert self._sim is not None
        reward = 0.0
        c = self.config
        # Bounded by the simulation itself (it ends); the cap only guards against a bug.
        for _ in range(10_000_000):
            before = self._request
            assert before is not None
            in_system = _in_system(before)  # before apply: its queue is a view of the sim's
            self._sim.apply(decision)
            request = self._sim.next_request()
            self._request = request
            if request is None:
                return reward
            cost = _job_seconds(in_system, before.state.now_s, request)
            self._accounted += cost
            reward -= cost / c.reward_scale_s
            if c.fairness_weight > 0:
                hours = (request.state.now_s - before.state.now_s) / 3600.0
                reward -= c.fairness_weight * hours * (1.0 - jain(before.state))
            if c.form is ActionForm.RANK and c.skip_uncontested and _uncontested(request):
                decision = _base_decision(request)
                continue
            self._set_request(request)
            if self._picker is None or not self._picker.done:
                return reward
            decision = Decision((), ENV_POLICY_NAME, "")  # nothing fits: wait
        raise RuntimeError("simulation did not end")

    def _truncated(self) -> bool:
        return self.config.max_steps > 0 and self._steps >= self.config.max_steps

    def _set_request(self, request: Request) -> None:
        self._request = request
        self._obs = observe(request.state, request.pending, self.config.k)
        pick = self.config.form is ActionForm.PICK
        self._picker = Picker(request.state, self._obs) if pick else None

    def _observation(self) -> npt.NDArray[np.float32]:
        assert self._obs is not None
        x, mask = pad(self._obs, self.config.k)
        if self._picker is not None:
            n = min(len(self._obs.jobs), self.config.k)
            x[:n] = self._picker.x[:n]
        return np.concatenate([x, mask[:, None].astype(np.float32)], axis=1)

    def _info(self) -> dict[str, Any]:
        """``mask``: valid actions; rank form also ``gpus`` per row and ``capacity``, which
        a trainer needs to tell which positions of a ranking mattered."""
        k = self.config.k
        mask = np.zeros(k + 1, dtype=bool)
        mask[k] = True
        if self._picker is not None:
            n = min(len(self._picker.valid), k)
            mask[:n] = self._picker.valid[:n]
            mask[k] = self._picker.may_wait
            return {"mask": mask}
        assert self._obs is not None
        n = min(len(self._obs.jobs), k)
        mask[:n] = True
        # Jobs beyond k still take GPUs in the select step after the ranked ones; the
        # capacity left for the ranked rows is what they compete for.
        return {
            "mask": mask,
            "gpus": [j.gpus for j in self._obs.jobs[:n]],
            "capacity": self._obs.capacity,
        }

    def _empty(self) -> npt.NDArray[np.float32]:
        return np.zeros((self.config.k, NUM_FEATURES + 1), dtype=np.float32)


def _uncontested(request: Request) -> bool:
    demand = sum(j.gpus for j in request.state.running) + sum(j.gpus for j in request.pending)
    return demand <= request.state.num_gpus


def _base_decision(request: Request) -> Decision:
    """The observation's base order (Tiresias' queues)."""

    def rank(job: Job, running: bool, now: float) -> Rank:
        return (-job.priority, *base_key(job, running))

    return schedule_by_rank(request.state, request.pending, rank, FIT, ENV_POLICY_NAME)


def _in_system(request: Request) -> set[str]:
    """Ids of the jobs running or waiting at ``request``."""
    return {j.id for j in request.state.running} | {j.id for j in request.pending}


def _job_seconds(ids0: set[str], t0: float, after: Request) -> float:
    """Job-seconds spent in the system between two decisions (see the module docstring):
    from the jobs ``ids0`` in the system at time ``t0`` to ``after``."""
    t1 = after.state.now_s
    dt = max(t1 - t0, 0.0)
    jobs1: list[Job] = [*after.state.running, *after.pending]
    ids1 = {j.id for j in jobs1}
    stayed = len(ids0 & ids1)
    finished = len(ids0) - stayed
    arrived = sum(max(t1 - max(j.submit_time_s, t0), 0.0) for j in jobs1 if j.id not in ids0)
    return stayed * dt + finished * dt / 2.0 + arrived


def jain(state: ClusterState) -> float:
    """Jain's fairness index of GPUs held per tenant (1 = equal; 1 when one or no tenant)."""
    held: dict[str, float] = {}
    for j in state.running:
        held[j.tenant] = held.get(j.tenant, 0.0) + j.gpus
    values = np.array(list(held.values()))
    if len(values) < 2 or not values.any():
        return 1.0
    return float(values.sum() ** 2 / (len(values) * (values**2).sum()))


def make_windows(
    trace: Trace, start: str, end: str, days: float, count: int, seed: int
) -> tuple[Trace, ...]:
    """``count`` windows of ``days`` days with random starts in ``[start, end - days]``
    (ISO dates), seeded; windows without jobs are skipped."""
    from ganglion.traces import Window

    rng = np.random.default_rng(seed)
    first, last = Window.parse(f"{start}:{end}").resolve(trace.origin)
    span = max(last - first - days * 86_400.0, 0.0)
    out: list[Trace] = []
    for _ in range(count * 4):
        if len(out) == count:
            break
        s = first + float(rng.uniform(0.0, span))
        w = Window(
            f"{s / 86_400.0:.3f}:{s / 86_400.0 + days:.3f}", s / 86_400.0, s / 86_400.0 + days
        )
        cut = trace.window(w)
        if len(cut) >= 2:
            out.append(cut)
    return tuple(out)


def fixed_windows(trace: Trace, texts: Sequence[str]) -> tuple[Trace, ...]:
    """Windows given as ``START:END`` texts."""
    from ganglion.traces import Window

    return tuple(trace.window(Window.parse(t)) for t in texts)
