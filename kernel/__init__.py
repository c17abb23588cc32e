"""Researcher side of Veil: the SDK the Jupyter kernel and its magics. Never holds raw rows."""

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

__all__ = ["ModelSpec", "Study", "TrainedModel", "VeilAuthError", "VeilBudgetError", "VeilConfigError", "VeilError",
           "VeilPolicyError", "VeilRequestError", "VeilSiteUnavailable", "VeilTrainingFailed", "VeilUsageError", "col",
           "count", "load_study"]
