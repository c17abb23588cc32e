"""Datasets whose rows live in PostgreSQL: copied into the site's own Parquet snapshot, then served as files.

Why a snapshot rather than reading the database for each query: reading a million rows over ADBC takes
about 0.8 s on this machine, scanning them from Parquet a few tens of milliseconds (`bench/database_source.py`);
and the site's guarantees need a fixed file: the per-patient bound is checked once per version of the data
(by its fingerprint), and a release's note can say which version it used. So the executor copies the
catalog's declared columns (never `*`) of the table at start and every `refresh_minutes`, inside a
read-only transaction under a statement timeout, casts them to the catalog's dtypes (a value that does
not fit names its column), writes the snapshot beside a small JSON record of when it was taken, and swaps
it in atomically: a query already reading the previous snapshot finishes on it.

ADBC (Apache Arrow's PostgreSQL driver) rather than ConnectorX: both read a million rows in 0.7-0.9 s
here, but ADBC gives a DB-API connection, so the session is made read-only and time-limited with plain
`SET` statements whatever the URL says.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from veil.errors import CatalogError
from veil.executor.catalog import Catalog, Dataset

REFRESH_CHECK_SECONDS = 60.0
"""How often the site looks whether a snapshot is due."""


@dataclass(frozen=True)
class Snapshot:
    """When a dataset's snapshot was taken, of which table, and how many rows it holds."""

    taken_at: str
    table: str
    rows: int

    @property
    def note(self) -> str:
        """What a release made from this snapshot tells its reader."""
        return f"data as of {self.taken_at[:16].replace('T', ' ')} UTC (the site's snapshot of table {self.table})"


def _record(dataset: Dataset) -> Path:
    return dataset.path.with_suffix(".snapshot.json")


def current(dataset: Dataset) -> Snapshot | None:
    """The dataset's snapshot record, if it has a source and a snapshot was taken."""
    if dataset.source is None:
        return None
    try:
        return Snapshot(**json.loads(_record(dataset).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _quoted(name: str) -> str:
    return ".".join(f'"{part}"' for part in name.split("."))


def take(dataset: Dataset) -> Snapshot:
    """Copy the dataset's declared columns from its source table into its snapshot file (atomically)."""
    try:
        import adbc_driver_postgresql.dbapi as adbc
    except ImportError:
        raise CatalogError("source_unreadable", f"dataset '{dataset.name}' is read from PostgreSQL, which needs "
                           "Apache Arrow's ADBC driver", hint="pip install 'veil[site,postgres]'") from None
    source = dataset.source
    assert source is not None
    columns = ", ".join(_quoted(c) for c in dataset.columns)
    started = datetime.now(UTC)
    try:
        with adbc.connect(source.url, autocommit=True) as conn, conn.cursor() as cursor:  # each statement its own
            cursor.execute("SET default_transaction_read_only = on")  # ... transaction, read-only from here on
            cursor.execute(f"SET statement_timeout = {int(source.statement_seconds * 1000)}")
            cursor.execute(f"SELECT {columns} FROM {_quoted(source.table)}")  # noqa: S608  (names checked)
            frame = pl.from_arrow(cursor.fetch_arrow_table())
    except Exception as exc:  # the driver's errors: connection, permission, missing table or column, timeout
        raise CatalogError("source_unreadable", f"dataset '{dataset.name}': reading table {source.table} failed: "
                           f"{type(exc).__name__}: {str(exc).strip()[:400]}",
                           hint="check the source URL's role (SELECT on the table), the table's columns against "
                                "the catalog, and statement_seconds") from None
    assert isinstance(frame, pl.DataFrame)
    frame = _as_declared(dataset, frame)
    dataset.path.parent.mkdir(parents=True, exist_ok=True)
    partial = dataset.path.with_suffix(".partial.parquet")
    frame.write_parquet(partial)
    os.replace(partial, dataset.path)
    snapshot = Snapshot(taken_at=started.isoformat(timespec="seconds"), table=source.table, rows=frame.height)
    record = _record(dataset)
    record.with_suffix(".partial").write_text(json.dumps(snapshot.__dict__))
    os.replace(record.with_suffix(".partial"), record)
    return snapshot


def _as_declared(dataset: Dataset, frame: pl.DataFrame) -> pl.DataFrame:
    """The frame in the catalog's dtypes; a column whose values do not fit is named in the error."""
    schema = dataset.schema()
    for name, dtype in schema.items():
        try:
            frame = frame.with_columns(pl.col(name).cast(dtype, strict=True))
        except pl.exceptions.PolarsError as exc:
            raise CatalogError("bad_catalog", f"dataset '{dataset.name}', column '{name}': the table's "
                               f"{frame.schema[name]} values do not fit the catalog's dtype {dtype} "
                               f"({type(exc).__name__})",
                               hint="declare the column's dtype to match the table (veil site init drafts it)"
                               ) from None
    return frame.select(list(schema))


def due(dataset: Dataset, now: float | None = None) -> bool:
    """Whether the dataset's snapshot is missing or older than its refresh interval."""
    if dataset.source is None:
        return False
    if current(dataset) is None or not dataset.path.is_file():
        return True
    age = (now or time.time()) - dataset.path.stat().st_mtime
    return age >= dataset.source.refresh_minutes * 60


class Refresher:
    """Retakes the due snapshots of the datasets it `wanted` in a daemon thread; a failed refresh keeps the previous
    snapshot (and logs)."""

    def __init__(self, catalog: Catalog, on_error: Callable[[Dataset, CatalogError], None],
                 wanted: Callable[[Dataset], bool] = lambda _: True) -> None:
        self.catalog, self.on_error, self.wanted = catalog, on_error, wanted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="veil-snapshots", daemon=True)

    def start(self) -> None:
        if any(d.source for d in self.catalog.datasets.values()):
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(REFRESH_CHECK_SECONDS):
            for dataset in self.catalog.datasets.values():
                if due(dataset) and self.wanted(dataset):
                    try:
                        take(dataset)
                    except CatalogError as exc:
                        self.on_error(dataset, exc)
