"""Property-based fuzzing of the executor's HTTP API, generated from the live `/openapi.json` (schemathesis).

One real executor per backend (not rate-limited, so the fuzzing is not just a wall of 429s) answers
generated requests to every operation the schema lists, as three callers in turn: a researcher (project
study1, grants on `encounters` and `patients`), a steward, and a caller without a token. Each operation
gets three kinds of cases: valid data (schema "positive"), invalid data ("negative"), and grounded data
(valid data pointed at the site's real datasets, columns, ids and receipts, and SQL over its catalog, so
that releases, reviews, revocations, caps, mocks and jobs are reached, not just the first lookup). Every
path is also sent the methods it does not take, and FastAPI's own pages (`/openapi.json`, `/docs`,
`/docs/oauth2-redirect`, `/redoc`, which the schema does not list) are fetched. Every response must:

* never be a 5xx (a 500 `internal_error` is a bug in the executor),
* arrive within `RESPONSE_SECONDS` (no request hangs past the site's query time limit),
* if it is a 4xx, be a `veil.wire.Refusal`; to a valid token it carries a receipt naming a "refused"
  entry of the audit log (a 429 is counted, not logged one by one); without a token its receipt is null,
* if it is a 2xx, conform to the response schema the executor publishes.

After each caller the audit chain and the ledger must still agree (`audit.verify`), and no grant or
dataset cap may have spent more than it holds.

The weights uploads (`POST /jobs/{job_id}/round` and `/finish`) take a raw protobuf / safetensors body the
schema does not describe, so schemathesis can only send them bodiless requests with generated job ids;
`check` also sends each such case a second time with a pseudo-random binary body (seeded by the case, so
reproducible), sometimes past the body limits. No job here holds weights, so these bodies meet the
refusals in front of Flower's parser, not the parser itself.

Generation: each operation's cases come from schemathesis' public per-operation strategies
(`APIOperation.as_strategy`) under Hypothesis with `derandomize=True` (the same cases on every run), no
shrinking (a failing case is reported as found, with its request) and no example database. Each failing
operation is reported with its first failing request, and the others still run.
`schemathesis.pytest.from_fixture` would run a schema known only at run time per operation, but with
pytest 9.2 it fails before running anything (it sets `Function._nodeid`, which pytest 9.2 no longer has),
and `@schema.parametrize()` needs the schema at import time, before any executor runs; schemathesis'
deterministic "coverage" phase is reachable only through those, so it is not used here.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import FlakyFailure, Unsatisfiable
from schemathesis.specs.openapi.checks import response_schema_conformance

from conftest import BACKENDS, Deployment, deploy, limited_config, make_database
from veil.executor import audit, ledger
from veil.executor.catalog import Catalog
from veil.query.accounting import epsilon_of
from veil.wire import Refusal

RESPONSE_SECONDS = 35
"""No response may take longer (the site stops a query at its own, shorter, time limit)."""
MAX_EXAMPLES = 10
"""Generated cases per operation, caller and kind of data (valid, invalid, grounded): 30 per operation and caller."""
WEIGHTS_ROUTES = ("/jobs/{job_id}/round", "/jobs/{job_id}/finish")
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                report_multiple_bugs=False)


@pytest.fixture(scope="module", params=BACKENDS)
def fuzzed(request: pytest.FixtureRequest, site_config: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Deployment]:
    """One executor per backend for the whole module; the callers' fuzzing runs one after the other on it."""
    state = tmp_path_factory.mktemp("fuzz")
    url, drop = make_database(request.param, state)
    config = limited_config(site_config, "fuzz", requests_per_minute=100_000, anonymous_per_minute=100_000)
    d = deploy(config, url, state, {"encounters": 50.0, "patients": 50.0})  # rate limits fuzzing never meets
    yield d
    d.stop()
    drop()


@pytest.fixture(scope="module")
def api_schema(fuzzed: Deployment) -> schemathesis.BaseSchema:
    """The executor's schema as it serves it, at its own address."""
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json", config=schemathesis.Config(), timeout=30)
    schema.config.update(base_url=fuzzed.url, request_timeout=RESPONSE_SECONDS)
    return schema


def describe(case: schemathesis.Case, response: requests.Response | schemathesis.Response | None,
             headers: dict[str, str], body: bytes | None = None) -> str:
    """The request and the response, enough to reproduce it by hand."""
    if body is not None:
        sent = f"{case.method.upper()} {case.formatted_path} with a {len(body)}-byte binary body " \
               f"(first bytes {body[:32]!r})"
    else:
        sent = case.as_curl_command(headers=headers)
    if response is None:
        return f"request: {sent}"
    return f"request: {sent}\nresponse: {response.status_code} {response.text[:2000]}"


MAX_URL_BYTES = 65_535
"""uvicorn's URL parser (httptools) takes at most this: a longer URL gets its plain-text 400 before the
executor sees the request, so that answer cannot be a Refusal (and nothing reaches the site)."""
HUNG: set[tuple[str | None, str]] = set()
"""Requests that got no answer in time: Hypothesis replays a failing case, and they are not sent again."""


def check(d: Deployment, case: schemathesis.Case, who: str | None, session: requests.Session) -> None:
    """Send the case as `who` and assert the properties of the module docstring."""
    headers = {"Authorization": f"Bearer {d.tokens[who]}"} if who else {}
    hung = f"no response within {RESPONSE_SECONDS} s\n{describe(case, None, headers)}"
    key = (who, hung)
    if key in HUNG:
        raise AssertionError(hung)
    start = time.monotonic()
    try:
        response = case.call(base_url=d.url, session=session, headers=headers, timeout=RESPONSE_SECONDS)
    except requests.Timeout:
        HUNG.add(key)
        raise AssertionError(hung) from None
    if len(response.request.url or "") > MAX_URL_BYTES:  # the HTTP server's parser refuses it, before the executor
        assert (response.status_code, response.text) == (400, "Invalid HTTP request received."), \
            describe(case, response, headers)
        return
    judge(d, who, response.status_code, response.text, time.monotonic() - start, describe(case, response, headers))
    if 200 <= response.status_code < 300:
        case.validate_response(response, checks=[response_schema_conformance], headers=headers)
    if case.operation.path in WEIGHTS_ROUTES:
        send_weights(d, case, who, headers, session)


def send_weights(d: Deployment, case: schemathesis.Case, who: str | None, headers: dict[str, str],
                 session: requests.Session) -> None:
    """The weights routes once more, with a binary body the schema cannot describe (sizes around the
    anonymous, ordinary and weights limits), derived from the case so that a failure replays."""
    rng = random.Random(hashlib.sha256(case.formatted_path.encode()).digest())
    size = rng.choice([0, 1, 100, 1024, 1025, 4096, 64 * 1024, 64 * 1024 + 1, 200_000])
    body = rng.randbytes(size)
    start = time.monotonic()
    try:
        response = session.post(d.url + case.formatted_path, data=body, timeout=RESPONSE_SECONDS,
                                headers={**headers, "Content-Type": "application/octet-stream"})
    except requests.Timeout:
        raise AssertionError(f"no response within {RESPONSE_SECONDS} s\n{describe(case, None, headers, body)}") from None
    judge(d, who, response.status_code, response.text, time.monotonic() - start,
          describe(case, response, headers, body))


def judge(d: Deployment, who: str | None, status: int, text: str, seconds: float, what: str) -> None:
    """The properties of one response (`what` describes the request and the response)."""
    assert status < 500, f"server error\n{what}"
    assert seconds < RESPONSE_SECONDS, f"took {seconds:.1f} s\n{what}"
    if status < 400:
        return
    try:
        refusal = Refusal.model_validate(json.loads(text))
    except ValueError as exc:
        raise AssertionError(f"a {status} that is not a Refusal ({exc})\n{what}") from None
    if status == 429:
        assert refusal.code == "rate_limited" and refusal.receipt is None, what
    elif who is None:
        assert refusal.receipt is None, f"a refusal without a token got its own audit entry\n{what}"
    else:
        assert refusal.receipt is not None, f"a refusal to a valid token without a receipt\n{what}"
        entry = audit.find(d.engine, refusal.receipt)
        assert entry is not None, f"the receipt names no audit entry\n{what}"
        assert entry.decision == "refused", f"the receipt names a '{entry.decision}' entry\n{what}"


def books_balance(d: Deployment) -> None:
    """The chain is intact, the ledger equals the releases it records, nothing spent more than it holds."""
    verification = audit.verify(d.engine)
    assert verification.ok, verification.problems
    delta = d.catalog.reporting_delta
    for g in ledger.list_grants(d.engine, None, delta):
        assert g.rho_spent <= g.rho_total * (1 + 1e-9) + 1e-12, g
        assert g.epsilon_spent <= epsilon_of(g.rho_total, delta) * (1 + 1e-9) + 1e-12, g
        assert g.delta_spent <= g.delta * (1 + 1e-9) + 1e-15, g
    for b in ledger.budgets(d.engine, d.catalog):
        assert b.spent_rho <= b.cap_rho * (1 + 1e-9) + 1e-12, b
        assert b.spent_epsilon <= b.cap_epsilon * (1 + 1e-9) + 1e-12, b


@pytest.fixture(scope="module")
def session(fuzzed: Deployment) -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


# ---------------------------------------------------------------- grounded cases
# Schema-generated data names datasets and columns no site has, and ids no object has: the executor refuses
# it at the first lookup, so releases, reviews, revocations, caps, mocks and jobs would go unexercised.
# A third kind of case takes a valid generated case and points it at what the site holds: its datasets,
# their columns, small ids (the objects created so far), receipts from its log, and for `/query` a small
# SQL grammar over the catalog. Training jobs it may start are kept short (at most 2 epochs) so that the
# fuzzing stays within its time.

ID_PARAMETERS = {"job_id", "application_id", "grant_id"}
DATASET_PARAMETERS = {"name", "dataset"}
COLUMN_KEYS = {"column", "label"}
COLUMN_LIST_KEYS = {"features", "group_by"}


def literal(data: st.DataObject) -> str:
    """A SQL literal, sometimes hostile (unbalanced quotes, huge numbers)."""
    return data.draw(st.one_of(
        st.integers(-10, 3000).map(str), st.integers(-(2**70), 2**70).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.text(max_size=12).map(lambda t: "'" + t.replace("'", "''") + "'"),
        st.text(max_size=12).map(lambda t: f"'{t}'"),
    ), label="literal")


def sql(catalog: Catalog, dataset: str, data: st.DataObject) -> str:
    """A SELECT of aggregates over `dataset`, optionally filtered and grouped, mostly as an honest analyst
    would write it."""
    columns = catalog.datasets[dataset].columns
    numeric = [c.name for c in columns.values() if c.is_numeric and c.bounds]
    grouping = [c.name for c in columns.values() if c.categories]
    aggregates = ["COUNT(*)"] + [f"{fn}({c})" for c in numeric for fn in ("SUM", "AVG", "MEDIAN", "COUNT")] \
        + [f"QUANTILE_CONT({c}, 0.9)" for c in numeric]
    chosen = data.draw(st.lists(st.sampled_from(aggregates), min_size=1, max_size=3, unique=True), label="select")
    group = data.draw(st.none() | st.sampled_from(grouping), label="group") if grouping else None
    text = f"SELECT {', '.join(([group] if group else []) + chosen)} FROM {dataset}"
    if data.draw(st.booleans(), label="where"):
        column = data.draw(st.sampled_from(list(columns)), label="where column")
        op = data.draw(st.sampled_from(["=", "<", ">=", "<>", "IN", "IS NULL", "BETWEEN"]), label="op")
        if op == "IN":
            condition = f"{column} IN ({', '.join(literal(data) for _ in range(data.draw(st.integers(1, 4))))})"
        elif op == "IS NULL":
            condition = f"{column} IS NULL"
        elif op == "BETWEEN":
            condition = f"{column} BETWEEN {literal(data)} AND {literal(data)}"
        else:
            condition = f"{column} {op} {literal(data)}"
        text += f" WHERE {condition}"
    return text + (f" GROUP BY {group}" if group else "")


def grounded(value: Any, catalog: Catalog, dataset: str, data: st.DataObject) -> Any:
    """`value` (generated JSON) with dataset and column names replaced by the site's."""
    columns = list(catalog.datasets[dataset].columns)
    if isinstance(value, list):
        return [grounded(v, catalog, dataset, data) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, v in value.items():
        if key == "dataset" and isinstance(v, str):
            out[key] = dataset
        elif key == "datasets" and isinstance(v, list):
            out[key] = data.draw(st.lists(st.sampled_from(list(catalog.datasets)), min_size=1, unique=True))
        elif key in COLUMN_KEYS and isinstance(v, str):
            out[key] = data.draw(st.sampled_from(columns))
        elif key in COLUMN_LIST_KEYS and isinstance(v, list):
            out[key] = data.draw(st.lists(st.sampled_from(columns), min_size=len(v), max_size=len(v)))
        elif key == "epochs" and isinstance(v, int):
            out[key] = min(v, 2)
        else:
            out[key] = grounded(v, catalog, dataset, data)
    return out


def ground(d: Deployment, case: schemathesis.Case, receipts: list[str], data: st.DataObject) -> None:
    """Point a valid generated case at what the site holds (in place)."""
    dataset = data.draw(st.sampled_from(list(d.catalog.datasets)), label="dataset")
    for name in list(case.path_parameters or {}):
        if name in DATASET_PARAMETERS:
            case.path_parameters[name] = dataset
        elif name in ID_PARAMETERS:
            case.path_parameters[name] = data.draw(st.integers(1, 8), label=name)
        elif name == "receipt":
            case.path_parameters[name] = data.draw(st.sampled_from(receipts), label=name)
    if not isinstance(case.body, dict):
        return
    body = grounded(case.body, d.catalog, dataset, data)
    if case.operation.path == "/query":  # one query, SQL or a grounded spec, at an ordinary privacy loss
        spec = body.get("spec") or {"dataset": dataset, "aggregates": [{"fn": "count"}]}
        body = {k: v for k, v in body.items() if k == "confidence"}
        body.update(data.draw(st.sampled_from([{"epsilon": 0.05}, {"epsilon": 1.0}, {"rho": 0.01}]), label="loss"))
        if data.draw(st.booleans(), label="sql"):
            body["sql"] = sql(d.catalog, dataset, data)
        else:
            body["spec"] = spec
    if case.operation.path == "/datasets/{name}/mock" and body.get("kind") == "synthetic":
        # Fitting DP synthetic rows (OpenDP's MST on JAX) takes about a minute per dataset here: a steward's
        # long job, not a query under the site's time limit (tests/test_mockdata.py covers it). Grounded
        # cases ask for schema-only mocks.
        body = {"kind": "schema"}
    case.body = body


def exercise(d: Deployment, operation: schemathesis.APIOperation, kind: str, who: str | None,
             session: requests.Session, receipts: list[str]) -> None:
    """One operation, one kind of data (positive, negative, grounded), MAX_EXAMPLES cases, as `who`."""
    mode = schemathesis.GenerationMode.NEGATIVE if kind == "negative" else schemathesis.GenerationMode.POSITIVE

    @FUZZ
    @given(case=operation.as_strategy(mode), data=st.data())
    def run(case: schemathesis.Case, data: st.DataObject) -> None:
        if kind == "grounded":
            ground(d, case, receipts, data)
        check(d, case, who, session)

    run()


UNDECLARED_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
"""Methods sent to paths that do not take them (HEAD is left out: its answers carry no body to check)."""
FASTAPI_PAGES = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


def undeclared(d: Deployment, api: schemathesis.BaseSchema, who: str | None, session: requests.Session) -> None:
    """Every path with each method it does not take (a 405 refusal, audited), and FastAPI's own pages."""
    declared: dict[str, set[str]] = {}
    for result in api.get_all_operations():
        operation = result.ok()
        declared.setdefault(operation.path, set()).add(operation.method.upper())
    headers = {"Authorization": f"Bearer {d.tokens[who]}"} if who else {}
    sends = [(method, path.replace("{job_id}", "1").replace("{application_id}", "1").replace("{grant_id}", "1")
              .replace("{receipt}", "0" * 64).replace("{name}", "patients").replace("{dataset}", "patients"))
             for path, methods in declared.items() for method in UNDECLARED_METHODS if method not in methods]
    sends += [("GET", page) for page in FASTAPI_PAGES]
    for method, path in sends:
        start = time.monotonic()
        response = session.request(method, d.url + path, headers=headers, timeout=RESPONSE_SECONDS, data=b"{}")
        what = f"request: {method} {path} with body {{}}\nresponse: {response.status_code} {response.text[:2000]}"
        judge(d, who, response.status_code, response.text, time.monotonic() - start, what)
        if path in FASTAPI_PAGES:
            assert response.status_code == 200, what
        else:
            assert response.status_code == 405, what


def fuzz(d: Deployment, api: schemathesis.BaseSchema, who: str | None, session: requests.Session) -> None:
    """Every operation of the schema as `who`: valid, then invalid, then grounded data. Fails listing every
    operation and kind of data whose cases broke a property (each with the first case that did)."""
    receipts = [e.hash for e in audit.entries(d.engine, limit=50)]
    failures: list[str] = []
    for result in api.get_all_operations():
        operation = result.ok()  # an operation the schema cannot describe raises here: none may be skipped
        for kind in ("positive", "negative", "grounded"):
            try:
                exercise(d, operation, kind, who, session, receipts)
            except Unsatisfiable:
                # Negative data only exists where the schema constrains something: an operation without
                # parameters, or whose only parameter is a free-form string in the path, has none.
                assert kind == "negative", operation.label
            except Exception as exc:  # every operation runs; each failure is reported with its request
                if isinstance(exc, FlakyFailure):  # it failed once, then not when Hypothesis replayed it
                    exc = exc.exceptions[0]
                failures.append(f"{operation.label} ({kind} data): " + "".join(traceback.format_exception_only(exc)))
    try:
        undeclared(d, api, who, session)
    except Exception as exc:
        failures.append(f"undeclared methods and FastAPI's pages: {exc}")
    assert not failures, f"{len(failures)} operation(s) broke a property as {who or 'anonymous'}:\n\n" \
        + "\n\n".join(failures)


# The three callers in this order on one executor: the researcher spends first, the steward may then
# revoke, cap and review, and the anonymous caller meets whatever state they left.


def test_fuzz_as_researcher(fuzzed: Deployment, api_schema: schemathesis.BaseSchema,
                            session: requests.Session) -> None:
    fuzz(fuzzed, api_schema, "researcher", session)


def test_books_balance_after_the_researcher(fuzzed: Deployment) -> None:
    books_balance(fuzzed)


def test_fuzz_as_steward(fuzzed: Deployment, api_schema: schemathesis.BaseSchema, session: requests.Session) -> None:
    fuzz(fuzzed, api_schema, "steward", session)


def test_books_balance_after_the_steward(fuzzed: Deployment) -> None:
    books_balance(fuzzed)


def test_fuzz_anonymously(fuzzed: Deployment, api_schema: schemathesis.BaseSchema, session: requests.Session) -> None:
    fuzz(fuzzed, api_schema, None, session)


def test_books_balance_after_the_anonymous_caller(fuzzed: Deployment) -> None:
    books_balance(fuzzed)
