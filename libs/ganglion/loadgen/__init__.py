"""Load generation for Ganglion's services: open-loop arrivals, HdrHistogram latencies.

``ganglion loadgen`` (:mod:`ganglion.cli.loadgen`) is the command; ``tools/bench`` uses the
same functions for its ratio benchmarks.
"""

from __future__ import annotations

import importlib.util

from ganglion.loadgen.arrivals import OK, Schedule, Tally, closed_loop, open_loop
from ganglion.loadgen.decision import (
    SCHEDULE_METHOD,
    DecisionLoad,
    RawScheduleClient,
    load_decision,
    run_decision_load,
    synthetic_request,
)
from ganglion.loadgen.echo import start_echo_server
from ganglion.loadgen.errors import LoadgenError, NotAvailableError, TargetUnavailableError
from ganglion.loadgen.report import LatencySummary, LoadReport, merge, plot_percentiles
from ganglion.loadgen.telemetry import SimulatedHosts, TelemetryLoad, load_telemetry


def transfer_available() -> bool:
    """Whether this build has the data plane's TransferService (another part of Ganglion)."""
    return (
        importlib.util.find_spec("ganglion.transport") is not None
        and importlib.util.find_spec("ganglion.v1.data_pb2") is not None
    )


__all__ = [
    "OK",
    "SCHEDULE_METHOD",
    "DecisionLoad",
    "LatencySummary",
    "LoadReport",
    "LoadgenError",
    "NotAvailableError",
    "RawScheduleClient",
    "Schedule",
    "SimulatedHosts",
    "Tally",
    "TargetUnavailableError",
    "TelemetryLoad",
    "closed_loop",
    "load_decision",
    "load_telemetry",
    "merge",
    "open_loop",
    "plot_percentiles",
    "run_decision_load",
    "start_echo_server",
    "synthetic_request",
    "transfer_available",
]
