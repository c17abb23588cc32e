"""A dataset's sharing model, as both sides enforce it on a query release.

`open` (L1 only): DP statistics for any project on the site, and a DP statistics sheet the steward may publish;
`controlled`: releases as the dataset's privacy level and its review rules allow (the default);
`enclave`: no query release at all, only approved training jobs and their DP evaluations. The site refuses a
query on an enclave dataset before planning it; mock mode refuses it the same way, so that no notebook is
written against releases the site will never make.
"""

from __future__ import annotations

from typing import get_args

from veil.errors import QueryError
from veil.wire import Sharing

SHARING_MODELS: tuple[Sharing, ...] = get_args(Sharing)


def refuse_query(dataset: str, sharing: Sharing) -> None:
    """Refuse a query release on an enclave dataset (nothing is planned, run or charged); others pass."""
    if sharing == "enclave":
        raise QueryError("enclave_dataset", f"dataset '{dataset}' is an enclave: its site releases no query "
                         "results on it, only models trained with DP-SGD under an approved grant and their DP "
                         "evaluations; nothing was charged",
                         hint="train a model on it instead (study.train(...); README, \"Sharing models\"), or "
                              "query an open or controlled dataset", status=403)
