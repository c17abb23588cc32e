"""Federated DP-SGD on Flower against one site holding all the data, and against non-private training.

scikit-learn's breast-cancer data (569 patients, bounds from its documentation): per split, 20% held out
(stratified) for scoring, the rest split 45/33/22 across three sites. For each epsilon: logistic
regression trained by DP-SGD at one site with all training rows (20 epochs, batch 128, SGD lr 2), and
federated (Flower's simulation engine, FedAvg weighted by public row counts, 5 rounds x 4 local epochs at
sampling rate 0.28 at every site, each site at that epsilon for the whole study); non-private is
scikit-learn's LogisticRegression. Wall times: one federated study (3 sites x 5 rounds, simulation
included) against one DP-SGD job on the same rows for the same epochs at one site.

    python bench/federated_utility.py [--splits 5]   (needs flwr[simulation]; see executor/federated.py)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save, table  # noqa: E402

from veil.executor import dpsgd, features, federated  # noqa: E402
from veil.executor.public_data import CLASSES, LABEL, breast_cancer_frame  # noqa: E402
from veil.federation.codec import StudyPlan  # noqa: E402
from veil.models.spec import ModelSpec, TrainSpec  # noqa: E402

EPSILONS = (1.0, 2.0, 8.0)
SITES, SHARES = ("north", "central", "valley"), (0.45, 0.33, 0.22)
SINGLE = {"delta": 1e-5, "epochs": 20, "batch_size": 128, "learning_rate": 2.0, "optimizer": "sgd"}


def plan(epsilon: float) -> StudyPlan:
    """The study: 5 rounds x 4 local epochs (20 epochs in all, as the single-site job), rate 0.28."""
    train = TrainSpec(
        epsilon=epsilon, delta=1e-5, epochs=4, batch_size=128, learning_rate=2.0, optimizer="sgd"
    )
    return StudyPlan(model=ModelSpec.logistic(), train=train, rounds=5, sample_rate=0.28)


def main() -> None:
    """Print the accuracy table and the wall times; save them to bench/results/federated_utility.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=5)
    args = parser.parse_args()
    frame, columns = breast_cancer_frame()
    data = features.encode(
        frame, label=LABEL, numeric={c.name: c.bounds for c in columns if c.bounds}, classes=CLASSES
    )
    acc: dict[str, list[float]] = {"non-private": []}
    site_eps: dict[float, list[dict[str, float]]] = {e: [] for e in EPSILONS}
    seconds: dict[str, list[float]] = {"federated": [], "single": []}
    for split in range(args.splits):
        idx = np.arange(len(data.y))
        train, test = train_test_split(idx, test_size=0.2, stratify=data.y.numpy(), random_state=split)
        x_test, y_test = data.x[test], data.y[test]
        base = LogisticRegression(max_iter=2000).fit(data.x[train].numpy(), data.y[train].numpy())
        acc["non-private"].append(base.score(x_test.numpy(), y_test.numpy()))
        order = np.random.default_rng(split).permutation(train)
        cuts = (np.cumsum([0.0, *SHARES]) * len(order)).round().astype(int)
        sites = [
            federated.SiteData(
                name,
                data.x[order[a:b]],
                data.y[order[a:b]],
                data.layout,
                public_rows=int(b - a),
                seed=100 * split + i,
            )
            for i, (name, a, b) in enumerate(zip(SITES, cuts, cuts[1:]))
        ]

        def score(
            module: torch.nn.Module, x: torch.Tensor = x_test, y: torch.Tensor = y_test
        ) -> dict[str, float]:
            with torch.no_grad():
                return {"accuracy": float((module(x).argmax(dim=1) == y).float().mean())}

        for eps in EPSILONS:
            started = time.perf_counter()
            out = dpsgd.train(
                ModelSpec.logistic(),
                {**SINGLE, "epsilon": eps},
                data.x[train],
                data.y[train],
                x_test,
                y_test,
                device="cpu",
                seed=split,
            )
            seconds["single"].append(time.perf_counter() - started)
            assert out.evaluation is not None and out.evaluation.correct is not None
            acc.setdefault(f"single-site DP, eps {eps:g}", []).append(
                out.evaluation.correct / out.evaluation.n
            )
            started = time.perf_counter()
            result = federated.simulate(plan(eps), sites, evaluate=score, seed=split)
            seconds["federated"].append(time.perf_counter() - started)
            acc.setdefault(f"federated DP, eps {eps:g}", []).append(result.evaluation[-1]["accuracy"])
            site_eps[eps].append(result.site_epsilon)
            print(
                f"split {split} eps {eps:g}: single {acc[f'single-site DP, eps {eps:g}'][-1]:.4f} "
                f"federated {result.evaluation[-1]['accuracy']:.4f} {result.site_epsilon}",
                flush=True,
            )
    rows = [[k, f"{100 * np.mean(v):.1f}", f"{100 * np.std(v):.1f}"] for k, v in acc.items()]
    print(table(["model", f"accuracy % (mean of {args.splits} splits)", "sd"], rows))
    worst = {f"{e:g}": {s: max(r[s] for r in site_eps[e]) for s in SITES} for e in EPSILONS}
    print("largest per-site epsilon reported:", worst)
    print(
        "wall s: federated study (3 sites x 5 rounds, Ray simulation) "
        f"{np.median(seconds['federated']):.1f}, "
        f"single site, same rows and epochs {np.median(seconds['single']):.1f}"
    )
    save(
        "federated_utility",
        {"accuracy": acc, "site_epsilon": {f"{e:g}": site_eps[e] for e in EPSILONS}, "seconds": seconds},
    )


if __name__ == "__main__":
    main()
