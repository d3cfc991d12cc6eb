"""Generate the Python stubs and typed ``.pyi`` for ``protos/`` (``make protos``).

``python -m ganglion.protogen`` writes into ``libs/``; ``--check`` regenerates into a temporary
directory and exits 1 when the committed stubs differ (the staleness test uses it).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "libs"
GENERATED_DIR = Path("ganglion") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> None:
    """Run protoc (from grpcio-tools) with the mypy-protobuf plugins into ``out_root``."""
    bindir = Path(sys.executable).parent
    protos = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / GENERATED_DIR).glob("*.proto")
    )
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / GENERATED_DIR}")
    (out_root / GENERATED_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def generated_files(root: Path) -> list[str]:
    d = root / GENERATED_DIR
    return sorted(p.name for p in d.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def stale_files() -> list[str]:
    """Names of generated files that differ from (or are missing in) ``libs/ganglion/v1``."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want = generated_files(fresh)
        have = set(generated_files(OUT_ROOT))
        stale = [n for n in want if n not in have]
        stale += [
            n
            for n in want
            if n in have
            and not filecmp.cmp(
                fresh / GENERATED_DIR / n, OUT_ROOT / GENERATED_DIR / n, shallow=False
            )
        ]
        stale += sorted(have - set(want))
        return sorted(stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when committed stubs are stale"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated stubs (run `make protos`): " + ", ".join(stale))
            return 1
        print("generated stubs are up to date")
        return 0
    generate(OUT_ROOT)
    print(f"generated {len(generated_files(OUT_ROOT))} files in {OUT_ROOT / GENERATED_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
