"""Transport tuning: chunk size, lz4 level and compression on/off for one link.

:class:`AnalyticTuner` models a transfer as a pipeline of three stages that overlap (compress
on the sender, the link, decompress on the receiver): its goodput in raw bytes/s is set by the
slowest, ``1 / max(1/compress, ratio/bandwidth, 1/decompress)``, against ``bandwidth`` for
raw chunks. It compresses when that wins by a margin and the data shrinks by at least
``min_saving``, and picks the lz4 level the model says is fastest: on a slow link the slower
high-compression levels pay off, on a fast one they become the bottleneck.

Speeds not given by the caller default to lz4's usual single-core figures; how much the high
levels shrink beyond level 0 is an assumption (:data:`LEVELS`), stated here rather than
hidden, and the executor reports the compressibility it actually observes at level 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ganglion.policies.registry import Registry

DEFAULT_COMPRESS_BPS = 500e6
"""lz4 level-0 compression speed assumed when the caller measured none (raw bytes/s)."""
DEFAULT_DECOMPRESS_BPS = 2e9
"""lz4 decompression speed assumed when the caller measured none (raw bytes/s)."""
CHUNK_SECONDS = 0.025
"""A chunk should take about this long on the link: long enough to amortise per-message
costs, short enough that a broken connection loses little and the pipeline stays full."""
MIN_CHUNK = 256 * 1024
MAX_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class Level:
    """What an lz4 level costs and buys, relative to level 0."""

    level: int
    """lz4.frame compression_level."""
    ratio_factor: float
    """Compressed size relative to level 0's."""
    speed_factor: float
    """Compression speed relative to level 0's."""


LEVELS: tuple[Level, ...] = (Level(0, 1.0, 1.0), Level(3, 0.8, 0.25), Level(9, 0.75, 0.07))
"""Relative cost and gain of lz4 levels, as measured on telemetry-like protobuf data
(level 3: ~20% smaller at ~1/4 the speed; level 9: ~25% smaller at ~1/14)."""


@dataclass(frozen=True)
class LinkObservation:
    """What the sender knows about the link and the data."""

    bandwidth_bytes_per_s: float
    """Measured link bandwidth."""
    compressibility: float
    """Observed compressed/raw ratio at lz4 level 0, in (0, 1]."""
    compress_bytes_per_s: float = 0.0
    """Measured lz4 level-0 speed on the sender; 0 = :data:`DEFAULT_COMPRESS_BPS`."""
    decompress_bytes_per_s: float = 0.0
    """Measured lz4 decompression speed on the receiver; 0 = :data:`DEFAULT_DECOMPRESS_BPS`."""
    rtt_s: float = 0.0
    """Round-trip time, 0 when unknown."""
    blob_bytes: int = 0
    """Typical blob size, 0 when unknown."""


@dataclass(frozen=True)
class TransportPlan:
    """The settings a sender should use, and the model's expectation."""

    chunk_bytes: int
    """Raw bytes per chunk."""
    compress: bool
    """Whether to try lz4 per chunk."""
    lz4_level: int
    """lz4 level when compressing."""
    expected_goodput: float
    """Modelled raw bytes/s with these settings."""
    raw_goodput: float
    """Modelled raw bytes/s with raw chunks."""
    reason: str
    """One line on why."""


class TransportTuner(Protocol):
    name: str
    version: str

    def tune(self, link: LinkObservation) -> TransportPlan: ...


TUNERS: Registry[TransportTuner] = Registry("transport tuning", "analytic")
"""Tuning policies by name (``analytic`` default, ``raw``)."""


def chunk_for(link: LinkObservation) -> int:
    """A power of two near ``CHUNK_SECONDS`` (or one RTT, if longer) of link time."""
    target = link.bandwidth_bytes_per_s * max(CHUNK_SECONDS, link.rtt_s)
    chunk = MIN_CHUNK
    while chunk < target and chunk < MAX_CHUNK:
        chunk *= 2
    if link.blob_bytes:
        while chunk > MIN_CHUNK and chunk // 2 >= link.blob_bytes:
            chunk //= 2
    return chunk


def lz4_goodput(link: LinkObservation, level: Level) -> float:
    c = (link.compress_bytes_per_s or DEFAULT_COMPRESS_BPS) * level.speed_factor
    d = link.decompress_bytes_per_s or DEFAULT_DECOMPRESS_BPS
    ratio = min(1.0, link.compressibility * level.ratio_factor)
    return 1.0 / max(1.0 / c, ratio / link.bandwidth_bytes_per_s, 1.0 / d)


class AnalyticTuner:
    """The pipeline model of the module docstring."""

    name = "analytic"
    version = "1"

    def __init__(self, min_saving: float = 0.10, margin: float = 0.05) -> None:
        self.min_saving = min_saving
        self.margin = margin

    def tune(self, link: LinkObservation) -> TransportPlan:
        raw = link.bandwidth_bytes_per_s
        chunk = chunk_for(link)
        if link.compressibility > 1.0 - self.min_saving:
            return TransportPlan(
                chunk,
                False,
                0,
                raw,
                raw,
                f"data shrinks to {link.compressibility:.2f} of its size, less than the "
                f"{self.min_saving:.0%} saving worth compressing",
            )
        best = max(LEVELS, key=lambda lv: lz4_goodput(link, lv))
        good = lz4_goodput(link, best)
        if good <= raw * (1.0 + self.margin):
            return TransportPlan(
                chunk,
                False,
                0,
                raw,
                raw,
                f"lz4 would deliver {good / 1e6:.0f} MB/s, not enough over the link's "
                f"{raw / 1e6:.0f} MB/s raw",
            )
        return TransportPlan(
            chunk,
            True,
            best.level,
            good,
            raw,
            f"lz4 level {best.level}: {good / 1e6:.0f} MB/s modelled vs {raw / 1e6:.0f} MB/s "
            f"raw (ratio {link.compressibility:.2f})",
        )


class RawTuner:
    """Never compress: the baseline."""

    name = "raw"
    version = "1"

    def tune(self, link: LinkObservation) -> TransportPlan:
        raw = link.bandwidth_bytes_per_s
        return TransportPlan(chunk_for(link), False, 0, raw, raw, "raw chunks (baseline)")


TUNERS.register(AnalyticTuner.name)(AnalyticTuner)
TUNERS.register(RawTuner.name)(RawTuner)
