"""Mock mode: the same queries, run in the researcher's process on mock rows made from public metadata.

A mock site is the shared query core (`veil.query`: planning, OpenDP calibration, intervals, pricing)
over made-up rows that respect each column's public bounds and categories, or over the steward's DP
synthetic rows. Nothing is read from any hospital and nothing is spent: costs come out as a live run
charges them, to the last digit, because they depend only on the query, the dataset's public metadata,
the site's published pricing and the requested loss, never on the data. No executor, database or
child process is involved.
"""

from __future__ import annotations

from datetime import date

import numpy as np
import polars as pl

from veil.errors import CatalogError
from veil.query.prepared import Prepared, PreparedQueries, prepare
from veil.query.pricing import accuracy_within_level, requested_rho, unsigned_release
from veil.query.release import run
from veil.query.sharing import refuse_query
from veil.query.table import DTYPES, Table
from veil.sql import canonical_sql
from veil.wire import ColumnInfo, DatasetInfo, MockInfo, QueryRequest, QuerySpec, Release

MOCK_ROWS = 2000
_DATES = (date(2015, 1, 1), date(2025, 12, 31))


def _column(info: ColumnInfo, units: np.ndarray, rng: np.random.Generator) -> pl.Series:
    n = len(units)
    if info.categories:
        values = pl.Series(info.name, rng.choice(np.array(info.categories, dtype=object), n).tolist())
    elif info.dtype in ("Int64", "Int32"):
        lo, hi = info.bounds or (0, 100)
        values = pl.Series(info.name, rng.integers(int(lo), int(hi) + 1, n))
    elif info.dtype == "Float64":
        lo, hi = info.bounds or (0.0, 1.0)
        values = pl.Series(info.name, rng.uniform(float(lo), float(hi), n))
    elif info.dtype == "Date":
        days = rng.integers(_DATES[0].toordinal(), _DATES[1].toordinal() + 1, n)
        values = pl.Series(info.name, [date.fromordinal(int(d)) for d in days])
    elif info.dtype == "Boolean":
        values = pl.Series(info.name, rng.random(n) < 0.5)
    else:
        values = pl.Series(info.name, [f"{info.name}_{i % 7}" for i in range(n)])
    values = values.cast(DTYPES[info.dtype])
    if info.nullable:
        values = values.scatter(np.flatnonzero(rng.random(n) < 0.1), None)
    return values


def mock_rows(info: DatasetInfo, rows: int = MOCK_ROWS, seed: int = 0) -> pl.DataFrame:
    """Made-up rows with the dataset's schema, within its public bounds and categories."""
    rng = np.random.default_rng(seed)
    per_unit = max(1, (info.max_rows_per_unit + 1) // 2)  # about half the public maximum, on average
    units = np.sort(rng.integers(0, max(1, rows // per_unit), rows))
    columns = []
    for column in info.columns:
        if column.name == info.privacy_unit:
            columns.append(pl.Series(column.name, units).cast(pl.Int64 if column.dtype == "Int64" else pl.Int32))
        else:
            columns.append(_column(column, units, rng))
    frame = pl.DataFrame(columns)  # cap each unit at the public maximum, as the real data promises
    return frame.filter(pl.int_range(pl.len()).over(info.privacy_unit) < info.max_rows_per_unit)


def synthetic_rows(info: DatasetInfo, mock: MockInfo) -> pl.DataFrame | None:
    """The steward's DP synthetic rows as a frame with the dataset's schema; None for a schema-only mock."""
    if mock.kind != "synthetic" or mock.data is None:
        return None
    frame = pl.DataFrame(mock.data)
    return frame.with_columns(
        pl.col(c.name).str.to_date() if c.dtype == "Date" else pl.col(c.name).cast(DTYPES[c.dtype])
        for c in info.columns
    )


class MockSite:
    """One site's datasets over mock rows, answering like `SiteClient.query` but locally and for free.

    `rows` gives a dataset's rows (the steward's DP synthetic mock); others get `mock_rows`."""

    def __init__(self, name: str, datasets: list[DatasetInfo], rows: dict[str, pl.DataFrame] | None = None) -> None:
        self.name = name
        self._infos = {info.name: info for info in datasets}
        self._rows = {info.name: given if (given := (rows or {}).get(info.name)) is not None else mock_rows(info)
                      for info in datasets}
        self._prepared = PreparedQueries(size=256)

    def _bound_holds(self, info: DatasetInfo) -> bool:
        """Whether no unit has more mock rows than the public maximum (as a site checks its data)."""
        most = self._rows[info.name].group_by(info.privacy_unit).len()["len"].max()
        return most is None or int(most) <= info.max_rows_per_unit  # type: ignore[arg-type]

    def query(self, spec: QuerySpec, **loss: object) -> Release:
        """The release a live query would give, on mock rows: same plan, same measurement, same price."""
        request = QueryRequest(spec=spec, **loss)  # type: ignore[arg-type]
        info = self._infos.get(spec.dataset)
        if info is None or info.pricing is None:
            raise CatalogError("unknown_dataset", f"site '{self.name}' publishes no dataset '{spec.dataset}' you may "
                               "query", hint="list the datasets you may use with `%veil datasets`", status=404)
        refuse_query(info.name, info.sharing)  # as the site refuses it: an enclave releases no query results
        rho = requested_rho(request, info.level, info.pricing)
        verified = self._bound_holds(info)
        delta = request.delta if spec.group_by else None
        threshold = info.pricing.min_group_threshold
        text = canonical_sql(spec)

        def prepared_here() -> Prepared:
            return prepare(Table.from_info(info), spec, verified_bound=verified, rho=rho, delta=delta,
                           confidence=request.confidence, min_threshold=threshold, accuracy=request.accuracy)

        prepared = self._prepared.get_or_prepare((text, verified, rho, request.accuracy, delta, request.confidence),
                                                 prepared_here)
        accuracy_within_level(request, prepared.certified, info.level, info.pricing)
        output = run(self._rows[info.name].lazy(), Table.from_info(info), prepared.plan, prepared.certified,
                     prepared.description)
        return unsigned_release(self.name, info.name, "mock", text, request, list(spec.group_by),
                                prepared.certified, output, info.pricing)
