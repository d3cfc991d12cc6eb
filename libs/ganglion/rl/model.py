"""A scheduling model ready to score: an artefact verified, its network built, its weights
loaded. Also the other direction: a trained network packed into an artefact.

Inference runs under ``torch.inference_mode``; the number of torch threads is set once per
process (:func:`set_threads`), because torch's default (all cores) fights the service's own
threads for the CPU on these small tensors. The device is the CPU unless
``$GANGLION_TORCH_DEVICE`` names another (``cuda``, ``cuda:1``, ``auto``): the network is small,
so a GPU pays off only for large batches; scores agree with the CPU's to float tolerance.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ganglion.models.artifact import (
    Artifact,
    CorruptArtifactError,
    ModelKind,
    SchemaMismatchError,
    build,
    verify,
)
from ganglion.rl.decide import ActionForm
from ganglion.rl.features import DEFAULT_K, FEATURES, SCHEMA_VERSION
from ganglion.rl.network import NetConfig, SchedulerNet

WEIGHTS = "weights.pt"
DEFAULT_MODEL = "scheduler"
"""Name of the scheduling model the ``rl`` policy serves."""
EXPECTED_SCHEMA = {ModelKind.SCHEDULING: (SCHEMA_VERSION, FEATURES)}
DEVICE_ENV = "GANGLION_TORCH_DEVICE"
"""Environment variable naming the inference device (default ``cpu``)."""


def resolve_device(spec: str | None = None) -> torch.device:
    """The torch device for ``spec`` (default: ``$GANGLION_TORCH_DEVICE``, else ``cpu``).

    ``auto`` is CUDA where available, else the CPU. Naming CUDA on a host without it is an
    error (ValueError), not a silent fall back: the operator asked for a GPU."""
    spec = (spec if spec is not None else os.environ.get(DEVICE_ENV, "")).strip() or "cpu"
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"{DEVICE_ENV}={spec!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{DEVICE_ENV}={spec!r} but torch {torch.__version__} sees no CUDA device "
            "(a CPU build of torch, or no driver)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={spec!r}: only cpu and cuda are supported")
    return device


_threads_lock = threading.Lock()
_threads_set: int | None = None


def set_threads(n: int) -> None:
    """Set torch's intra-op threads for this process (once; later calls with another value
    are ignored, since torch allows the inter-op setting only before first use)."""
    global _threads_set
    with _threads_lock:
        if _threads_set is None:
            torch.set_num_threads(max(1, n))
            _threads_set = n


class ScoringModel:
    """A verified scheduling artefact with its network, ready for :meth:`score`."""

    def __init__(self, artifact: Artifact, device: str | None = None) -> None:
        m = artifact.manifest
        if m.kind is not ModelKind.SCHEDULING:
            raise SchemaMismatchError(f"{m.ref} is a {m.kind.value} model, not a scheduling one")
        verify(artifact, EXPECTED_SCHEMA)
        self.manifest = m
        params = m.params
        try:
            self.form = ActionForm(params.get("action_form", "rank"))
            self.k = int(params.get("k", DEFAULT_K))
            self.quantum_s = float(params.get("quantum_s", 300.0))
            config = NetConfig(len(FEATURES), int(params.get("hidden", 64)))
        except (ValueError, TypeError) as exc:
            raise CorruptArtifactError(f"{m.ref}: bad params ({exc})") from None
        self.net = SchedulerNet(config)
        try:
            state = torch.load(io.BytesIO(artifact.files[WEIGHTS]), weights_only=True)
            self.net.load_state_dict(state)
        except KeyError:
            raise CorruptArtifactError(f"{m.ref}: no {WEIGHTS}") from None
        except (RuntimeError, ValueError, EOFError, OSError) as exc:
            raise CorruptArtifactError(f"{m.ref}: weights do not load ({exc})") from None
        self.device = resolve_device(device)
        self.net.to(self.device)
        self.net.eval()

    @property
    def ref(self) -> str:
        return self.manifest.ref

    def score(
        self, x: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_], value: bool = False
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """(B, k, F) features and (B, k) masks -> (B, k) scores and (B,) values (the value
        head, Q(s, wait) of a pick model, only when ``value``; else zeros)."""
        with torch.inference_mode():
            xt = torch.from_numpy(x).to(self.device)
            mt = torch.from_numpy(mask).to(self.device)
            scores = self.net.scores(xt, mt).cpu().numpy()
            if not value:
                return scores, np.zeros(len(x), np.float32)
            return scores, self.net.value(xt, mt).cpu().numpy()


def to_artifact(
    net: SchedulerNet,
    *,
    name: str = DEFAULT_MODEL,
    version: int = 1,
    form: ActionForm,
    k: int,
    quantum_s: float,
    training: Mapping[str, Any],
    evaluation: Mapping[str, Any] | None = None,
) -> Artifact:
    """Pack a trained network (weights, normalisation, schema) as an artefact."""
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return build(
        name,
        version,
        ModelKind.SCHEDULING,
        SCHEMA_VERSION,
        {WEIGHTS: buf.getvalue()},
        features=FEATURES,
        params={
            "action_form": form.value,
            "k": k,
            "quantum_s": quantum_s,
            "hidden": net.config.hidden,
        },
        normalisation={
            "mean": [round(float(v), 6) for v in net.mean],
            "std": [round(float(v), 6) for v in net.std],
        },
        training=dict(training),
        evaluation=dict(evaluation or {}),
    )
