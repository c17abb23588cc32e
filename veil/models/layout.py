"""The columns of a model's input tensor: public metadata that travels with a job and its weights."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FeatureLayout:
    """The columns of an input tensor, in order, and the number of model outputs.

    Numeric columns come first, then one code column per categorical column; `categorical` pairs each
    name with its cardinality, the extra 'other' code included. Everything here is public metadata.
    """

    numeric: tuple[str, ...]
    categorical: tuple[tuple[str, int], ...] = ()
    outputs: int = 2

    @property
    def width(self) -> int:
        """Columns of the input tensor."""
        return len(self.numeric) + len(self.categorical)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureLayout:
        """A layout from its JSON form (weights' metadata, a job's public `layout`, a run config)."""
        return cls(numeric=tuple(data["numeric"]), categorical=tuple((str(c), int(n)) for c, n in data["categorical"]),
                   outputs=int(data["outputs"]))

    @classmethod
    def numeric_only(cls, n_features: int, outputs: int = 2) -> FeatureLayout:
        """A layout of `n_features` anonymous numeric columns (x0, x1, ...)."""
        return cls(numeric=tuple(f"x{i}" for i in range(n_features)), outputs=outputs)
