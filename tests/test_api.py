"""The executor's HTTP API, end to end: a real uvicorn process on loopback, real HTTP, no mocks.

Every refusal must be precise (status, code, a message naming what was wrong), audited (its receipt
points to a "refused" entry) and free (the ledger is unchanged). Most tests share one executor per
backend (`shared`); they never depend on each other's spending, only on before/after deltas.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from conftest import BACKENDS, PROJECT, Deployment
from veil.executor import audit
from veil.executor.app import MAX_ANONYMOUS_BODY_BYTES, MAX_BODY_BYTES
from veil.executor.store import caps
from veil.kernel.errors import VeilRefusal
from veil.query.accounting import epsilon_of
from veil.wire import AuditEntry, ColumnInfo, DatasetInfo, GrantInfo, Health, Refusal, Release

ROUTES = {"/health", "/datasets", "/datasets/{name}", "/query", "/query/{request_id}/cancel", "/grants", "/receipts/{receipt}", "/whoami",
          "/datasets/{name}/mock", "/levels", "/catalog", "/applications", "/applications/{application_id}",
          "/applications/{application_id}/withdraw", "/applications/{application_id}/reviews",
          "/grants/{grant_id}/revoke", "/budgets", "/budgets/{dataset}/cap", "/audit", "/audit/verify",
          "/audit/export",
          "/jobs", "/job-checks", "/jobs/{job_id}", "/jobs/{job_id}/cancel", "/jobs/{job_id}/weights", "/jobs/{job_id}/round",
          "/jobs/{job_id}/finish", "/bridge/refusals",
          "/datasets/{name}/state", "/datasets/{name}/transitions", "/dataset-transitions",
          "/dataset-transitions/{transition_id}/reviews", "/datasets/{name}/sheet", "/report",
          "/witness", "/witness/{peer}", "/standing", "/standing/{standing_id}",
          "/standing/{standing_id}/windows", "/standing/{standing_id}/stop"}
HEX64 = re.compile(r"^[0-9a-f]{64}$")
EPSILON = 0.5
"""The privacy loss of requests in this module: small, so the shared grants last."""

Http = Callable[..., httpx.Client]


# ---------------------------------------------------------------- helpers


@pytest.fixture
def http(shared: Deployment) -> Iterator[Http]:
    """Raw HTTP clients, closed after the test: http(who="researcher", deployment=shared)."""
    opened: list[httpx.Client] = []

    def connect(who: str | None = "researcher", deployment: Deployment | None = None,
                headers: dict[str, str] | None = None) -> httpx.Client:
        client = (deployment or shared).http(who)
        client.headers.update(headers or {})
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def query(client: httpx.Client, sql: str | None = None, spec: dict[str, Any] | None = None,
          **fields: Any) -> httpx.Response:
    """POST /query with `sql` or `spec`; `fields` default to epsilon=EPSILON unless rho is given."""
    body: dict[str, Any] = {"sql": sql} if sql is not None else {"spec": spec}
    if "rho" not in fields:
        fields.setdefault("epsilon", EPSILON)
    body.update(fields)
    return client.post("/query", json=body)


def audited(d: Deployment, receipt: str | None) -> AuditEntry:
    assert receipt is not None and HEX64.match(receipt), receipt
    entry = audit.find(d.engine, receipt)
    assert entry is not None, f"receipt {receipt} is not in the audit log"
    return entry


def assert_refused(d: Deployment, response: httpx.Response, status: int, code: str, *,
                   says: tuple[str, ...] = (), hint: str | None = None,
                   principal: str | None = None) -> Refusal:
    """A `Refusal` with this status and code, whose message contains every string of `says`, whose hint
    contains `hint`, and whose receipt is a "refused" audit entry giving the code as its reason."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    refusal = Refusal.model_validate(response.json())
    assert (refusal.kind, refusal.code) == ("refusal", code), refusal
    for fragment in says:
        assert fragment in refusal.message, (fragment, refusal.message)
    if hint is not None:
        assert refusal.hint is not None and hint in refusal.hint, (hint, refusal.hint)
    if principal == "anonymous":  # no one is accountable: counted into one audit entry per window
        assert refusal.receipt is None
        return refusal
    entry = audited(d, refusal.receipt)
    assert entry.decision == "refused"
    assert entry.reason == f"{code}: {refusal.message}"
    assert (entry.rho, entry.delta, entry.result_digest) == (0.0, 0.0, None)
    if principal is not None:
        assert entry.principal == principal
    return refusal


def ledger(d: Deployment) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Everything that can be charged: all grants as a steward reads them over HTTP, and the datasets'
    lifetime caps read from the state database."""
    with d.http("steward") as steward:
        response = steward.get("/grants")
    assert response.status_code == 200, response.text
    with d.engine.connect() as conn:
        cap_rows = [dict(r) for r in conn.execute(select(caps).order_by(caps.c.dataset)).mappings()]
    return response.json(), cap_rows


@contextmanager
def charges_nothing(d: Deployment) -> Iterator[None]:
    """The block must leave every grant and cap exactly as it found them."""
    before = ledger(d)
    yield
    assert ledger(d) == before


def grants_of(client: httpx.Client) -> dict[tuple[str, str], GrantInfo]:
    response = client.get("/grants")
    assert response.status_code == 200, response.text
    return {(g.project, g.dataset): g for g in map(GrantInfo.model_validate, response.json())}


def spent(client: httpx.Client, dataset: str, project: str = PROJECT) -> float:
    return grants_of(client)[(project, dataset)].rho_spent


def wrong_secret(token: str) -> str:
    """The same token id with another (well-formed) secret."""
    prefix, token_id, _ = token.split("_", 2)
    return f"{prefix}_{token_id}_{secrets.token_urlsafe(32)}"


# ---------------------------------------------------------------- health and schema


def test_health_needs_no_token(shared: Deployment, http: Http) -> None:
    response = http(None).get("/health")
    assert response.status_code == 200, response.text
    health = Health.model_validate(response.json())
    assert (health.status, health.site, health.datasets) == ("ok", shared.catalog.site, 2)


def test_openapi_lists_routes_and_query_schema(http: Http) -> None:
    response = http(None).get("/openapi.json")
    assert response.status_code == 200, response.text
    doc = response.json()
    assert set(doc["paths"]) == ROUTES
    assert set(doc["paths"]["/query"]) == {"post"}
    body = doc["paths"]["/query"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/QueryRequest")
    schema = doc["components"]["schemas"]["QueryRequest"]
    assert {"sql", "spec", "epsilon", "rho", "delta", "confidence", "project"} <= set(schema["properties"])
    assert {"QuerySpec", "Release", "Refusal"} <= set(doc["components"]["schemas"])


# ---------------------------------------------------------------- visibility


DATASET_KEYS = set(DatasetInfo.model_fields)
COLUMN_KEYS = set(ColumnInfo.model_fields)


def dataset_names(client: httpx.Client) -> list[str]:
    response = client.get("/datasets")
    assert response.status_code == 200, response.text
    listing = response.json()
    for info in listing:  # schema and public metadata only: no rows, no paths, no values
        assert set(info) == DATASET_KEYS, set(info) ^ DATASET_KEYS
        assert all(set(column) == COLUMN_KEYS for column in info["columns"])
        DatasetInfo.model_validate(info)
    return sorted(info["name"] for info in listing)


def test_who_sees_which_datasets(http: Http) -> None:
    assert dataset_names(http("researcher")) == ["encounters", "patients"]  # study1 holds a grant on L2
    assert dataset_names(http("outsider")) == ["patients"]  # L1 only
    assert dataset_names(http("steward")) == ["encounters", "patients"]
    assert dataset_names(http("admin")) == ["encounters", "patients"]


def test_dataset_view_is_metadata_only(shared: Deployment, http: Http) -> None:
    response = http().get("/datasets/encounters")
    assert response.status_code == 200, response.text
    assert set(response.json()) == DATASET_KEYS
    info = DatasetInfo.model_validate(response.json())
    assert info == shared.catalog.dataset("encounters").info()
    assert (info.level, info.privacy_unit, info.max_rows_per_unit) == ("L2", "patient_id", 20)
    assert str(shared.catalog.dataset("encounters").path) not in response.text
    crp = next(c for c in info.columns if c.name == "crp_mg_l")
    assert (crp.dtype, crp.bounds, crp.nullable) == ("Float64", (0.0, 300.0), True)


def test_outsider_is_told_encounters_do_not_exist(shared: Deployment, http: Http) -> None:
    """A dataset one may not use is 'unknown' (404), exactly like one that does not exist."""
    outsider = http("outsider")
    with charges_nothing(shared):
        hidden = assert_refused(shared, outsider.get("/datasets/encounters"), 404, "unknown_dataset",
                                says=("encounters",), principal="bob")
        missing = assert_refused(shared, outsider.get("/datasets/nosuch"), 404, "unknown_dataset",
                                 says=("nosuch",), principal="bob")
        assert hidden.message.replace("encounters", "X") == missing.message.replace("nosuch", "X")
        assert hidden.hint == missing.hint
        by_sql = assert_refused(shared, query(outsider, "SELECT COUNT(*) FROM encounters"), 404,
                                "unknown_dataset", says=("encounters",), principal="bob")
        assert audited(shared, by_sql.receipt).query == "SELECT COUNT(*) FROM encounters"
        by_spec = query(outsider, spec={"dataset": "encounters", "aggregates": [{"fn": "count"}]})
        assert_refused(shared, by_spec, 404, "unknown_dataset", says=("encounters",), principal="bob")
        assert audited(shared, by_spec.json()["receipt"]).dataset == "encounters"
    assert outsider.get("/datasets/patients").status_code == 200


def test_grants_researcher_sees_own_project_steward_sees_all(shared: Deployment, http: Http) -> None:
    shared.grant("third_project", "patients", 1.0)
    mine = grants_of(http("researcher"))
    assert {"encounters", "patients"} <= {dataset for _, dataset in mine}
    assert {project for project, _ in mine} == {PROJECT}
    assert all(g.project != "third_project" for g in grants_of(http("outsider")).values())
    everything = grants_of(http("steward"))
    assert set(mine) | {("third_project", "patients")} <= set(everything)
    assert everything[("third_project", "patients")].epsilon == 1.0
    assert grants_of(http("admin")) == everything
    g = mine[(PROJECT, "encounters")]
    assert g.epsilon == 50.0 and 0.0 <= g.rho_spent <= g.rho_total
    assert math.isclose(g.rho_remaining, g.rho_total - g.rho_spent)


# ---------------------------------------------------------------- a release


GROUPED_SQL = "SELECT sex, COUNT(*) AS n, AVG(age) FROM patients WHERE age >= 5 GROUP BY sex"
GROUPED_SPEC = {
    "dataset": "patients",
    "where": {"column": "age", "op": ">=", "value": 5},
    "group_by": ["sex"],
    "aggregates": [{"fn": "count", "alias": "n"}, {"fn": "mean", "column": "age"}],
}
CANONICAL = "SELECT sex, COUNT(*) AS n, AVG(age) AS mean_age FROM patients WHERE age >= 5 GROUP BY sex"


def released(response: httpx.Response) -> Release:
    assert response.status_code == 200, response.text
    release = Release.model_validate(response.json())
    assert release.kind == "release" and HEX64.match(release.receipt) and release.released_at
    return release


def check_grouped_release(d: Deployment, release: Release, epsilon: float) -> None:
    assert (release.site, release.dataset, release.project) == (d.catalog.site, "patients", PROJECT)
    assert release.query == CANONICAL
    assert release.group_by == ["sex"] and release.confidence == 0.95 and release.threshold is None
    stats = {s.name: s for s in release.statistics}
    assert set(stats) == {"n", "mean_age"}
    assert stats["n"].fn == "count" and stats["n"].accuracy is not None and stats["n"].accuracy > 0
    assert stats["n"].scale is not None and stats["n"].scale > 0 and stats["n"].distribution
    assert stats["mean_age"].fn == "mean" and stats["mean_age"].column == "age" and stats["mean_age"].note
    assert sorted(row["sex"] for row in release.rows) == ["F", "M"]  # public keys: every group
    for row in release.rows:
        assert set(row) == {"sex", "n", "n_lower", "n_upper", "mean_age", "mean_age_lower", "mean_age_upper"}
        assert row["n_lower"] <= row["n"] <= row["n_upper"]
        assert math.isclose(row["n_upper"] - row["n"], stats["n"].accuracy)
        assert 0 <= row["mean_age_lower"] <= row["mean_age"] <= row["mean_age_upper"] <= 17
    cost = release.cost
    assert cost.rho > 0 and cost.delta == 0.0
    assert cost.epsilon_delta == d.catalog.reporting_delta
    assert cost.epsilon <= epsilon * (1 + 1e-9)
    assert cost.epsilon == pytest.approx(epsilon, rel=1e-3)


def check_receipt(d: Deployment, client: httpx.Client, release: Release) -> None:
    response = client.get(f"/receipts/{release.receipt}")
    assert response.status_code == 200, response.text
    entry = AuditEntry.model_validate(response.json())
    assert entry.hash == release.receipt and entry.ts == release.released_at
    assert (entry.decision, entry.action) == ("released", "query")
    assert (entry.principal, entry.role) == ("alice", "researcher")
    assert (entry.project, entry.dataset, entry.query) == (PROJECT, release.dataset, release.query)
    assert (entry.rho, entry.delta) == (release.cost.rho, release.cost.delta)
    assert entry.result_digest and HEX64.match(entry.result_digest)
    assert entry.epsilon_at_reporting_delta == epsilon_of(entry.rho, d.catalog.reporting_delta) > 0
    assert entry.model_copy(update={"checkpoint": None, "epsilon_at_reporting_delta": None}) == audited(d, release.receipt)
    assert entry.checkpoint is not None and entry.checkpoint.seq >= entry.seq  # signed by the site
    assert release.checkpoint == entry.checkpoint


def test_sql_and_spec_release_the_same_query(shared: Deployment, http: Http) -> None:
    researcher = http()
    before = spent(researcher, "patients")
    by_sql = released(query(researcher, GROUPED_SQL, epsilon=EPSILON))
    middle = spent(researcher, "patients")
    by_spec = released(query(researcher, spec=GROUPED_SPEC, epsilon=EPSILON))
    after = spent(researcher, "patients")
    assert by_sql.query == by_spec.query == CANONICAL
    for release in (by_sql, by_spec):
        check_grouped_release(shared, release, EPSILON)
        check_receipt(shared, researcher, release)
    assert by_sql.receipt != by_spec.receipt
    assert middle - before == pytest.approx(by_sql.cost.rho, rel=1e-9)
    assert after - middle == pytest.approx(by_spec.cost.rho, rel=1e-9)
    assert audit.find(shared.engine, by_sql.receipt).seq < audit.find(shared.engine, by_spec.receipt).seq


def test_release_by_rho_with_project_named(shared: Deployment, http: Http) -> None:
    researcher = http()
    before = grants_of(researcher)[(PROJECT, "encounters")]
    response = query(researcher, "SELECT department, COUNT(*), SUM(length_of_stay_days) FROM encounters "
                                 "GROUP BY department", rho=0.002, project=PROJECT, confidence=0.9)
    release = released(response)
    after = grants_of(researcher)[(PROJECT, "encounters")]
    assert release.cost.rho <= 0.002 and release.cost.rho == pytest.approx(0.002, rel=1e-3)
    assert release.confidence == 0.9
    assert len(release.rows) == len(shared.catalog.dataset("encounters").column("department").categories)
    assert after.rho_spent - before.rho_spent == pytest.approx(release.cost.rho, rel=1e-9)
    assert after.rho_remaining < before.rho_remaining
    check_receipt(shared, researcher, release)


def test_sdk_client_releases_and_raises_refusals(shared: Deployment) -> None:
    client = shared.client("researcher")
    release = client.query(sql="SELECT COUNT(*) FROM encounters WHERE crp_mg_l IS NULL", epsilon=EPSILON)
    assert release.query == "SELECT COUNT(*) AS count FROM encounters WHERE crp_mg_l IS NULL"
    assert release.rows[0]["count"] > 0
    with charges_nothing(shared):
        with pytest.raises(VeilRefusal) as refused:
            client.query(sql="SELECT MIN(age) FROM patients", epsilon=EPSILON)
    assert refused.value.status == 400 and refused.value.refusal.code == "unsupported_query"
    assert audited(shared, refused.value.refusal.receipt).decision == "refused"


# ---------------------------------------------------------------- receipts


def test_receipts_are_private_to_their_project(shared: Deployment, http: Http) -> None:
    researcher = http()
    release = released(query(researcher, "SELECT COUNT(*) FROM patients", epsilon=EPSILON))
    steward_view = http("steward").get(f"/receipts/{release.receipt}")
    assert steward_view.status_code == 200 and steward_view.json()["hash"] == release.receipt
    with charges_nothing(shared):
        other = assert_refused(shared, http("outsider").get(f"/receipts/{release.receipt}"), 404,
                               "unknown_receipt", principal="bob")
        unknown = assert_refused(shared, researcher.get(f"/receipts/{secrets.token_hex(32)}"), 404,
                                 "unknown_receipt", principal="alice")
        assert other.hint == unknown.hint


def test_researcher_reads_own_refusal_receipt(http: Http) -> None:
    researcher = http()
    refusal = Refusal.model_validate(query(researcher, "SELECT age FROM patients").json())
    response = researcher.get(f"/receipts/{refusal.receipt}")
    assert response.status_code == 200, response.text
    entry = AuditEntry.model_validate(response.json())
    assert (entry.decision, entry.project, entry.query) == ("refused", PROJECT, "SELECT age FROM patients")
    assert entry.reason is not None and entry.reason.startswith("row_level_output:")


# ---------------------------------------------------------------- refused queries


@dataclass(frozen=True)
class Bad:
    """A query the executor must refuse: the answer's status, code, message fragments and hint fragment."""

    status: int
    code: str
    says: tuple[str, ...] = ()
    hint: str | None = None


def bad(name: str, request: str | dict[str, Any], status: int, code: str, *says: str,
        hint: str | None = None) -> Any:
    """A pytest param: `request` is SQL text or a JSON spec."""
    return pytest.param(request, Bad(status, code, says, hint), id=name)


REFUSED_QUERIES = [
    # names
    bad("unknown-dataset", "SELECT COUNT(*) FROM nosuch", 404, "unknown_dataset", "'nosuch'",
        hint="GET /datasets"),
    bad("unknown-column", "SELECT AVG(weight) FROM patients", 400, "unknown_column", "'weight'",
        hint="patient_id, age, sex, region, rare_disease, enrolled_year"),
    bad("unknown-column-in-where", "SELECT COUNT(*) FROM patients WHERE weight > 3", 400, "unknown_column",
        "'weight'", hint="columns are:"),
    bad("unknown-column-in-group-by", "SELECT weight, COUNT(*) FROM patients GROUP BY weight", 400,
        "unknown_column", "'weight'", hint="columns are:"),
    # syntax
    bad("malformed-sql", "SELEC COUNT(*) FROM patients", 400, "malformed_sql", "could not be parsed"),
    bad("truncated-sql", "SELECT COUNT(*) FROM patients WHERE", 400, "malformed_sql", "could not be parsed"),
    bad("two-statements", "SELECT COUNT(*) FROM patients; DROP TABLE x", 400, "malformed_sql",
        "one SQL statement", "got 2", hint="one SELECT"),
    bad("drop-statement", "DROP TABLE patients", 400, "unsupported_query", "DROP statement"),
    bad("no-from", "SELECT COUNT(*)", 400, "malformed_sql", "no FROM clause"),
    bad("quantile-q-out-of-range", "SELECT QUANTILE_CONT(age, 2) FROM patients", 400, "malformed_sql",
        "strictly between 0 and 1"),
    # rows instead of aggregates
    bad("bare-column", "SELECT age FROM patients", 400, "row_level_output", "'age'", hint="AVG(age)"),
    bad("select-star", "SELECT * FROM patients", 400, "row_level_output", "SELECT *"),
    bad("keys-only", "SELECT sex FROM patients GROUP BY sex", 400, "row_level_output", "no aggregate"),
    # unsupported constructs, each named
    bad("join", "SELECT COUNT(*) FROM patients p JOIN encounters e ON p.patient_id = e.patient_id", 400,
        "unsupported_query", "JOIN"),
    bad("min", "SELECT MIN(age) FROM patients", 400, "unsupported_query", "MIN()", hint="QUANTILE_CONT"),
    bad("max", "SELECT MAX(hemoglobin_g_dl) FROM encounters", 400, "unsupported_query", "MAX()"),
    bad("order-by", "SELECT sex, COUNT(*) FROM patients GROUP BY sex ORDER BY sex", 400, "unsupported_query",
        "ORDER BY"),
    bad("limit", "SELECT COUNT(*) FROM patients LIMIT 1", 400, "unsupported_query", "LIMIT"),
    bad("having", "SELECT sex, COUNT(*) FROM patients GROUP BY sex HAVING COUNT(*) > 5", 400,
        "unsupported_query", "HAVING"),
    bad("select-distinct", "SELECT DISTINCT COUNT(*) FROM patients", 400, "unsupported_query",
        "SELECT DISTINCT"),
    bad("count-distinct", "SELECT COUNT(DISTINCT age) FROM patients", 400, "unsupported_query",
        "COUNT(DISTINCT ...)", hint="GROUP BY"),
    bad("subquery-in-from", "SELECT COUNT(*) FROM (SELECT * FROM patients)", 400, "unsupported_query",
        "subquery"),
    bad("in-subquery", "SELECT COUNT(*) FROM patients WHERE age IN (SELECT age FROM patients)", 400,
        "unsupported_query", "IN (subquery)"),
    bad("qualified-name", "SELECT COUNT(*) FROM etc.passwd", 400, "unsupported_query", "qualified name"),
    bad("path-in-from", "SELECT COUNT(*) FROM ../x", 400, "malformed_sql"),
    # statistics that cannot be made private
    bad("sum-of-text", "SELECT SUM(sex) FROM patients", 400, "unsupported_query", "needs a numeric column",
        "'sex'"),
    bad("mean-of-date", "SELECT AVG(encounter_date) FROM encounters", 400, "unsupported_query",
        "needs a numeric column", "'encounter_date'"),
    bad("sum-of-unbounded", "SELECT SUM(patient_id) FROM patients", 400, "unbounded_column", "'patient_id'",
        "no public bounds", hint="bounds"),
    bad("private-keys", "SELECT encounter_date, COUNT(*) FROM encounters GROUP BY encounter_date", 400,
        "private_keys", "encounter_date", hint="delta"),
    bad("bad-value", "SELECT COUNT(*) FROM patients WHERE age > 'old'", 400, "bad_value", "'age'"),
    bad("bad-date", "SELECT COUNT(*) FROM encounters WHERE encounter_date > '2020-13-45'", 400, "bad_value",
        "'encounter_date'", hint="YYYY-MM-DD"),
    # the same through the JSON spec
    bad("spec-unknown-dataset", {"dataset": "nosuch", "aggregates": [{"fn": "count"}]}, 404,
        "unknown_dataset", "'nosuch'"),
    bad("spec-unknown-column", {"dataset": "patients", "aggregates": [{"fn": "mean", "column": "weight"}]},
        400, "unknown_column", "'weight'", hint="columns are:"),
    bad("spec-sum-of-text", {"dataset": "patients", "aggregates": [{"fn": "sum", "column": "region"}]}, 400,
        "unsupported_query", "needs a numeric column"),
    bad("spec-private-keys", {"dataset": "encounters", "group_by": ["encounter_date"],
                              "aggregates": [{"fn": "count"}]}, 400, "private_keys", hint="delta"),
    bad("spec-duplicate-names", {"dataset": "patients", "aggregates": [{"fn": "count"}, {"fn": "count"}]},
        400, "duplicate_name", hint="alias"),
]


@pytest.mark.parametrize("request_, expected", REFUSED_QUERIES)
def test_refused_query(shared: Deployment, http: Http, request_: str | dict[str, Any], expected: Bad) -> None:
    researcher = http()
    with charges_nothing(shared):
        sent = query(researcher, request_) if isinstance(request_, str) else query(researcher, spec=request_)
    refusal = assert_refused(shared, sent, expected.status, expected.code, says=expected.says,
                             hint=expected.hint, principal="alice")
    assert refusal.remaining is None
    entry = audited(shared, refusal.receipt)
    assert (entry.action, entry.project, entry.role) == ("query", PROJECT, "researcher")
    if isinstance(request_, str):
        assert entry.query == request_  # the refused text itself is on record
    else:
        assert entry.dataset == request_["dataset"]


@pytest.mark.parametrize("sql", [
    pytest.param('SELECT COUNT(*) FROM "../secret"', id="quoted-path-in-from"),
    pytest.param("SELECT COUNT(*) FROM read_csv('/etc/passwd')", id="table-function"),
    pytest.param('SELECT SUM("a b") FROM patients', id="quoted-column"),
    pytest.param('SELECT COUNT(*) AS "x-y" FROM patients', id="quoted-alias"),
])
def test_sql_names_outside_the_name_pattern_are_refused(shared: Deployment, http: Http, sql: str) -> None:
    """Quoted identifiers can carry any text; the wire's name pattern must turn them into a clean 400."""
    with charges_nothing(shared):
        response = query(http(), sql)
    assert response.status_code != 200 and "root:" not in response.text
    refusal = Refusal.model_validate(response.json())
    assert audited(shared, refusal.receipt).decision == "refused"
    assert response.status_code == 400, response.text
    assert refusal.code in ("malformed_sql", "unsupported_query"), refusal


def test_common_table_expression_is_refused_not_ignored(shared: Deployment, http: Http) -> None:
    """A CTE that shadows a dataset must not be silently dropped (the filter in it would be ignored)."""
    sql = "WITH patients AS (SELECT * FROM patients WHERE age > 10) SELECT COUNT(*) FROM patients"
    before = ledger(shared)
    response = query(http(), sql)
    assert response.status_code == 400, response.text
    assert_refused(shared, response, 400, "unsupported_query", says=("WITH",), principal="alice")
    assert ledger(shared) == before


# ---------------------------------------------------------------- malformed requests (422)


@pytest.mark.parametrize("body, says", [
    pytest.param({"spec": {"dataset": "encounters", "aggregates": [{"fn": "quantile", "column": "crp_mg_l"}]},
                  "epsilon": EPSILON}, ("q is required",), id="quantile-without-q"),
    pytest.param({"spec": {"dataset": "patients", "aggregates": [{"fn": "sum"}]}, "epsilon": EPSILON},
                 ("sum needs a column",), id="sum-without-column"),
    pytest.param({"spec": {"dataset": "../../etc/passwd", "aggregates": [{"fn": "count"}]},
                  "epsilon": EPSILON}, ("spec.dataset", "pattern"), id="spec-path-traversal"),
    pytest.param({"spec": {"dataset": "patients", "aggregates": [{"fn": "mean", "column": "../age"}]},
                  "epsilon": EPSILON}, ("column", "pattern"), id="spec-column-traversal"),
    pytest.param({"spec": {"dataset": "patients", "aggregates": []}, "epsilon": EPSILON}, ("aggregates",),
                 id="no-aggregates"),
    pytest.param({"spec": {"dataset": "patients", "aggregates": [{"fn": "max", "column": "age"}]},
                  "epsilon": EPSILON}, ("fn",), id="unknown-function"),
    pytest.param({"spec": {"dataset": "patients", "aggregates": [{"fn": "count"}], "limit": 5},
                  "epsilon": EPSILON}, ("limit",), id="extra-spec-field"),
    pytest.param({"spec": {"dataset": "patients", "where": {"column": "age", "op": "in", "value": []},
                           "aggregates": [{"fn": "count"}]}, "epsilon": EPSILON}, ("non-empty list",),
                 id="empty-in"),
    pytest.param({"sql": "SELECT COUNT(*) FROM patients", "epsilon": EPSILON, "rows": True}, ("rows",),
                 id="extra-field"),
    pytest.param({"sql": "SELECT COUNT(*) FROM patients",
                  "spec": {"dataset": "patients", "aggregates": [{"fn": "count"}]}, "epsilon": EPSILON},
                 ("exactly one of 'sql' or 'spec'",), id="sql-and-spec"),
    pytest.param({"epsilon": EPSILON}, ("exactly one of 'sql' or 'spec'",), id="neither-sql-nor-spec"),
    pytest.param({"sql": "SELECT COUNT(*) FROM patients /*" + "x" * 20_000 + "*/", "epsilon": EPSILON},
                 ("sql",), id="sql-over-20000-chars"),
    pytest.param({"sql": 42, "epsilon": EPSILON}, ("sql",), id="sql-not-text"),
    pytest.param({"sql": "SELECT COUNT(*) FROM patients", "epsilon": EPSILON, "confidence": 1.0},
                 ("confidence",), id="confidence-1"),
    pytest.param({"sql": "SELECT COUNT(*) FROM patients", "epsilon": EPSILON, "delta": 0.5}, ("delta",),
                 id="delta-too-large"),
    pytest.param({"sql": "SELECT COUNT(*) FROM patients", "epsilon": EPSILON, "project": "../study1"},
                 ("project",), id="project-traversal"),
])
def test_invalid_request_body(shared: Deployment, http: Http, body: dict[str, Any],
                              says: tuple[str, ...]) -> None:
    with charges_nothing(shared):
        response = http().post("/query", json=body)
    assert_refused(shared, response, 422, "malformed_request", says=("the request is not valid", *says),
                   hint="/openapi.json", principal="alice")


@pytest.mark.parametrize("loss, says", [
    pytest.param({"epsilon": 0}, ("epsilon", "greater than or equal to 0.01"), id="epsilon-zero"),
    pytest.param({"epsilon": -1}, ("epsilon", "greater than or equal to 0.01"), id="epsilon-negative"),
    pytest.param({"epsilon": 1e-20}, ("epsilon", "greater than or equal to 0.01"), id="epsilon-tiny"),
    pytest.param({"epsilon": 10.5}, ("epsilon", "less than or equal to 10"), id="epsilon-over-10"),
    pytest.param({"epsilon": 1e308}, ("epsilon",), id="epsilon-huge"),
    pytest.param({"epsilon": "a lot"}, ("epsilon",), id="epsilon-text"),
    pytest.param({"rho": 0}, ("rho", "greater than or equal to 0.000001"), id="rho-zero"),
    pytest.param({"rho": 1e-30}, ("rho", "greater than or equal to 0.000001"), id="rho-tiny"),
    pytest.param({"rho": 11}, ("rho",), id="rho-over-10"),
    pytest.param({"epsilon": 1.0, "rho": 0.01}, ("exactly one of 'epsilon' or 'rho'",), id="both"),
    pytest.param({}, ("exactly one of 'epsilon' or 'rho'",), id="neither"),
])
def test_privacy_loss_is_validated(shared: Deployment, http: Http, loss: dict[str, Any],
                                   says: tuple[str, ...]) -> None:
    body = {"sql": "SELECT COUNT(*) FROM encounters", **loss}
    with charges_nothing(shared):
        response = http().post("/query", json=body)
    assert_refused(shared, response, 422, "malformed_request", says=says, principal="alice")


@pytest.mark.parametrize("raw", [
    pytest.param(b'{"sql": "SELECT COUNT(*) FROM patients", "epsilon": NaN}', id="epsilon-nan"),
    pytest.param(b'{"sql": "SELECT COUNT(*) FROM patients", "epsilon": Infinity}', id="epsilon-infinity"),
    pytest.param(b'{"sql": "SELECT COUNT(*) FROM patients", "rho": NaN}', id="rho-nan"),
])
def test_non_finite_privacy_loss_is_refused(shared: Deployment, http: Http, raw: bytes) -> None:
    with charges_nothing(shared):
        response = http().post("/query", content=raw, headers={"content-type": "application/json"})
    assert_refused(shared, response, 422, "malformed_request")


@pytest.mark.parametrize("raw", [
    pytest.param(b'{"sql": "SELECT COUNT(*) FROM patients", "epsilon": 0.5', id="truncated"),
    pytest.param(b"not json at all", id="not-json"),
    pytest.param(b'["SELECT COUNT(*) FROM patients", 0.5]', id="a-list"),
    pytest.param(b"", id="empty"),
])
def test_malformed_json_body(shared: Deployment, http: Http, raw: bytes) -> None:
    with charges_nothing(shared):
        response = http().post("/query", content=raw, headers={"content-type": "application/json"})
    assert_refused(shared, response, 422, "malformed_request", says=("the request is not valid",),
                   principal="alice")  # refused before authentication, yet attributed to the caller


# ---------------------------------------------------------------- request size


def oversized_sql() -> str:
    return "SELECT COUNT(*) FROM patients /*" + " " * (MAX_BODY_BYTES + 1024) + "*/"


@pytest.mark.parametrize("who", ["researcher", None])
def test_body_over_64_kib_is_refused_before_parsing(shared: Deployment, http: Http, who: str | None) -> None:
    with charges_nothing(shared):
        response = query(http(who), oversized_sql())
    limit = MAX_BODY_BYTES if who else MAX_ANONYMOUS_BODY_BYTES  # a caller without a token may send 1 KiB
    refusal = assert_refused(shared, response, 413, "body_too_large", says=(str(limit),),
                             principal="alice" if who == "researcher" else "anonymous")
    if who:
        assert audited(shared, refusal.receipt).action == "query"


def test_chunked_body_over_64_kib_is_refused(shared: Deployment, http: Http) -> None:
    """Without content-length the limit is enforced while reading the chunks."""
    def chunks() -> Iterator[bytes]:
        yield b'{"sql": "SELECT COUNT(*) FROM patients /*'
        for _ in range(MAX_BODY_BYTES // 4096 + 4):
            yield b" " * 4096
        yield b'*/", "epsilon": 0.5}'

    with charges_nothing(shared):
        response = http().post("/query", content=chunks(), headers={"content-type": "application/json"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert_refused(shared, response, 413, "body_too_large")


def test_chunked_body_under_the_limit_is_served(http: Http) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"sql": "SELECT COUNT(*) '
        yield b'FROM patients", "epsilon": 0.5}'

    response = http().post("/query", content=chunks(), headers={"content-type": "application/json"})
    assert released(response).query == "SELECT COUNT(*) AS count FROM patients"


# ---------------------------------------------------------------- authentication and roles


PROTECTED = [("GET", "/datasets"), ("GET", "/datasets/patients"), ("GET", "/grants"), ("GET", "/whoami"),
             ("GET", f"/receipts/{'0' * 64}"), ("POST", "/query")]
QUERY_BODY = {"sql": "SELECT COUNT(*) FROM encounters", "epsilon": EPSILON}


def send(client: httpx.Client, method: str, path: str) -> httpx.Response:
    return client.request(method, path, json=QUERY_BODY if method == "POST" else None)


@pytest.mark.parametrize("method, path", PROTECTED)
def test_missing_token(shared: Deployment, http: Http, method: str, path: str) -> None:
    with charges_nothing(shared):
        for headers in ({}, {"Authorization": "Basic YWxpY2U6c2VjcmV0"}, {"Authorization": "Bearer"}):
            response = send(http(None, headers=headers), method, path)
            assert_refused(shared, response, 401, "missing_token", hint="Authorization: Bearer",
                           principal="anonymous")


@pytest.mark.parametrize("method, path", PROTECTED)
def test_invalid_token(shared: Deployment, http: Http, method: str, path: str) -> None:
    alice = shared.tokens["researcher"]
    forged = [
        "not-a-token",
        f"veil_{'0' * 16}_{secrets.token_urlsafe(32)}",  # well-formed, unknown id
        wrong_secret(alice),  # well-formed, alice's id, wrong secret
        alice + "x",
        alice.replace("veil_", "VEIL_"),
    ]
    with charges_nothing(shared):
        for token in forged:
            response = send(http(None, headers={"Authorization": f"Bearer {token}"}), method, path)
            refusal = assert_refused(shared, response, 401, "invalid_token", principal="anonymous")
            assert token not in refusal.message and token not in (refusal.hint or "")


@pytest.mark.parametrize("who", ["steward", "admin"])
def test_only_researchers_query(shared: Deployment, http: Http, who: str) -> None:
    with charges_nothing(shared):
        response = http(who).post("/query", json=QUERY_BODY)
    assert_refused(shared, response, 403, "forbidden", says=(who, "researcher"))


def test_researcher_cannot_act_for_another_project(shared: Deployment, http: Http) -> None:
    with charges_nothing(shared):
        response = http().post("/query", json={**QUERY_BODY, "project": "other_project"})
    assert_refused(shared, response, 403, "wrong_project", says=(f"'{PROJECT}'", "'other_project'"),
                   principal="alice")


# ---------------------------------------------------------------- path traversal in URLs


@pytest.mark.parametrize("path", [
    "/datasets/..%2F..%2Fetc%2Fpasswd",
    "/datasets/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/datasets/..%5C..%5Cetc%5Cpasswd",
    "/datasets/patients.parquet",
    "/datasets/%2Fetc%2Fpasswd",
    "/receipts/..%2F..%2Fetc%2Fpasswd",
])
def test_path_traversal_in_urls_is_not_served(shared: Deployment, http: Http, path: str) -> None:
    for who in ("researcher", "steward"):
        response = http(who).get(path)
        assert response.status_code in (404, 422), response.text
        assert "root:" not in response.text and "PAR1" not in response.text
        assert str(shared.catalog.path.parent) not in response.text


# ---------------------------------------------------------------- budget


@pytest.mark.parametrize("backend", BACKENDS)
def test_exhausted_grant_is_refused_with_what_remains(deployer: Callable[..., Deployment],
                                                      backend: str) -> None:
    d = deployer(backend, grants={"encounters": 0.5})
    sql = "SELECT COUNT(*) FROM encounters"
    with d.http("researcher") as researcher:
        first = released(query(researcher, sql, epsilon=0.45))
        grant = grants_of(researcher)[(PROJECT, "encounters")]
        assert grant.rho_spent == pytest.approx(first.cost.rho, rel=1e-12)
        with charges_nothing(d):
            second = query(researcher, sql, epsilon=0.45)
        refusal = assert_refused(d, second, 409, "budget_exhausted", says=("encounters", "for the next release"),
                                 hint="smaller epsilon", principal="alice")
        assert refusal.remaining is not None
        assert refusal.remaining["rho"] == pytest.approx(grant.rho_remaining, rel=1e-9)
        assert refusal.remaining["epsilon_granted"] == 0.5
        assert refusal.remaining["rho_granted"] == pytest.approx(grant.rho_total)
        assert refusal.remaining["epsilon_spent"] == pytest.approx(grant.epsilon_spent)
        assert refusal.remaining["largest_next_epsilon"] == pytest.approx(grant.largest_next_epsilon)
        # what was asked, and the largest next release with what was granted and spent
        assert "asks for epsilon 0.45" in refusal.message
        assert (f"allows at most epsilon {grant.largest_next_epsilon:.4g} for the next release "
                f"(granted 0.5, spent {grant.epsilon_spent:.4g}") in refusal.message
        assert grant.epsilon_spent + grant.largest_next_epsilon > grant.epsilon  # epsilons do not add up
        assert PROJECT in refusal.message
        assert grants_of(researcher)[(PROJECT, "encounters")] == grant
        # The largest next release is spendable: the figure the hint names still goes through.
        named = re.search(r"smaller epsilon, ([0-9.e-]+) at most", refusal.hint or "")
        assert named is not None, refusal.hint
        hinted = float(named.group(1))
        assert grant.largest_next_epsilon * 0.99 < hinted <= grant.largest_next_epsilon
        small = released(query(researcher, sql, epsilon=hinted))
        assert grants_of(researcher)[(PROJECT, "encounters")].rho_spent == pytest.approx(
            first.cost.rho + small.cost.rho, rel=1e-12)
    with pytest.raises(VeilRefusal) as refused:
        d.client("researcher").query(sql=sql, epsilon=0.45)
    assert refused.value.status == 409 and refused.value.refusal.code == "budget_exhausted"
    assert audit.verify(d.engine).ok


# ---------------------------------------------------------------- the audit log holds (keep last)


def test_audit_chain_and_ledger_verify_after_everything(shared: Deployment) -> None:
    result = audit.verify(shared.engine)
    assert result.ok, result.problems
    assert result.entries == audit.count_entries(shared.engine) > 50
