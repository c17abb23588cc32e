"""Signed checkpoints of the audit log: the site's Ed25519 key signs the chain's head.

The hash chain alone binds nobody who can write the state database: they can delete an entry,
refund the ledger and recompute every later hash. So each write transaction that moves the head
also stores a signature over (site, seq, head hash, time) made with a key kept outside the database.
A rewritten chain no longer matches the signed heads; checkpoints published outside the site
(`veil audit checkpoints`) catch even a rewrite whose checkpoints were deleted or re-signed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from weakref import WeakKeyDictionary

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, Engine, insert, select

from veil.errors import CatalogError
from veil.executor.store import checkpoints as table
from veil.executor.store import on_head_moved, seal
from veil.wire import Checkpoint

_INSERT = insert(table)
_COLUMNS = (table.c.seq, table.c.hash, table.c.ts, table.c.key_id, table.c.public_key, table.c.signature)


def message(site: str, seq: int, head: str, ts: str) -> bytes:
    """The exact bytes a checkpoint signs (version 1)."""
    return f"veil-audit-checkpoint:v1:{site}:{seq}:{head}:{ts}".encode()


@dataclass(frozen=True)
class SiteKey:
    """A site's name and public key: what checks its checkpoints."""

    site: str
    public: Ed25519PublicKey

    @property
    def public_hex(self) -> str:
        return self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()

    @property
    def key_id(self) -> str:
        """The first 16 hex digits of SHA-256 over the raw public key."""
        return hashlib.sha256(bytes.fromhex(self.public_hex)).hexdigest()[:16]

    def signed(self, checkpoint: Checkpoint) -> bool:
        """True when this site's key made `checkpoint`'s signature over its site, seq, hash and time."""
        if checkpoint.site != self.site or checkpoint.key_id != self.key_id:
            return False
        try:
            self.public.verify(bytes.fromhex(checkpoint.signature),
                               message(checkpoint.site, checkpoint.seq, checkpoint.hash, checkpoint.ts))
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class Signer:
    """The site's private key, loaded once per process; signs the head before a write commits."""

    key: SiteKey
    private: Ed25519PrivateKey

    @classmethod
    def load(cls, site: str, path: Path) -> Signer:
        """The key at `path`, created on first start (PEM, PKCS8, mode 0600, public key beside it)."""
        private = load_or_create_key(path)
        return cls(SiteKey(site, private.public_key()), private)

    def sign(self, conn: Connection, seq: int, head: str) -> None:
        """Store a checkpoint for head (seq, head) in the caller's write transaction."""
        ts = datetime.now(UTC).isoformat(timespec="microseconds")
        signature = self.private.sign(message(self.key.site, seq, head, ts)).hex()
        conn.execute(_INSERT, {"seq": seq, "hash": head, "ts": ts, "key_id": self.key.key_id,
                               "public_key": self.key.public_hex, "signature": signature})


_SIGNERS: WeakKeyDictionary[Engine, Signer] = WeakKeyDictionary()


def register(engine: Engine, signer: Signer) -> None:
    """Sign the audit head in every write transaction on `engine` that moves it."""
    _SIGNERS[engine] = signer
    on_head_moved(engine, signer.sign)


def signer(engine: Engine) -> Signer | None:
    """The signer registered for `engine` in this process, if any."""
    return _SIGNERS.get(engine)


def public_key_path(key_path: Path) -> Path:
    """Where the public key lives: beside the private key, suffix `.pub`."""
    return key_path.with_suffix(".pub")


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """Load the PEM private key at `path`; if absent, create it atomically (racing processes agree)."""
    try:
        if not path.exists():
            _create(path)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CatalogError("bad_audit_key", f"cannot load or create the audit-signing key {path}: {exc}",
                           hint="set audit_key in site.toml's [site] table to a writable path, or restore the "
                                "key file (PEM, PKCS8, Ed25519)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CatalogError("bad_audit_key", f"{path} holds a {type(key).__name__}, not an Ed25519 key",
                           hint="point audit_key at an Ed25519 key, or move the file away to get a new one")
    pub = public_key_path(path)
    if not pub.exists():
        _write_atomic(pub, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
    return key


def _create(path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())
    _write_atomic(path, pem, 0o600, replace=False)


def _write_atomic(path: Path, data: bytes, mode: int, replace: bool = True) -> None:
    """Write a whole file under its final name at once; with replace=False, the first writer wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process created it first: everyone uses that one
                pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def site_key(site: str, key_path: Path) -> SiteKey | None:
    """The site's public key for verification, from the private key file or the `.pub` beside it."""
    pub = public_key_path(key_path)
    try:
        if key_path.exists():
            public = serialization.load_pem_private_key(key_path.read_bytes(), password=None).public_key()
        elif pub.exists():
            public = serialization.load_pem_public_key(pub.read_bytes())
        else:
            return None
    except (OSError, ValueError) as exc:
        raise CatalogError("bad_audit_key", f"cannot read the audit-signing key at {key_path}: {exc}",
                           hint="restore the site's key file (or its .pub) from a backup") from None
    if not isinstance(public, Ed25519PublicKey):
        raise CatalogError("bad_audit_key", f"the audit-signing key at {key_path} is not an Ed25519 key")
    return SiteKey(site, public)


def covering(conn: Connection, seq: int, site: str | None = None) -> Checkpoint | None:
    """The first checkpoint at or after entry `seq` (inside a write transaction its head is signed
    first); `site` defaults to the site of the signer registered for the engine."""
    seal(conn)
    registered = signer(conn.engine)
    site = site or (registered.key.site if registered else None)
    if site is None:
        return None
    row = conn.execute(select(*_COLUMNS).where(table.c.seq >= seq).order_by(table.c.seq).limit(1)).mappings().first()
    return Checkpoint(site=site, **row) if row is not None else None


def stored(conn: Connection, site: str, latest: bool = False) -> list[Checkpoint]:
    """The checkpoints in the state database, oldest first (or only the latest)."""
    query = select(*_COLUMNS).order_by(table.c.seq.desc() if latest else table.c.seq)
    return [Checkpoint(site=site, **row) for row in conn.execute(query.limit(1) if latest else query).mappings()]


def read(lines: Iterable[str]) -> list[Checkpoint]:
    """Checkpoints from JSON lines (as `veil audit checkpoints` writes them); blank lines are skipped."""
    return [Checkpoint.model_validate_json(line) for line in lines if line.strip()]
