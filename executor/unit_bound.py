"""Check, without releasing anything, how a dataset file keeps its catalog's rows-per-patient bound.

Grouping millions of rows by patient holds a few hundred MB that the allocator keeps afterwards,
so the count runs in a short-lived child process and only two numbers come back, never rows."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import NamedTuple

import polars as pl


class RowsPerUnit(NamedTuple):
    """What the check found: the most rows one unit has, and how many units have more than the bound."""

    most: int
    over: int


def _rows_per_unit(path: str, unit: str, bound: int) -> RowsPerUnit:
    counts = pl.scan_parquet(path).group_by(unit).len()
    found = counts.select(pl.col("len").max().alias("most"), (pl.col("len") > bound).sum().alias("over"))
    most, over = found.collect(engine="streaming").row(0)
    return RowsPerUnit(int(most or 0), int(over or 0))


def rows_per_unit(path: Path, unit: str, bound: int) -> RowsPerUnit:
    """The largest number of rows sharing one value of `unit` (0 for an empty file), and the number of
    values of `unit` that have more than `bound` rows."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_rows_per_unit, (str(path), unit, bound))
