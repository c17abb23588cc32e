"""Turn a Polars frame into training tensors using only public column metadata.

Scaling uses the steward's public bounds, never statistics of the private data (a scaler fitted on
the data would itself be a release). Numeric values are clipped to their bounds and mapped to
[-1, 1]; a missing value becomes 0, the middle of the bounds. A categorical value becomes its index
in the public category list, and anything else (an unlisted value, a null) the extra code len(list).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import polars as pl
import torch

from veil.errors import QueryError
from veil.models.layout import FeatureLayout

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Encoded:
    """Tensors ready for training: `x` float32 (rows, layout.width), `y` class codes or scaled labels."""

    x: torch.Tensor
    y: torch.Tensor
    layout: FeatureLayout


def encode(
    frame: pl.DataFrame,
    *,
    label: str,
    numeric: Mapping[str, tuple[float, float]],
    categorical: Mapping[str, Sequence[Scalar]] | None = None,
    classes: Sequence[Scalar] | None = None,
    label_bounds: tuple[float, float] | None = None,
) -> Encoded:
    """Encode feature and label columns by their public metadata.

    Give `classes` for a classification label (rows whose label is not listed, or null, are dropped)
    or `label_bounds` for a regression label (scaled like a numeric feature; null rows dropped).
    """
    categorical = dict(categorical or {})
    if (classes is None) == (label_bounds is None):
        raise QueryError(
            "bad_label", f"label {label!r} needs either public classes or public bounds, not both or neither"
        )
    if classes is not None and len(classes) < 2:
        raise QueryError("bad_label", f"label {label!r} needs at least two public classes")
    missing = [c for c in [*numeric, *categorical, label] if c not in frame.columns]
    if missing:
        raise QueryError("unknown_column", f"no such column(s): {', '.join(missing)}")
    if classes is not None:
        frame = frame.filter(pl.col(label).is_in(list(classes)))
        y_expr = _codes(label, classes).alias("__y")
    else:
        assert label_bounds is not None
        frame = frame.filter(pl.col(label).is_not_null() & pl.col(label).is_not_nan())
        y_expr = _scaled(label, label_bounds).alias("__y")
    x_exprs = [_scaled(c, b) for c, b in numeric.items()]
    x_exprs += [_codes(c, cats).cast(pl.Float32) for c, cats in categorical.items()]
    out = frame.select(*x_exprs, y_expr)
    x = torch.tensor(out.drop("__y").to_numpy().reshape(len(out), out.width - 1), dtype=torch.float32)
    y = torch.tensor(out.get_column("__y").to_numpy(), dtype=torch.int64 if classes else torch.float32)
    layout = FeatureLayout(
        numeric=tuple(numeric),
        categorical=tuple((c, len(cats) + 1) for c, cats in categorical.items()),
        outputs=len(classes) if classes is not None else 1,
    )
    return Encoded(x=x, y=y, layout=layout)


def _scaled(column: str, bounds: tuple[float, float]) -> pl.Expr:
    """Clip to the public bounds, map to [-1, 1]; null or NaN becomes 0."""
    lo, hi = (float(b) for b in bounds)
    if not lo < hi:
        raise QueryError("bad_bounds", f"column {column!r}: public bounds need lower < upper, got {bounds}")
    value = pl.col(column).cast(pl.Float64)
    scaled = (value.clip(lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    return scaled.fill_nan(0.0).fill_null(0.0).cast(pl.Float32).alias(column)


def _codes(column: str, categories: Sequence[Scalar]) -> pl.Expr:
    """Index in the public category list; unlisted values and nulls get len(categories)."""
    if len(set(categories)) != len(categories) or not categories:
        raise QueryError(
            "bad_categories", f"column {column!r}: public categories must be distinct and non-empty"
        )
    other = len(categories)
    return (
        pl.col(column)
        .replace_strict(list(categories), list(range(other)), default=other, return_dtype=pl.Int64)
        .fill_null(other)
        .alias(column)
    )
