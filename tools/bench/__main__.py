"""``make bench``: run the benchmark modules, write bench/results.json and bench/results.md.

Each module in :data:`MODULES` exposes ``run(quick: bool = False) -> list[dict]`` (optionally
also taking ``out_dir`` for its plots); every row it returns has the keys of :data:`ROW_KEYS`
and is a ratio against a baseline measured in the same run, because the machines are noisy
and shared; absolute figures are context. A module that is not written yet is reported as
absent; any other failure stops the run.

Each module runs in a fresh interpreter (``--one NAME``), so one module's heap, imports and
leftover threads (torch, gRPC pollers, a NATS client) cannot weigh on the next one's figures.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import pkgutil
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

EXPECTED = ("core", "decision", "scaleout", "telemetry", "sim", "cache", "transport")
"""Benchmark modules of ``tools.bench`` every full run has, in this order; any other module
of the package with a ``run`` function runs after them."""
HELPERS = frozenset({"harness"})
"""Modules of the package that are shared code, not benchmarks."""
ROW_KEYS = ("name", "value", "unit", "baseline", "baseline_unit", "ratio", "note")

Row = dict[str, object]


def discover() -> tuple[str, ...]:
    """The expected modules, then any other benchmark module found in the package."""
    here = Path(__file__).parent
    found = sorted(
        info.name
        for info in pkgutil.iter_modules([str(here)])
        if not info.name.startswith("_") and info.name not in HELPERS
    )
    return EXPECTED + tuple(n for n in found if n not in EXPECTED)


MODULES = discover()


def load(name: str) -> ModuleType | None:
    """``tools.bench.<name>``, or None when that module does not exist (yet)."""
    module = f"tools.bench.{name}"
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise  # the module exists but something it imports does not: a real error
        return None
    if not callable(getattr(loaded, "run", None)):
        raise TypeError(f"{module} has no run(quick: bool = False) function")
    return loaded


def absent(name: str) -> Row:
    return {
        "module": name,
        "name": f"{name}: not run",
        "value": None,
        "unit": "",
        "baseline": None,
        "baseline_unit": "",
        "ratio": None,
        "note": f"tools/bench/{name}.py is not written yet",
    }


def run_module(name: str, module: ModuleType, quick: bool, out_dir: Path) -> list[Row]:
    run = module.run
    kwargs: dict[str, object] = {"quick": quick}
    if "out_dir" in inspect.signature(run).parameters:
        kwargs["out_dir"] = out_dir
    rows = run(**kwargs)
    if not isinstance(rows, list):
        raise TypeError(f"tools.bench.{name}.run returned {type(rows).__name__}, not a list")
    out: list[Row] = []
    for r in rows:
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise ValueError(f"tools.bench.{name}: row {r.get('name')!r} lacks {missing}")
        out.append({"module": name, **r})
    return out


def run_isolated(name: str, quick: bool, out_dir: Path) -> list[Row]:
    """``name`` in a fresh interpreter (see the module docstring); its rows come back as JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "tools.bench", "--one", name, "--rows-to", str(rows_file)]
        cmd += ["--out", str(out_dir), *(["--quick"] if quick else [])]
        subprocess.run(cmd, check=True)
        rows: list[Row] = json.loads(rows_file.read_text())
        return rows


def _one(name: str, quick: bool, out_dir: Path, rows_to: Path) -> int:
    """The child side of :func:`run_isolated`."""
    module = load(name)
    rows = [absent(name)] if module is None else run_module(name, module, quick, out_dir)
    rows_to.write_text(json.dumps(rows))  # NaN/Infinity survive: json reads them back
    return 0


def _fmt(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def markdown(rows: list[Row], meta: dict[str, object]) -> str:
    partial = meta.get("done") != meta.get("modules")
    lines = [
        f"Benchmarks, {meta['when']}: {meta['cpus']} CPUs, Python {meta['python']}"
        + (" (--quick)" if meta["quick"] else "")
        + ". Every ratio is against a baseline measured in the same run."
        + (f" Partial: {meta['done']} of {meta['modules']} so far." if partial else ""),
        "",
        "| module | benchmark | value | baseline | ratio | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        value = f"{_fmt(r['value'])} {r['unit']}".strip()
        baseline = f"{_fmt(r['baseline'])} {r['baseline_unit']}".strip()
        lines.append(
            f"| {r['module']} | {r['name']} | {value} | {baseline} | {_fmt(r['ratio'])} "
            f"| {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def _json_safe(value: object) -> object:
    """Non-finite floats become None: strict JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write(out: Path, rows: list[Row], meta: dict[str, object]) -> str:
    """Write results.json and results.md; returns the Markdown table."""
    safe = [{k: _json_safe(v) for k, v in r.items()} for r in rows]
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": safe}, indent=2))
    table = markdown(rows, meta)
    (out / "results.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools.bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench"), help="output directory")
    p.add_argument("--quick", action="store_true", help="short runs (smoke-test sized)")
    p.add_argument(
        "--only",
        action="append",
        choices=MODULES,
        metavar="NAME",
        help=f"run only this module (repeatable): {', '.join(MODULES)}",
    )
    p.add_argument("--one", choices=MODULES, help=argparse.SUPPRESS)  # run_isolated's child
    p.add_argument("--rows-to", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        if a.rows_to is None:
            p.error("--one needs --rows-to")
        return _one(a.one, a.quick, a.out, a.rows_to)
    names = [m for m in MODULES if a.only is None or m in a.only]
    a.out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    rows: list[Row] = []
    started = time.time()
    meta: dict[str, object] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "time": started,
        "quick": a.quick,
        "modules": names,
        "done": [],
    }
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("benchmarks", total=len(names))
        for name in names:
            progress.update(task, description=f"bench {name}")
            rows += run_isolated(name, a.quick, a.out)
            # Written after every module, so a long run stopped half-way keeps what it measured.
            meta["done"] = [*names[: names.index(name) + 1]]
            meta["seconds"] = round(time.time() - started, 1)
            write(a.out, rows, meta)
            progress.advance(task)
    print(write(a.out, rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
