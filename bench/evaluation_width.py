"""Width of a trained model's DP held-out accuracy interval: the evaluation's old mechanism (COUNT(*) and
AVG(score) through the query path, its rho split over three noisy parts) against the new one (ONE DP
sum of the scores over a public held-out size, `veil.query.evaluation`), in the same run.

    python bench/evaluation_width.py              # ~5 s on 2 cores
    python bench/evaluation_width.py --seeds 50

Held-out sizes: 300 (sklearn's breast cancer, 569 patients, holding out about half), 114 (the same at
the default holdout 0.2), and a 130-patient site at holdout 0.5 and 0.2 (65 and 26). Per size and
evaluation epsilon (0.5, the default, and 1.0), each seed draws per-patient 0/1 scores of a model
70% accurate (away from 1, so that few intervals are cut at the bound) and releases both ways at the
site's reporting delta 1e-6, 95% intervals. Reported: the mean width of the interval released (the
old one also when it shows no estimate), the share of runs with no estimate (old: "not informative";
new: "too small to evaluate privately", decided from public values before any score is read), the
coverage of the true held-out accuracy, and old width / new width.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from _common import save, table  # noqa: E402

from veil.query import evaluation  # noqa: E402
from veil.query.accounting import rho_for_epsilon  # noqa: E402
from veil.query.prepared import prepare  # noqa: E402
from veil.query.release import run  # noqa: E402
from veil.query.table import Column, Table  # noqa: E402
from veil.sql import parse_sql  # noqa: E402

REPORTING_DELTA = 1e-6
CONFIDENCE = 0.95
SIZES = {"breast cancer, holdout ~0.5": 300, "breast cancer, holdout 0.2": 114,
         "130-patient site, holdout 0.5": 65, "130-patient site, holdout 0.2": 26}
EPSILONS = (0.5, 1.0)
TRUE_ACCURACY = 0.7
Shown = tuple[float | None, float | None, float | None]
"""(estimate, lower, upper) of a release's accuracy; None where it shows none."""


def old(scores: np.ndarray, rho: float) -> Shown:
    """The evaluation as it was: COUNT(*) and AVG(score) through the query path (three noisy parts)."""
    table_ = Table(name="data", privacy_unit="row_id", max_rows_per_unit=1, max_rows=1000,
                   columns={"row_id": Column("row_id", "Int64"),
                            "score": Column("score", "Int32", bounds=(0, 1))})
    prepared = prepare(table_, parse_sql("SELECT COUNT(*) AS n, AVG(score) AS accuracy FROM data"),
                       verified_bound=True, rho=rho, delta=None, confidence=CONFIDENCE, min_threshold=0)
    rows = (pl.DataFrame({"score": scores.astype(np.int32)}).with_row_index("row_id")
            .with_columns(pl.col("row_id").cast(pl.Int64)).lazy())
    row = run(rows, table_, prepared.plan, prepared.certified, prepared.description).rows[0]
    return row["accuracy"], row["accuracy_lower"], row["accuracy_upper"]


def new(scores: np.ndarray, rho: float, epsilon: float) -> Shown:
    """The evaluation now: one DP sum over the public held-out size."""
    ev = evaluation.evaluator("accuracy", len(scores), rho, CONFIDENCE)
    row = evaluation.release(scores, ev, epsilon).rows[0]
    return row["accuracy"], row["accuracy_lower"], row["accuracy_upper"]


def summary(runs: list[Shown], truth: list[float]) -> dict[str, Any]:
    intervals = [(lo, hi) for _, lo, hi in runs if lo is not None and hi is not None]
    covered = [lo <= t <= hi for (_, lo, hi), t in zip(runs, truth) if lo is not None and hi is not None]
    return {"width": float(np.mean([hi - lo for lo, hi in intervals])) if intervals else float("nan"),
            "no_estimate": sum(est is None for est, _, _ in runs) / len(runs),
            "coverage": float(np.mean(covered)) if covered else float("nan")}


def pct(x: float) -> str:
    return "-" if x != x else f"{x:.0%}"


def number(x: Any) -> Any:
    """A width or ratio with 3 digits; '-' where none was released (the new mechanism's 'too small')."""
    return ("-" if x != x else f"{x:.3f}") if isinstance(x, float) else x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    started = time.perf_counter()
    rows, results = [], []
    for where, m in SIZES.items():
        for epsilon in EPSILONS:
            rho = rho_for_epsilon(epsilon, REPORTING_DELTA)
            before, after, truth = [], [], []
            for seed in range(args.seeds):
                scores = (np.random.default_rng(seed).random(m) < TRUE_ACCURACY).astype(np.int32)
                truth.append(float(scores.mean()))
                before.append(old(scores, rho))
                after.append(new(scores, rho, epsilon))
            a, b = summary(before, truth), summary(after, truth)
            ev = evaluation.evaluator("accuracy", m, rho, CONFIDENCE)
            ratio = a["width"] / b["width"] if b["width"] == b["width"] and a["width"] == a["width"] else float("nan")
            rows.append([where, m, epsilon, a["width"], f"{a['no_estimate']:.0%}", b["width"],
                         f"{b['no_estimate']:.0%}", 2 * ev.half_width, f"{pct(a['coverage'])} / {pct(b['coverage'])}",
                         ratio])
            results.append({"where": where, "held_out": m, "epsilon": epsilon, "old": a, "new": b,
                            "new_unclipped_width": 2 * ev.half_width, "new_needed_held_out": ev.needed,
                            "old_over_new": ratio})
    headers = ["site", "held out", "eps", "old width", "old no est.", "new width", "new too small",
               "new +/- x2", "coverage old / new", "old / new"]
    print(table(headers, [[*r[:3], *(number(x) for x in r[3:])] for r in rows]))
    print(f"\n{args.seeds} seeds per row; widths are means of the intervals released; "
          f"'new +/- x2' is the new interval's width before it is cut to [0, 1] (public, data-free); "
          f"{time.perf_counter() - started:.1f} s")
    needed = {e: evaluation.evaluator("accuracy", 300, rho_for_epsilon(e, REPORTING_DELTA), CONFIDENCE).needed
              for e in EPSILONS}
    print("held-out patients needed for an informative interval (new): "
          + ", ".join(f"eps {e:g}: {n}" for e, n in needed.items()))
    print(f"saved {save('evaluation_width', {'seeds': args.seeds, 'results': results})}")


if __name__ == "__main__":
    main()
