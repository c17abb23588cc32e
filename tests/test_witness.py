"""Witnessed audit heads: three real executors, each the others' peer, keep each other's signed heads, so a site
whose administrator rewrote and re-signed its own log still passes its local check but fails against its peers."""

from __future__ import annotations

import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, select, update

from conftest import SITES, Deployment, deploy, make_database
from veil.cli import main
from veil.errors import CatalogError
from veil.executor import audit, checkpoints
from veil.executor.catalog import load_catalog
from veil.executor.store import GENESIS, audit_head, write
from veil.executor.store import audit as audit_table
from veil.executor.store import checkpoints as checkpoint_table
from veil.local import free_port
from veil.wire import Checkpoint

SCHEDULED = "valley"
"""The one site that exchanges on a schedule (every 1.2 s); the others push only when told to."""


@dataclass
class Ring:
    sites: dict[str, Deployment]
    keys: dict[str, Path]  # each site's private signing key

    def veil(self, capsys: pytest.CaptureFixture[str], *args: str, site: str = "north",
             config: Path | None = None) -> tuple[int, str]:
        """`veil ARGS --site-config ... --database-url ...` for `site`: exit status and output."""
        d = self.sites[site]
        code = main([*args, "--site-config", str(config or d.catalog.path), "--database-url", d.database_url])
        out = capsys.readouterr()
        return code, out.out + out.err

    def signed(self, site: str, seq: int, head: str, key: Ed25519PrivateKey | None = None) -> Checkpoint:
        """A checkpoint of `site`'s entry `seq` as `head`, signed with `key` (default: the site's own)."""
        signer = checkpoints.Signer(checkpoints.SiteKey(site, (key := key or self._key(site)).public_key()), key)
        ts = audit.now()
        return Checkpoint(site=site, seq=seq, hash=head, ts=ts, key_id=signer.key.key_id,
                          public_key=signer.key.public_hex,
                          signature=key.sign(checkpoints.message(site, seq, head, ts)).hex())

    def _key(self, site: str) -> Ed25519PrivateKey:
        return checkpoints.load_or_create_key(self.keys[site])


def _peer_config(original: Path, key: Path, peers: dict[str, dict[str, str]], minutes: float) -> Path:
    """A copy of a site's catalog beside it (its relative paths hold) with its own key, peers and schedule."""
    raw = tomllib.loads(original.read_text())
    raw["site"].update(audit_key=str(key), witness_minutes=minutes)
    path = original.with_name(f"site-witness-{uuid.uuid4().hex[:8]}.toml")
    path.write_text(tomli_w.dumps({**raw, "peers": peers}))
    return path


@pytest.fixture(scope="module")
def ring(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ring]:
    state = tmp_path_factory.mktemp("witness")
    keys = {name: state / f"{name}.key" for name in SITES}
    public = {name: checkpoints.Signer.load(name, keys[name]).key.public_hex for name in SITES}
    ports = {name: free_port() for name in SITES}
    started: dict[str, Deployment] = {}
    for name in SITES:
        peers = {other: {"url": f"http://127.0.0.1:{ports[other]}", "public_key": public[other]}
                 for other in SITES if other != name}
        config = _peer_config(cohort / name / "site.toml", keys[name], peers, 0.02 if name == SCHEDULED else 0)
        url, _ = make_database("sqlite", state)
        started[name] = deploy(config, url, state, {"encounters": 20.0}, port=ports[name])
    yield Ring(started, keys)
    for d in started.values():
        d.stop()
        d.catalog.path.unlink()


def _release(d: Deployment) -> None:
    """A query release: an audit entry the executor signs."""
    with d.http() as http:
        response = http.post("/query", json={"sql": "SELECT COUNT(*) FROM encounters", "epsilon": 0.2})
    assert response.status_code == 200, response.text


def _witnessed(at: Deployment, site: str) -> list[Checkpoint]:
    with httpx.Client(base_url=at.url) as http:  # no token: witnessed heads are public
        response = http.get(f"/witness/{site}")
    assert response.status_code == 200, response.text
    return [Checkpoint.model_validate(head) for head in response.json()]


def _push(at: Deployment, head: Checkpoint) -> httpx.Response:
    with httpx.Client(base_url=at.url) as http:  # no token: the signature authenticates
        return http.post("/witness", content=head.model_dump_json(), headers={"Content-Type": "application/json"})


def test_the_scheduled_exchange_reaches_every_peer(ring: Ring) -> None:
    _release(ring.sites[SCHEDULED])
    deadline = time.monotonic() + 30
    while not all(_witnessed(ring.sites[peer], SCHEDULED) for peer in SITES if peer != SCHEDULED):
        assert time.monotonic() < deadline, "valley's scheduled exchange pushed nothing within 30 s"
        time.sleep(0.5)


def test_a_forged_head_is_refused(ring: Ring) -> None:
    central = ring.sites["central"]
    forged = ring.signed("north", 1, "f" * 64, key=Ed25519PrivateKey.generate())
    response = _push(central, forged)
    assert response.status_code == 403 and response.json()["code"] == "bad_signature", response.text
    stranger = ring.signed("stranger", 1, "f" * 64, key=Ed25519PrivateKey.generate())
    response = _push(central, stranger)
    assert response.status_code == 403 and response.json()["code"] == "unknown_peer", response.text
    assert all(head.hash != "f" * 64 for head in _witnessed(central, "north"))


def test_a_fork_is_refused_and_audited_as_evidence(ring: Ring) -> None:
    central, valley = ring.sites["central"], ring.sites["valley"]
    _release(valley)
    with valley.engine.connect() as conn:
        latest = checkpoints.stored(conn, "valley", latest=True)[0]
    first = _push(central, latest)
    assert first.status_code == 200, first.text
    again = _push(central, latest)  # idempotent
    assert again.status_code == 200 and again.json()["new"] is False, again.text
    fork = ring.signed("valley", latest.seq, "e" * 64)  # valley's own key, another hash for the same entry
    response = _push(central, fork)
    assert response.status_code == 409 and response.json()["code"] == "forked_head", response.text
    held = {head.seq: head.hash for head in _witnessed(central, "valley")}
    assert held[latest.seq] == latest.hash
    with central.http("steward") as http:
        evidence = http.get("/audit", params={"action": "witness", "decision": "refused"}).json()
    assert any("e" * 64 in entry["reason"] and latest.hash in entry["reason"] for entry in evidence), evidence


def rewrite_and_resign(ring: Ring, site: str, seq: int) -> None:
    """The administrator's attack: edit entry `seq`, recompute every later hash and the head, and re-sign all
    of the site's own checkpoints with its own key, so that its local verification passes."""
    d = ring.sites[site]
    key = ring._key(site)
    signer = checkpoints.Signer(checkpoints.SiteKey(site, key.public_key()), key)
    with write(d.engine) as conn:
        prev, hashes = GENESIS, {}
        for row in conn.execute(select(audit_table).order_by(audit_table.c.seq)).mappings().all():
            entry = {**row, "prev_hash": prev}
            if entry["seq"] == seq:
                entry["principal"] = "someone_else"
            prev = hashes[entry["seq"]] = audit.entry_hash(entry)
            conn.execute(update(audit_table).where(audit_table.c.seq == entry["seq"]).values(
                principal=entry["principal"], prev_hash=entry["prev_hash"], hash=prev))
        conn.execute(update(audit_head).values(hash=prev))
        signed = conn.execute(select(checkpoint_table.c.seq)).scalars().all()
        conn.execute(delete(checkpoint_table))
        for at in signed:
            signer.sign(conn, at, hashes[at])


def test_verify_with_witnesses_catches_a_rewritten_and_resigned_log(ring: Ring, capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path) -> None:
    north = ring.sites["north"]
    _release(north)
    code, out = ring.veil(capsys, "audit", "witness")
    assert code == 0 and "peer central: accepted" in out and "peer valley: accepted" in out, out
    _release(north)  # entries after the witnessed head, then a second exchange
    assert ring.veil(capsys, "audit", "witness")[0] == 0
    code, out = ring.veil(capsys, "audit", "verify", "--witnesses")
    assert code == 0 and "peer central: the log extends all 2 heads" in out and "peer valley" in out, out

    raw = tomllib.loads(north.catalog.path.read_text())
    raw["peers"]["ghost"] = {"url": f"http://127.0.0.1:{free_port()}", "public_key": "ab" * 32}
    with_ghost = north.catalog.path.with_name(f"site-ghost-{uuid.uuid4().hex[:8]}.toml")
    with_ghost.write_text(tomli_w.dumps(raw))
    try:
        code, out = ring.veil(capsys, "audit", "verify", "--witnesses", config=with_ghost)
    finally:
        with_ghost.unlink()
    assert code == 1 and "peer ghost: not verified" in out and "unreachable" in out, out

    witnessed = _witnessed(ring.sites["central"], "north")
    rewrite_and_resign(ring, "north", witnessed[0].seq - 1)
    code, out = ring.veil(capsys, "audit", "verify")
    assert code == 0, f"the rewrite should pass the site's own check: {out}"
    code, out = ring.veil(capsys, "audit", "verify", "--witnesses")
    assert code == 1, out
    for peer in ("central", "valley"):
        assert f"head witnessed by peer {peer} at entry {witnessed[0].seq}" in out, out


@pytest.mark.parametrize(("peer", "problem"), [
    ({"url": "http://127.0.0.1:1", "public_key": "xyz"}, "public_key must be 64 lowercase hex digits"),
    ({"url": "ftp://central", "public_key": "ab" * 32}, "is not an http:// or https:// URL"),
    ({"public_key": "ab" * 32}, "missing required key 'url'"),
    ({"url": "http://127.0.0.1:1", "public_key": "ab" * 32, "token": "x"}, "a table of public_key, url"),
])
def test_the_catalog_checks_its_peers(site_config: Path, peer: dict[str, str], problem: str) -> None:
    raw = tomllib.loads(site_config.read_text())
    path = site_config.with_name(f"site-peers-{uuid.uuid4().hex[:8]}.toml")
    path.write_text(tomli_w.dumps({**raw, "peers": {"central": peer}}))
    try:
        with pytest.raises(CatalogError, match=problem):
            load_catalog(path)
        path.write_text(tomli_w.dumps({**raw, "peers": {"north": {"url": "http://x", "public_key": "ab" * 32}}}))
        with pytest.raises(CatalogError, match="cannot be its own peer"):
            load_catalog(path)
    finally:
        path.unlink()
