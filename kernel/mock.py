"""Mock mode: the same queries, run locally on mock rows made from public metadata only.

A mock site is the executor's own engine (planning, OpenDP calibration, intervals) over a Parquet
file of made-up rows that respect each column's public bounds and categories. Nothing is read from
any hospital and nothing is spent: costs come out as a live run would charge them, because they
depend only on the query, the public metadata and the requested loss, never on the data.
"""

from __future__ import annotations

import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl

from veil.wire import ColumnInfo, DatasetInfo, MockInfo, QueryRequest, QuerySpec, Release

MOCK_ROWS = 2000
DTYPES = {"Int64": pl.Int64, "Int32": pl.Int32, "Float64": pl.Float64, "String": pl.String, "Date": pl.Date,
          "Boolean": pl.Boolean}
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


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value).lower() if isinstance(value, bool) else repr(value)


class MockSite:
    """A local executor over mock rows for one site's datasets; answers like `SiteClient.query`.

    `rows` gives a dataset's rows (the steward's DP synthetic mock); others get `mock_rows`."""

    def __init__(self, name: str, datasets: list[DatasetInfo], rows: dict[str, pl.DataFrame] | None = None) -> None:
        from veil.executor import ledger
        from veil.executor.auth import Principal
        from veil.executor.site import Site
        from veil.executor.store import write

        self.name = name
        self._dir = tempfile.TemporaryDirectory(prefix=f"veil-mock-{name}-")
        root = Path(self._dir.name)
        lines = ["[site]", f'name = "{name}"', 'database = "sqlite:///mock.db"', "default_l1_epsilon = 1000.0",
                 "[limits]", "query_workers = 1"]  # one query process per mock site is plenty
        for info in datasets:
            given = (rows or {}).get(info.name)
            (given if given is not None else mock_rows(info)).write_parquet(root / f"{info.name}.parquet")
            lines += [f"[datasets.{info.name}]", f'path = "{info.name}.parquet"', f'level = "{info.level}"',
                      f'privacy_unit = "{info.privacy_unit}"', f"max_rows_per_unit = {info.max_rows_per_unit}",
                      f"max_rows = {info.max_rows}", "lifetime_epsilon = 1000.0"]
            for c in info.columns:
                lines.append(f"[datasets.{info.name}.columns.{c.name}]")
                lines.append(f'dtype = "{c.dtype}"')
                if c.bounds is not None:
                    lines.append(f"bounds = {_toml_value(list(c.bounds))}")
                if c.categories is not None:
                    lines.append(f"categories = {_toml_value(list(c.categories))}")
                lines.append(f"nullable = {_toml_value(c.nullable)}")
        (root / "site.toml").write_text("\n".join(lines) + "\n")
        self._site = Site.open(root / "site.toml")
        self._who = Principal("mock", "researcher", "mock")
        with write(self._site.engine) as conn:
            for info in datasets:
                ledger.set_grant(conn, self._site.catalog, "mock", self._site.catalog.dataset(info.name),
                                 1000.0, by="mock")

    def query(self, spec: QuerySpec, **loss: object) -> Release:
        """The release a live query would give, on mock rows; the mock ledger is the only one charged."""
        return self._site.query(self._who, QueryRequest(spec=spec, **loss))  # type: ignore[arg-type]
