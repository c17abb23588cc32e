"""Training throughput: samples/s of DP-SGD against non-private PyTorch on synthetic tabular rows.

One run measures, on the same data, model and batch size:
- non-private: plain PyTorch the usual way: the rows shuffled each epoch and cut into batches of exactly
  `batch` rows, from in-memory tensors (cheaper per step than any Poisson sampling);
- opacus hooks / opacus ghost: Opacus' `PrivacyEngine.make_private` as documented, with its Poisson
  DataLoader over a TensorDataset (per-sample gradients materialized / ghost clipping);
- engine ghost / engine hooks: Veil's `dpsgd.train`, Poisson batches drawn from in-memory tensors
  (its training loop only; the up-front noise calibration is reported apart).
On CUDA it also reports the peak memory PyTorch allocated (`torch.cuda.max_memory_allocated`).
It is self-contained (no bench/_common import) so that it runs on a GPU machine with only the training
dependencies installed. Results go to bench/results/training_throughput_<device>.json.

    python bench/training_throughput.py                       # CPU, 100k rows, batch 512
    python bench/training_throughput.py --device cuda --batch 512 4096
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from veil.executor import dpsgd, models
from veil.models.layout import FeatureLayout
from veil.models.spec import ModelSpec, TrainSpec

RESULTS = Path(__file__).resolve().parent / "results"
NOISE = 1.0  # Opacus modes: a fixed noise multiplier (throughput does not depend on it)
EPSILON = 8.0  # engine modes: the target it calibrates for

warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def synthetic(rows: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features in [-1, 1] and a binary label from a noisy linear rule."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, features, generator=g) * 2 - 1
    w = torch.randn(features, generator=g)
    y = ((x @ w + 0.5 * torch.randn(rows, generator=g)) > 0).long()
    return x, y


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(fn: Callable[[], float | None], device: torch.device) -> tuple[float, int | None]:
    """(seconds, peak CUDA bytes) of fn; fn may return its own seconds (the engine's loop time)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    own = fn()
    sync(device)
    seconds = own if own is not None else time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def make_model(spec: ModelSpec, layout: FeatureLayout, device: torch.device) -> nn.Module:
    return models.build_model(spec, layout).to(device)


def non_private(
    spec: ModelSpec,
    layout: FeatureLayout,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    epochs: int,
    device: torch.device,
) -> None:
    """Plain PyTorch on in-memory tensors, shuffled each epoch and cut into batches of `batch` rows (every row once an epoch)."""
    model = make_model(spec, layout, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    x, y, n = x.to(device), y.to(device), len(x)
    for _ in range(epochs):
        order = torch.randperm(n, device=device)
        for start in range(0, n, batch):
            rows = order[start : start + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[rows]), y[rows]).backward()
            opt.step()


def opacus_loader(
    mode: str,
    spec: ModelSpec,
    layout: FeatureLayout,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    epochs: int,
    device: torch.device,
) -> None:
    """Opacus as documented: make_private with its Poisson DataLoader."""
    model = make_model(spec, layout, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    engine = PrivacyEngine(accountant="rdp")
    loss_fn = nn.CrossEntropyLoss()
    made = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        criterion=loss_fn,
        noise_multiplier=NOISE,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
    )
    if mode == "ghost":
        model, opt, loss_fn, loader = made
    else:
        model, opt, loader = made
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb.to(device)), yb.to(device)).backward()
            opt.step()


def engine(
    mode: str,
    spec: ModelSpec,
    layout: FeatureLayout,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    epochs: int,
    device: torch.device,
) -> float:
    """Veil's engine; returns the seconds of its training loop."""
    hyper = TrainSpec(
        epsilon=EPSILON, delta=1e-6, epochs=epochs, batch_size=batch, learning_rate=0.1, optimizer="sgd"
    )
    out = dpsgd.train(spec, hyper, x, y, layout=layout, device=device, seed=0, grad_sample_mode=mode)
    return out.train_seconds


MODES: dict[str, Callable[..., float | None]] = {
    "non-private": non_private,
    "opacus hooks (DataLoader)": lambda *a: opacus_loader("hooks", *a),
    "opacus ghost (DataLoader)": lambda *a: opacus_loader("ghost", *a),
    "engine hooks (tensors)": lambda *a: engine("hooks", *a),
    "engine ghost (tensors)": lambda *a: engine("ghost", *a),
    "engine book-keeping (tensors)": lambda *a: engine("bk", *a),
}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    cells = [[f"{c:,.1f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=30)
    parser.add_argument("--hidden", default="64,64", help="MLP hidden widths, comma-separated")
    parser.add_argument("--batch", type=int, nargs="+", default=[512], help="expected batch sizes")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode; the fastest counts")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    print(
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
    )
    spec = ModelSpec.mlp([int(h) for h in args.hidden.split(",")])
    layout = FeatureLayout.numeric_only(args.features)
    x, y = synthetic(args.rows, args.features, args.seed)
    samples = args.rows * args.epochs
    results: dict[str, Any] = {}
    for batch in args.batch:
        started = time.perf_counter()
        dpsgd.calibrate(EPSILON, 1e-6, batch / args.rows, args.epochs * round(args.rows / batch))
        calibration = time.perf_counter() - started  # cached from here on: the engine rows time training only
        rows, per_mode = [], {}
        for name, fn in MODES.items():
            runs = [
                measured(lambda fn=fn, b=batch: fn(spec, layout, x, y, b, args.epochs, device), device)
                for _ in range(args.repeats)
            ]
            seconds = min(s for s, _ in runs)
            peak = max((p for _, p in runs if p is not None), default=None)
            per_mode[name] = {"seconds": seconds, "samples_per_s": samples / seconds, "peak_bytes": peak}
        base = per_mode["non-private"]["samples_per_s"]
        for name, r in per_mode.items():
            r["slowdown_vs_non_private"] = base / r["samples_per_s"]
            rows.append(
                [
                    name,
                    r["samples_per_s"] / 1e3,
                    f"{r['slowdown_vs_non_private']:.1f}x",
                    "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f}",
                ]
            )
        results[str(batch)] = {"modes": per_mode, "calibration_s": calibration}
        print(
            f"\n{args.rows:,} rows x {args.features} features, MLP {args.hidden}, batch {batch}, "
            f"{args.epochs} epoch(s), {args.device}; engine noise calibration (PRV, once per job) "
            f"{calibration:.1f} s"
        )
        print(table(["mode", "k samples/s", "slower than non-private", "peak CUDA MiB"], rows), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"training_throughput_{args.device}.json"
    path.write_text(
        json.dumps({"args": vars(args), "torch": torch.__version__, "results": results}, indent=2)
    )
    print(f"\nresults in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
