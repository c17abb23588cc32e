"""The steward's choice of mock per dataset, as researchers' mock mode gets it.

Schema-only rows are made by the kernel from public metadata and cost nothing. DP synthetic rows are
fitted here (`mockdata.synthesize_mock`), charged to the dataset's lifetime cap and audited as a
release in one transaction with the rows they store: researchers then fetch them for free.
"""

from __future__ import annotations

import hashlib
import io

import polars as pl
from sqlalchemy import Connection, Engine, delete, insert, select

from veil.executor import audit, ledger
from veil.executor.catalog import Catalog, Dataset
from veil.executor.mockdata import synthesize_mock
from veil.executor.store import mocks, write
from veil.query.accounting import epsilon_of, rho_for_epsilon
from veil.wire import MockInfo, MockRequest

SCHEMA_ROWS = 2000


def _store(conn: Connection, dataset: str, **values: object) -> None:
    conn.execute(delete(mocks).where(mocks.c.dataset == dataset))
    conn.execute(insert(mocks).values(dataset=dataset, created_at=audit.now(), **values))


def set_mock(engine: Engine, catalog: Catalog, dataset: Dataset, request: MockRequest, by: str,
             verified_bound: bool) -> MockInfo:
    """Make `request` the dataset's mock; a synthetic one is fitted, charged to the cap and audited."""
    if request.kind == "schema":
        rows = request.rows or SCHEMA_ROWS
        with write(engine) as conn:
            entry = audit.append(conn, principal=by, role="steward", action="mock", decision="set",
                                 dataset=dataset.name, reason=f"schema-only mock, {rows} rows")
            _store(conn, dataset.name, kind="schema", epsilon=0.0, rows=rows, data=None, created_by=by,
                   receipt=entry.hash)
        return get_mock(engine, dataset.name)
    assert request.epsilon is not None
    rho = rho_for_epsilon(request.epsilon, catalog.reporting_delta)
    with engine.connect() as conn:  # fail early, before fitting anything
        ledger.check_cap(conn, dataset, rho, 0.0, catalog.reporting_delta)
    synthetic = synthesize_mock(dataset, rho, rows=request.rows, verified_bound=verified_bound)
    buffer = io.BytesIO()
    synthetic.frame.write_parquet(buffer)
    data = buffer.getvalue()
    epsilon = epsilon_of(synthetic.rho, catalog.reporting_delta)
    unfitted = f"; not fitted (schema-only): {', '.join(synthetic.columns_not_fitted)}" \
        if synthetic.columns_not_fitted else ""
    with write(engine) as conn:
        ledger.charge_cap(conn, dataset, synthetic.rho, synthetic.delta, catalog.reporting_delta)
        entry = audit.append(conn, principal=by, role="steward", action="mock", decision="released",
                             dataset=dataset.name, rho=synthetic.rho, delta=synthetic.delta,
                             result_digest=hashlib.sha256(data).hexdigest(),
                             reason=f"DP synthetic mock (OpenDP MST), {synthetic.frame.height} rows{unfitted}")
        _store(conn, dataset.name, kind="synthetic", epsilon=epsilon, rows=synthetic.frame.height, data=data,
               created_by=by, receipt=entry.hash)
    return get_mock(engine, dataset.name)


def get_mock(engine: Engine, dataset: str) -> MockInfo:
    """The dataset's mock: synthetic rows with their columns, or the schema-only default."""
    with engine.connect() as conn:
        row = conn.execute(select(mocks).where(mocks.c.dataset == dataset)).mappings().first()
    if row is None:
        return MockInfo(dataset=dataset, kind="schema", epsilon=0.0, rows=SCHEMA_ROWS, created_by="site-default",
                        created_at="", receipt=None)
    data = None
    if row["data"] is not None:
        frame = pl.read_parquet(io.BytesIO(row["data"]))
        data = frame.with_columns(pl.col(pl.Date).cast(pl.String)).to_dict(as_series=False)
    return MockInfo(dataset=dataset, kind=row["kind"], epsilon=row["epsilon"], rows=row["rows"],
                    created_by=row["created_by"], created_at=row["created_at"], receipt=row["receipt"], data=data)
