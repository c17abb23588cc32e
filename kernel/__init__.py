"""Researcher side of Veil: the SDK (and, with issue [2/6], the Jupyter kernel). Never holds raw rows."""

from veil.kernel.builder import col, count
from veil.kernel.errors import (
    VeilAuthError,
    VeilBudgetError,
    VeilConfigError,
    VeilError,
    VeilPolicyError,
    VeilRequestError,
    VeilSiteUnavailable,
)
from veil.kernel.study import Study, load_study

__all__ = ["Study", "VeilAuthError", "VeilBudgetError", "VeilConfigError", "VeilError", "VeilPolicyError",
           "VeilRequestError", "VeilSiteUnavailable", "col", "count", "load_study"]
