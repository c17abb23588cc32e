"""Check, without releasing anything, the most rows any one patient has in a dataset file.

Grouping millions of rows by patient holds a few hundred MB that the allocator keeps afterwards,
so the count runs in a short-lived child process and only the number comes back."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import polars as pl


def _most_rows(path: str, unit: str) -> int:
    counts = pl.scan_parquet(path).group_by(unit).len()
    return int(counts.select(pl.col("len").max()).collect(engine="streaming").item() or 0)


def most_rows_per_unit(path: Path, unit: str) -> int:
    """The largest number of rows sharing one value of `unit` (0 for an empty file)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_most_rows, (str(path), unit))
