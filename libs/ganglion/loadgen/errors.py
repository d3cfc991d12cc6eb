"""Errors of the load generator."""

from __future__ import annotations


class LoadgenError(Exception):
    """A load run could not be done as asked (bad target, failed probe, dead client)."""


class TargetUnavailableError(LoadgenError):
    """Nothing answered at the target address."""


class NotAvailableError(LoadgenError):
    """The target service is not part of this build."""
