"""Standing weekly counts at one total budget: the binary tree mechanism (`veil.query.continual`) against
releasing each week alone (the naive split) and re-releasing the whole series every week, in the same run.

    python bench/continual.py              # ~30 s on 2 cores
    python bench/continual.py --runs 2000

T = 52 weekly windows, epsilon 1 at delta 1e-6 for the WHOLE horizon (converted to rho with
`accounting.rho_for_epsilon`), for a per-patient bound k (the most weeks one patient counts in) of 1, 4
and 52. The weekly counts are synthetic (Poisson, 40 a week, rising to 120 from week 30; the noise does
not depend on them). Per mechanism, over all weeks and runs, as released when each week closes: the RMSE
and the 95% quantile of |error| of the window counts and the running totals, the stated 95% half-width
(OpenDP's accuracy helper; the mean over weeks for running totals) and how often it covers the error,
and the RMSE over the naive split's (each week alone at rho / 52: one-off weekly queries from a split
budget). "split rho/k" is the split that uses the bound k (each week at rho / k).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import save, table  # noqa: E402

from veil.query import continual  # noqa: E402
from veil.query.accounting import rho_for_epsilon  # noqa: E402

HORIZON = 52
EPSILON, DELTA = 1.0, 1e-6
BOUNDS = (1, 4, 52)
WEEKS_SHOWN = (1, 13, 26, 39, 52)


def weekly_counts(runs: int, seed: int = 0) -> np.ndarray:
    """Synthetic weekly counts (runs x 52): Poisson, mean 40, rising linearly to 120 from week 30."""
    weeks = np.arange(HORIZON)
    mean = 40.0 + np.clip(weeks - 29, 0, None) * (80.0 / (HORIZON - 30))
    return np.random.default_rng(seed).poisson(mean, size=(runs, HORIZON))


def errors(series: continual.Series, counts: np.ndarray) -> dict[str, Any]:
    """Empirical and stated error of the window counts and running totals of one mechanism."""
    out: dict[str, Any] = {}
    for what, released, truth, stated in (("window", series.windows, counts, series.window_accuracy),
                                          ("total", series.totals, counts.cumsum(axis=1), series.total_accuracy)):
        err = np.abs(released - truth)
        out[what] = {"rmse": float(np.sqrt(np.mean(err**2))), "p95": float(np.quantile(err, 0.95)),
                     "stated": float(np.mean(stated)), "coverage": float(np.mean(err < stated)),
                     "rmse_by_week": np.sqrt(np.mean(err**2, axis=0)).tolist()}
    return out


def mechanisms(k: int, rho: float, counts: np.ndarray) -> dict[str, tuple[float, continual.Series]]:
    """(certified rho, simulated series) per mechanism, all at the same total `rho`."""
    tree, naive = continual.plan_counter(HORIZON, k, rho), continual.plan_split(HORIZON, rho)
    split_k, again = continual.plan_split(HORIZON, rho, k), continual.plan_rerelease(HORIZON, k, rho)
    return {"tree": (tree.rho, continual.simulate(tree, counts)),
            "split rho/52 (naive)": (naive.rho, continual.simulate(naive, counts)),
            "split rho/k": (split_k.rho, continual.simulate(split_k, counts)),
            "re-release": (again.rho, continual.simulate_rerelease(again, counts))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    started = time.perf_counter()
    rho = rho_for_epsilon(EPSILON, DELTA)
    counts = weekly_counts(args.runs)
    rows: dict[str, list[list[Any]]] = {"window": [], "total": []}
    by_week, results = [], []
    for k in BOUNDS:
        measured = {name: (certified, errors(series, counts)) for name, (certified, series)
                    in mechanisms(k, rho, counts).items()}
        naive = measured["split rho/52 (naive)"][1]
        for name, (certified, err) in measured.items():
            for what in rows:
                e = err[what]
                rows[what].append([k, name, f"{certified:.5f}", e["rmse"], e["p95"], e["stated"],
                                   f"{e['coverage']:.1%}", e["rmse"] / naive[what]["rmse"]])
            by_week.append([k, name, *(err["total"]["rmse_by_week"][w - 1] for w in WEEKS_SHOWN)])
            results.append({"k": k, "mechanism": name, "rho": certified, **err})
    headers = ["k", "mechanism", "rho", "RMSE", "p95 |err|", "stated +/-95%", "covered", "RMSE / naive"]
    for what, title in (("window", "weekly counts"), ("total", "running totals")):
        print(f"\n{title} (T={HORIZON}, epsilon {EPSILON:g} at delta {DELTA:g} = rho {rho:.5f} for the whole horizon)")
        print(table(headers, [[*r[:3], *(f"{x:.1f}" for x in r[3:6]), r[6], f"{r[7]:.2f}"] for r in rows[what]]))
    print("\nrunning totals, RMSE by week")
    print(table(["k", "mechanism", *(f"week {w}" for w in WEEKS_SHOWN)],
                [[*r[:2], *(f"{x:.1f}" for x in r[2:])] for r in by_week]))
    print(f"\n{args.runs} runs x {HORIZON} weeks per mechanism; 'stated' is OpenDP's accuracy helper (discrete "
          f"Gaussian at sqrt(nodes) x scale; re-release: Gaussian at the weighted mean's sd); "
          f"{time.perf_counter() - started:.1f} s")
    print(f"saved {save('continual', {'runs': args.runs, 'rho': rho, 'results': results})}")


if __name__ == "__main__":
    main()
