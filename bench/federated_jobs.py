"""Federated DP-SGD through real executors against the same training at one site, in one run.

Three executors on loopback hold scikit-learn's breast-cancer patients split 45/33/22%; the researcher's
`Study.train` joins each site and coordinates R rounds of FedAvg over HTTP (Flower's strategy over an
ExecutorGrid), each site training `epochs` epochs per round. The baseline is one executor holding all
569 patients, training one job of R x epochs epochs on the same model: the same samples in total. Both
are wall time end to end, as the researcher sees it (joins, rounds, DP evaluation, settlement), measured
twice on the same executors: first on fresh ones (each loads PyTorch and Opacus and calibrates the noise
for its first job), then again (a hospital's long-running executor). Beside the wall time, the CPU seconds
each executor (all its processes) and the researcher's process used: on this 2-core machine three sites and
the coordinator share two cores, where hospitals each have their own machine.

    python bench/federated_jobs.py [--rounds 5] [--epochs 2] [--epsilon 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_by_role, ratio, save, table, timed, workdir  # noqa: E402

from veil.executor import ledger  # noqa: E402
from veil.executor.auth import create_token  # noqa: E402
from veil.executor.catalog import load_catalog  # noqa: E402
from veil.executor.public_data import DATASET, LABEL, breast_cancer_frame, write_sites  # noqa: E402
from veil.executor.store import open_store, write  # noqa: E402
from veil.kernel.sdk import Site  # noqa: E402
from veil.kernel.study import Study  # noqa: E402
from veil.local import LocalExecutor  # noqa: E402

warnings.filterwarnings("ignore", message="Full backward hook is firing")
T = TypeVar("T")
FEATURES = [c.name for c in breast_cancer_frame()[1] if c.bounds is not None]


def start(config: Path, root: Path) -> tuple[LocalExecutor, str]:
    """An executor for `config` with a researcher token of project 'bench', approved for training."""
    catalog = load_catalog(config)
    engine = open_store(catalog.database_url)
    token = create_token(engine, "bench", "researcher", "bench")
    ledger.sync_caps(engine, catalog)
    with write(engine) as conn:
        ledger.set_grant(conn, catalog, "bench", catalog.dataset(DATASET), 12.0, by="bench", delta=1e-3,
                         uses=("query", "training"))
    engine.dispose()
    return LocalExecutor(config, log=root / f"{catalog.site}.log").start(), token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--epsilon", type=float, default=2.0)
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    root = workdir(args.keep, "bench-federated-jobs")
    train = {"delta": 1e-5, "batch_size": 24, "learning_rate": 2.0, "evaluation_epsilon": 1.0, "progress": False}
    executors = []
    try:
        solo_executor, solo_token = start(write_sites(root / "solo", sites=("solo",), shares=(1.0,))[0], root)
        executors.append(solo_executor)
        solo = Site("solo", solo_executor.url, solo_token)
        sites = {}
        for config in write_sites(root / "three"):
            executor, token = start(config, root)
            executors.append(executor)
            name = load_catalog(config).site
            sites[name] = Site(name, executor.url, token)
        study = Study("bench", "bench", sites, [])
        rows, figures = [], {}
        for when in ("fresh executors", "again"):
            solo_wall, alone, solo_cpu = measured(lambda: solo.train(
                DATASET, FEATURES, LABEL, args.epsilon, epochs=args.rounds * args.epochs, **train), executors[:1])
            fed_wall, fed, fed_cpu = measured(lambda: study.train(
                DATASET, FEATURES, LABEL, epsilon=args.epsilon, rounds=args.rounds, epochs=args.epochs, **train),
                executors[1:])
            rows += [[f"{when}: one site, all 569 patients, one job", f"{solo_wall:.1f}", "1.0x",
                      f"{solo_cpu[0]:.2f}", f"{solo_cpu[-1]:.2f}", f"{alone.epsilon:.3g}"],
                     [f"{when}: 3 sites x {args.rounds} rounds (Study.train, HTTP)", f"{fed_wall:.1f}",
                      f"{ratio(fed_wall, solo_wall):.1f}x", " / ".join(f"{c:.2f}" for c in fed_cpu[:-1]),
                      f"{fed_cpu[-1]:.2f}", ", ".join(f"{e:.3g}" for e in fed.epsilon.values())]]
            figures[when] = {"solo_wall_s": solo_wall, "federated_wall_s": fed_wall, "site_epsilon": fed.epsilon,
                             "solo_epsilon": alone.epsilon, "solo_cpu_s": solo_cpu, "federated_cpu_s": fed_cpu}
    finally:
        for executor in executors:
            executor.stop()
    print(f"breast cancer, logistic regression, {args.rounds} rounds x {args.epochs} epochs, epsilon {args.epsilon}")
    print(table(["run", "wall s", "vs one site", "executor CPU s (per site)", "researcher CPU s",
                 "epsilon (per site)"], rows))
    save("federated_jobs", {"rounds": args.rounds, "epochs": args.epochs, "epsilon": args.epsilon, **figures})
    return 0


def measured(call: Callable[[], T], executors: list[LocalExecutor]) -> tuple[float, T, list[float]]:
    """Wall seconds of `call()`, its result, and the CPU seconds each of `executors` (its process tree) and
    then this process (the researcher's side) used meanwhile."""
    def cpu() -> list[float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return [sum(cpu_by_role(_pid(e)).values()) for e in executors] + [own.ru_utime + own.ru_stime]

    before = cpu()
    wall, result = timed(call)
    return wall, result, [b - a for a, b in zip(before, cpu())]


def _pid(executor: LocalExecutor) -> int:
    assert executor.process is not None, "a started executor"
    return executor.process.pid


if __name__ == "__main__":
    sys.exit(main())
