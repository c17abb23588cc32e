"""The executor's training-job path end to end, against non-private PyTorch in the same run.

A site holds `--rows` patients with 30 bounded features and a binary label (Parquet, one row per
patient). A researcher's job goes over HTTP to a real executor (`POST /jobs`, polled until done): the
policy check and reservation, the read and encoding of the data, the DP count of training rows, the
noise calibration, DP-SGD (ghost clipping, Poisson batches from tensors), the DP evaluation and the
settlement. The baseline trains the same MLP for the same epochs on the same rows with plain PyTorch.
Both are reported as training rows x epochs / wall seconds; the job runs twice on the same executor (the first
also loads the training stack and calibrates the noise, the second finds both done).

    python bench/training_job.py [--rows 100000] [--epochs 3] [--batch 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ratio, save, table, workdir  # noqa: E402
from training_throughput import non_private  # noqa: E402

from veil.executor import ledger  # noqa: E402
from veil.executor.auth import create_token  # noqa: E402
from veil.executor.catalog import load_catalog  # noqa: E402
from veil.executor.store import open_store, write  # noqa: E402
from veil.executor.synth import ColumnSpec, dataset_table, write_site_toml  # noqa: E402
from veil.kernel.client import SiteClient  # noqa: E402
from veil.local import LocalExecutor  # noqa: E402
from veil.models.layout import FeatureLayout  # noqa: E402
from veil.models.spec import ModelSpec, TrainSpec  # noqa: E402
from veil.wire import TrainRequest  # noqa: E402

FEATURES = 30


def write_site(root: Path, rows: int, seed: int) -> Path:
    """A one-dataset site: `rows` patients, features x0..x29 in [-1, 1], label from a noisy linear rule."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (rows, FEATURES))
    y = (x @ rng.normal(size=FEATURES) + 0.5 * rng.normal(size=rows)) > 0
    frame = pl.DataFrame(x, schema=[f"x{i}" for i in range(FEATURES)]).with_columns(
        pl.Series("label", np.where(y, "yes", "no")), pl.int_range(1, rows + 1, dtype=pl.Int64).alias("patient_id"))
    frame.write_parquet(root / "cohort.parquet")
    columns = [ColumnSpec("patient_id", "Int64", "patient"), ColumnSpec("label", "String", "label", categories=["no", "yes"])]
    columns += [ColumnSpec(f"x{i}", "Float64", "feature", bounds=(-1.0, 1.0)) for i in range(FEATURES)]
    write_site_toml(root / "site.toml", {"name": "bench", "database": "sqlite:///veil.db", "reporting_delta": 1e-6},
                    {"cohort": dataset_table({"path": "cohort.parquet", "level": "L2", "privacy_unit": "patient_id",
                                              "max_rows_per_unit": 1, "max_rows": 10 * rows,
                                              "lifetime_epsilon": 100.0}, columns)})
    return root / "site.toml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--hidden", default="64,64")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    root = workdir(args.keep, "bench-job")
    config = write_site(root, args.rows, seed=7)
    engine = open_store(f"sqlite:///{root / 'veil.db'}")
    catalog = load_catalog(config)
    token = create_token(engine, "bench", "researcher", "bench")
    ledger.sync_caps(engine, catalog)
    with write(engine) as conn:
        ledger.set_grant(conn, catalog, "bench", catalog.dataset("cohort"), 50.0, by="bench", delta=1e-3,
                         uses=("query", "training"))
    spec = ModelSpec.mlp([int(w) for w in args.hidden.split(",")])
    train_rows = round(args.rows * 0.8)
    hyper = TrainSpec(epsilon=8.0, delta=1e-6, epochs=args.epochs, batch_size=args.batch, learning_rate=0.5)

    layout = FeatureLayout.numeric_only(FEATURES)
    x, y = torch.rand(train_rows, FEATURES) * 2 - 1, torch.randint(0, 2, (train_rows,))
    started = time.perf_counter()
    non_private(spec, layout, x, y, args.batch, args.epochs, torch.device("cpu"))
    baseline = train_rows * args.epochs / (time.perf_counter() - started)

    walls, jobs = [], []
    with LocalExecutor(config, log=root / "executor.log") as executor, SiteClient("bench", executor.url, token) as site:
        request = TrainRequest(dataset="cohort", features=[f"x{i}" for i in range(FEATURES)], label="label",
                               model=spec, train=hyper)
        for _ in range(2):  # a fresh executor's first job, then the same job again
            started = time.perf_counter()
            job = site.train(request)
            while job.state == "running":
                time.sleep(0.05)
                job = site.job(job.id)
            walls.append(time.perf_counter() - started)
            jobs.append(job)
            assert job.state == "done", job.error
    first, second = (train_rows * args.epochs / w for w in walls)
    rows = [["non-private PyTorch (training loop)", f"{baseline:,.0f}", "1.0x", ""],
            ["job path, a fresh executor's first job", f"{first:,.0f}", f"{ratio(baseline, first):.1f}x", f"{walls[0]:.1f}"],
            ["job path, the same job again", f"{second:,.0f}", f"{ratio(baseline, second):.1f}x", f"{walls[1]:.1f}"]]
    print(f"{args.rows:,} patients ({train_rows:,} trained on), MLP {args.hidden}, batch {args.batch}, "
          f"{args.epochs} epochs, epsilon {jobs[0].epsilon:.3g}. The first job also loads the training stack "
          "(PyTorch, Opacus) into the executor and calibrates the noise; the second finds both done.")
    print(table(["mode", "samples/s", "slowdown", "job wall s"], rows))
    save("training_job", {"rows": args.rows, "epochs": args.epochs, "batch": args.batch, "hidden": args.hidden,
                          "baseline_samples_per_s": baseline, "job_samples_per_s": [first, second],
                          "job_wall_s": walls, "epsilon": [j.epsilon for j in jobs]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
