"""Ganglion sensing service: per-host GPU telemetry to NATS and Prometheus."""

from __future__ import annotations

from ganglion_sensing.collectors import Collector, NvmlCollector, make_collector
from ganglion_sensing.config import SensingConfig, parse_args
from ganglion_sensing.metrics import MetricsServer, SampleCollector
from ganglion_sensing.publisher import LatestSample, Publisher, PublisherConfig
from ganglion_sensing.service import serve
from ganglion_sensing.sim import SimCollector

__all__ = [
    "Collector",
    "LatestSample",
    "MetricsServer",
    "NvmlCollector",
    "Publisher",
    "PublisherConfig",
    "SampleCollector",
    "SensingConfig",
    "SimCollector",
    "make_collector",
    "parse_args",
    "serve",
]
