"""Names in the wire contract (datasets, columns, projects): one pattern for every module that checks them."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"
"""Dataset and column names: letters, digits and underscores. Rules out path traversal by construction."""

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
