"""``ganglion train --algo ppo|dqn``: train a scheduling policy on real trace windows, evaluate
it on held-out windows against the heuristics, and publish it as a versioned model.

Training windows come from ``--train-window`` (default Philly September-October), evaluation
windows from ``--eval-dates`` (default November-December). The run directory
(``--out-dir``/<run>) gets the CSV logs, the learning curve, checkpoints and the evaluation
report; the artefact (weights + manifest with checksums, schema, normalisation, provenance
and the evaluation) goes to ``--models-dir`` under the next free version, or under
``--version N`` (``--force`` replaces an existing N: how ``make train`` rebuilds the shipped
default model). Every trainer flag is listed by ``ganglion train --algo ppo --help``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str}
_SKIP = {"algo", "extra"}


@dataclasses.dataclass(frozen=True)
class ArgSpec:
    """One trainer argument, read from the trainer's source (no import: torch stays out of
    CLI start-up)."""

    name: str
    kind: str
    """``int``, ``float``, ``str`` or ``bool``."""
    defaults: dict[str, object]
    """Default per algorithm."""
    doc: str


def _module_source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"cannot find {module}")
    return Path(spec.origin).read_text()


def _fields(source: str, cls: str) -> list[tuple[str, str, object, str]]:
    """(name, type, default, docstring) of the annotated fields of class ``cls``."""
    tree = ast.parse(source)
    out = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            body = node.body
            for i, stmt in enumerate(body):
                if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                    continue
                kind = ast.unparse(stmt.annotation)
                if kind not in (*_TYPES, "bool") or stmt.value is None:
                    continue
                try:
                    default = ast.literal_eval(stmt.value)
                except ValueError:
                    continue
                doc = ""
                nxt = body[i + 1] if i + 1 < len(body) else None
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                    doc = " ".join(str(nxt.value.value).split())
                out.append((stmt.target.id, kind, default, doc))
    return out


def arg_specs() -> list[ArgSpec]:
    """Flags of both trainers (shared ones from ``CommonArgs``, then each algorithm's)."""
    common = _fields(_module_source("ganglion.rl.training"), "CommonArgs")
    specs: dict[str, ArgSpec] = {}
    for algo in ALGOS:
        own = _fields(_module_source(f"ganglion.rl.{algo}"), "Args")
        for name, kind, default, doc in [*common, *own]:
            if name in _SKIP:
                continue
            if name in specs:
                specs[name].defaults[algo] = default
                if doc and not specs[name].doc:
                    specs[name] = dataclasses.replace(specs[name], doc=doc)
            else:
                specs[name] = ArgSpec(name, kind, {algo: default}, doc)
    return list(specs.values())


ALGOS = ("ppo", "dqn")


def add_parser(sub: Any) -> None:
    from ganglion.rl.evaluate import EvalSpec

    p = sub.add_parser(
        "train",
        help="train a learned scheduling policy (PPO or DQN) and publish it as a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--algo", choices=ALGOS, default="ppo", help="algorithm (default: ppo)")
    trainer = p.add_argument_group("trainer (defaults per algorithm)")
    for spec in arg_specs():
        flag = "--" + spec.name.replace("_", "-")
        shown = ", ".join(f"{a}: {v!r}" for a, v in spec.defaults.items())
        only = "" if len(spec.defaults) == len(ALGOS) else f" [{'/'.join(spec.defaults)} only]"
        help_text = f"{spec.doc}{only} ({shown})".replace("%", "%%")
        if spec.kind == "bool":
            trainer.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            trainer.add_argument(
                flag, type=_TYPES[spec.kind], default=argparse.SUPPRESS, help=help_text
            )
    out = p.add_argument_group("publishing and evaluation")
    out.add_argument(
        "--models-dir",
        type=Path,
        default=Path("runs/models"),
        help="local model registry to publish to (default: %(default)s)",
    )
    out.add_argument("--model-name", default="scheduler", help="model name (default: %(default)s)")
    out.add_argument("--version", type=int, default=0, help="version to publish as (0: next free)")
    out.add_argument("--force", action="store_true", help="replace --version if it exists")
    d = EvalSpec()
    out.add_argument("--eval-dates", default=d.dates, help="held-out dates (default: %(default)s)")
    out.add_argument(
        "--eval-windows",
        type=int,
        default=d.windows,
        help="held-out windows, 0 skips evaluation (default: %(default)s)",
    )
    out.add_argument(
        "--eval-days",
        type=float,
        default=d.window_days,
        help="length of each held-out window in days (default: %(default)s)",
    )
    p.set_defaults(run=train_and_publish)


def _trainer(algo: str) -> tuple[type[Any], Any]:
    if algo == "dqn":
        from ganglion.rl import dqn

        return dqn.Args, dqn.train
    from ganglion.rl import ppo

    return ppo.Args, ppo.train


def train_and_publish(ns: argparse.Namespace) -> int:
    """Train, evaluate, publish (the body of ``ganglion train``)."""
    import torch

    from ganglion.models import LocalRegistry, ModelError
    from ganglion.policies.rl import RlPolicy
    from ganglion.rl.decide import ActionForm
    from ganglion.rl.evaluate import EvalSpec, evaluate
    from ganglion.rl.model import ScoringModel, to_artifact
    from ganglion.rl.network import NetConfig, SchedulerNet
    from ganglion.rl.training import load_trace

    console = Console(stderr=True)
    args_cls, train = _trainer(ns.algo)
    names = {f.name for f in dataclasses.fields(args_cls)} - _SKIP
    args = args_cls(**{n: getattr(ns, n) for n in names if hasattr(ns, n)})
    started = time.perf_counter()
    run_dir: Path = train(args)
    wall = time.perf_counter() - started
    net = SchedulerNet(NetConfig(hidden=args.hidden))
    net.load_state_dict(torch.load(run_dir / "final.pt", weights_only=True))
    form = ActionForm.PICK if ns.algo == "dqn" else ActionForm.RANK
    training = {
        "algo": ns.algo,
        "args": json.loads(args.to_json()),
        "trace": str(args.trace_path().name),
        "train_window": args.train_window,
        "seed": args.seed,
        "wall_s": round(wall, 1),
        "run": run_dir.name,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    common = {"name": ns.model_name, "form": form, "k": args.k, "quantum_s": args.quantum_s}
    artifact = to_artifact(net, training=training, **common)
    evaluation: dict[str, Any] = {}
    if ns.eval_windows > 0:
        spec = EvalSpec(
            dates=ns.eval_dates,
            windows=ns.eval_windows,
            window_days=ns.eval_days,
            hosts=args.hosts,
            gpus_per_host=args.gpus_per_host,
            restart_penalty_s=args.restart_penalty_s,
        )
        learned = RlPolicy("rl", model=ScoringModel(artifact))
        trace = load_trace(args.trace_path())
        report_dir = run_dir / "eval"
        report_dir.mkdir(exist_ok=True)
        summary = evaluate(learned, spec, trace, report_dir)
        evaluation = {"spec": dataclasses.asdict(spec), **summary.to_json()}
        (report_dir / "summary.json").write_text(json.dumps(evaluation, indent=2) + "\n")
        console.print(
            f"held-out: avg JCT {summary.avg_jct_ratio:.3f}x {summary.best_heuristic} "
            f"(best non-clairvoyant), p99 {summary.p99_jct_ratio:.3f}x, "
            f"{summary.oracle_ratio:.3f}x the SRTF oracle; report {report_dir / 'report.md'}",
            highlight=False,
        )
    artifact = to_artifact(net, training=training, evaluation=evaluation, **common)
    registry = LocalRegistry(ns.models_dir)
    version = ns.version or registry.next_version(ns.model_name)
    target = ns.models_dir / ns.model_name / str(version)
    if target.exists():
        if not ns.force:
            raise SystemExit(f"{target} exists (use --force to replace it)")
        import shutil

        shutil.rmtree(target)
    final = dataclasses.replace(artifact.manifest, version=version)
    try:
        ref = registry.publish_sync(type(artifact)(final, artifact.files))
    except ModelError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    console.print(f"published {ref} to {ns.models_dir} (run {run_dir})", highlight=False)
    return 0
