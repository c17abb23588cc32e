"""A 2-round federated study on Flower's deployment runtime against the same study through the executors.

Three executors on loopback hold scikit-learn's breast-cancer patients split 45/33/22% (`write_sites`).
(a) The researcher's `Study.train` joins each site and coordinates the rounds over HTTP (Flower's
strategy over an ExecutorGrid). (b) The same study on Flower's deployment runtime: a SuperLink, one
SuperNode per site beside its executor (`veil executor supernode`), each site joined over HTTP, the
Flower App submitted with `flwr run`, and the researcher handing back the global model (`finish_job`,
which runs the site's DP evaluation and settles), as in tests/test_flower_deployment.py. Both walls
count the joins, the rounds and the settlement; (b)'s SuperNodes are started (and timed) before it,
as a site runs its SuperNode beside its executor for good.

The phases of (b) are timestamped as the lines appear in the SuperNodes' logs and in `flwr run
--stream`'s output (the ServerApp's log), read as they are written.

    python bench/flower_deployment.py [--rounds 2] [--epochs 2] [--epsilon 2]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_quiet, ratio, save, table, workdir  # noqa: E402
from federated_jobs import start  # noqa: E402

from veil.executor.catalog import load_catalog  # noqa: E402
from veil.executor.public_data import DATASET, LABEL, breast_cancer_frame, write_sites  # noqa: E402
from veil.kernel.client import SiteClient  # noqa: E402
from veil.kernel.sdk import Site, train_request  # noqa: E402
from veil.kernel.study import Study  # noqa: E402
from veil.local import LocalExecutor, free_port, local_superlink, stop_group  # noqa: E402
from veil.wire import Federation  # noqa: E402

warnings.filterwarnings("ignore", message="Full backward hook is firing")
FEATURES = [c.name for c in breast_cancer_frame()[1] if c.bounds is not None]
BIN = Path(sys.executable).parent


class Tail:
    """Lines of a log file (or a pipe) with the time each was first read, relative to `t0`."""

    def __init__(self, name: str, t0: float, path: Path | None = None, stream: IO[str] | None = None) -> None:
        self.name, self.t0, self.path, self.stream = name, t0, path, stream
        self.lines: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.stream is not None:
            for line in self.stream:
                self.lines.append((time.perf_counter() - self.t0, line.rstrip()))
            return
        assert self.path is not None
        while not self.path.exists() and not self.stop.is_set():
            time.sleep(0.05)
        with self.path.open() as f:
            while True:
                line = f.readline()
                if line:
                    self.lines.append((time.perf_counter() - self.t0, line.rstrip()))
                elif self.stop.is_set():
                    return
                else:
                    time.sleep(0.05)

    def first(self, pattern: str, after: float = -1.0) -> float | None:
        return next((t for t, line in self.lines if t > after and re.search(pattern, line)), None)

    def all(self, pattern: str) -> list[float]:
        return [t for t, line in self.lines if re.search(pattern, line)]


def deployment_study(root: Path, sites: dict[str, tuple[LocalExecutor, str, Path]], args: argparse.Namespace,
                     train: dict[str, Any]) -> dict[str, Any]:
    """(b): SuperLink, SuperNodes, joins, `flwr run`, settlement; the walls and the phases' timestamps."""
    processes: list[subprocess.Popen[Any]] = []
    tails: dict[str, Tail] = {}
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        env, fleet, superlink = local_superlink(root / "flwr", root / "superlink.log")
        processes.append(superlink)
        out["superlink_ready_s"] = time.perf_counter() - t0
        for name, (_, _, config) in sites.items():
            path = root / f"supernode-{name}.log"
            tails[name] = Tail(name, t0, path=path)
            with path.open("w") as f:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "veil.cli", "executor", "supernode", "--site-config", str(config),
                     "--superlink", f"127.0.0.1:{fleet}", "--clientappio", f"127.0.0.1:{free_port()}", "--insecure",
                     *([] if args.in_process else ["--executor-url", sites[name][0].url])],
                    env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 120
        while any(t.first(r"SuperNode ID") is None for t in tails.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("the SuperNodes did not register within 120 s")
            time.sleep(0.05)
        out["supernodes_ready_s"] = max(t.first(r"SuperNode ID") or 0.0 for t in tails.values())
        time.sleep(3.5)  # a SuperNode asks for messages every 3 s: let each reach its idle loop, as a warm site is

        started = time.perf_counter()
        s0 = started - t0
        request = train_request(DATASET, FEATURES, LABEL, args.epsilon, train["delta"], None, args.epochs,
                                train["batch_size"], train["learning_rate"], "sgd", 1.0, 0.2,
                                train["evaluation_epsilon"], federated=Federation(study="deployed", rounds=args.rounds))
        clients = {name: SiteClient(name, executor.url, token) for name, (executor, token, _) in sites.items()}
        jobs = {name: c.train(request) for name, c in clients.items()}
        joined = time.perf_counter() - t0
        layout = next(iter(jobs.values())).layout
        assert layout is not None
        weights_path = root / "global.safetensors"
        overrides = root / "run.toml"
        overrides.write_text("\n".join([
            f"jobs = '{json.dumps({name: job.id for name, job in jobs.items()})}'",
            f"model = '{request.model.model_dump_json()}'", f"layout = '{layout.model_dump_json()}'",
            f"rounds = {args.rounds}", f"delta = {train['delta']}", f"out = '{weights_path}'"]) + "\n")
        flwr = str(BIN / "flwr")
        run = subprocess.Popen([flwr, "run", str(Path(__file__).resolve().parent.parent / "executor" / "flower_app"),
                                "local", "--stream", "--run-config", str(overrides)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert run.stdout is not None
        tails["flwr run"] = Tail("flwr run", t0, stream=run.stdout)
        run.wait(timeout=600)
        tails["flwr run"].thread.join(timeout=5)
        stream_ended = time.perf_counter() - t0
        text_ = "\n".join(line for _, line in tails["flwr run"].lines)
        run_id = re.search(r"Successfully started run (\d+)", text_)
        if run.returncode != 0 or run_id is None:
            raise RuntimeError(f"flwr run failed:\n{text_[-3000:]}")
        status = ""
        while not status.startswith("finished"):
            listed = subprocess.run([flwr, "ls", "local", "--run-id", run_id.group(1), "--format", "json"],
                                    env=env, capture_output=True, text=True)
            status = json.loads(listed.stdout)["runs"][0]["status"]
            if not status.startswith("finished"):
                time.sleep(0.2)
        finished = time.perf_counter() - t0
        if status != "finished:completed":
            raise RuntimeError(f"the run ended {status}:\n{text_[-3000:]}")
        weights = weights_path.read_bytes()
        done = {name: c.finish_job(jobs[name].id, weights) for name, c in clients.items()}
        settled = time.perf_counter() - t0
        summary = json.loads(weights_path.with_name(weights_path.name + ".json").read_text())
        run_tail = tails["flwr run"]
        out.update({
            "study_wall_s": settled - s0,
            "phases_s_from_study_start": {
                "sites_joined": joined - s0,
                "run_submitted": (run_tail.first(r"Successfully started run") or 0.0) - s0,
                "serverapp_started (first ServerApp log line)": (run_tail.first(r"Starting|FedAvg|\[ROUND") or 0.0) - s0,
                **{f"server: round {i + 1} sent": t - s0 for i, t in enumerate(run_tail.all(r"configure_train"))},
                **{f"server: round {i + 1} replies in": t - s0
                   for i, t in enumerate(run_tail.all(r"aggregate_train"))},
                "flwr run --stream returned": stream_ended - s0,
                "run finished (flwr ls)": finished - s0,
                "settled (finish_job x3)": settled - s0,
            },
            "supernode_s_from_study_start": {
                name: {"received": [t - s0 for t in tail.all(r"Receiving: train message")],
                       "clientapp": [t - s0 for t in tail.all(r"Start `flwr-clientapp` process")],
                       "sent": [t - s0 for t in tail.all(r"Sending: train message")]}
                for name, tail in tails.items() if name != "flwr run"},
            "coordinator_seconds": summary["seconds"],
            "coordinator_round_ended_s": summary.get("round_ended_s"),
            "site_epsilon": summary["site_epsilon"],
            "states": {name: j.state for name, j in done.items()},
            "serverapp_log": [f"{t - s0:7.2f} {line}" for t, line in run_tail.lines],
        })
        return out
    finally:
        for tail in tails.values():
            tail.stop.set()
        for process in reversed(processes):
            stop_group(process, timeout=20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--epsilon", type=float, default=2.0)
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--in-process", action="store_true",
                        help="SuperNodes without --executor-url: each round trains in the ClientApp's own process")
    parser.add_argument("--log", action="store_true", help="print the ServerApp's log with timestamps")
    args = parser.parse_args(argv)
    load_before = check_quiet("before")
    root = workdir(args.keep, "bench-flower-deployment")
    train = {"delta": 1e-5, "batch_size": 24, "learning_rate": 2.0, "evaluation_epsilon": 1.0}
    executors = []
    try:
        sites: dict[str, tuple[LocalExecutor, str, Path]] = {}
        for config in write_sites(root / "three"):
            executor, token = start(config, root)
            executors.append(executor)
            sites[load_catalog(config).site] = (executor, token, config)
        study = Study("bench", "bench", {name: Site(name, e.url, t) for name, (e, t, _) in sites.items()}, [])
        started = time.perf_counter()
        fed = study.train(DATASET, FEATURES, LABEL, epsilon=args.epsilon, rounds=args.rounds, epochs=args.epochs,
                          progress=False, **train)
        http_wall = time.perf_counter() - started
        deployed = deployment_study(root, sites, args, train)
    finally:
        for executor in executors:
            executor.stop()
    load_after = check_quiet("after")
    wall = deployed["study_wall_s"]
    print(f"breast cancer, logistic regression, 3 sites x {args.rounds} rounds x {args.epochs} epochs, "
          f"epsilon {args.epsilon}")
    print(table(["study", "wall s", "vs executors", "epsilon (per site)"], [
        ["through the executors (Study.train, HTTP)", f"{http_wall:.1f}", "1.0x",
         ", ".join(f"{e:.3g}" for e in fed.epsilon.values())],
        [f"Flower deployment runtime (flwr run, {'in-process' if args.in_process else 'relayed'} rounds)", f"{wall:.1f}", f"{ratio(wall, http_wall):.1f}x",
         ", ".join(f"{e:.3g}" for e in deployed["site_epsilon"].values())]]))
    print(f"\nSuperLink ready {deployed['superlink_ready_s']:.1f} s, 3 SuperNodes registered "
          f"{deployed['supernodes_ready_s']:.1f} s after start (not in the study's wall)")
    phases = sorted(deployed["phases_s_from_study_start"].items(), key=lambda kv: kv[1])
    print(table(["phase of (b)", "s from study start"], [[k, f"{v:.1f}"] for k, v in phases]))
    print(table(["SuperNode", "train messages received (s)", "flwr-clientapp started (s)", "replies sent (s)"],
                [[n, *(", ".join(f"{t:.1f}" for t in v[k]) for k in ("received", "clientapp", "sent"))]
                 for n, v in deployed["supernode_s_from_study_start"].items()]))
    if deployed["coordinator_round_ended_s"]:
        print("ServerApp: coordinator " + f"{deployed['coordinator_seconds']:.1f} s, rounds ended at "
              + ", ".join(f"{t:.1f}" for t in deployed["coordinator_round_ended_s"]) + " s from its start")
    if args.log:
        print("\n".join(deployed["serverapp_log"]))
    path = save("flower_deployment" + ("_in_process" if args.in_process else ""), {
        "rounds": args.rounds, "epochs": args.epochs, "epsilon": args.epsilon,
        "clientapp": "in-process" if args.in_process else "relayed to the executor", "http_wall_s": http_wall,
        "deployment_wall_s": wall, "ratio": ratio(wall, http_wall), "http_site_epsilon": fed.epsilon,
        "load_before": load_before, "load_after": load_after, **deployed})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
