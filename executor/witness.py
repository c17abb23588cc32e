"""Witnessed audit heads: each site keeps its peers' signed audit heads, so that no site can rewrite its own past.

A site's administrator holds its signing key: they can rewrite the log, recompute the chain and re-sign every
checkpoint, and the site's own verification passes. They cannot make the peers forget the heads they already
witnessed. So each site pushes its latest signed checkpoint to every peer in its `[peers]` (`POST /witness`,
every `witness_minutes` and on `veil audit witness`); a peer keeps it only when the key configured for that
site signed it (never the key the message carries), and refuses a second, different hash for a seq it holds
(a fork) and records it in its own audit log as evidence. `GET /witness/{site}` serves the heads it holds,
and `veil audit verify --witnesses` proves that the site's chain still extends every one of them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import Connection, Engine, insert, select

from veil.errors import AuthError, VeilError
from veil.executor import audit, checkpoints
from veil.executor.catalog import Catalog, Peer
from veil.executor.checkpoints import SiteKey
from veil.executor.store import witnessed_heads, write
from veil.wire import Checkpoint, Witnessed

log = logging.getLogger("veil.executor.witness")

TIMEOUT_SECONDS = 10.0
"""How long a push to, or a fetch from, one peer may take."""
_HEADS = TypeAdapter(list[Checkpoint])
_COLUMNS = (witnessed_heads.c.seq, witnessed_heads.c.hash, witnessed_heads.c.ts, witnessed_heads.c.key_id,
            witnessed_heads.c.public_key, witnessed_heads.c.signature)


def peer_key(peer: Peer) -> SiteKey:
    """The key that must have signed the peer's heads: the one this site's catalog names for it."""
    return SiteKey(peer.name, Ed25519PublicKey.from_public_bytes(bytes.fromhex(peer.public_key)))


# ------------------------------------------------------------ receiving


def receive(engine: Engine, catalog: Catalog, head: Checkpoint) -> Witnessed:
    """Keep a peer's signed head (idempotently). Refused: a site not in `[peers]`, a signature not made by the
    configured key, or a fork (another hash for a seq already witnessed: audited here as evidence)."""
    peer = catalog.peers.get(head.site)
    if peer is None:
        raise AuthError("unknown_peer", f"site '{head.site[:64]}' is not a peer of site '{catalog.site}'",
                        hint=f"ask {catalog.site}'s administrator to add it to [peers] in site.toml", status=403)
    if not peer_key(peer).signed(head):
        log.warning("refused a head of %s at seq %d: not signed by its configured key", peer.name, head.seq)
        raise AuthError("bad_signature", f"this head is not signed by the key site '{catalog.site}' holds for "
                        f"'{peer.name}'", hint=f"check [peers.{peer.name}] public_key against 'veil audit key' "
                        f"on {peer.name}", status=403)
    with write(engine) as conn:
        held = conn.execute(select(witnessed_heads.c.hash).where(
            witnessed_heads.c.site == head.site, witnessed_heads.c.seq == head.seq)).scalar_one_or_none()
        if held is None:
            conn.execute(insert(witnessed_heads), {**head.model_dump(), "public_key": peer.public_key,
                                                   "received_at": audit.now()})
        elif held != head.hash:
            _record_fork(conn, head, held)  # committed before the refusal below: the evidence stays
    if held is not None and held != head.hash:
        raise VeilError("forked_head", f"site '{head.site}' already signed hash {held[:16]}... for entry {head.seq}; "
                        f"this head says {head.hash[:16]}...: its audit log was rewritten after it was witnessed",
                        hint=f"{catalog.site} keeps the head it witnessed first and audited this one as evidence",
                        status=409)
    return Witnessed(witness=catalog.site, site=head.site, seq=head.seq, new=held is None)


def _record_fork(conn: Connection, head: Checkpoint, held: str) -> None:
    """Audit a fork (both hashes, both signed by the peer) and warn in the executor's log."""
    log.error("site %s signed two heads for entry %d: %s (witnessed first) and %s: its log was rewritten",
              head.site, head.seq, held, head.hash)
    audit.append(conn, principal=f"peer:{head.site}", role="peer", action="witness",
                 decision="refused", result_digest=head.hash,
                 reason=f"fork: {head.site} signed entry {head.seq} as {held} (witnessed first) and now as "
                        f"{head.hash} (signature {head.signature}, ts {head.ts})")


def witnessed(engine: Engine, site: str) -> list[Checkpoint]:
    """The heads of `site` this site witnessed, oldest first."""
    query = select(*_COLUMNS).where(witnessed_heads.c.site == site).order_by(witnessed_heads.c.seq)
    with engine.connect() as conn:
        return [Checkpoint(site=site, **row) for row in conn.execute(query).mappings()]


# ------------------------------------------------------------ pushing and fetching


@dataclass(frozen=True)
class Outcome:
    """What one peer answered: `ok` with what it said, or why it did not take part."""

    peer: str
    ok: bool
    detail: str


def push(catalog: Catalog, engine: Engine) -> list[Outcome]:
    """Send this site's latest signed checkpoint to every peer; one outcome per peer (none without peers)."""
    with engine.connect() as conn:
        latest = checkpoints.stored(conn, catalog.site, latest=True)
    if not latest:
        return [Outcome(name, False, "nothing to push: the audit log has no signed head yet")
                for name in catalog.peers]
    return [_push_one(peer, latest[0]) for peer in catalog.peers.values()]


def _push_one(peer: Peer, head: Checkpoint) -> Outcome:
    try:
        response = httpx.post(f"{peer.url}/witness", content=head.model_dump_json(),
                              headers={"Content-Type": "application/json"}, timeout=TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        return Outcome(peer.name, False, f"unreachable at {peer.url}: {exc}")
    if response.status_code != 200:
        return Outcome(peer.name, False, f"refused (HTTP {response.status_code}): {_said(response)}")
    try:
        answer = Witnessed.model_validate_json(response.content)
    except ValidationError:
        return Outcome(peer.name, False, f"answered something that is not a witness's answer: {response.text[:200]}")
    return Outcome(peer.name, True, f"witnessed entry {answer.seq}" + ("" if answer.new else " (already held)"))


def fetch(peer: Peer, site: str) -> list[Checkpoint]:
    """The heads of `site` that `peer` witnessed (`GET /witness/{site}`); a VeilError when it cannot tell."""
    try:
        response = httpx.get(f"{peer.url}/witness/{site}", timeout=TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        raise VeilError("peer_unreachable", f"peer {peer.name} is unreachable at {peer.url}: {exc}",
                        hint=f"check that {peer.name}'s executor runs and [peers.{peer.name}] url") from None
    if response.status_code != 200:
        raise VeilError("peer_refused", f"peer {peer.name} refused (HTTP {response.status_code}): {_said(response)}")
    try:
        return _HEADS.validate_json(response.content)
    except ValidationError as exc:
        raise VeilError("peer_refused", f"peer {peer.name} answered something that is not a list of heads: "
                        f"{exc.error_count()} problems", hint=f"check [peers.{peer.name}] url") from None


def gather(catalog: Catalog) -> tuple[dict[str, list[Checkpoint]], list[str]]:
    """peer -> the heads of this site it witnessed, and why each other peer verifies nothing (unreachable,
    refusing, or holding no head yet)."""
    if not catalog.peers:
        return {}, ["site.toml has no [peers] to ask: add a [peers.NAME] table for each witnessing site"]
    found, problems = {}, []
    for peer in catalog.peers.values():
        try:
            heads = fetch(peer, catalog.site)
        except VeilError as exc:
            problems.append(f"peer {peer.name}: not verified: {exc.message}")
            continue
        if heads:
            found[peer.name] = heads
        else:
            problems.append(f"peer {peer.name}: not verified: it has witnessed no head of {catalog.site} yet "
                            "(push one with 'veil audit witness')")
    return found, problems


def _said(response: httpx.Response) -> str:
    """A refusal's message (the executor's `Refusal`), or the start of whatever else was answered."""
    try:
        return str(response.json().get("message", response.text[:200]))
    except (ValueError, AttributeError):
        return response.text[:200]


# ------------------------------------------------------------ schedule


class Exchange:
    """Pushes the site's latest head to its peers every `witness_minutes` in a daemon thread (not at all
    without peers or with witness_minutes = 0), and logs what each peer answered."""

    def __init__(self, catalog: Catalog, engine: Engine) -> None:
        self.catalog, self.engine = catalog, engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="veil-witness", daemon=True)

    def start(self) -> None:
        if self.catalog.peers and self.catalog.witness_minutes > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.catalog.witness_minutes * 60):
            for outcome in push(self.catalog, self.engine):  # a refusal or a silent peer is a warning
                log.log(logging.INFO if outcome.ok else logging.WARNING, "witness exchange: peer %s %s",
                        outcome.peer, outcome.detail)
