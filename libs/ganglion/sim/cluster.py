"""Simulated cluster shapes: ``--hosts H --gpus-per-host G`` or a Tiresias spec file."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from ganglion.traces import traces_dir

_SPEC_NAME = re.compile(r"^n\d+g\d+$")
_SHAPE = re.compile(r"^(\d+)x(\d+)$")


class ClusterSpecError(ValueError):
    """A cluster name or spec file that cannot be used."""


@dataclass(frozen=True)
class ClusterSpec:
    """Hosts and their GPU counts, in placement order."""

    name: str
    """For reports, e.g. ``n32g4`` or ``64x8``."""
    hosts: tuple[str, ...]
    """Host names, unique."""
    gpus: tuple[int, ...]
    """GPUs on each host."""

    def __post_init__(self) -> None:
        if not self.hosts:
            raise ClusterSpecError("a cluster needs at least one host")
        if len(self.hosts) != len(self.gpus):
            raise ClusterSpecError("hosts and gpus differ in length")
        if len(set(self.hosts)) != len(self.hosts):
            raise ClusterSpecError("duplicate host names")
        if min(self.gpus) < 1:
            raise ClusterSpecError("every host needs at least one GPU")

    @property
    def num_gpus(self) -> int:
        return sum(self.gpus)

    @property
    def max_gpus_per_host(self) -> int:
        return max(self.gpus)

    @classmethod
    def uniform(cls, hosts: int, gpus_per_host: int, name: str = "") -> ClusterSpec:
        """``hosts`` hosts of ``gpus_per_host`` GPUs, named ``h000``, ``h001``, ..."""
        if hosts < 1 or gpus_per_host < 1:
            raise ClusterSpecError(
                f"need at least 1 host and 1 GPU per host, got {hosts}x{gpus_per_host}"
            )
        width = max(3, len(str(hosts - 1)))
        return cls(
            name or f"{hosts}x{gpus_per_host}",
            tuple(f"h{i:0{width}d}" for i in range(hosts)),
            (gpus_per_host,) * hosts,
        )

    @classmethod
    def from_tiresias(cls, path: Path) -> ClusterSpec:
        """``num_switch,num_node_p_switch,num_gpu_p_node,...``: switches x nodes x GPUs.

        Hosts are named ``s<switch>n<node>`` so that placement order follows the switches.
        """
        try:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            row = rows[0]
            switches = int(row["num_switch"])
            nodes = int(row["num_node_p_switch"])
            gpus = int(row["num_gpu_p_node"])
        except (OSError, IndexError, KeyError, ValueError) as exc:
            raise ClusterSpecError(f"{path}: not a Tiresias cluster spec ({exc})") from None
        if switches < 1 or nodes < 1 or gpus < 1:
            raise ClusterSpecError(f"{path}: sizes must be positive")
        hosts = tuple(f"s{s}n{n:03d}" for s in range(switches) for n in range(nodes))
        return cls(path.stem, hosts, (gpus,) * len(hosts))

    @classmethod
    def parse(cls, name: str, spec_dir: Path | None = None) -> ClusterSpec:
        """``n32g4`` (a spec file in ``spec_dir``, default the shared Tiresias folder),
        ``64x8`` (hosts x GPUs), or a path to a spec CSV."""
        shape = _SHAPE.match(name)
        if shape:
            return cls.uniform(int(shape.group(1)), int(shape.group(2)))
        path = Path(name)
        if path.suffix == ".csv" and path.is_file():
            return cls.from_tiresias(path)
        if _SPEC_NAME.match(name) or name == "cluster_spec":
            folder = spec_dir or traces_dir() / "tiresias"
            spec = folder / f"{name}.csv"
            if not spec.is_file():
                raise ClusterSpecError(f"cluster spec {name!r} not found at {spec}")
            return cls.from_tiresias(spec)
        raise ClusterSpecError(
            f"unknown cluster {name!r}: use a Tiresias spec name (n32g4, n160g8, n256g8, n1g4), "
            "HOSTSxGPUS (64x8) or a spec CSV path"
        )
