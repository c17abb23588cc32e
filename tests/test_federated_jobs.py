"""Federated DP-SGD across three real executors, driven from the researcher's study: each site joins
under its own grant and ledger, trains its rounds where its data lives (its one accountant kept in its
database), evaluates the global model on its own held-out patients, and is charged what its
accountant spent. Bad rounds are refused and cost nothing; a site that drops out mid-study is charged
only for the rounds it ran, and the study goes on without it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from conftest import Deployment, deploy, make_database
from veil.executor import audit, dpsgd
from veil.executor.features import encode
from veil.executor.public_data import CLASSES, DATASET, LABEL, breast_cancer_frame, write_sites
from veil.executor.store import jobs
from veil.federation import codec, coordinator
from veil.kernel.client import SiteClient
from veil.kernel.errors import VeilError, VeilPolicyError
from veil.kernel.federation import ExecutorGrid, train_federated
from veil.kernel.sdk import Site as ResearcherSite
from veil.kernel.sdk import train_request
from veil.kernel.study import Study
from veil.models.build import read_metadata
from veil.models.layout import FeatureLayout
from veil.models.spec import ModelSpec
from veil.query.accounting import rho_for_epsilon
from veil.wire import Federation, JobInfo, TrainRequest

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
SITES = ("north", "central", "valley")
FEATURES = [c.name for c in breast_cancer_frame()[1] if c.bounds is not None]
SGD: dict[str, Any] = {"delta": 1e-5, "model": None, "epochs": 2, "batch_size": 24, "learning_rate": 2.0,
                       "optimizer": "sgd", "max_grad_norm": 1.0, "holdout": 0.2, "evaluation_epsilon": 1.0}


def study(cancer_sites: dict[str, Deployment], names: tuple[str, ...] = SITES) -> Study:
    sites = {n: ResearcherSite(n, cancer_sites[n].url, cancer_sites[n].tokens["researcher"]) for n in names}
    return Study("bc_study", "study1", sites, [])


def charged(d: Deployment) -> dict[str, float]:
    return d.spent(DATASET)


def release_rho(d: Deployment) -> float:
    """The rho of one of a part's two DP releases (its count of rows, its held-out evaluation)."""
    return rho_for_epsilon(SGD["evaluation_epsilon"], d.catalog.reporting_delta)


def job_row(d: Deployment, job_id: int) -> dict[str, Any]:
    with d.engine.connect() as conn:
        return dict(conn.execute(jobs.select().where(jobs.c.id == job_id)).mappings().one())


def join(d: Deployment, rounds: int = 2, epsilon: float = 2.0) -> tuple[SiteClient, JobInfo, TrainRequest]:
    """The researcher joins one site to a study of `rounds` rounds directly (what Study.train does first)."""
    request = train_request(DATASET, FEATURES, LABEL, epsilon, federated=Federation(study="s", rounds=rounds), **SGD)
    client = d.client()
    return client, client.train(request), request


def round_content(job: JobInfo, server_round: int, state: dict[str, torch.Tensor] | None = None) -> bytes:
    """What FedAvg sends for one round: the global weights and the round number, as protobuf."""
    assert job.layout is not None
    layout = FeatureLayout(numeric=tuple(job.layout.numeric), outputs=job.layout.outputs)
    state = state or coordinator.initial_state(ModelSpec.logistic(), layout, seed=0)
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": server_round})})
    return codec.encode_content(content)


def test_a_researcher_trains_one_model_across_three_sites(cancer_sites: dict[str, Deployment]) -> None:
    before = {n: charged(d) for n, d in cancer_sites.items()}
    model = study(cancer_sites).train(DATASET, FEATURES, LABEL, epsilon=2.0, rounds=3, progress=False,
                                   **{k: v for k, v in SGD.items() if k != "model"})
    assert set(model.parts) == set(SITES) and not model.failures
    assert len(model.rounds) == 3 and all(set(r) == set(SITES) for r in model.rounds)
    for name, part in model.parts.items():
        d = cancer_sites[name]
        assert part.state == "done" and part.round == part.rounds == 3 and part.study == "bc_study"
        assert 0.5 < part.epsilon <= 2.0, name
        assert part.epsilon == pytest.approx(model.rounds[-1][name])
        # the site's ledger holds exactly what its accountant spent (epsilon) and its two DP releases (rho)
        after = charged(d)
        assert after["epsilon"] - before[name]["epsilon"] == pytest.approx(part.epsilon, rel=1e-9)
        assert after["delta"] - before[name]["delta"] == pytest.approx(1e-5)
        row = job_row(d, part.id)
        accountant = json.loads(row["history"])  # Opacus' accountant state_dict, as JSON
        history = [tuple(h) for h in accountant["history"]]
        assert accountant["mechanism"] == "prv" and dpsgd.load_accountant(accountant, "rdp").history == history
        assert part.epsilon == dpsgd.history_epsilon(history, "prv", 1e-5)
        assert sum(k for _, _, k in history) == 3 * 2 * max(1, round(part.rows / 24))  # all rounds, one accountant
        # the global model's DP accuracy on this site's own held-out patients
        assert part.evaluation is not None and part.evaluation.receipt == part.receipt
        release = model.evaluation[name].release
        row = release.rows[0]
        if row["n"] >= 41:  # an informative interval at epsilon 1 (north: ~51 held out)
            assert 0 <= row["accuracy_lower"] <= row["accuracy"] <= row["accuracy_upper"] <= 1
            assert not release.notes and release.cost.epsilon == pytest.approx(1.0)
            made = 2  # the count of rows and the evaluation
        else:  # central ~38 and valley ~25 held out: too few, said plainly, no number, nothing measured or charged
            assert row["accuracy"] is None and "too small to evaluate" in release.notes[0]
            assert release.cost.rho == release.cost.epsilon == 0.0
            made = 1  # the count of rows only: the evaluation's reserved rho was refunded
        assert after["rho"] - before[name]["rho"] == pytest.approx(made * release_rho(d)), name
        entries = [e for e in audit.entries(d.engine) if e.action == "train"]
        rounds = [e for e in entries if e.decision == "released" and f"job {part.id}," in (e.reason or "")]
        assert len(rounds) == 3 and all(e.result_digest for e in rounds)
        assert audit.verify(d.engine).ok
    frame, columns = breast_cancer_frame()  # public data: the model scored on every patient, for this test only
    bounds = {c.name: c.bounds for c in columns if c.bounds is not None}
    everyone = encode(frame, label=LABEL, numeric=bounds, classes=CLASSES)
    with torch.no_grad():
        accuracy = float((model.module()(everyone.x).argmax(dim=1) == everyone.y).float().mean())
    assert accuracy >= 0.88, accuracy
    assert read_metadata(model.weights)["site_epsilon"] == pytest.approx(model.epsilon)


def test_rounds_out_of_order_or_malformed_are_refused_and_cost_nothing(cancer_sites: dict[str, Deployment]) -> None:
    d = cancer_sites["valley"]
    client, job, _ = join(d, rounds=2)
    with pytest.raises(VeilPolicyError, match="round 3 cannot run"):
        client.job_round(job.id, round_content(job, 3))
    with pytest.raises(VeilError, match=r"\[bad_round\]"):
        client.job_round(job.id, b"\x00 not protobuf")
    wrong = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    with pytest.raises(VeilError, match=r"\[bad_weights\]"):
        client.job_round(job.id, round_content(job, 1, wrong))
    assert job_row(d, job.id)["history"] == "{}" and client.job(job.id).epsilon == 0.0  # no accountant yet
    reply = codec.decode_content(client.job_round(job.id, round_content(job, 1)))
    first = reply["metrics"]["epsilon"]
    assert 0 < first < 2.0 and reply["metrics"][codec.WEIGHT_KEY] == job.rows
    with pytest.raises(VeilPolicyError, match="round 1 cannot run"):  # a replayed round
        client.job_round(job.id, round_content(job, 1))
    other = ResearcherSite("valley", d.url, d.tokens["outsider"]).client
    with pytest.raises(VeilError, match="no training job"):
        other.job_round(job.id, round_content(job, 2))
    # the round reports an upper bound (RDP's, capped by the plan's); the settlement charges Opacus'
    # accountant's exact epsilon of the recorded history, computed once, never above the bound
    row = job_row(d, job.id)
    saved = json.loads(row["history"])
    exact = dpsgd.history_epsilon([tuple(h) for h in saved["history"]], saved["mechanism"],
                                  TrainRequest.model_validate_json(row["request"]).train.delta)
    assert 0 < exact <= first
    before = charged(d)
    ended = client.cancel_job(job.id)  # the researcher stops after one round: charged that round only
    assert ended.state == "cancelled" and ended.epsilon == pytest.approx(exact)
    assert before["epsilon"] - charged(d)["epsilon"] == pytest.approx(2.0 - exact, rel=1e-9)
    assert before["rho"] - charged(d)["rho"] == pytest.approx(release_rho(d))  # no evaluation: its rho refunded
    with pytest.raises(VeilPolicyError, match="takes no more rounds"):
        client.job_round(job.id, round_content(job, 2))
    assert audit.verify(d.engine).ok


def test_a_job_row_written_before_accountant_state_dicts_resumes_its_history(
        cancer_sites: dict[str, Deployment]) -> None:
    """A part whose row holds the accountant's bare history (as rows were written before state dicts)
    resumes it under the calibrated mechanism: the next round spends what one accountant over both rounds
    gives, to the last digit, and the row then holds the accountant's state_dict."""
    d = cancer_sites["central"]
    client, job, _ = join(d, rounds=2)
    first = codec.decode_content(client.job_round(job.id, round_content(job, 1)))
    saved = json.loads(job_row(d, job.id)["history"])
    with d.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job.id).values(history=json.dumps(saved["history"])))
    second = codec.decode_content(client.job_round(job.id, round_content(job, 2, first["arrays"].to_torch_state_dict())))
    resumed = json.loads(job_row(d, job.id)["history"])
    assert resumed["mechanism"] == saved["mechanism"] == "prv"
    (sigma, q, steps), = saved["history"]
    assert resumed["history"] == [[sigma, q, 2 * steps]]
    assert second["metrics"]["epsilon"] == dpsgd.accountant_epsilon([(sigma, q, 2 * steps)], "prv", 1e-5)
    assert client.cancel_job(job.id).epsilon == second["metrics"]["epsilon"]
    assert audit.verify(d.engine).ok


def test_a_site_that_refuses_to_join_stops_the_study_before_any_round(cancer_sites: dict[str, Deployment]) -> None:
    """Valley refuses (this project has no grant there) when every site is asked first (POST /job-checks): the
    study stops before any site joined, so none spends anything, not even a DP count of rows."""
    sites = study(cancer_sites).sites
    sites["valley"] = ResearcherSite("valley", cancer_sites["valley"].url, cancer_sites["valley"].tokens["outsider"])
    before = {n: charged(d) for n, d in cancer_sites.items()}
    with pytest.raises(VeilError, match="valley"):
        Study("bc_study", "study1", sites, []).train(DATASET, FEATURES, LABEL, epsilon=2.0, rounds=2, sites=SITES,
                                                     progress=False, **{k: v for k, v in SGD.items() if k != "model"})
    for name, d in cancer_sites.items():
        after = charged(d)
        assert after["epsilon"] == pytest.approx(before[name]["epsilon"]), name
        assert after["delta"] == pytest.approx(before[name]["delta"]), name
        assert after["rho"] == before[name]["rho"], name
        assert audit.verify(d.engine).ok
        with d.engine.connect() as conn:
            assert not conn.execute(jobs.select().where(jobs.c.state == "running")).fetchall(), name


def test_a_site_checks_a_request_without_reserving_or_reading_anything(cancer_sites: dict[str, Deployment]) -> None:
    """POST /job-checks answers what joining would reserve and how the features are encoded, or the refusal
    joining would get (audited), and leaves the ledger and the jobs untouched."""
    d = cancer_sites["north"]
    request = train_request(DATASET, FEATURES, LABEL, 2.0, federated=Federation(study="s", rounds=2), **SGD)
    before, log_before = charged(d), audit.count_entries(d.engine)
    with d.engine.connect() as conn:
        jobs_before = conn.execute(jobs.select()).fetchall()
    check = d.client().check_training(request)
    assert check.dataset == DATASET and check.epsilon == 2.0 and check.rho == pytest.approx(2 * release_rho(d))
    assert check.layout.numeric == FEATURES and check.layout.outputs == len(CLASSES)
    outsider = ResearcherSite("north", d.url, d.tokens["outsider"]).client
    with pytest.raises(VeilPolicyError, match="unknown_dataset"):
        outsider.check_training(request)
    too_much = train_request(DATASET, FEATURES, LABEL, 2.0, federated=Federation(study="s", rounds=2),
                             **{**SGD, "delta": 5e-3})
    with pytest.raises(VeilError, match="delta_exhausted"):
        d.client().check_training(too_much)
    assert charged(d) == before and audit.count_entries(d.engine) == log_before + 2  # the two refusals only
    with d.engine.connect() as conn:
        assert conn.execute(jobs.select()).fetchall() == jobs_before


def test_a_site_dropping_out_mid_study_is_charged_for_its_rounds_only(
        cancer_sites: dict[str, Deployment], tmp_path: Path) -> None:
    """Valley's executor stops after round 1: rounds 2 and 3 go on with north and central; valley's part
    is charged its round-1 epsilon once it is back and the researcher ends it."""
    parts = {n: join(cancer_sites[n], rounds=3) for n in SITES}
    before = {n: charged(cancer_sites[n]) for n in SITES}
    valley = cancer_sites["valley"]

    def on_round(server_round: int, epsilons: dict[str, float], failed: list[str]) -> None:
        if server_round == 1:
            valley.executor.stop()

    layout = parts["north"][1].layout
    assert layout is not None
    shape = FeatureLayout(numeric=tuple(layout.numeric), outputs=layout.outputs)
    grid = ExecutorGrid([(client, job.id) for client, job, _ in parts.values()])
    result = coordinator.coordinate(grid, ModelSpec.logistic(), shape, 3, 3, {}, 1e-5, on_round=on_round)
    assert [set(r) for r in result.rounds] == [set(SITES), {"north", "central"}, {"north", "central"}]
    assert len(result.refusals) == 2 and all("valley" in reason for _, _, reason in result.refusals)
    assert result.site_epsilon["valley"] == result.rounds[0]["valley"]
    valley.executor.start()
    client, job, _ = parts["valley"]
    ended = client.cancel_job(job.id)
    assert ended.state == "cancelled" and ended.round == 1
    # settled at the accountant's exact epsilon of its recorded round, at most the bound the round reported
    assert 0 < ended.epsilon <= result.rounds[0]["valley"]
    assert charged(valley)["epsilon"] == pytest.approx(before["valley"]["epsilon"] - 2.0 + ended.epsilon, rel=1e-9)
    for name in ("north", "central"):
        client, job, _ = parts[name]
        done = client.finish_job(job.id, result.weights)
        assert done.state == "done" and done.round == 3 and done.evaluation is not None
    for d in cancer_sites.values():
        assert audit.verify(d.engine).ok


def test_train_federated_needs_every_site_to_encode_alike(cancer_sites: dict[str, Deployment]) -> None:
    """Sites whose public metadata differ would average unrelated weights: refused before any round."""
    clients = [cancer_sites[n].client() for n in ("north", "central")]
    request = train_request(DATASET, FEATURES, LABEL, 2.0, federated=Federation(study="x", rounds=1), **SGD)
    one = train_request(DATASET, FEATURES[:3], LABEL, 2.0, federated=Federation(study="x", rounds=1), **SGD)
    before = charged(cancer_sites["central"])

    class Mixed(SiteClient):  # central joins with other features than north, as a misconfigured site would
        def train(self, _: TrainRequest) -> JobInfo:
            return super().train(one)

    mixed = Mixed("central", cancer_sites["central"].url, cancer_sites["central"].tokens["researcher"])
    with pytest.raises(VeilError, match="encode the features differently"):
        train_federated([clients[0], mixed], request, progress=False)
    assert charged(cancer_sites["central"])["epsilon"] == pytest.approx(before["epsilon"])
    mixed.close()


def test_a_round_stops_at_the_sites_time_limit_and_is_charged_for_its_steps(tmp_path: Path) -> None:
    """A site whose time limit is shorter than a round: the round ends early, its reply carries the steps
    taken (possibly none) and the ledger is charged exactly what the accountant recorded for them."""
    (config,) = write_sites(tmp_path, sites=("slow",), shares=(1.0,))
    text = config.read_text().replace("[site]\n", "[site]\nmax_training_seconds = 0.2\n", 1)
    config.write_text(text)
    url, drop = make_database("sqlite", tmp_path)
    d = deploy(config, url, tmp_path, grants={})
    try:
        d.approve_training(DATASET, 12.0)
        request = train_request(DATASET, FEATURES, LABEL, 2.0, federated=Federation(study="s", rounds=1),
                                **{**SGD, "epochs": 400})
        client = d.client()
        job = client.train(request)
        reply = codec.decode_content(client.job_round(job.id, round_content(job, 1)))
        steps, planned = reply["metrics"]["steps"], 400 * max(1, round((job.rows or 1) / 24))
        assert steps < planned  # cut off by the limit
        assert client.job(job.id).epsilon == pytest.approx(reply["metrics"]["epsilon"])
        ended = client.finish_job(job.id, None)
        assert ended.state == "cancelled" and d.spent(DATASET)["epsilon"] == pytest.approx(ended.epsilon, rel=1e-9)
        assert audit.verify(d.engine).ok
    finally:
        d.stop()
        drop()
