"""Errors of the transport: bad frames (never retried as-is) and failed transfers."""

from __future__ import annotations


class TransportError(Exception):
    """Base of every transport error."""


class FrameError(TransportError):
    """A frame that must not be accepted."""


class TruncatedFrameError(FrameError):
    """Fewer bytes than the header promised."""


class CorruptFrameError(FrameError):
    """Bad magic, flags, lengths, lz4 payload or checksum."""


class FrameTooLargeError(FrameError):
    """A header claiming more than the receiver's limit (rejected before allocating)."""


class TransferError(TransportError):
    """A transfer that failed after its retries, or answered out of protocol."""
