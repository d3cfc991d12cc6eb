"""Latency histograms (HdrHistogram) and the report every load run produces.

Latencies are recorded in microseconds into an HdrHistogram with 3 significant digits, so a
run of millions of calls keeps a few kilobytes and percentiles stay exact to 0.1 %. Reports
from several client processes merge by adding their histograms (never by averaging
percentiles). The histogram travels in the JSON report in HdrHistogram's standard compressed
base64 form, so any HdrHistogram tool can read it back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
"""Smallest latency the histogram tells apart (1 us)."""
HIGHEST_US = 120_000_000
"""Largest latency it records (120 s); longer ones are clamped to it."""
SIGNIFICANT_DIGITS = 3

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
"""Percentiles every report lists."""


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def record_us(histogram: HdrHistogram, seconds: float) -> None:
    """Record one latency given in seconds (clamped into the histogram's range)."""
    histogram.record_value(min(max(int(seconds * 1e6), LOWEST_US), HIGHEST_US))


def decode_histogram(encoded: str) -> HdrHistogram:
    histogram = new_histogram()
    if encoded:
        histogram.decode_and_add(encoded)
    return histogram


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of one histogram, in milliseconds."""

    count: int
    """Calls recorded."""
    mean_ms: float
    """Mean latency."""
    min_ms: float
    """Fastest call."""
    max_ms: float
    """Slowest call."""
    percentiles_ms: dict[str, float]
    """``"p50"``, ``"p90"``, ``"p99"``, ``"p99.9"`` -> latency."""

    @classmethod
    def of(cls, histogram: HdrHistogram) -> LatencySummary:
        count = int(histogram.get_total_count())
        if count == 0:
            return cls(0, 0.0, 0.0, 0.0, {_label(p): 0.0 for p in PERCENTILES})
        return cls(
            count=count,
            mean_ms=float(histogram.get_mean_value()) / 1000,
            min_ms=float(histogram.get_min_value()) / 1000,
            max_ms=float(histogram.get_max_value()) / 1000,
            percentiles_ms={
                _label(p): float(histogram.get_value_at_percentile(p)) / 1000 for p in PERCENTILES
            },
        )

    def p(self, percentile: float) -> float:
        """Latency at one of :data:`PERCENTILES`, in ms."""
        return self.percentiles_ms[_label(percentile)]


def _label(percentile: float) -> str:
    return f"p{percentile:g}"


@dataclass(frozen=True)
class LoadReport:
    """What one load run did and saw. ``to_json``/``from_json`` round-trip it exactly."""

    target: str
    """What was loaded: ``decision``, ``telemetry``, ... ."""
    address: str
    """Server address or NATS URL."""
    mode: str
    """``open`` (arrivals on a fixed schedule) or ``closed`` (``--max``: back-to-back)."""
    rate: float
    """Offered calls per second in open mode; 0 in closed mode."""
    concurrency: int
    """Calls in flight at most (closed mode: exactly this many loops)."""
    duration_s: float
    """Length of the measured window (after warm-up)."""
    warmup_s: float
    """Seconds of load before the window, not recorded."""
    sent: int
    """Calls whose (intended) start fell in the window."""
    completed: int
    """Of those, calls that returned (successfully or not)."""
    ok: int
    """Of those, calls that succeeded."""
    errors: dict[str, int]
    """Failed calls by status (e.g. ``DEADLINE_EXCEEDED``)."""
    unfinished: int
    """Calls still outstanding when the run gave up waiting (counted as failures)."""
    achieved_per_s: float
    """Calls completed per second of the window."""
    latency: LatencySummary
    """Latency of completed calls, measured from the intended start in open mode (so a stalled
    server cannot hide its queueing: no coordinated omission)."""
    histogram: str = field(repr=False)
    """The latency histogram (microseconds), HdrHistogram compressed base64."""
    client_processes: int = 1
    """Load-generating processes whose histograms were merged into this report."""
    params: dict[str, float | int | str] = field(default_factory=dict)
    """What was sent: e.g. ``state_gpus``, ``pending``, ``request_bytes``."""

    @property
    def failed(self) -> int:
        return sum(self.errors.values()) + self.unfinished

    def histogram_object(self) -> HdrHistogram:
        return decode_histogram(self.histogram)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoadReport:
        raw: dict[str, Any] = json.loads(text)
        raw["latency"] = LatencySummary(**raw["latency"])
        return cls(**raw)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")

    def text(self) -> str:
        """A few aligned lines for a terminal."""
        lat = self.latency
        offered = f"{self.rate:,.0f}/s offered" if self.mode == "open" else "max (closed loop)"
        lines = [
            f"{self.target} load on {self.address}: {offered}, concurrency {self.concurrency}, "
            f"{self.client_processes} client process(es)",
            f"  window {self.duration_s:.1f} s after {self.warmup_s:.1f} s warm-up: "
            f"sent {self.sent:,}, ok {self.ok:,}, failed {self.failed:,}"
            + (f" {dict(sorted(self.errors.items()))}" if self.errors else "")
            + (f", unfinished {self.unfinished:,}" if self.unfinished else ""),
            f"  throughput {self.achieved_per_s:,.1f}/s",
            "  latency ms: "
            + "  ".join(f"{k} {v:.3f}" for k, v in lat.percentiles_ms.items())
            + f"  max {lat.max_ms:.3f}  mean {lat.mean_ms:.3f}",
        ]
        if self.params:
            lines.append("  " + "  ".join(f"{k}={v}" for k, v in sorted(self.params.items())))
        return "\n".join(lines)


def merge(reports: list[LoadReport]) -> LoadReport:
    """One report for several client processes that loaded the same target at once."""
    if not reports:
        raise ValueError("nothing to merge")
    histogram = new_histogram()
    errors: dict[str, int] = {}
    for r in reports:
        histogram.add(r.histogram_object())
        for code, n in r.errors.items():
            errors[code] = errors.get(code, 0) + n
    first = reports[0]
    return replace(
        first,
        rate=sum(r.rate for r in reports),
        concurrency=sum(r.concurrency for r in reports),
        sent=sum(r.sent for r in reports),
        completed=sum(r.completed for r in reports),
        ok=sum(r.ok for r in reports),
        errors=errors,
        unfinished=sum(r.unfinished for r in reports),
        achieved_per_s=sum(r.achieved_per_s for r in reports),
        latency=LatencySummary.of(histogram),
        histogram=histogram.encode().decode("ascii"),
        client_processes=sum(r.client_processes for r in reports),
    )


def plot_percentiles(reports: dict[str, LoadReport], path: Path, title: str) -> None:
    """Latency by percentile (log-scaled tail), one line per report, as a PNG."""
    import matplotlib  # lazily: CLI start stays fast

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, report in reports.items():
        h = report.histogram_object()
        if h.get_total_count() == 0:
            continue
        xs, ys = [], []
        for item in h.get_percentile_iterator(5):
            pct = min(float(item.percentile_level_iterated_to), 99.9999)
            xs.append(1.0 / (1.0 - pct / 100.0))
            ys.append(float(item.value_iterated_to) / 1000)
        ax.plot(xs, ys, label=label)
    ax.set_xscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000]
    ax.set_xticks(ticks, ["p0", "p50", "p90", "p99", "p99.9", "p99.99"])
    ax.set_xlim(1, 10000)
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
