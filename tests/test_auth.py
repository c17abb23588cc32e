"""Bearer tokens: stored only as hashes; `veil executor token create` prints one once, and it works."""

from __future__ import annotations

import hashlib
import re
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, Table, func, select

from conftest import Deployment
from veil.executor import audit
from veil.executor.store import audit as audit_log
from veil.executor.store import tokens
from veil.wire import Release

TOKEN = re.compile(r"^veil_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


def split(token: str) -> tuple[str, str]:
    """A token's id and secret."""
    match = TOKEN.match(token)
    assert match, f"not a token: {token!r}"
    return match.group(1), match.group(2)


def table_text(engine: Engine, table: Table) -> str:
    """Every value of every row of `table`, as text."""
    with engine.connect() as conn:
        return "\n".join(str(v) for row in conn.execute(select(table)).mappings() for v in row.values())


def token_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(tokens)).scalar_one())


def veil(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "veil.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def create_token(d: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    """`veil executor token create` against the deployment's own catalog and state database."""
    return veil("executor", "token", "create", "--site-config", str(d.catalog.path),
                "--database-url", d.database_url, *args)


def client(d: Deployment, token: str) -> httpx.Client:
    return httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def printed_token(result: subprocess.CompletedProcess[str]) -> str:
    """The token a successful `token create` printed: its only output line, printed once."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    token = lines[0]
    split(token)
    assert result.stdout.count(token) == 1 and token not in result.stderr
    return token


# ---------------------------------------------------------------- storage


def test_tokens_are_stored_hashed(shared: Deployment) -> None:
    with shared.engine.connect() as conn:
        rows = {r["token_id"]: dict(r) for r in conn.execute(select(tokens)).mappings()}
    stored = table_text(shared.engine, tokens) + table_text(shared.engine, audit_log)
    roles = {"researcher": "researcher", "outsider": "researcher", "steward": "steward", "admin": "admin"}
    for who, token in shared.tokens.items():
        token_id, secret = split(token)
        row = rows[token_id]
        assert row["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
        assert row["role"] == roles[who] and not row["revoked"]
        assert secret not in stored and token not in stored
    if shared.database_url.startswith("sqlite:///"):  # not even in the database's bytes (WAL included)
        path = Path(shared.database_url.removeprefix("sqlite:///"))
        raw = b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists())
        assert raw
        for token in shared.tokens.values():
            assert split(token)[1].encode() not in raw


# ---------------------------------------------------------------- the CLI


def test_cli_token_authenticates_over_http(shared: Deployment) -> None:
    before = token_count(shared.engine)
    token = printed_token(create_token(shared, "--role", "researcher", "--principal", "xavier",
                                       "--project", "cli_project"))
    assert token_count(shared.engine) == before + 1
    token_id, secret = split(token)
    assert secret not in table_text(shared.engine, tokens)
    with client(shared, token) as xavier:
        listing = xavier.get("/datasets")
        assert listing.status_code == 200, listing.text
        assert [d["name"] for d in listing.json()] == ["patients"]  # no grant on the L2 dataset
        grants = xavier.get("/grants")
        assert grants.status_code == 200 and grants.json() == []
        response = xavier.post("/query", json={"sql": "SELECT COUNT(*) FROM patients", "epsilon": 0.5})
        assert response.status_code == 200, response.text
        release = Release.model_validate(response.json())
        assert release.project == "cli_project"
        entry = audit.find(shared.engine, release.receipt)
        assert entry is not None and (entry.principal, entry.role) == ("xavier", "researcher")
        (grant,) = xavier.get("/grants").json()  # the L1 default grant, created by the first charge
        assert (grant["project"], grant["dataset"]) == ("cli_project", "patients")
        assert grant["rho_spent"] == pytest.approx(release.cost.rho, rel=1e-12)


def test_cli_token_written_to_file(shared: Deployment, tmp_path: Path) -> None:
    out = tmp_path / "steward.token"
    result = create_token(shared, "--role", "steward", "--principal", "sam", "--out", str(out))
    assert result.returncode == 0, result.stderr
    token = out.read_text().strip()
    assert out.read_text() == token + "\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert str(out) in result.stdout and token not in result.stdout and split(token)[1] not in result.stdout
    with client(shared, token) as sam:
        assert sam.get("/grants").status_code == 200
        forbidden = sam.post("/query", json={"sql": "SELECT COUNT(*) FROM patients", "epsilon": 0.5})
        assert forbidden.status_code == 403 and forbidden.json()["code"] == "forbidden"


@pytest.mark.parametrize("args, says", [
    pytest.param(("--role", "researcher", "--principal", "yves"), "needs --project",
                 id="researcher-without-project"),
    pytest.param(("--role", "researcher", "--principal", "yves", "--project", "../p"), "not a valid name",
                 id="bad-project-name"),
    pytest.param(("--role", "root", "--principal", "yves", "--project", "p"), "invalid choice",
                 id="unknown-role"),
])
def test_cli_refuses_incomplete_tokens(shared: Deployment, args: tuple[str, ...], says: str) -> None:
    before = token_count(shared.engine)
    result = create_token(shared, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert says in result.stderr
    assert result.stdout == "" and "veil_" not in result.stderr
    assert token_count(shared.engine) == before


def test_revoked_token_is_refused(shared: Deployment) -> None:
    token = printed_token(create_token(shared, "--role", "researcher", "--principal", "erin", "--project", "study1"))
    with client(shared, token) as erin:
        assert erin.get("/grants").status_code == 200
        revoke = ("executor", "token", "revoke", "--site-config", str(shared.catalog.path),
                  "--database-url", shared.database_url, token)
        assert veil(*revoke).returncode == 0
        refused = erin.get("/grants")
        assert refused.status_code == 401 and refused.json()["code"] == "invalid_token"
        again = veil(*revoke)
        assert again.returncode == 2 and "no active token" in again.stderr
