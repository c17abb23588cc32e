"""What every route depends on: the site the app serves, the caller the Gate identified, and id paths."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path as PathParam
from fastapi import Request

from veil import limits
from veil.errors import AuthError
from veil.executor.auth import Principal
from veil.executor.site import Site
from veil.wire import REQUEST_ID_PATTERN

Id = Annotated[int, PathParam(ge=1, le=limits.MAX_ID)]
RequestId = Annotated[str, PathParam(pattern=REQUEST_ID_PATTERN)]


async def site_of(request: Request) -> Site:
    """The site this app serves (async: nothing to wait for, so no worker thread is taken)."""
    site: Site = request.app.state.site
    return site


def principal(request: Request) -> Principal:
    """The caller the Gate authenticated; a request without a valid token is refused here."""
    identity = request.state.identity
    if isinstance(identity, AuthError):
        raise identity
    return identity  # type: ignore[no-any-return]
