"""Train a small MLP on synthetic data, taking GPUs from the Ganglion SDK every epoch.

    python tools/examples/train_sdk.py                   # 10 epochs, 2 of GPUs 0-3 per epoch
    python tools/examples/train_sdk.py --epochs 3 --backend sim

Exactly the SDK usage of the project's issue: ``Scheduler(gpus=[...])``, ``allocate(gpus=2)``
at the start of every epoch (blocks until granted; gives back the previous epoch's GPUs), and
``update({...})`` with the epoch's throughput, step time, loss and accuracy. The model trains
on the CPU unless the GPUs are real and torch has CUDA. Run several copies at once: they share
the GPUs without overlap. With ``GANGLION_CONTROLLER`` set the same script asks the cluster.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ganglion import Lease, Scheduler


@dataclass(frozen=True)
class Args:
    """Command-line settings."""

    epochs: int = 10
    """Training epochs; one allocation each."""
    gpus: tuple[int, ...] = (0, 1, 2, 3)
    """GPU ids the scheduler may hand out."""
    gpus_per_epoch: int = 2
    """GPUs asked at the start of each epoch."""
    samples: int = 4096
    """Synthetic training samples (a held-out set of a quarter of that is drawn too)."""
    features: int = 32
    """Input features."""
    batch_size: int = 128
    """Samples per step."""
    lr: float = 3e-3
    """Adam learning rate."""
    seed: int = 0
    """Seeds the data, the model and the shuffling."""
    backend: str = "auto"
    """GPU discovery: auto (NVML, else the listed ids as simulated GPUs), nvml or sim."""
    state_dir: Path | None = None
    """The SDK's state directory (default: $XDG_RUNTIME_DIR/ganglion)."""
    timeout: float | None = None
    """Seconds to wait for GPUs each epoch (default: forever)."""


def parse_args(argv: list[str] | None = None) -> Args:
    d = Args()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--gpus", type=int, nargs="+", default=list(d.gpus))
    p.add_argument("--gpus-per-epoch", type=int, default=d.gpus_per_epoch)
    p.add_argument("--samples", type=int, default=d.samples)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backend", choices=["auto", "nvml", "sim"], default=d.backend)
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=None)
    a = p.parse_args(argv)
    return Args(
        epochs=a.epochs,
        gpus=tuple(a.gpus),
        gpus_per_epoch=a.gpus_per_epoch,
        samples=a.samples,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        backend=a.backend,
        state_dir=a.state_dir,
        timeout=a.timeout,
    )


def make_data(args: Args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels from a fixed random "teacher" network, so the task is learnable but not linear."""
    g = torch.Generator().manual_seed(args.seed)
    n = args.samples + args.samples // 4
    x = torch.randn(n, args.features, generator=g)
    w1 = torch.randn(args.features, 16, generator=g)
    w2 = torch.randn(16, 4, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return x[: args.samples], y[: args.samples], x[args.samples :], y[args.samples :]


class Mlp(nn.Module):
    def __init__(self, features: int, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def device_for(lease: Lease) -> torch.device:
    """The first granted GPU when it is real and torch has CUDA, else the CPU."""
    if lease.simulated is False and torch.cuda.is_available():
        return torch.device(f"cuda:{lease[0]}")
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = make_data(args)
    model = Mlp(args.features)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(args.seed + 1)

    with Scheduler(
        gpus=list(args.gpus), backend=args.backend, state_dir=args.state_dir
    ) as scheduler:
        kind = "simulated" if scheduler.simulated else "real"
        print(f"{scheduler}: {kind} GPUs, job {scheduler.job_id}", flush=True)
        for epoch in range(args.epochs):
            gpus = scheduler.allocate(gpus=args.gpus_per_epoch, timeout=args.timeout)
            device = device_for(gpus)
            model.to(device)
            model.train()
            t0 = time.perf_counter()
            total, steps = 0.0, 0
            for idx in torch.randperm(args.samples, generator=order).split(args.batch_size):
                xb, yb = x_train[idx].to(device), y_train[idx].to(device)
                optimizer.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                optimizer.step()
                total += loss.item()
                steps += 1
            elapsed = time.perf_counter() - t0
            model.eval()
            with torch.no_grad():
                pred = model(x_test.to(device)).argmax(dim=1).cpu()
            accuracy = (pred == y_test).float().mean().item()
            metrics = {
                "throughput": args.samples / elapsed,
                "step_time_s": elapsed / steps,
                "loss": total / steps,
                "accuracy": accuracy,
            }
            scheduler.update(metrics)
            print(
                f"epoch {epoch} GPUs {list(gpus)} ({gpus.visible_devices}) on {device}: "
                f"loss {metrics['loss']:.4f} accuracy {accuracy:.3f} "
                f"{metrics['throughput']:.0f} samples/s",
                flush=True,
            )
        where = scheduler.metrics_file or scheduler.config.nats_url
        print(f"metrics of {args.epochs} epochs sent to {where}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
