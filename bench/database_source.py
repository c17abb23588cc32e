"""A dataset in PostgreSQL against the Parquet path, on ~1M and ~10M encounter rows, in the same run.

    python bench/database_source.py                      # 1M and 10M rows (~5 min)
    python bench/database_source.py --rows 1M            # quick
    python bench/database_source.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

For each size: one synthetic site's encounters are loaded into a fresh PostgreSQL database, then
* snapshot: Veil's copy of the table into the site's Parquet snapshot (`executor.snapshot.take`: ADBC,
  read-only, the declared columns, cast to the catalog's dtypes, written atomically);
* reads: the same SELECT with Polars' two database engines, ADBC and ConnectorX (when installed),
  against the baseline `pl.read_parquet` of the original file;
* releases: warm HTTP releases (a count and a grouped mean) from an executor serving the snapshot and
  from one serving the original Parquet file (same data, same queries, p50 of `--repeats`).
A query that read the database each time would pay the read column on every release; the snapshot
pays it once per refresh.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import polars as pl  # noqa: E402
import tomli_w  # noqa: E402
from _common import (  # noqa: E402
    bench_site,
    check_quiet,
    label,
    make_cohort,
    parse_rows,
    ratio,
    save,
    state_database,
    stats_ms,
    table,
    timed,
    workdir,
)

from veil.executor import snapshot  # noqa: E402
from veil.executor.catalog import load_catalog  # noqa: E402
from veil.kernel.client import SiteClient  # noqa: E402

QUERIES = {"count": "SELECT COUNT(*) AS n FROM encounters",
           "grouped mean": "SELECT department, AVG(length_of_stay_days) AS los FROM encounters GROUP BY department"}


def sourced_catalog(site_config: Path, url: str) -> Path:
    """The cohort's catalog with `encounters` read from table research.encounters."""
    raw = tomllib.loads(site_config.read_text())
    encounters = raw["datasets"]["encounters"]
    encounters["path"] = "snapshots/encounters.parquet"
    encounters["source"] = {"url": url, "table": "research.encounters"}
    path = site_config.with_name("site-sourced.toml")
    path.write_text(tomli_w.dumps(raw))
    return path


def releases(config: Path, state_dir: Path, repeats: int) -> dict[str, dict[str, float]]:
    with state_database(state_dir) as url, bench_site(config, url, {"encounters": 10_000.0}) as site:
        client = SiteClient("north", site.url, site.token)
        figures = {}
        for name, sql in QUERIES.items():
            client.query(sql=sql, epsilon=0.05)  # cold
            figures[name] = stats_ms([timed(client.query, sql=sql, epsilon=0.05)[0] for _ in range(repeats)])
        client.close()
    return figures


def measure(rows: int, database_url: str, root: Path, repeats: int) -> dict[str, Any]:
    cohort = make_cohort(root / label(rows), target_rows=rows)
    frame = pl.read_parquet(cohort.encounters)
    with state_database(root, database_url.replace("postgresql://", "postgresql+psycopg://")) as db:
        url = db.replace("+psycopg", "")
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA research")
        load_s, _ = timed(frame.write_database, "research.encounters", url, engine="adbc")
        config = sourced_catalog(cohort.site_config, url)
        dataset = load_catalog(config).dataset("encounters")
        snapshot_s, _ = timed(snapshot.take, dataset)
        columns = ", ".join(frame.columns)
        select = f"SELECT {columns} FROM research.encounters"
        reads = {"parquet (baseline)": timed(pl.read_parquet, cohort.encounters)[0],
                 "ADBC": timed(pl.read_database_uri, select, url, engine="adbc")[0]}
        try:
            reads["ConnectorX"] = timed(pl.read_database_uri, select, url, engine="connectorx")[0]
        except ImportError:
            print("ConnectorX is not installed (pip install connectorx): its read is not measured")
        served = {"snapshot of the table": releases(config, root, repeats),
                  "Parquet file (baseline)": releases(cohort.site_config, root, repeats)}
    return {"rows": cohort.rows, "load_s": load_s, "snapshot_s": snapshot_s, "reads_s": reads,
            "releases_ms": served}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1M,10M")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    before = check_quiet("before")
    root = workdir(args.keep, "dbsource")
    results = {}
    for rows in [parse_rows(r) for r in args.rows.split(",")]:
        got = results[label(rows)] = measure(rows, args.database_url, root, args.repeats)
        base = got["reads_s"]["parquet (baseline)"]
        print(f"\n## {label(rows)} ({got['rows']:,} rows): loading the table took {got['load_s']:.1f} s; "
              f"Veil's snapshot {got['snapshot_s']:.2f} s ({ratio(got['snapshot_s'], base):.1f} x reading the Parquet file)")
        print(table(["read of all rows", "seconds", "x parquet"],
                    [[k, f"{v:.3f}", f"{ratio(v, base):.1f}"] for k, v in got["reads_s"].items()]))
        served = got["releases_ms"]
        print(table(["warm release p50 (ms)", *QUERIES, ],
                    [[where, *(f"{served[where][q]['p50']:.1f}" for q in QUERIES)] for where in served]))
    save(f"database_source_{args.rows.replace(',', '_')}", {"results": results, "load_before": before,
                                                             "load_after": check_quiet("after")})


if __name__ == "__main__":
    main()
