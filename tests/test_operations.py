"""What a hospital's IT runs the executor with: JSON request logs without secrets or data, Prometheus metrics
for stewards, admins and the scraper only, a health check that covers the state database, settings from
the environment. Real executors on loopback."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import polars as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from conftest import POSTGRES_URL, Deployment
from veil.cli import parser

SECRET_IN_QUERY_STRING = "qs-secret-4821"
RARE_LITERAL = "41.3719"


def _requests(log: Path) -> list[dict[str, object]]:
    """The executor log's JSON request lines."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "request"]


def _metrics(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def _scrape(d: Deployment, who: str = "steward") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with d.http(who) as http:
        response = http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return _metrics(response.text)


def _leaves(value: object) -> list[object]:
    """Every scalar in a JSON value."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def test_every_request_is_one_json_line_without_token_query_string_or_data(shared: Deployment,
                                                                           site_config: Path) -> None:
    before = len(_requests(shared.executor.log))
    sql = f"SELECT COUNT(*) AS n FROM encounters WHERE crp_mg_l > {RARE_LITERAL}"
    with shared.http() as http:
        release = http.post("/query", json={"sql": sql, "epsilon": 0.1})
        assert release.status_code == 200, release.text
        assert http.get(f"/datasets?token={SECRET_IN_QUERY_STRING}").status_code == 200
        assert http.get("/grants/nowhere/at/all").status_code == 404
        assert http.post("/query", content=b"{not json").status_code in (400, 422)
    with httpx.Client(base_url=shared.url, headers={"Authorization": "Bearer veil_0123456789abcdef_" + "x" * 43}) as bad:
        assert bad.get("/datasets").status_code == 401
    lines = _requests(shared.executor.log)[before:]
    assert len(lines) == 5
    query, listing, unknown, malformed, invalid = lines
    assert query["status"] == 200 and query["route"] == "/query"
    assert (query["principal"], query["role"], query["project"], query["refusal"]) == ("alice", "researcher", "study1",
                                                                                        None)
    assert isinstance(query["duration_ms"], float) and query["duration_ms"] > 0
    assert str(query["time"]).endswith("Z")
    assert (listing["path"], listing["status"], listing["principal"]) == ("/datasets", 200, "alice")
    assert (unknown["status"], unknown["route"], unknown["refusal"]) == (404, None, "unknown_route")
    assert (malformed["path"], malformed["refusal"]) == ("/query", "malformed_request")
    assert (invalid["status"], invalid["principal"], invalid["role"], invalid["refusal"]) == (
        401, "anonymous", None, "invalid_token")

    log = shared.executor.log.read_text()
    for token in shared.tokens.values():
        assert token not in log
        assert token.split("_", 2)[2] not in log  # not even the secret part (which may itself hold "_")
    assert "x" * 43 not in log
    assert SECRET_IN_QUERY_STRING not in log and "token=" not in log
    assert RARE_LITERAL not in log and "crp_mg_l" not in log  # the query text is the audit log's, not this one's
    # the released count is no value in any log record (a bare substring test would find it in a port or a time)
    n = release.json()["rows"][0]["n"]
    values = [v for line in log.splitlines() if line.startswith("{") for v in _leaves(json.loads(line))]
    assert n not in values and not any(isinstance(v, str) and re.search(rf"(?<![\d.:]){n}(?![\d.])", v)
                                       for v in values)
    patients = pl.read_parquet(site_config.with_name("encounters.parquet"))["patient_id"].unique().sort()
    assert all(str(pid) not in log for pid in patients[1000:1050].to_list())  # no row value


def test_text_log_format_on_request(deployer: Callable[..., Deployment], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_LOG_FORMAT", "text")
    d = deployer("sqlite")
    with d.http() as http:
        assert http.get("/whoami").status_code == 200
    line = next(line for line in d.executor.log.read_text().splitlines() if "path=/whoami" in line)
    assert "veil.executor.access" in line and "status=200" in line and "principal=alice" in line
    assert d.tokens["researcher"] not in d.executor.log.read_text()


def test_metrics_need_a_steward_or_admin_and_count_releases_refusals_and_budget(shared: Deployment) -> None:
    with shared.http(None) as anonymous, shared.http() as researcher:
        assert anonymous.get("/metrics").status_code == 401
        refused = researcher.get("/metrics")
        assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    before = _scrape(shared, "admin")
    with shared.http() as http:
        release = http.post("/query", json={"sql": "SELECT COUNT(*) FROM patients", "epsilon": 0.2})
        assert release.status_code == 200, release.text
        over = http.post("/query", json={"sql": "SELECT COUNT(*) FROM patients", "epsilon": 1000.0})
        assert over.status_code >= 400, over.text
        code = over.json()["code"]
    after = _scrape(shared)

    def grew(name: str, labels: dict[str, str]) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    rho = release.json()["cost"]["rho"]
    assert grew("veil_releases_total", {"dataset": "patients"}) == 1
    assert grew("veil_rho_charged_total", {"dataset": "patients"}) == pytest.approx(rho)
    assert grew("veil_refusals_total", {"code": code}) == 1
    assert grew("veil_refusals_total", {"code": "forbidden"}) == 0  # counted before the first scrape
    assert grew("veil_requests_total", {"method": "POST", "route": "/query", "status": "200"}) == 1
    assert grew("veil_request_duration_seconds_count", {"method": "POST", "route": "/query"}) == 2
    with shared.engine.connect() as conn:
        spent = conn.execute(text("SELECT rho_spent FROM dataset_caps WHERE dataset = 'patients'")).scalar_one()
    assert after[("veil_dataset_rho_spent", (("dataset", "patients"),))] == pytest.approx(spent)
    assert after[("veil_executor_info", (("site", shared.catalog.site), ("version", "0.1.0")))] == 1
    with shared.http("steward") as http:
        body = http.get("/metrics").text
    assert "study1" not in body and "other_project" not in body and "alice" not in body  # no project's figures
    assert all(token not in body for token in shared.tokens.values())


def test_a_scraper_secret_opens_metrics_and_nothing_else(deployer: Callable[..., Deployment],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "scrape-" + "s3cr3t" * 4
    monkeypatch.setenv("VEIL_METRICS_TOKEN", secret)
    d = deployer("sqlite")
    with httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {secret}"}) as scraper:
        assert scraper.get("/metrics").status_code == 200
        assert scraper.get("/datasets").status_code == 401
        assert scraper.get("/budgets").status_code == 401
    with httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {secret}x"}) as wrong:
        assert wrong.get("/metrics").status_code == 401
    assert secret not in d.executor.log.read_text()


def test_metrics_add_up_every_worker(deployer: Callable[..., Deployment]) -> None:
    d = deployer("sqlite", workers=2)
    for _ in range(12):  # a new connection each: both workers answer some
        assert httpx.get(f"{d.url}/whoami", headers={"Authorization": f"Bearer {d.tokens['researcher']}"}
                         ).status_code == 200
    seen = {_scrape(d).get(("veil_requests_total", (("method", "GET"), ("route", "/whoami"), ("status", "200"))))
            for _ in range(4)}
    assert seen == {12.0}


def test_health_reports_the_database(shared: Deployment) -> None:
    with shared.http(None) as http:
        health = http.get("/health")
    assert health.status_code == 200 and health.json()["database"] == "ok"


def test_health_is_503_while_the_sqlite_database_is_missing(deployer: Callable[..., Deployment]) -> None:
    d = deployer("sqlite")
    path = Path(d.database_url.removeprefix("sqlite:///"))
    d.engine.dispose()
    moved = path.with_name("moved-away.db")
    path.rename(moved)  # a volume unmounted, a file moved: the pool's open connections would not notice
    with d.http(None) as http:
        health = http.get("/health")
        assert health.status_code == 503, health.text
        assert health.json()["code"] == "database_unreachable"
        assert "sqlite" not in health.text and str(path) not in health.text  # no URL or path for anyone
        assert http.get("/health").status_code == 503
        moved.replace(path)
        assert http.get("/health").status_code == 200  # back
    refusals = [line for line in _requests(d.executor.log) if line["path"] == "/health" and line["status"] == 503]
    assert len(refusals) == 2 and all(line["refusal"] == "database_unreachable" for line in refusals)


@pytest.mark.skipif(not POSTGRES_URL, reason="VEIL_TEST_POSTGRES_URL names no PostgreSQL server")
def test_health_is_503_when_the_postgres_database_is_gone(deployer: Callable[..., Deployment]) -> None:
    d = deployer("postgresql")
    with d.http(None) as http:
        assert http.get("/health").status_code == 200
    d.engine.dispose()
    name = d.database_url.rsplit("/", 1)[1]
    assert POSTGRES_URL
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()
    with d.http(None) as http:
        health = http.get("/health")
    assert health.status_code == 503, health.text
    assert health.json()["code"] == "database_unreachable"
    assert "postgres" not in health.text


# ---------------------------------------------------------------- settings from the environment


def test_serve_takes_every_setting_from_the_environment_and_the_command_line_wins(
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"VEIL_SITE_CONFIG": "/srv/site.toml", "VEIL_DATABASE_URL": "postgresql+psycopg://db/veil",
           "VEIL_HOST": "0.0.0.0", "VEIL_PORT": "9000", "VEIL_WORKERS": "3", "VEIL_LOG_LEVEL": "info",
           "VEIL_LOG_FORMAT": "text"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = parser().parse_args(["executor", "serve"])
    assert (args.site_config, args.database_url, args.host, args.port, args.workers, args.log_level,
            args.log_format) == ("/srv/site.toml", "postgresql+psycopg://db/veil", "0.0.0.0", 9000, 3, "info", "text")
    args = parser().parse_args(["executor", "serve", "--config", "/etc/veil/site.toml", "--port", "8700",
                                "--workers", "1", "--log-format", "json"])
    assert (args.site_config, args.port, args.workers, args.log_format) == ("/etc/veil/site.toml", 8700, 1, "json")
    token = parser().parse_args(["executor", "token", "create", "--role", "admin", "--principal", "it"])
    assert token.site_config == "/srv/site.toml"  # the other site commands read it too
    for name in env:
        monkeypatch.delenv(name)
    with pytest.raises(SystemExit):
        parser().parse_args(["executor", "serve"])  # no catalog named anywhere


def test_serve_help_documents_the_variables() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "veil.cli", "executor", "serve", "--help"], capture_output=True,
                         text=True, check=True, env={**os.environ, "COLUMNS": "120"}).stdout
    for name in ("VEIL_SITE_CONFIG", "VEIL_DATABASE_URL", "VEIL_HOST", "VEIL_PORT", "VEIL_WORKERS", "VEIL_LOG_LEVEL",
                 "VEIL_LOG_FORMAT", "VEIL_METRICS_TOKEN", "--config"):
        assert name in out
