"""Truncation is never silent: a file with more rows per patient than its catalog's bound is reported to
the steward (start-up log, audit log, budgets API, `veil steward`, never to researchers), each release on
it says truncation applied, and a catalog may choose `on_excess_rows = "refuse"` instead."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import tomli_w

from conftest import Deployment, deploy, make_database
from veil.cli import main as veil
from veil.errors import CatalogError
from veil.executor.auth import Principal
from veil.executor.catalog import load_catalog
from veil.executor.site import Site

BOUND = 2
COUNT = "SELECT COUNT(*) AS n FROM encounters"
TRAIN = {"dataset": "encounters", "features": ["crp_mg_l"], "label": "department",
         "train": {"epsilon": 1.0, "delta": 1e-5, "epochs": 1, "batch_size": 32, "learning_rate": 0.1}}


def broken_catalog(site_config: Path, directory: Path, **encounters: Any) -> Path:
    """The north site with encounters declared at BOUND rows per patient (its file has up to 20)."""
    config = tomllib.loads(site_config.read_text())
    for table in config["datasets"].values():
        table["path"] = str(site_config.parent / table["path"])
    config["datasets"]["encounters"].update(max_rows_per_unit=BOUND, **encounters)
    path = directory / "site.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def over_bound(catalog: Path) -> tuple[int, int]:
    """(patients with more than BOUND encounters, the most encounters of one patient), from the file."""
    counts = pl.read_parquet(load_catalog(catalog).dataset("encounters").path).group_by("patient_id").len()["len"]
    return int((counts > BOUND).sum()), int(counts.max())


def data_checks(d: Deployment) -> list[dict[str, Any]]:
    with d.http("steward") as http:
        return [e for e in reversed(http.get("/audit", params={"limit": 1000}).json()) if e["action"] == "data_check"]


@pytest.fixture(scope="module")
def broken(site_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    state = tmp_path_factory.mktemp("broken")
    url, drop = make_database("sqlite", state)
    d = deploy(broken_catalog(site_config, state), url, state, {"encounters": 5.0, "patients": 5.0})
    (state / "steward.token").write_text(d.tokens["steward"])
    yield d
    d.stop()
    drop()


def test_the_steward_is_warned_at_start_and_it_is_audited_once_per_file_version(
        site_config: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    catalog, database = broken_catalog(site_config, tmp_path), f"sqlite:///{tmp_path / 'state.db'}"
    over, most = over_bound(catalog)
    for _ in range(2):  # a restart on the same file version warns again but adds no second entry
        with caplog.at_level(logging.WARNING, logger="veil.executor"):
            site = Site.open(catalog, database)
        entries = [e for e in site.audit_log(Principal("carol", "steward", None)) if e.action == "data_check"]
        site.close()
        site.engine.dispose()
        assert [(e.dataset, e.decision) for e in entries] == [("encounters", "truncating")]
        assert entries[0].reason is not None and f"{over} patients" in entries[0].reason
    warnings = [r.getMessage() for r in caplog.records if r.name == "veil.executor"]
    assert len(warnings) == 2 and "dataset 'encounters'" in warnings[0]
    assert f"max_rows_per_unit = {BOUND}: {over} patients have more rows (up to {most})" in warnings[0]
    assert "raise max_rows_per_unit" in warnings[0] and 'on_excess_rows = "refuse"' in warnings[0]


def test_start_up_log_audit_and_steward_views(broken: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    over, most = over_bound(broken.catalog.path)
    assert f"{over} patients have more rows (up to {most})" in broken.executor.log.read_text()
    assert [(e["dataset"], e["decision"]) for e in data_checks(broken)] == [("encounters", "truncating")]
    with broken.http("steward") as http:
        budgets = {b["dataset"]: b for b in http.get("/budgets").json()}
    assert budgets["encounters"]["patients_over_bound"] == over
    assert budgets["encounters"]["most_rows_per_patient"] == most
    assert budgets["encounters"]["max_rows_per_unit"] == BOUND
    assert budgets["patients"]["patients_over_bound"] == 0 and budgets["patients"]["most_rows_per_patient"] == 1
    token = broken.executor.log.parent / "steward.token"
    code = veil(["steward", "budget", "encounters", "--site", broken.url, "--token-file", str(token)])
    out = capsys.readouterr().out
    assert code == 0 and f"{over} patients have more rows (up to {most})" in out, out
    assert veil(["steward", "budget", "patients", "--site", broken.url, "--token-file", str(token)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_researchers_see_a_note_but_not_the_patients_over_the_bound(broken: Deployment) -> None:
    with broken.http() as http:
        views = [http.get(path) for path in ("/datasets", "/datasets/encounters", "/grants")]
        assert http.get("/budgets").status_code == 403
        truncated = http.post("/query", json={"sql": COUNT, "epsilon": 0.5}).json()
        conforming = http.post("/query", json={"sql": "SELECT COUNT(*) AS n FROM patients", "epsilon": 0.5}).json()
        train = http.post("/jobs", json=TRAIN)  # DP-SGD never truncates: it is refused on such a file
    assert train.status_code == 409 and train.json()["code"] == "data_breaks_bound", train.text
    assert "would not protect each patient" in train.json()["message"]
    for view in views:
        assert view.status_code == 200 and "over_bound" not in view.text and "most_rows" not in view.text
    assert any(f"truncated to at most {BOUND} per patient" in n for n in truncated["notes"]), truncated
    assert "patients have" not in " ".join(truncated["notes"])
    assert not any("truncated" in n for n in conforming["notes"]), conforming
    assert len(data_checks(broken)) == 1  # one entry per file version, not per query


def test_a_steward_may_refuse_a_file_that_breaks_its_bound(site_config: Path, tmp_path: Path) -> None:
    catalog = broken_catalog(site_config, tmp_path, on_excess_rows="refuse")
    url, drop = make_database("sqlite", tmp_path)
    d = deploy(catalog, url, tmp_path, {"encounters": 5.0})
    try:
        before = d.spent("encounters")
        with d.http("steward") as http:
            cap_before = next(b for b in http.get("/budgets").json() if b["dataset"] == "encounters")
            mock = http.put("/datasets/encounters/mock", json={"kind": "synthetic", "epsilon": 1.0})
            assert http.put("/datasets/encounters/mock", json={"kind": "schema"}).status_code == 200  # reads no data
        with d.http() as http:
            query = http.post("/query", json={"sql": COUNT, "epsilon": 0.5})
            train = http.post("/jobs", json=TRAIN)
        for response in (query, mock, train):
            body = response.json()
            assert response.status_code == 409 and body["code"] == "data_breaks_bound", body
            assert "breaks its catalog's bound" in body["message"] and "nothing was charged" in body["message"]
            assert "data steward" in body["hint"] and body["receipt"]
        assert "patients" not in query.json()["message"]
        assert d.spent("encounters") == before
        with d.http("steward") as http:
            cap_after = next(b for b in http.get("/budgets").json() if b["dataset"] == "encounters")
            log = http.get("/audit", params={"limit": 1000}).json()[::-1]  # oldest first
        assert cap_after["spent_rho"] == cap_before["spent_rho"] and cap_after["on_excess_rows"] == "refuse"
        refused = [e for e in log if e["decision"] == "refused"]
        assert [e["action"] for e in refused] == ["datasets", "query", "jobs"]
        assert all(e["reason"].startswith("data_breaks_bound") and e["rho"] == 0 for e in refused)
        assert [e["decision"] for e in log if e["action"] == "data_check"] == ["refusing"]
    finally:
        d.stop()
        drop()


def test_on_excess_rows_takes_only_truncate_or_refuse(site_config: Path, tmp_path: Path) -> None:
    assert load_catalog(broken_catalog(site_config, tmp_path)).dataset("encounters").on_excess_rows == "truncate"
    with pytest.raises(CatalogError, match="on_excess_rows must be one of truncate, refuse, not 'drop'"):
        load_catalog(broken_catalog(site_config, tmp_path, on_excess_rows="drop"))
