"""``ganglion models``: the learned models of a decision service, and their registries.

Against a running decision service (``--addr``, default ``127.0.0.1:50051``)::

    ganglion models list                       # loaded versions, aliases, metrics, refusals
    ganglion models load 3                     # fetch + verify version 3 (0: the newest)
    ganglion models alias stable 2             # roll back / pin (stops auto-promotion)
    ganglion models alias stable 3 --auto      # ... and resume auto-promotion
    ganglion models alias canary 3 --share 0.1 # 10% of unpinned `rl` requests to version 3
    ganglion models alias shadow 3             # version 3 scores every request, no effect
    ganglion models alias canary 0             # clear the canary
    ganglion models unload 1

Against a registry (no service): ``ganglion models publish DIR`` copies the artefact in DIR
(``manifest.json`` + files) into ``--to-dir`` or ``--to-nats-bucket`` as the next version;
``ganglion models verify DIR`` checks its checksums and schema.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from ganglion import rpc
from ganglion.models import MAX_VERSION, ModelError
from ganglion.v1 import decision_pb2, decision_pb2_grpc

DEFAULT_ADDR = "127.0.0.1:50051"
TIMEOUT_S = 30.0


def _version(text: str) -> int:
    """A version number argument: an integer from 0 to 2^32 - 1."""
    try:
        version = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a version number: {text!r}") from None
    if not 0 <= version <= MAX_VERSION:
        raise argparse.ArgumentTypeError(f"a version is 0 to {MAX_VERSION}, got {version}")
    return version


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "models",
        help="list, load, alias and unload learned models; publish and verify artefacts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--addr",
        default=os.environ.get("GANGLION_DECISION_ADDR", DEFAULT_ADDR),
        help="decision service (default: $GANGLION_DECISION_ADDR or %(default)s)",
    )
    p.add_argument("--name", default="scheduler", help="model name (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the raw response as JSON")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("list", help="loaded versions, aliases, per-version metrics, refusals")
    load = verbs.add_parser("load", help="load a version from the service's registry")
    load.add_argument("version", type=_version, help="version (0: the newest)")
    alias = verbs.add_parser("alias", help="point stable, canary or shadow at a version")
    alias.add_argument("alias", choices=("stable", "canary", "shadow"))
    alias.add_argument("version", type=_version, help="version (0 clears canary/shadow)")
    alias.add_argument("--share", type=float, default=0.1, help="canary traffic share")
    alias.add_argument("--auto", action="store_true", help="stable: resume auto-promotion")
    unload = verbs.add_parser("unload", help="drop a loaded version")
    unload.add_argument("version", type=_version)
    publish = verbs.add_parser("publish", help="publish an artefact folder to a registry")
    publish.add_argument("artifact", type=Path, help="folder with manifest.json and its files")
    publish.add_argument("--to-dir", type=Path, default=None, help="local registry directory")
    publish.add_argument(
        "--to-nats-bucket", default=None, help="NATS object store bucket ($GANGLION_NATS_URL)"
    )
    verify = verbs.add_parser("verify", help="check an artefact folder's checksums and schema")
    verify.add_argument("artifact", type=Path)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    try:
        if args.verb == "publish":
            return asyncio.run(_publish(args, console))
        if args.verb == "verify":
            return _verify(args, console)
        return asyncio.run(_admin(args, console))
    except grpc.aio.AioRpcError as exc:
        Console(stderr=True).print(
            f"[red]error:[/] {args.addr}: {exc.code().name}: {exc.details()}"
        )
        return 1
    except ModelError as exc:  # publish: an artefact refused, a version taken meanwhile
        Console(stderr=True).print(f"[red]error:[/] {exc}", highlight=False)
        return 1


async def _admin(args: argparse.Namespace, console: Console) -> int:
    async with rpc.channel(args.addr) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        response: Any
        if args.verb == "list":
            response = await stub.ListModels(
                decision_pb2.ListModelsRequest(name=args.name), timeout=TIMEOUT_S
            )
        elif args.verb == "load":
            response = await stub.LoadModel(
                decision_pb2.LoadModelRequest(name=args.name, version=args.version),
                timeout=TIMEOUT_S,
            )
        elif args.verb == "alias":
            response = await stub.SetAlias(
                decision_pb2.SetAliasRequest(
                    name=args.name,
                    alias=args.alias,
                    version=args.version,
                    share=args.share if args.alias == "canary" else 0.0,
                    auto_promote=args.auto,
                ),
                timeout=TIMEOUT_S,
            )
        else:
            response = await stub.UnloadModel(
                decision_pb2.UnloadModelRequest(name=args.name, version=args.version),
                timeout=TIMEOUT_S,
            )
    if args.json:
        from google.protobuf.json_format import MessageToDict

        console.print_json(json.dumps(MessageToDict(response)))
        return 0
    if args.verb == "list":
        _print_list(response, console)
    elif args.verb == "load":
        console.print(
            f"loaded {response.model.name}@{response.model.version} "
            f"(sha256 {response.model.sha256[:12]})",
            highlight=False,
        )
    elif args.verb == "alias":
        _print_models(list(response.models), console)
    else:
        console.print(f"unloaded {args.name}@{args.version}", highlight=False)
    return 0


def _print_models(models: list[decision_pb2.ModelVersionStatus], console: Console) -> None:
    table = Table(
        "ver",
        "aliases",
        "reqs",
        "errs",
        "mean ms",
        "max ms",
        "shadow",
        "sha256",
        "held-out",
        box=None,
    )
    for m in models:
        aliases = ", ".join(
            f"canary {m.canary_share:.0%}" if a == "canary" else a for a in m.aliases
        )
        evaluation = json.loads(m.evaluation_json or "{}")
        ratio = evaluation.get("avg_jct_ratio")
        shadow = f"{m.shadow_agreement:.0%}/{m.shadow_requests}" if m.shadow_requests else "-"
        table.add_row(
            str(m.version),
            aliases or "-",
            str(m.requests),
            str(m.errors),
            f"{m.mean_latency_s * 1e3:.2f}",
            f"{m.max_latency_s * 1e3:.2f}",
            shadow,
            m.sha256[:8],
            f"{ratio:.2f}x {evaluation.get('best_heuristic', '')}" if ratio else "-",
        )
    console.print(table)


def _print_list(r: decision_pb2.ListModelsResponse, console: Console) -> None:
    console.print(
        f"registry {r.registry}; available versions "
        f"{', '.join(map(str, r.available)) or '-'}; auto-promote "
        f"{'on' if r.auto_promote else 'off'}",
        highlight=False,
    )
    _print_models(list(r.loaded), console)
    for refused in r.refused:
        console.print(
            f"[yellow]refused[/] {refused.name}@{refused.version}: {refused.reason}",
            highlight=False,
        )
    if r.shadow_log:
        agreed = sum(e.agreed for e in r.shadow_log)
        console.print(
            f"shadow: last {len(r.shadow_log)} comparisons, {agreed} agreed", highlight=False
        )


async def _publish(args: argparse.Namespace, console: Console) -> int:
    from ganglion.models import LocalRegistry, publish_next, verify
    from ganglion.rl.model import EXPECTED_SCHEMA

    if (args.to_dir is None) == (args.to_nats_bucket is None):
        raise SystemExit("give exactly one of --to-dir and --to-nats-bucket")
    artifact = _read_folder(args.artifact)
    # What every server would refuse (a file missing or changed since the manifest was
    # written, another observation schema) is refused here, before it takes a version.
    verify(artifact, EXPECTED_SCHEMA)
    if args.to_dir is not None:
        ref = await publish_next(LocalRegistry(args.to_dir), artifact)
    else:
        from ganglion.bus import ENV_NATS_URL, connect
        from ganglion.models.nats_registry import NatsRegistry

        url = os.environ.get(ENV_NATS_URL)
        if not url:
            raise SystemExit(f"--to-nats-bucket needs {ENV_NATS_URL}")
        nc = await connect(url, "ganglion-models")
        try:
            ref = await publish_next(NatsRegistry(nc.jetstream(), args.to_nats_bucket), artifact)
        finally:
            await nc.close()
    console.print(f"published {ref}", highlight=False)
    return 0


def _read_folder(folder: Path) -> Any:
    from ganglion.models import MANIFEST, Artifact, Manifest

    manifest = Manifest.from_json((folder / MANIFEST).read_bytes(), str(folder))
    files = {f: (folder / f).read_bytes() for f in manifest.files if (folder / f).is_file()}
    return Artifact(manifest, files)


def _verify(args: argparse.Namespace, console: Console) -> int:
    from ganglion.models import verify
    from ganglion.rl.model import EXPECTED_SCHEMA

    try:
        artifact = _read_folder(args.artifact)
        verify(artifact, EXPECTED_SCHEMA)
    except (ModelError, OSError) as exc:
        console.print(f"[red]refused:[/] {exc}", highlight=False)
        return 1
    m = artifact.manifest
    console.print(
        f"ok: {m.ref} ({m.kind.value}, schema v{m.schema_version}, "
        f"{artifact.size} bytes, sha256 {m.digest[:12]})",
        highlight=False,
    )
    return 0
