"""The policy interface and its registry (name -> factory), shared by the decision service,
the controller's fallback and the simulator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from ganglion.domain import ClusterState, Decision, Job


class PolicyError(Exception):
    """Base of policy errors."""


class UnknownPolicyError(PolicyError, KeyError):
    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown policy {name!r}; known: {', '.join(sorted(known))}")
        self.name = name
        self.known = tuple(known)

    def __str__(self) -> str:
        return str(self.args[0])


@runtime_checkable
class Policy(Protocol):
    """A pure function of (cluster state, pending jobs) -> placements.

    Implementations keep no hidden state between calls that changes placements, so the
    simulator and the live services get the same answer for the same input.

    ``pending`` may come in any order and the answer must not depend on it; when it is a
    ``domain.JobQueue`` it is in queue order (``domain.queue_key``) already, and a policy
    may walk it as it is instead of sorting it (the simulator passes one every decision).
    """

    name: str
    version: str

    def schedule(self, state: ClusterState, pending: Sequence[Job]) -> Decision: ...


PolicyFactory = Callable[[], Policy]

_REGISTRY: dict[str, PolicyFactory] = {}


def register(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class/function decorator: ``@register("fifo")``."""

    def deco(factory: PolicyFactory) -> PolicyFactory:
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def create(name: str) -> Policy:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownPolicyError(name, list(_REGISTRY)) from None
    return factory()


def names() -> list[str]:
    return sorted(_REGISTRY)
