"""Transport benchmarks: TransferService Fetch over real gRPC on loopback, directly and
through a token-bucket-capped TCP proxy (an in-process stand-in for a slow link).

* Goodput (blob bytes/s delivered, verified) of a Fetch with lz4 on an uncapped loopback,
  against in-process lz4 on the same chunks: the same encoder and decoder run back to back in
  one thread, with no gRPC, no copies between them and no proxy. Ratio = how much of lz4's
  own speed the service keeps.
* On a capped link: the lz4 path against the raw path for telemetry-like data (serialised
  ``TelemetryBatch`` messages of 8 simulated GPUs each, target >= 2.5x) and for random data
  (incompressible, target >= 0.95x: the encoder sends raw chunks and stops trying lz4).
* The settings ``TuneTransport`` (the decision service's ``analytic`` policy) picks from the
  link's bandwidth, lz4's speed measured here and the observed compressibility, against raw.

Best of N runs per figure (noise only ever slows a run down). ``python -m tools.bench.transport
[--quick] [--out DIR]`` prints the table (and writes a PNG).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from ganglion import rpc
from ganglion.policies.transport_tuning import TUNERS, LinkObservation
from ganglion.transport import ChunkEncoder, TransportSettings, decode_frame
from ganglion.transport.backends import MemoryBackend, MemorySink
from ganglion.transport.proxy import BandwidthProxy
from ganglion.transport.service import SERVICE_NAME, TransferServicer, fetch
from ganglion.v1 import data_pb2_grpc, telemetry_pb2

MIB = 1 << 20
LINK_BYTES_PER_S = 20e6
"""The capped link: 20 MB/s (160 Mbit/s), a congested or cross-region path."""

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


def telemetry_like(n_bytes: int, seed: int = 0) -> bytes:
    """Serialised TelemetryBatch messages, as sensing publishes them, ``n_bytes`` of them."""
    rng = random.Random(seed)
    out: list[bytes] = []
    size, seq = 0, 0
    while size < n_bytes:
        sample = telemetry_pb2.HostSample(
            host=f"node-{seq % 64:03d}",
            backend=telemetry_pb2.COLLECTOR_BACKEND_SIM,
            time_s=1.7e9 + seq,
            driver_version="550.54.15",
        )
        for i in range(8):
            sample.gpus.add(
                uuid=f"GPU-{seq % 64:04x}{i:04x}-sim",
                index=i,
                name="NVIDIA H100 80GB HBM3",
                gpu_utilization_percent=rng.randint(0, 100),
                memory_utilization_percent=rng.randint(0, 100),
                fb_used_bytes=rng.randint(0, 80) << 30,
                fb_total_bytes=80 << 30,
                power_watts=round(rng.uniform(60, 700), 1),
                energy_millijoules=seq * 400_000 + rng.randint(0, 1000),
                temperature_celsius=rng.randint(30, 80),
                sm_clock_mhz=1980,
                mem_clock_mhz=2619,
            )
        msg = telemetry_pb2.TelemetryBatch(samples=[sample], sequence=seq).SerializeToString()
        out.append(msg)
        size += len(msg)
        seq += 1
    return b"".join(out)[:n_bytes]


def inprocess_lz4(data: bytes, settings: TransportSettings, repeats: int) -> tuple[float, float]:
    """(raw bytes/s of encode+decode in one thread, compressed/raw ratio), best of N."""
    best = 0.0
    ratio = 1.0
    step = settings.chunk_bytes
    for _ in range(repeats):
        enc = ChunkEncoder(settings)
        t0 = time.perf_counter()
        for off in range(0, len(data), step):
            decode_frame(enc.encode(data[off : off + step], off))
        best = max(best, len(data) / (time.perf_counter() - t0))
        ratio = enc.ratio
    return best, ratio


async def _goodput(address: str, blob: str, settings: TransportSettings, repeats: int) -> float:
    best = 0.0
    async with rpc.channel(address) as ch:
        stub = data_pb2_grpc.TransferServiceStub(ch)
        for _ in range(repeats):
            sink, stats = await fetch(
                stub, blob, lambda n: MemorySink(blob, n), settings, timeout_s=300
            )
            sink.value()  # verified against the sha256 id, as every receiver does
            best = max(best, stats.goodput)
    return best


async def _run(quick: bool) -> tuple[list[Row], dict[str, float]]:
    size = (4 if quick else 16) * MIB
    repeats = 1 if quick else 3
    telemetry = telemetry_like(size)
    noise = os.urandom(size)
    backend = MemoryBackend([telemetry, noise])
    t_id, n_id = list(backend.blobs)

    def register(server: grpc.aio.Server) -> None:
        data_pb2_grpc.add_TransferServiceServicer_to_server(TransferServicer(backend), server)

    server, port, _ = await rpc.start_server(register, [SERVICE_NAME])
    lz4 = TransportSettings()
    raw = TransportSettings(compress=False)
    rows: list[Row] = []
    speeds: dict[str, float] = {}
    try:
        direct = f"127.0.0.1:{port}"
        inproc, ratio = inprocess_lz4(telemetry, lz4, repeats + 1)
        loop_lz4 = await _goodput(direct, t_id, lz4, repeats + 1)
        speeds.update({"in-process lz4": inproc, "loopback Fetch lz4": loop_lz4})
        rows.append(
            _row(
                "Fetch goodput (lz4, loopback) vs in-process lz4, telemetry-like",
                loop_lz4 / 1e6,
                "MB/s",
                inproc / 1e6,
                "MB/s (encode+decode, one thread)",
                loop_lz4 / inproc,
                f"{size // MIB} MiB, 1 MiB chunks, lz4 ratio {ratio:.3f}",
            )
        )
        async with BandwidthProxy("127.0.0.1", port, LINK_BYTES_PER_S) as proxy:
            capped = proxy.address
            for label, blob, target in (("telemetry-like", t_id, 2.5), ("random", n_id, 0.95)):
                with_lz4 = await _goodput(capped, blob, lz4, repeats)
                without = await _goodput(capped, blob, raw, repeats)
                speeds[f"capped {label} lz4"] = with_lz4
                speeds[f"capped {label} raw"] = without
                rows.append(
                    _row(
                        f"capped link {LINK_BYTES_PER_S / 1e6:.0f} MB/s: lz4 path vs raw, {label}",
                        with_lz4 / 1e6,
                        "MB/s",
                        without / 1e6,
                        "MB/s (raw)",
                        with_lz4 / without,
                        f"target >= {target:g}: "
                        + ("met" if with_lz4 / without >= target else "NOT met"),
                    )
                )
            enc = ChunkEncoder(lz4)
            enc.encode(telemetry[: 4 * MIB], 0)
            plan = TUNERS.create("analytic").tune(
                LinkObservation(
                    bandwidth_bytes_per_s=LINK_BYTES_PER_S,
                    compressibility=enc.ratio,
                    compress_bytes_per_s=inproc,
                    decompress_bytes_per_s=inproc,
                )
            )
            tuned = TransportSettings(
                chunk_bytes=plan.chunk_bytes, compress=plan.compress, lz4_level=plan.lz4_level
            )
            got = await _goodput(capped, t_id, tuned, repeats)
            speeds["capped telemetry-like tuned"] = got
            rows.append(
                _row(
                    "capped link: TuneTransport (analytic) settings vs raw, telemetry-like",
                    got / 1e6,
                    "MB/s",
                    speeds["capped telemetry-like raw"] / 1e6,
                    "MB/s (raw)",
                    got / speeds["capped telemetry-like raw"],
                    f"chose chunk {plan.chunk_bytes // 1024} KiB, lz4 level {plan.lz4_level}, "
                    f"compress={plan.compress}; model {plan.expected_goodput / 1e6:.0f} MB/s",
                )
            )
    finally:
        await server.stop(grace=None)
    return rows, speeds


def plot(speeds: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(speeds)
    ax.barh(names, [speeds[n] / 1e6 for n in names])
    ax.set_xscale("log")
    ax.set_xlabel("goodput (MB/s of blob delivered)")
    ax.set_title(f"TransferService Fetch; capped link = {LINK_BYTES_PER_S / 1e6:.0f} MB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool = False, out_dir: Path | None = None) -> list[Row]:
    rows, speeds = asyncio.run(_run(quick))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot(speeds, out_dir / "transport_goodput.png")
    return rows


def print_table(rows: Sequence[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="transport")
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
        prog="python -m tools.bench.transport", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="4 MiB blobs, one run each")
    p.add_argument("--out", type=Path, default=Path("bench"), help="directory for the PNG")
    a = p.parse_args(argv)
    from rich.console import Console

    with Console(stderr=True).status("running the transport benchmarks (about 15 s)"):
        rows = run(a.quick, a.out)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
