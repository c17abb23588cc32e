"""A dataset as the shared core sees it: its schema and the public metadata a steward declared.

Everything here is public (names, dtypes, bounds, categories, the most rows one patient may have):
planning, calibration and intervals need nothing else, so the researcher's mock mode and the site
plan the same query the same way. Where the rows live is the executor's business (`executor/catalog.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from veil.errors import CatalogError
from veil.wire import ColumnInfo, DatasetInfo

DTYPES: dict[str, pl.DataType] = {
    "Int64": pl.Int64(),
    "Int32": pl.Int32(),
    "Float64": pl.Float64(),
    "String": pl.String(),
    "Date": pl.Date(),
    "Boolean": pl.Boolean(),
}


@dataclass(frozen=True)
class Column:
    """A column and what the steward declared public about it."""

    name: str
    dtype: str
    description: str | None = None
    bounds: tuple[float, float] | None = None
    categories: tuple[Any, ...] | None = None
    nullable: bool = False

    @property
    def is_numeric(self) -> bool:
        return self.dtype in ("Int64", "Int32", "Float64")

    @property
    def is_integer(self) -> bool:
        return self.dtype in ("Int64", "Int32")

    def info(self) -> ColumnInfo:
        return ColumnInfo(
            name=self.name,
            dtype=self.dtype,
            description=self.description,
            bounds=self.bounds,
            categories=list(self.categories) if self.categories is not None else None,
            nullable=self.nullable,
        )

    @classmethod
    def from_info(cls, info: ColumnInfo) -> Column:
        categories = tuple(info.categories) if info.categories is not None else None
        return cls(info.name, info.dtype, info.description, info.bounds, categories, info.nullable)


@dataclass(frozen=True, kw_only=True)
class Table:
    """A dataset's schema and public bounds: all that planning a query may look at."""

    name: str
    privacy_unit: str
    max_rows_per_unit: int
    max_rows: int
    columns: dict[str, Column] = field(default_factory=dict)

    def column(self, name: str) -> Column:
        """The column called `name`, or a CatalogError listing the columns that exist."""
        try:
            return self.columns[name]
        except KeyError:
            known = ", ".join(self.columns)
            raise CatalogError(
                "unknown_column",
                f"dataset '{self.name}' has no column '{name}'",
                hint=f"columns are: {known}",
            ) from None

    def schema(self) -> pl.Schema:
        return pl.Schema({c.name: DTYPES[c.dtype] for c in self.columns.values()})

    @classmethod
    def from_info(cls, info: DatasetInfo) -> Table:
        """The table a site published (`GET /datasets`)."""
        return cls(name=info.name, privacy_unit=info.privacy_unit, max_rows_per_unit=info.max_rows_per_unit,
                   max_rows=info.max_rows, columns={c.name: Column.from_info(c) for c in info.columns})
