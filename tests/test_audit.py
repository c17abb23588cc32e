"""The audit log's hash chain catches every kind of tampering; `veil audit verify` reports it."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from veil.executor import audit, ledger
from veil.executor.auth import Principal
from veil.executor.site import Site
from veil.executor.store import write
from veil.wire import QueryRequest


@pytest.fixture(scope="module")
def logged_site(site_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite state database holding grants, releases and refusals (14 entries or so)."""
    db = tmp_path_factory.mktemp("audit") / "state.db"
    site = Site.open(site_config, f"sqlite:///{db}")
    with write(site.engine) as conn:
        ledger.set_grant(conn, site.catalog, "p1", site.catalog.dataset("encounters"), 3.0, by="steward_a")
    who = Principal("alice", "researcher", "p1")
    for sql in ["SELECT COUNT(*) FROM patients", "SELECT sex, COUNT(*) FROM patients GROUP BY sex",
                "SELECT AVG(hemoglobin_g_dl) FROM encounters", "SELECT department, COUNT(*) FROM encounters "
                "GROUP BY department", "SELECT MEDIAN(age) FROM patients"]:
        site.query(who, QueryRequest(sql=sql, epsilon=0.2))
    site.engine.dispose()
    return db


def _copy(db: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy.db"
    shutil.copy(db, target)
    return target


def _problems(db: Path) -> list[str]:
    from veil.executor.store import open_store

    engine = open_store(f"sqlite:///{db}")
    try:
        return audit.verify(engine).problems
    finally:
        engine.dispose()


def _edit(db: Path, *statements: str) -> None:
    with sqlite3.connect(db) as conn:
        for statement in statements:
            conn.execute(statement)


def test_untouched_log_verifies(logged_site: Path) -> None:
    assert _problems(logged_site) == []


TAMPERING: dict[str, tuple[Callable[[Path], None], str]] = {
    "edited cost": (lambda db: _edit(db, "UPDATE audit SET rho = rho / 2 WHERE seq = 4",
                                     "UPDATE grants SET rho_spent = rho_spent"), "edited"),
    "edited query text": (lambda db: _edit(db, "UPDATE audit SET query = 'SELECT 1' WHERE seq = 5"), "edited"),
    "deleted entry": (lambda db: _edit(db, "DELETE FROM audit WHERE seq = 3"), "missing"),
    "inserted entry": (lambda db: _edit(
        db, "UPDATE audit SET seq = seq + 1000 WHERE seq >= 4",  # make room, then forge an entry at seq 4
        "UPDATE audit SET seq = seq - 999 WHERE seq >= 1000",
        "INSERT INTO audit SELECT 4, ts, principal, role, project, action, dataset, query, 0, 0, 0, result_digest, "
        "decision, reason, prev_hash, CASE WHEN substr(hash, 1, 1) = 'f' THEN 'e' ELSE 'f' END "
        "|| substr(hash, 2) FROM audit WHERE seq = 3",
        "UPDATE audit_head SET seq = seq + 1"), "inserted"),
    "reordered entries": (lambda db: _edit(
        db, "UPDATE audit SET seq = -1 WHERE seq = 4", "UPDATE audit SET seq = 4 WHERE seq = 5",
        "UPDATE audit SET seq = 5 WHERE seq = -1"), "reordered"),
    "truncated tail": (lambda db: _edit(db, "DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)"),
                       "truncated"),
    "ledger rolled back": (lambda db: _edit(db, "UPDATE grants SET rho_spent = 0"), "ledger says"),
}


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_tampering_is_detected(logged_site: Path, tmp_path: Path, kind: str) -> None:
    tamper, expected = TAMPERING[kind]
    db = _copy(logged_site, tmp_path)
    tamper(db)
    problems = _problems(db)
    assert problems, f"{kind} went unnoticed"
    assert any(expected in p for p in problems), problems


def test_cli_verify_exit_codes(logged_site: Path, site_config: Path, tmp_path: Path) -> None:
    db = _copy(logged_site, tmp_path)
    cmd = [sys.executable, "-m", "veil.cli", "audit", "verify", "--site-config", str(site_config),
           "--database-url", f"sqlite:///{db}"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and "audit log OK" in ok.stdout
    _edit(db, "UPDATE audit SET decision = 'refused' WHERE seq = 6")
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "entry 6" in bad.stdout and "edited" in bad.stdout


def test_receipts_are_entry_hashes_chained_from_genesis(logged_site: Path) -> None:
    with sqlite3.connect(logged_site) as conn:
        rows = conn.execute("SELECT seq, prev_hash, hash FROM audit ORDER BY seq").fetchall()
    assert rows[0][1] == "0" * 64
    assert all(rows[i][1] == rows[i - 1][2] for i in range(1, len(rows)))
    assert len({r[2] for r in rows}) == len(rows)
