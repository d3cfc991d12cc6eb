"""``rl``: the learned scheduling policy, in-process (simulator, ``ganglion eval``, the SDK).

``rl`` serves the newest version of the ``scheduler`` model in the default registry
(``$GANGLION_MODELS_DIR`` over the small model that ships in the package); ``rl:N`` pins
version N (every version present when this module is imported is registered by that name).
The decision service routes these names to its model manager instead, which adds aliases,
canary, shadow and hot reload (``services/ganglion_decision/models.py``).

Non-clairvoyant: it reads only :mod:`ganglion.rl.features`, never ``duration_hint_s``.
Creating the policy is cheap; torch and the weights are loaded on the first decision.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ganglion.domain import ClusterState, Decision, Job
from ganglion.models.artifact import ModelError
from ganglion.models.registry import LayeredRegistry, ModelRef, default_registry
from ganglion.policies.base import Policy, PolicyError, register
from ganglion.rl.features import ActionForm, Observation, observe, pad

if TYPE_CHECKING:
    from ganglion.rl.model import ScoringModel

log = logging.getLogger(__name__)

POLICY = "rl"
MODEL = "scheduler"


class ModelUnavailableError(PolicyError):
    """No usable model version (none in the registry, or it failed verification)."""


def decide_with(
    model: ScoringModel,
    state: ClusterState,
    pending: Sequence[Job],
    name: str,
    scores: npt.NDArray[np.float32] | None = None,
    obs: Observation | None = None,
) -> Decision:
    """One decision with ``model``; ``scores`` (and the ``obs`` they were computed on) may
    come from a batched forward pass (the decision service's path)."""
    # Imported here: ganglion.rl.decide uses ganglion.policies, which imports this module.
    from ganglion.rl.decide import pick_decision, rank_decision, rank_order

    obs = obs if obs is not None else observe(state, pending, model.k)
    version = model.ref
    if model.form is ActionForm.PICK:

        def scorer(
            x: npt.NDArray[np.float32], valid: npt.NDArray[np.bool_]
        ) -> tuple[np.ndarray, float]:
            xs, ms = pad_rows(x, valid, model.k)
            s, v = model.score(xs[None], ms[None], value=True)
            return s[0][: len(x)], float(v[0])

        return pick_decision(state, obs, scorer, name, version)
    if scores is None:
        x, mask = pad(obs, model.k)
        scores = model.score(x[None], mask[None])[0][0]
    return rank_decision(
        state, list(pending), obs, rank_order(scores, len(obs.jobs)), name, version
    )


def pad_rows(
    x: npt.NDArray[np.float32], valid: npt.NDArray[np.bool_], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    out = np.zeros((k, x.shape[1]), dtype=np.float32)
    mask = np.zeros(k, dtype=bool)
    n = min(len(x), k)
    out[:n], mask[:n] = x[:n], valid[:n]
    return out, mask


class RlPolicy:
    """The learned policy on a fixed model version (``None``: the newest in the registry).

    Creating it reads the version's manifest (cheap); torch and the weights are loaded on
    the first decision. ``version`` names the model version (``scheduler@N``)."""

    def __init__(
        self,
        name: str = POLICY,
        version: int | None = None,
        registry: LayeredRegistry | None = None,
        model: ScoringModel | None = None,
    ) -> None:
        self.name = name
        self._registry = registry or default_registry()
        self._model = model
        self._lock = threading.Lock()
        self._problem = ""
        # Preemptive like the LAS family (the simulator reads quantum_s before deciding).
        self.quantum_s: float | None = 300.0
        if model is not None:
            self._ref = ModelRef(model.manifest.name, model.manifest.version)
            self.quantum_s = None if model.form is ActionForm.PICK else model.quantum_s
        else:
            self._ref = self._pick(version)
            self._read_manifest()
        self.version = str(self._ref)

    def _pick(self, version: int | None) -> ModelRef:
        versions = self._registry.versions_sync(MODEL)
        if version is not None:
            return ModelRef(MODEL, version)
        return versions[-1] if versions else ModelRef(MODEL, 0)

    def _read_manifest(self) -> None:
        """Quantum from the manifest; a problem is kept and raised on the first decision."""
        from ganglion.models.artifact import ModelError

        try:
            if self._ref.version == 0:
                raise ModelUnavailableError(f"no {MODEL} model in {self._registry.description}")
            params = self._registry.fetch_sync(self._ref).manifest.params
            pick = params.get("action_form", "rank") == ActionForm.PICK.value
            self.quantum_s = None if pick else float(params.get("quantum_s", 300.0))
        except (ModelError, ValueError, TypeError) as exc:
            self._problem = str(exc)

    @property
    def model(self) -> ScoringModel:
        with self._lock:
            if self._model is None:
                from ganglion.models.artifact import ModelError
                from ganglion.rl.model import ScoringModel, set_threads

                if self._problem:
                    raise ModelUnavailableError(self._problem)
                set_threads(1)
                try:
                    self._model = ScoringModel(self._registry.fetch_sync(self._ref))
                except ModelError as exc:
                    raise ModelUnavailableError(str(exc)) from exc
                log.info("rl policy loaded %s", self._model.ref)
            return self._model

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision:
        return decide_with(self.model, state, pending, self.name)


def _create(name: str, version: int | None) -> Policy:
    return RlPolicy(name, version)


register(POLICY)(functools.partial(_create, POLICY, None))


def _register_versions() -> None:
    """``rl:N`` for every version in the default registry now (cheap: a directory listing)."""
    try:
        refs = default_registry().versions_sync(MODEL)
    except ModelError:  # unreadable: the service reports it when a request names rl
        return
    for ref in refs:
        name = f"{POLICY}:{ref.version}"
        register(name)(functools.partial(_create, name, ref.version))


_register_versions()
