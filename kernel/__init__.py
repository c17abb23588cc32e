"""Researcher side of Veil: the SDK the Jupyter kernel and its magics. Never holds raw rows.

The names below load on first use (PEP 562), so that importing a module of this package (the kernel,
at start) does not import the SDK and its libraries (Polars, httpx, pydantic, sqlglot).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from veil.kernel.builder import col, count
    from veil.kernel.errors import (
        VeilAuthError,
        VeilBudgetError,
        VeilConfigError,
        VeilError,
        VeilPolicyError,
        VeilRequestError,
        VeilSiteUnavailable,
        VeilUsageError,
    )
    from veil.kernel.study import Study, load_study
    from veil.kernel.training import TrainedModel, VeilTrainingFailed
    from veil.models.spec import ModelSpec

_HOME = {
    "col": "veil.kernel.builder", "count": "veil.kernel.builder",
    **dict.fromkeys(["VeilAuthError", "VeilBudgetError", "VeilConfigError", "VeilError", "VeilPolicyError",
                     "VeilRequestError", "VeilSiteUnavailable", "VeilUsageError"], "veil.kernel.errors"),
    "Study": "veil.kernel.study", "load_study": "veil.kernel.study",
    "TrainedModel": "veil.kernel.training", "VeilTrainingFailed": "veil.kernel.training",
    "ModelSpec": "veil.models.spec",
}
"""Where each public name lives."""

__all__ = ["ModelSpec", "Study", "TrainedModel", "VeilAuthError", "VeilBudgetError", "VeilConfigError", "VeilError",
           "VeilPolicyError", "VeilRequestError", "VeilSiteUnavailable", "VeilTrainingFailed", "VeilUsageError", "col",
           "count", "load_study"]


def __getattr__(name: str) -> Any:
    """`veil.kernel.NAME`: import NAME's module on first use, then keep NAME here."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
