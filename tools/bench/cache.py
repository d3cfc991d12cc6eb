"""Cache benchmarks: eviction policies on a real trace against Belady OPT, SHARDS against the
exact LRU curve, and MRC-driven multi-tenant sizing against an equal split.

* ``../shared/traces/cache/cloudPhysicsIO.txt`` (CloudPhysics block I/O sample, via
  libCacheSim), unit-size objects, caches of 1% and 10% of the distinct objects. Every policy
  runs through :class:`ganglion.cache.Partition`, the same code the executor's store uses.
  Baseline: OPT in the same run; ratio = OPT misses / policy misses (1.0 = optimal). The
  trace's SOURCES.md lists libCacheSim's LRU 0.838 / 0.805 and OPT 0.793 / 0.629; our LRU
  and OPT rows reproduce them (see the notes).
* SHARDS (sampling rate 0.1 and fixed-size at 1,024 keys) against the exact LRU miss ratio.
* Three tenants share one host: the real trace, a Zipf(0.9) working set and a looping scan.
  Curves come from SHARDS over the first half of each tenant's requests; ``greedy-mrc``
  (the decision service's SizeCaches policy) and an equal split each set the budgets; the
  second half is replayed through S3-FIFO partitions warmed on the first. Ratio = hits with
  greedy budgets / hits with the equal split.

``python -m tools.bench.cache [--quick] [--out DIR]`` prints the table (and writes a PNG).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Hashable, Sequence
from pathlib import Path

from ganglion.cache import Partition, Shards, belady_misses, load_trace, simulate
from ganglion.policies.cache_sizing import SIZERS, HostDemand, TenantDemand

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT.parent / "shared" / "traces" / "cache" / "cloudPhysicsIO.txt"
REFERENCE = {
    0.01: "published (SOURCES.md, libCacheSim): LRU 0.838, OPT 0.793",
    0.10: "published (SOURCES.md, libCacheSim): LRU 0.805, OPT 0.629",
}

Row = dict[str, object]


def _row(
    name: str, value: float, unit: str, baseline: float, bunit: str, ratio: float, note: str
) -> Row:
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_unit": bunit,
        "ratio": ratio,
        "note": note,
    }


def policy_rows(
    trace: Sequence[int], curves: dict[str, list[tuple[int, float]]], whole: bool
) -> list[Row]:
    distinct = len(set(trace))
    rows: list[Row] = []
    for frac in (0.01, 0.10):
        cap = int(distinct * frac)
        opt = belady_misses(trace, cap) / len(trace)
        for name in ("s3fifo", "arc", "lru"):
            mr = simulate(name, trace, cap).miss_ratio
            curves.setdefault(name, []).append((cap, mr))
            rows.append(
                _row(
                    f"miss ratio {name} @ {frac:.0%} ({cap} objects)",
                    mr,
                    "miss ratio",
                    opt,
                    "miss ratio (OPT)",
                    opt / mr,
                    (REFERENCE[frac] if whole else "trace prefix: published values differ")
                    if name == "lru"
                    else "baseline: OPT in this run",
                )
            )
        curves.setdefault("opt", []).append((cap, opt))
    return rows


def shards_rows(trace: Sequence[int]) -> list[Row]:
    distinct = len(set(trace))
    sizes = [int(distinct * 0.01), int(distinct * 0.10)]
    exact = {c: simulate("lru", trace, c).miss_ratio for c in sizes}
    rows: list[Row] = []
    for label, est in (
        ("rate 0.1", Shards(rate=0.1, max_keys=1 << 20)),
        ("fixed-size 1024 keys", Shards(rate=1.0, max_keys=1024)),
    ):
        for k in trace:
            est.record(k, 1)
        curve = est.curve(sizes)
        for c in sizes:
            got = curve.miss_ratio_at(c)
            rows.append(
                _row(
                    f"SHARDS {label} LRU miss ratio @ {c} objects",
                    got,
                    "miss ratio",
                    exact[c],
                    "miss ratio (exact LRU)",
                    got / exact[c],
                    f"final sampling rate {est.rate:.3f}; ratio 1.0 = exact",
                )
            )
    return rows


def _tenants(trace: Sequence[int], quick: bool) -> dict[str, list[Hashable]]:
    rng = random.Random(7)
    n = len(trace)
    keys = 20_000
    weights = [1.0 / (k + 1) ** 0.9 for k in range(keys)]
    zipf: list[Hashable] = [("z", k) for k in rng.choices(range(keys), weights=weights, k=n)]
    loop = 3_000 if not quick else 1_000
    scan: list[Hashable] = [("s", i % loop) for i in range(n)]
    return {"cloudphysics": list(trace), "zipf": zipf, "scan": scan}


def _replay(streams: dict[str, list[Hashable]], budgets: dict[str, int]) -> tuple[int, int]:
    """Warm on the first half, count hits/requests on the second (round-robin interleaved)."""
    parts = {t: Partition(t, budgets.get(t, 0), "s3fifo") for t in streams}
    half = min(len(s) for s in streams.values()) // 2
    hits = requests = 0
    for i in range(2 * half):
        for t, s in streams.items():
            p = parts[t]
            hit = p.lookup(s[i], 1)
            if not hit:
                p.admit(s[i], 1)
            if i >= half:
                requests += 1
                hits += hit
    return hits, requests


def sizing_rows(trace: Sequence[int], quick: bool) -> list[Row]:
    streams = _tenants(trace, quick)
    half = min(len(s) for s in streams.values()) // 2
    distinct = sum(len(set(s)) for s in streams.values())
    capacity = distinct // 10
    demands = []
    for t, s in streams.items():
        est = Shards(rate=1.0, max_keys=8192)
        for k in s[:half]:
            est.record(k, 1)
        demands.append(TenantDemand(t, half, est.curve()))
    host = HostDemand("bench", capacity, tuple(demands))
    greedy = SIZERS.create("greedy-mrc").size(host)
    equal = SIZERS.create("equal-split").size(host)
    g_hits, n = _replay(streams, dict(greedy.budgets))
    e_hits, _ = _replay(streams, dict(equal.budgets))
    shares = ", ".join(f"{t}={b}" for t, b in greedy.budgets.items())
    return [
        _row(
            f"multi-tenant hit ratio, greedy-mrc vs equal split ({capacity} objects, 3 tenants)",
            g_hits / n,
            "hit ratio",
            e_hits / n,
            "hit ratio (equal split)",
            g_hits / max(e_hits, 1),
            f"greedy budgets {shares}; model expected {greedy.expected_hit_ratio:.3f} vs "
            f"{greedy.equal_split_hit_ratio:.3f}",
        )
    ]


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("cache size (objects)")
    ax.set_ylabel("miss ratio")
    ax.set_title("cloudPhysicsIO: eviction policies vs Belady OPT")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool = False, out_dir: Path | None = None) -> list[Row]:
    if not TRACE.exists():
        return [
            _row(
                "cache benchmarks: skipped",
                float("nan"),
                "",
                float("nan"),
                "",
                float("nan"),
                f"trace not found at {TRACE} (../shared is absent)",
            )
        ]
    trace = load_trace(TRACE)
    if quick:
        trace = trace[:40_000]
    curves: dict[str, list[tuple[int, float]]] = {}
    rows = policy_rows(trace, curves, whole=not quick)
    rows += shards_rows(trace)
    rows += sizing_rows(trace, quick)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot(curves, out_dir / "cache_policies.png")
    return rows


def print_table(rows: Sequence[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cache")
    for col in ("name", "value", "baseline", "ratio", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            str(r["name"]),
            f"{r['value']:.4g} {r['unit']}",
            f"{r['baseline']:.4g} {r['baseline_unit']}",
            f"{r['ratio']:.3f}",
            str(r["note"]),
        )
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench.cache", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="a prefix of the trace")
    p.add_argument("--out", type=Path, default=Path("bench"), help="directory for the PNG")
    a = p.parse_args(argv)
    from rich.console import Console

    with Console(stderr=True).status("running the cache benchmarks (about 15 s)"):
        rows = run(a.quick, a.out)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
