"""A site catalog drafted from a Parquet file or a PostgreSQL table, for the site's data steward to complete.

`veil site init --from FILE_OR_TABLE` reads the schema only (never a row) and writes a `site.toml` with
each column's dtype (a dtype the catalog maps, say UInt32 as Int64, is noted), and, for every public fact
that must not come from the data, a `"TODO: ..."` string saying where it comes from: the privacy unit,
rows per patient, the row bound, the privacy level, numeric bounds (clinical ranges), category lists
(code lists). `load_catalog` refuses a catalog that still holds a TODO, naming each one.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from veil.errors import CatalogError
from veil.executor.catalog import TABLE_NAME, declared_dtype

UNIT_NAMES = re.compile(r"^(person|patient|subject|participant|member)_?(id|key|num|number)?$", re.IGNORECASE)


def file_schema(path: Path) -> pl.Schema:
    """A Parquet file's schema (its metadata only)."""
    return pl.scan_parquet(path).collect_schema()


def table_schema(url: str, table: str) -> pl.Schema:
    """A PostgreSQL table's or view's schema, from a query that returns no row."""
    import adbc_driver_postgresql.dbapi as adbc

    if not TABLE_NAME.match(table):
        raise CatalogError("bad_catalog", f"{table!r} is not a table name (schema.table or table)")
    quoted = ".".join(f'"{part}"' for part in table.split("."))
    with adbc.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute("SET default_transaction_read_only = on")
        cursor.execute(f"SELECT * FROM {quoted} LIMIT 0")  # noqa: S608  (name checked)
        frame = pl.from_arrow(cursor.fetch_arrow_table())
    assert isinstance(frame, pl.DataFrame)
    return frame.schema


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def draft(name: str, schema: pl.Schema, *, path: str | None = None, source_table: str | None = None,
          url_env: str | None = None, site: str = "TODO_site_name") -> str:
    """The text of a `site.toml` with one dataset `name` of `schema`, read from `path` or `source_table`."""
    unsupported = [f"'{c}' ({dtype})" for c, dtype in schema.items() if declared_dtype(dtype) is None]
    if unsupported:
        raise CatalogError("bad_catalog", f"column(s) {', '.join(unsupported)} have dtypes a catalog cannot declare",
                           hint="cast them in a database view (integers, floats, text, dates, booleans) and "
                                "draft from the view")
    guess = next((c for c in schema if UNIT_NAMES.match(c)), None)
    lines = [
        "# Drafted by `veil site init` from the schema alone (no row was read). Every TODO is a public fact for",
        "# the data steward to declare from knowledge, never from the data; the executor refuses to start",
        "# while one is left. See README, \"Set up your own site\". Where nobody knows a number's range, `veil site",
        "# bounds` estimates it with DP once the privacy unit and row bounds are declared (charged to the budget).",
        "[site]", f"name = {_toml(site)}", 'database = "sqlite:///veil.db"  # the state database (ledger, audit)',
        "reporting_delta = 1e-6", "default_l1_epsilon = 2.0", "",
        f"[datasets.{name}]",
        f"title = {_toml(name.replace('_', ' ').capitalize())}",
        'description = "TODO: one sentence a researcher reads in the catalog"',
    ]
    if source_table is not None:
        lines.append(f"source = {{ table = {_toml(source_table)}, url_env = {_toml(url_env or 'VEIL_SOURCE_URL')} }}"
                     "  # the site copies it into snapshots/ (read-only)")
    else:
        lines.append(f"path = {_toml(path or '')}")
    lines += [
        'level = "TODO: L1 (open aggregates), L2 (controlled) or L3 (restricted: ethics approval, two reviewers)"',
        "privacy_unit = " + _toml("TODO: the column that identifies a patient"
                                  + (f" (is it '{guess}'?)" if guess else "")),
        'max_rows_per_unit = "TODO: the most rows one patient can have (by design of the table, e.g. 1 for one '
        'row per patient); the site checks it and truncates beyond"',
        'max_rows = "TODO: a public upper bound on the number of rows (e.g. the hospital\'s size times rows per '
        'patient)"',
        "lifetime_epsilon = 10.0  # the budget all projects together may spend on this dataset (a steward's choice)",
        '# sharing = "controlled"  # the default; "open" (L1 only: any project, a published statistics sheet) or '
        '"enclave" (no query releases, training only)',
    ]
    for column, dtype in schema.items():
        declared = declared_dtype(dtype)
        assert declared is not None
        lines += ["", f"[datasets.{name}.columns.{column}]",
                  f"dtype = {_toml(declared)}" + (f"  # the file's {dtype}, read as {declared}"
                                                  if str(dtype) != declared else ""),
                  'description = "TODO: what it holds, with its unit"',
                  "nullable = true  # set false if it is never empty (checked at start)"]
        if column == guess:
            continue
        if declared in ("Int64", "Int32", "Float64"):
            lines.append('bounds = "TODO: [lower, upper], public: a clinical or physical range, a code\'s range '
                         '(values outside are clamped); remove the line if the column is only filtered on"')
        elif declared == "String":
            lines.append('categories = "TODO: [\\"a\\", \\"b\\"], the public list of values (a code list or a '
                         'vocabulary); remove the line to release its groups only by thresholding"')
    return "\n".join(lines) + "\n"
