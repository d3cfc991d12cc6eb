"""A small name -> factory registry for the data-plane policies (cache sizing, transport
tuning), so a learned policy can be registered beside the analytic one and chosen by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from ganglion.policies.base import UnknownPolicyError

T = TypeVar("T")


class Registry(Generic[T]):
    """Factories by name; ``create`` raises :class:`UnknownPolicyError` for unknown names."""

    def __init__(self, kind: str, default: str) -> None:
        self.kind = kind
        self.default = default
        self._factories: dict[str, Callable[[], T]] = {}

    def register(self, name: str) -> Callable[[Callable[[], T]], Callable[[], T]]:
        def deco(factory: Callable[[], T]) -> Callable[[], T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} policy {name!r} registered twice")
            self._factories[name] = factory
            return factory

        return deco

    def create(self, name: str = "") -> T:
        try:
            factory = self._factories[name or self.default]
        except KeyError:
            raise UnknownPolicyError(name, list(self._factories)) from None
        return factory()

    def names(self) -> list[str]:
        return sorted(self._factories)
