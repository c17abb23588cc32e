"""Federated DP-SGD on Flower's deployment runtime: a SuperLink and one SuperNode per site as separate
processes on loopback, each SuperNode started beside its site's executor (`veil executor supernode`) and
connecting outward to the SuperLink; the study submitted with `flwr run`. Each site trains its part of
the study through its own ledger, exactly as when the researcher's kernel coordinates over HTTP."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from conftest import Deployment
from veil.executor import audit, federated
from veil.executor.public_data import DATASET, LABEL, breast_cancer_frame
from veil.executor.store import tokens
from veil.kernel.sdk import train_request
from veil.local import free_port, local_superlink, stop_group
from veil.models.build import read_metadata
from veil.wire import Federation

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
FEATURES = [c.name for c in breast_cancer_frame()[1] if c.bounds is not None]
ROUNDS = 2


def supernode_tokens(d: Deployment) -> list[bool]:
    """Whether each token a site's SuperNode minted to relay a round is revoked, oldest first."""
    with d.engine.connect() as conn:
        return list(conn.execute(select(tokens.c.revoked).where(tokens.c.principal == f"supernode_{d.catalog.site}")
                                 .order_by(tokens.c.created_at, tokens.c.token_id)).scalars())


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[tuple[dict[str, str], int, list[subprocess.Popen]]]:
    """A SuperLink on loopback (its Flower home in tmp_path); yields the environment for `flwr`, the Fleet
    API port and the list of started processes, all stopped (with their children) at the end."""
    env, fleet, superlink = local_superlink(tmp_path / "flwr", tmp_path / "superlink.log")
    processes: list[subprocess.Popen] = [superlink]
    yield env, fleet, processes
    for process in reversed(processes):  # the daemons and their SuperExec and app children
        stop_group(process, timeout=20)


@pytest.mark.parametrize("relay", [True, False], ids=["relayed", "in-process"])
def test_a_study_runs_on_flowers_deployment_runtime(
        cancer_sites: dict[str, Deployment], flower: tuple[dict[str, str], int, list[subprocess.Popen]],
        tmp_path: Path, relay: bool) -> None:
    """Relayed: each SuperNode names its executor (`--executor-url`) and the ClientApp hands each round
    to it; in-process: the ClientApp trains the round itself, on the same ledger."""
    env, fleet, processes = flower
    minted_before = {name: supernode_tokens(d) for name, d in cancer_sites.items()}
    request = train_request(DATASET, FEATURES, LABEL, 2.0, 1e-5, None, 2, 24, 2.0, "sgd", 1.0, 0.2, 1.0,
                            federated=Federation(study="deployed", rounds=ROUNDS))
    parts = {name: (d.client(), d.client().train(request)) for name, d in cancer_sites.items()}
    for name, d in cancer_sites.items():  # each site's SuperNode, beside its executor, dials out
        log = (tmp_path / f"supernode-{name}.log").open("w")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "veil.cli", "executor", "supernode", "--site-config", str(d.catalog.path),
             "--database-url", d.database_url, "--superlink", f"127.0.0.1:{fleet}",
             "--clientappio", f"127.0.0.1:{free_port()}", "--insecure", *(["--executor-url", d.url] if relay else [])],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    layout = next(iter(parts.values()))[1].layout
    assert layout is not None
    out = tmp_path / "global.safetensors"
    overrides = tmp_path / "run.toml"
    overrides.write_text("\n".join([
        f"jobs = '{json.dumps({name: job.id for name, (_, job) in parts.items()})}'",
        f"model = '{request.model.model_dump_json()}'",
        f"layout = '{layout.model_dump_json()}'",
        f"rounds = {ROUNDS}", "delta = 1e-5", f"out = '{out}'"]) + "\n")
    flwr = str(Path(sys.executable).with_name("flwr"))
    submitted = subprocess.run([flwr, "run", str(federated.APP_DIR), "local", "--stream", "--run-config",
                                str(overrides)], env=env, capture_output=True, text=True, timeout=400)
    started = re.search(r"Successfully started run (\d+)", submitted.stdout + submitted.stderr)
    assert submitted.returncode == 0 and started, submitted.stdout + submitted.stderr
    deadline, status = time.monotonic() + 120, ""
    while time.monotonic() < deadline:  # `flwr run --stream` returns when the run ends, whatever its outcome
        listed = subprocess.run([flwr, "ls", "local", "--run-id", started.group(1), "--format", "json"],
                                env=env, capture_output=True, text=True)
        status = json.loads(listed.stdout)["runs"][0]["status"]
        if status.startswith("finished"):
            break
        time.sleep(1)
    assert status == "finished:completed", submitted.stdout[-3000:]

    summary = json.loads(out.with_name(out.name + ".json").read_text())
    assert not summary["refusals"] and [set(r) for r in summary["rounds"]] == [set(cancer_sites)] * ROUNDS
    weights = out.read_bytes()
    assert read_metadata(weights)["rounds"] == ROUNDS
    for name, (client, job) in parts.items():
        d = cancer_sites[name]
        trained = client.job(job.id)  # the SuperNode trained through the executor's ledger
        assert trained.round == ROUNDS and trained.epsilon == pytest.approx(summary["site_epsilon"][name])
        assert 0 < trained.epsilon <= 2.0
        done = client.finish_job(job.id, weights)  # the researcher hands back the global model
        assert done.state == "done" and done.evaluation is not None and done.epsilon == trained.epsilon
        rounds = [e for e in audit.entries(d.engine) if e.decision == "released" and f"job {job.id}," in (e.reason or "")]
        assert len(rounds) == ROUNDS
        assert audit.verify(d.engine).ok
        minted = supernode_tokens(d)[len(minted_before[name]):]  # a relayed round's token lives for that round only
        assert minted == ([True] * ROUNDS if relay else [])


def test_a_relaying_supernode_without_its_database_says_what_to_do() -> None:
    """A SuperNode started by hand with `executor=` but not the site's name and database: a clear refusal."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from veil.errors import QueryError
    from veil.executor import supernode

    message = Message(RecordDict({"config": ConfigRecord({"jobs": '{"north": 1}'})}), dst_node_id=1,
                      message_type="train")
    context = Context(run_id=1, node_id=1, node_config={"executor": "http://127.0.0.1:9"}, state=RecordDict(),
                      run_config={})
    with pytest.raises(QueryError, match="node config") as refused:
        supernode.train(message, context)
    assert "veil executor supernode" in (refused.value.hint or "")
