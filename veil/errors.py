"""Refusals: each carries a code, a message, a hint and an HTTP status (the executor sends them as
`wire.Refusal`; SQL parsing on either side raises `QueryError`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class VeilError(Exception):
    """A refusal with a reason and what to do next. Nothing is charged for it."""

    status: int = 400

    def __init__(
        self,
        code: str,
        message: str,
        hint: str | None = None,
        status: int | None = None,
        remaining: dict[str, float] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.remaining = remaining
        if status is not None:
            self.status = status


class CatalogError(VeilError):
    """The catalog or the request names something the site does not have."""


class QueryError(VeilError):
    """The query is malformed, or not something OpenDP can release privately."""


class BudgetError(VeilError):
    """The grant or the dataset's lifetime cap cannot afford this release."""

    status = 409


class AuthError(VeilError):
    """Missing or invalid token (401), or a role that may not do this (403)."""

    status = 401


class GovernanceError(VeilError):
    """An application, review, grant or cap change that the site's review rules do not allow."""

    status = 409


def validation_problems(errors: Sequence[Any], limit: int = 5) -> str:
    """Pydantic's validation errors in one line: `where: what` for each (at most `limit`). When a value
    fails every member of a union, the type mismatches are left out if a more specific reason exists
    (a text too long says so, not "input should be a valid boolean")."""
    specific = [e for e in errors if not str(e.get("type", "")).endswith(("_type", "_parsing"))]
    return "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in list(specific or errors)[:limit])


def _where(loc: Sequence[Any]) -> str:
    """A field's path without the body prefix and pydantic's union-member tags (`constrained-str`, ...)."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or "constrained" in p))]
    return ".".join(parts) or "body"
