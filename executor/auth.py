"""Bearer tokens per principal with a role; only a SHA-256 of each secret is stored.

A token reads `veil_<id>_<secret>`: the id finds the row, the secret's hash is compared in
constant time. Tokens are random (256 bits), so a plain hash suffices (no password stretching).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select, update

from veil.errors import AuthError
from veil.executor import audit
from veil.executor.store import tokens, write
from veil.wire import NAME_PATTERN

ROLES = ("researcher", "steward", "admin")
OFFICES = ("data_center", "data_committee")
_TOKEN = re.compile(r"^veil_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_DUMMY_HASH = hashlib.sha256(b"no such token").hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a name, a role and, for researchers, the project they work for;
    for stewards, the office they review for (L3 applications need particular offices)."""

    name: str
    role: str
    project: str | None = None
    office: str | None = None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(engine: Engine, principal: str, role: str, project: str | None, office: str | None = None) -> str:
    """Store a new token for `principal` and return it; it is shown once and never stored in clear."""
    if office is not None and (role != "steward" or office not in OFFICES):
        raise ValueError(f"--office is for stewards and must be one of {OFFICES}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not '{role}'")
    if role == "researcher" and not project:
        raise ValueError("a researcher token needs --project: researchers act for a project")
    if project is not None and not re.match(NAME_PATTERN, project):
        raise ValueError(f"project '{project}' is not a valid name (letters, digits, _)")
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    with write(engine) as conn:
        conn.execute(insert(tokens).values(token_id=token_id, secret_hash=_hash(secret), principal=principal,
                                           role=role, project=project, office=office, created_at=audit.now(),
                                           revoked=False))
        audit.append(conn, principal="site-admin", role="admin", action="token", decision="created",
                     project=project, reason=f"token for {principal} as {role}" + (f" ({office})" if office else ""))
    return f"veil_{token_id}_{secret}"


def revoke_token(engine: Engine, token_id: str, by: str) -> bool:
    """Revoke a token by its id (the 16 hex digits after `veil_`); audited. False if there is none."""
    with write(engine) as conn:
        done = conn.execute(update(tokens).where(tokens.c.token_id == token_id, tokens.c.revoked.is_(False))
                            .values(revoked=True)).rowcount == 1
        if done:
            audit.append(conn, principal=by, role="admin", action="token", decision="revoked",
                         reason=f"token {token_id}")
    return done


def authenticate(engine: Engine, authorization: str | None) -> Principal:
    """The principal behind an `Authorization: Bearer ...` header, or AuthError (401)."""
    if not authorization or not authorization.startswith("Bearer "):
        raise AuthError("missing_token", "this request carries no bearer token",
                        hint="send 'Authorization: Bearer <token>'; a steward creates tokens with "
                             "'veil executor token create'")
    match = _TOKEN.match(authorization.removeprefix("Bearer ").strip())
    token_id, secret = match.groups() if match else ("", "")
    with engine.connect() as conn:
        row = conn.execute(select(tokens).where(tokens.c.token_id == token_id)).mappings().first()
    stored = row["secret_hash"] if row else _DUMMY_HASH
    if not hmac.compare_digest(_hash(secret), stored) or row is None or row["revoked"]:
        raise AuthError("invalid_token", "the bearer token is not valid for this site",
                        hint="check the token file your study config names, or ask the steward for a new token")
    return Principal(row["principal"], row["role"], row["project"], row["office"])


def require(principal: Principal, *roles: str) -> None:
    """AuthError (403) unless the principal holds one of `roles`."""
    if principal.role not in roles:
        raise AuthError("forbidden", f"role '{principal.role}' may not do this; it needs {' or '.join(roles)}",
                        hint="use a token of the right role", status=403)
