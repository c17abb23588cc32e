"""Witnessed audit heads (executor/witness.py): peers push their signed heads here, and anyone may read them.

`POST /witness` takes no token: the Ed25519 signature under the key `[peers.NAME]` configures is what
authenticates the sender, so the Gate's limits for requests without a token apply (1 KiB of body, the
anonymous rate per address). `GET /witness/{site}` takes no token either: the heads are signed data meant to be
published (like `veil audit checkpoints`), and whoever checks a site's log needs them from each of its peers.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam

from veil.executor import witness
from veil.executor.routes.deps import site_of
from veil.executor.site import Site
from veil.wire import NAME_PATTERN, Checkpoint, Witnessed

router = APIRouter()


@router.post("/witness", response_model=Witnessed)
def receive(head: Checkpoint, site: Site = Depends(site_of)) -> Witnessed:
    """Witness a peer's signed audit head: kept if the key configured for that peer signed it; a second hash
    for an entry already witnessed (a fork) is refused and audited here."""
    return witness.receive(site.engine, site.catalog, head)


@router.get("/witness/{peer}", response_model=list[Checkpoint])
def heads(peer: str = PathParam(pattern=NAME_PATTERN, max_length=64),
                site: Site = Depends(site_of)) -> list[Checkpoint]:
    """The heads of site `peer` this site witnessed, oldest first (signed by `peer`; public)."""
    return witness.witnessed(site.engine, peer)
