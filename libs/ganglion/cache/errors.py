"""Errors of the blob cache: one base class, one subclass per thing a caller can act on."""

from __future__ import annotations

from collections.abc import Sequence


class CacheError(Exception):
    """Base of every cache error."""


class UnknownEvictionPolicyError(CacheError, KeyError):
    """No eviction policy of that name."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown eviction policy {name!r}; known: {', '.join(sorted(known))}")
        self.name = name
        self.known = tuple(known)

    def __str__(self) -> str:
        return str(self.args[0])


class InvalidBlobIdError(CacheError, ValueError):
    """A blob id that is not 64 lowercase hex digits (a sha256)."""

    def __init__(self, blob_id: str) -> None:
        super().__init__(f"blob id must be 64 lowercase hex digits (sha256), got {blob_id[:80]!r}")
        self.blob_id = blob_id


class BlobNotFoundError(CacheError, KeyError):
    """The blob is not in this cache."""

    def __init__(self, blob_id: str) -> None:
        super().__init__(f"blob {blob_id} is not cached here")
        self.blob_id = blob_id

    def __str__(self) -> str:
        return str(self.args[0])


class IntegrityError(CacheError):
    """Written bytes do not hash to the blob id, or their length is not the declared size."""


class BlobBusyError(CacheError):
    """Another writer is already filling this blob."""

    def __init__(self, blob_id: str) -> None:
        super().__init__(f"blob {blob_id} is already being written")
        self.blob_id = blob_id


class BudgetError(CacheError, ValueError):
    """Budgets that cannot be applied (negative, or more than the host's capacity)."""
