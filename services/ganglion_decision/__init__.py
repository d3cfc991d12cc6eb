"""Ganglion decision service: stateless ``DecisionService`` over the registered policies."""

from ganglion_decision.config import DecisionConfig
from ganglion_decision.server import serve
from ganglion_decision.servicer import (
    SERVICE_NAME,
    DecisionServicer,
    DecisionStats,
    PolicyStats,
    status_for,
)
from ganglion_decision.validation import (
    InvalidRequestError,
    Limits,
    RequestError,
    RequestTooLargeError,
)

__all__ = [
    "SERVICE_NAME",
    "DecisionConfig",
    "DecisionServicer",
    "DecisionStats",
    "InvalidRequestError",
    "Limits",
    "PolicyStats",
    "RequestError",
    "RequestTooLargeError",
    "serve",
    "status_for",
]
