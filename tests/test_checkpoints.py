"""Signed checkpoints: receipts carry a signed head, and a recomputed (rewritten) chain is caught by the
checkpoints stored on the site or, if those were rewritten too, by ones published earlier."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Engine, delete, select, update

from conftest import BACKENDS, PROJECT, Deployment, make_database
from veil.executor import audit, checkpoints, ledger
from veil.executor.auth import Principal
from veil.executor.catalog import load_catalog
from veil.executor.site import Site
from veil.executor.store import audit as audit_table
from veil.executor.store import audit_head, caps, grants, write
from veil.executor.store import checkpoints as checkpoint_table
from veil.wire import QueryRequest

QUERIES = ["SELECT COUNT(*) FROM encounters", "SELECT AVG(crp_mg_l) FROM encounters",
           "SELECT department, COUNT(*) FROM encounters GROUP BY department"]


def _veil(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "veil.cli", *args], capture_output=True, text=True, timeout=300)


def _site_args(d: Deployment) -> list[str]:
    return ["--site-config", str(d.catalog.path), "--database-url", d.database_url]


def _public_key(d: Deployment) -> Ed25519PublicKey:
    """The site's public key as published beside its signing key (audit-signing.pub)."""
    key = serialization.load_pem_public_key(checkpoints.public_key_path(d.catalog.audit_key).read_bytes())
    assert isinstance(key, Ed25519PublicKey)
    return key


def _release(d: Deployment, sql: str) -> str:
    with d.http() as http:
        response = http.post("/query", json={"sql": sql, "epsilon": 0.3})
    assert response.status_code == 200, response.text
    return response.json()["receipt"]


def rewrite_without(engine: Engine, seq: int) -> None:
    """The attack: with plain SQL, delete entry `seq`, refund its charge on the grant and the dataset cap,
    renumber and re-hash every later entry (audit.entry_hash) and move the head, so the chain is consistent."""
    with engine.begin() as conn:
        gone = conn.execute(select(audit_table).where(audit_table.c.seq == seq)).mappings().one()
        refund = {"rho_spent": gone["rho"], "delta_spent": gone["delta"], "approx_epsilon_spent": gone["epsilon"]}
        for table, where in ((grants, (grants.c.project == gone["project"]) & (grants.c.dataset == gone["dataset"])),
                             (caps, caps.c.dataset == gone["dataset"])):
            conn.execute(update(table).where(where).values({table.c[k]: table.c[k] - v for k, v in refund.items()}))
        conn.execute(delete(audit_table).where(audit_table.c.seq == seq))
        prev, last = gone["prev_hash"], seq - 1
        later = conn.execute(select(audit_table).where(audit_table.c.seq > seq).order_by(audit_table.c.seq))
        for row in later.mappings().all():
            entry = dict(row)
            entry["seq"], entry["prev_hash"] = row["seq"] - 1, prev
            entry["hash"] = audit.entry_hash(entry)
            conn.execute(update(audit_table).where(audit_table.c.seq == row["seq"])
                         .values(seq=entry["seq"], prev_hash=prev, hash=entry["hash"]))
            prev, last = entry["hash"], entry["seq"]
        conn.execute(update(audit_head).where(audit_head.c.id == 1).values(seq=last, hash=prev))


def test_receipt_carries_a_checkpoint_signed_by_the_site(shared: Deployment) -> None:
    receipt = _release(shared, "SELECT COUNT(*) FROM patients")
    with shared.http() as http:
        entry = http.get(f"/receipts/{receipt}").json()
    cp = entry["checkpoint"]
    assert cp is not None and cp["seq"] >= entry["seq"] and cp["site"] == shared.catalog.site
    public = _public_key(shared)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert cp["public_key"] == raw.hex()
    public.verify(bytes.fromhex(cp["signature"]),  # raises InvalidSignature if not the site's
                  f"veil-audit-checkpoint:v1:{cp['site']}:{cp['seq']}:{cp['hash']}:{cp['ts']}".encode())
    assert [e.hash for e in audit.entries(shared.engine, since=cp["seq"] - 1, limit=1)] == [cp["hash"]]
    with shared.http("steward") as http:
        assert http.get("/audit/verify").json()["ok"] is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_rewritten_chain_is_caught(deployer: Callable[..., Deployment], backend: str, tmp_path: Path) -> None:
    d = deployer(backend)
    receipts = [_release(d, sql) for sql in QUERIES]
    published = tmp_path / "published.jsonl"
    exported = _veil("audit", "checkpoints", *_site_args(d), "--out", str(published))
    assert exported.returncode == 0, exported.stderr
    site_key = checkpoints.site_key(d.catalog.site, d.catalog.audit_key)
    assert site_key is not None
    assert audit.verify(d.engine, site_key, checkpoints.read(published.read_text().splitlines())).ok
    seq = next(e.seq for e in audit.entries(d.engine) if e.hash == receipts[1])
    spent = d.spent("encounters")["rho"]

    rewrite_without(d.engine, seq)
    assert d.spent("encounters")["rho"] < spent  # the release is refunded
    # (a) the chain and the ledger agree with each other: without signatures nothing shows
    assert audit.verify(d.engine).problems == []
    # (b) the checkpoints the site stored no longer match the chain
    stored = _veil("audit", "verify", *_site_args(d))
    assert stored.returncode == 1
    assert f"checkpoint at entry {seq}:" in stored.stdout and "rewritten" in stored.stdout
    # (c) the attacker drops the checkpoints from the deleted entry on: the site's own check passes again...
    with d.engine.begin() as conn:
        conn.execute(delete(checkpoint_table).where(checkpoint_table.c.seq >= seq))
    assert audit.verify(d.engine, site_key).ok
    # ...but the checkpoints published earlier, held outside the site, name the rewritten entry
    caught = _veil("audit", "verify", *_site_args(d), "--checkpoints", str(published))
    assert caught.returncode == 1
    assert f"published checkpoint at entry {seq}:" in caught.stdout and "rewritten" in caught.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_tampered_signatures_are_caught(site_config: Path, tmp_path: Path, backend: str) -> None:
    url, drop = make_database(backend, tmp_path)
    site = Site.open(site_config, url)
    try:
        with write(site.engine) as conn:
            ledger.set_grant(conn, site.catalog, PROJECT, site.catalog.dataset("encounters"), 2.0, by="steward_a")
        site.query(Principal("alice", "researcher", PROJECT), QueryRequest(sql=QUERIES[0], epsilon=0.2))
        signer = checkpoints.signer(site.engine)
        assert signer is not None
        latest = tmp_path / "latest.jsonl"
        assert _veil("audit", "checkpoints", "--site-config", str(site_config), "--database-url", url, "--latest",
                     "--out", str(latest)).returncode == 0
        [cp] = checkpoints.read(latest.read_text().splitlines())
        with site.engine.connect() as conn:
            assert cp.seq == conn.execute(select(audit_head.c.seq)).scalar_one()
        assert audit.verify(site.engine, signer.key, [cp]).ok

        forged = cp.model_copy(update={"signature": ("0" if cp.signature[0] != "0" else "1") + cp.signature[1:]})
        problems = audit.verify(site.engine, signer.key, [forged]).problems
        assert problems == [f"published checkpoint at entry {cp.seq}: not signed by this site's key "
                            f"{signer.key.key_id} (forged or altered)"]
        with site.engine.begin() as conn:
            conn.execute(update(checkpoint_table).where(checkpoint_table.c.seq == cp.seq)
                         .values(signature=forged.signature))
        bad = _veil("audit", "verify", "--site-config", str(site_config), "--database-url", url)
        assert bad.returncode == 1 and f"checkpoint at entry {cp.seq}: not signed" in bad.stdout
    finally:
        site.engine.dispose()
        drop()


def test_one_checkpoint_per_write_transaction(site_config: Path, tmp_path: Path) -> None:
    """`covering` inside the transaction signs its head once (what Site.query uses for Release.checkpoint);
    a rolled-back transaction leaves no checkpoint and nothing pending."""
    site = Site.open(site_config, f"sqlite:///{tmp_path / 'state.db'}")
    try:
        def count() -> int:
            with site.engine.connect() as conn:
                return len(checkpoints.stored(conn, site.catalog.site))

        before = count()
        with write(site.engine) as conn:
            entry = audit.append(conn, principal="p", role="researcher", action="query", decision="released")
            cp = checkpoints.covering(conn, entry.seq)
        assert cp is not None and (cp.seq, cp.hash) == (entry.seq, entry.hash) and count() == before + 1
        with pytest.raises(RuntimeError), write(site.engine) as conn:
            audit.append(conn, principal="p", role="researcher", action="query", decision="released")
            raise RuntimeError("fails before commit")
        with write(site.engine) as conn:  # a write that does not move the head signs nothing
            conn.execute(select(audit_head.c.seq))
        assert count() == before + 1
        signer = checkpoints.signer(site.engine)
        assert signer is not None and audit.verify(site.engine, signer.key).ok
    finally:
        site.engine.dispose()


def test_missing_key_is_created_on_first_start(site_config: Path, tmp_path: Path) -> None:
    """No key yet: the first start creates it (mode 0600, PKCS8 PEM, .pub beside it); later starts reuse it."""
    folder = tmp_path / "site"
    folder.mkdir()
    text = site_config.read_text().replace('path = "', f'path = "{site_config.parent}/')
    (folder / "site.toml").write_text(text)
    (folder / "other.toml").write_text(text.replace("[site]\n", '[site]\naudit_key = "keys/north.key"\n', 1))
    assert load_catalog(folder / "site.toml").audit_key == folder / "audit-signing.key"

    for config, key in ((folder / "site.toml", folder / "audit-signing.key"),
                        (folder / "other.toml", folder / "keys" / "north.key")):
        assert not key.exists()
        site = Site.open(config, f"sqlite:///{tmp_path / (config.stem + '.db')}")
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
        assert checkpoints.public_key_path(key).exists()
        signer = checkpoints.signer(site.engine)
        assert signer is not None
        assert checkpoints.Signer.load("north", key).key.key_id == signer.key.key_id  # a restart reuses it
        key.unlink()  # a verifier holding only the public key
        site_key = checkpoints.site_key("north", key)
        assert site_key is not None and site_key.key_id == signer.key.key_id
        site.engine.dispose()


def test_export_is_json_lines_of_checkpoints(shared: Deployment, tmp_path: Path) -> None:
    out = tmp_path / "all.jsonl"
    result = _veil("audit", "checkpoints", *_site_args(shared), "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and [c["seq"] for c in lines] == sorted(c["seq"] for c in lines)
    assert set(lines[0]) == {"site", "seq", "hash", "ts", "key_id", "public_key", "signature"}
