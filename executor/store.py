"""The site's durable state (tokens, applications, grants, caps, mocks, audit log) in SQLAlchemy.

Every write runs in `write()`: one transaction that first takes the site-wide write lock
(SQLite: BEGIN IMMEDIATE; PostgreSQL: a row lock on the audit head), so a charge, its grant and
cap updates and its audit entry commit together or not at all, in one order for all replicas.
A write that moved the audit head runs the engine's head hook before it commits (the site's signer,
executor/checkpoints.py), so the signed checkpoint commits with the entries it covers.
"""

from __future__ import annotations

import fcntl
import functools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from veil.errors import CatalogError

if TYPE_CHECKING:
    from alembic.config import Config

metadata = MetaData()

tokens = Table(
    "tokens", metadata,
    Column("token_id", String(32), primary_key=True),
    Column("secret_hash", String(64), nullable=False),
    Column("principal", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("project", String(64)),
    Column("office", String(32)),  # a steward's office (data_center, data_committee), for review rules
    Column("created_at", String(40), nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
)

applications = Table(
    "applications", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project", String(64), nullable=False),
    Column("applicant", String(128), nullable=False),
    Column("status", String(16), nullable=False),  # pending, approved, rejected, withdrawn
    Column("version", Integer, nullable=False),  # +1 on every change; reviews count for one version
    Column("request", Text, nullable=False),  # the ApplicationRequest as JSON
    Column("created_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
    Column("decided_at", String(40)),
)

reviews = Table(
    "reviews", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("application_id", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("reviewer", String(128), nullable=False),
    Column("office", String(32)),
    Column("decision", String(16), nullable=False),
    Column("comment", Text, nullable=False),
    Column("ts", String(40), nullable=False),
    UniqueConstraint("application_id", "version", "reviewer"),
)

grants = Table(
    "grants", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project", String(64), nullable=False),
    Column("dataset", String(64), nullable=False),
    Column("epsilon", Float(53), nullable=False),
    Column("delta", Float(53), nullable=False),
    Column("rho_total", Float(53), nullable=False),
    Column("rho_spent", Float(53), nullable=False, default=0.0),
    Column("delta_spent", Float(53), nullable=False, default=0.0),
    Column("approx_epsilon_spent", Float(53), nullable=False, default=0.0),  # DP-SGD, in (epsilon, delta)
    Column("created_by", String(128), nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("expires_at", String(40)),  # None: no expiry (the L1 default grant)
    Column("application_id", Integer),
    Column("uses", String(32), nullable=False, default="query"),  # comma-separated: query, training
    UniqueConstraint("project", "dataset"),
)

caps = Table(
    "dataset_caps", metadata,
    Column("dataset", String(64), primary_key=True),
    Column("epsilon", Float(53), nullable=False),
    Column("delta", Float(53), nullable=False),
    Column("rho_total", Float(53), nullable=False),
    Column("rho_spent", Float(53), nullable=False, default=0.0),
    Column("delta_spent", Float(53), nullable=False, default=0.0),
    Column("approx_epsilon_spent", Float(53), nullable=False, default=0.0),
    Column("set_by", String(128), nullable=False, default="catalog"),  # a steward's change outlives the catalog's
)

mocks = Table(
    "mocks", metadata,
    Column("dataset", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),  # schema or synthetic
    Column("epsilon", Float(53), nullable=False),
    Column("rows", Integer, nullable=False),
    Column("data", LargeBinary),  # synthetic rows as Parquet bytes
    Column("created_by", String(128), nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("receipt", String(64)),
)

jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project", String(64), nullable=False),
    Column("principal", String(128), nullable=False),
    Column("dataset", String(64), nullable=False),
    Column("request", Text, nullable=False),  # the TrainRequest as JSON
    Column("state", String(16), nullable=False),  # running, done, cancelled, failed
    Column("progress", Float(53), nullable=False, default=0.0),
    Column("epoch", Integer, nullable=False, default=0),
    Column("epsilon", Float(53), nullable=False, default=0.0),  # the accountant's, for the steps taken
    Column("rows", Integer),  # training rows, from a DP count of the dataset's rows (sets the held-out size)
    Column("release_rho", Float(53)),  # the rho reserved for each of its two DP releases (rows, evaluation)
    Column("cancel", Boolean, nullable=False, default=False),
    Column("owner", String(160), nullable=False),  # host:pid of the process training it now ('' when idle)
    Column("round", Integer, nullable=False, default=0),  # federated: the last round trained
    Column("history", Text),  # federated: the accountant's history [(sigma, q, steps)], kept across rounds
    Column("split_seed", BigInteger),  # federated: seeds the private holdout split; never leaves the site
    Column("evaluation", Text),  # the DP evaluation release as JSON
    Column("weights", LargeBinary),  # safetensors
    Column("error", Text),
    Column("receipt", String(64)),
    Column("created_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
)

audit = Table(
    "audit", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("ts", String(40), nullable=False),
    Column("principal", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("project", String(64)),
    Column("action", String(32), nullable=False),
    Column("dataset", String(64)),
    Column("query", Text),
    Column("rho", Float(53), nullable=False),
    Column("epsilon", Float(53), nullable=False, default=0.0),  # a release accounted in (epsilon, delta)
    Column("delta", Float(53), nullable=False),
    Column("result_digest", String(64)),
    Column("decision", String(16), nullable=False),
    Column("reason", Text),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
)

audit_head = Table(
    "audit_head", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)

checkpoints = Table(  # the audit head signed with the site's key (executor/checkpoints.py)
    "checkpoints", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),  # the head entry it covers
    Column("hash", String(64), nullable=False),
    Column("ts", String(40), nullable=False),
    Column("key_id", String(16), nullable=False),
    Column("public_key", String(64), nullable=False),  # raw Ed25519 key, hex; verify never trusts it
    Column("signature", String(128), nullable=False),
)

dataset_states = Table(  # a dataset's lifecycle (executor/lifecycle.py); a dataset without a row is active
    "dataset_states", metadata,
    Column("dataset", String(64), primary_key=True),
    Column("state", String(16), nullable=False),  # draft, active, suspended, retired, destroyed
    Column("reason", Text, nullable=False),
    Column("changed_by", String(128), nullable=False),
    Column("changed_at", String(40), nullable=False),
    Column("receipt", String(64)),  # the audit entry that recorded the change
)

dataset_transitions = Table(  # a steward's request to change a dataset's state, and its second office's review
    "dataset_transitions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dataset", String(64), nullable=False),
    Column("to_state", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("requested_by", String(128), nullable=False),
    Column("requested_office", String(64)),
    Column("requested_at", String(40), nullable=False),
    Column("status", String(16), nullable=False),  # pending, done, rejected
    Column("reviewed_by", String(128)),
    Column("reviewed_office", String(64)),
    Column("reviewed_at", String(40)),
    Column("digests", Text),  # destruction: JSON [{path, sha256, bytes}] of the copies deleted
)

witnessed_heads = Table(  # peers' signed audit heads this site witnessed (executor/witness.py)
    "witnessed_heads", metadata,
    Column("site", String(64), primary_key=True),  # the peer whose head it is
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
    Column("ts", String(40), nullable=False),  # when the peer signed it
    Column("key_id", String(16), nullable=False),
    Column("public_key", String(64), nullable=False),
    Column("signature", String(128), nullable=False),
    Column("received_at", String(40), nullable=False),
)

published_sheets = Table(  # an open dataset's DP statistics sheet, public once released (executor/sheets.py)
    "published_sheets", metadata,
    Column("dataset", String(64), primary_key=True),  # the latest publication; the audit log keeps every one
    Column("epsilon", Float(53), nullable=False),
    Column("sheet", Text, nullable=False),  # wire.StatisticsSheet as JSON
    Column("published_by", String(128), nullable=False),
    Column("published_at", String(40), nullable=False),
    Column("receipt", String(64), nullable=False),
)

standing_queries = Table(  # a standing DP count, charged once at approval (executor/standing.py)
    "standing_queries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("application_id", Integer, nullable=False),
    Column("project", String(64), nullable=False),
    Column("dataset", String(64), nullable=False),
    Column("spec", Text, nullable=False),  # wire.StandingQuery as JSON
    Column("epsilon", Float(53), nullable=False),
    Column("delta", Float(53), nullable=False),  # the reporting delta its epsilon is stated at
    Column("rho", Float(53), nullable=False),  # the whole horizon's certified loss, charged to the cap at approval
    Column("levels", Integer, nullable=False),
    Column("scale", Float(53), nullable=False),
    Column("state", Text, nullable=False),  # PRIVATE: each group's counter state (true counts of open nodes)
    Column("windows_released", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # active, finished, stopped
    Column("status_reason", Text),
    Column("created_at", String(40), nullable=False),
    Column("receipt", String(64), nullable=False),
)

standing_windows = Table(  # a standing query's released windows (public to its project)
    "standing_windows", metadata,
    Column("standing_id", Integer, primary_key=True, autoincrement=False),
    Column("window", Integer, primary_key=True, autoincrement=False),
    Column("start", String(10), nullable=False),
    Column("end", String(10), nullable=False),
    Column("cells", Text, nullable=False),  # [wire.StandingCell] as JSON
    Column("released_at", String(40), nullable=False),
    Column("receipt", String(64), nullable=False),
)

GENESIS = "0" * 64


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60}, pool_size=16,
                           max_overflow=48)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # transactions are begun below, IMMEDIATE
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # writers take the lock up front (no deadlock on upgrade); readers read a WAL snapshot
        immediate = connection.get_execution_options().get("veil_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def open_store(url: str) -> Engine:
    """Connect to the site database: create its tables on first use, or migrate it to this Veil's schema."""
    if url.startswith("sqlite"):
        engine = _sqlite_engine(url)
    else:
        engine = create_engine(url, pool_size=16, max_overflow=48, pool_pre_ping=True)
    migrate(engine)
    _check_columns(engine)
    try:
        with write(engine) as conn:
            if conn.execute(select(audit_head.c.id)).first() is None:
                conn.execute(insert(audit_head).values(id=1, seq=0, hash=GENESIS))
    except IntegrityError:  # another process starting on the same new database wrote it first
        pass
    return engine


def reachable(engine: Engine) -> bool:
    """Whether the state database answers now (one row read: cheap enough for every health check). SQLite
    is read through a new read-only connection, so a file moved or deleted (a volume unmounted) since the
    pool's connections opened it counts as unreachable."""
    head = select(audit_head.c.seq).where(audit_head.c.id == 1)
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    try:
        if path and path != ":memory:" and not path.startswith("file:"):
            with closing(sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as raw:
                raw.execute("SELECT seq FROM audit_head WHERE id = 1").fetchone()
            return True
        with engine.connect() as conn:
            conn.execute(head).first()
        return True
    except (SQLAlchemyError, sqlite3.Error):
        return False


MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
"""The revision of a database that a Veil made before migrations were kept (it has no alembic_version)."""
AFTER_BASELINE = {"checkpoints": None, "jobs": {"round", "history", "split_seed", "release_rho"}, "dataset_states": None,
                  "dataset_transitions": None, "witnessed_heads": None, "published_sheets": None,
                  "standing_queries": None, "standing_windows": None}
"""What the revisions after the baseline add (a table, or some of a table's columns): a database made
without migrations may lack these, and no more, to be migrated from the baseline."""
_MIGRATION_LOCK = 0x7665696C  # PostgreSQL advisory lock key: replicas starting together migrate one at a time


def migrate(engine: Engine) -> None:
    """Bring the state database to this Veil's schema (Alembic, `executor/migrations`): a new database gets
    the tables and is stamped, an older one runs the revisions it lacks. One transaction, under a lock."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.util.exc import CommandError

    with _migration_transaction(engine) as conn:
        config = _alembic_config(conn)
        current = MigrationContext.configure(conn).get_current_revision()
        if current == _head():
            return
        if current is None:
            if not inspect(conn).has_table("audit"):  # a new database
                metadata.create_all(conn)
                command.stamp(config, "head")
                return
            _check_columns(conn, ignore=AFTER_BASELINE)  # made before migrations: from the baseline, if it is one
            command.stamp(config, BASELINE)
        try:
            command.upgrade(config, "head")
        except CommandError as exc:  # a revision this Veil does not know: a newer Veil migrated it
            raise CatalogError(
                "newer_database", f"the state database {engine.url.render_as_string(hide_password=True)} is at "
                f"schema revision {current}, which this Veil does not know: a newer Veil migrated it ({exc})",
                hint="run the Veil version that migrated it (there are no downgrades), or restore a backup") from exc


@contextmanager
def _migration_transaction(engine: Engine) -> Iterator[Connection]:
    if engine.dialect.name == "sqlite":  # BEGIN IMMEDIATE: the database's write lock
        with engine.connect() as conn, conn.execution_options(veil_write=True).begin():
            yield conn
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        yield conn


def _alembic_config(conn: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


@functools.cache
def _head() -> str | None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def _check_columns(bind: Engine | Connection, ignore: dict[str, set[str] | None] | None = None) -> None:
    """Refuse a database this Veil cannot migrate (made before the baseline) with what to do."""
    found = inspect(bind)
    ignore = ignore or {}
    for table in metadata.sorted_tables:
        if table.name in ignore and ignore[table.name] is None:
            continue
        have = {c["name"] for c in found.get_columns(table.name)} if found.has_table(table.name) else set()
        lacking = [c.name for c in table.columns if c.name not in have and c.name not in (ignore.get(table.name) or ())]
        if lacking:
            url = bind.engine.url if isinstance(bind, Connection) else bind.url
            raise CatalogError(
                "stale_database",
                f"the state database {url.render_as_string(hide_password=True)} was created by an older Veil "
                f"than its migrations can upgrade: table '{table.name}' lacks {', '.join(lacking)}",
                hint="keep it for its audit log and start the site on a new database (for the demo: "
                     "'veil demo --reset')",
            )


class _SQLiteWriters:
    """The writers of one SQLite database queue here before BEGIN IMMEDIATE: threads of this process on a lock,
    processes (the executor's workers, a steward's CLI) on an exclusive `flock` of a file beside the database.
    SQLite's own busy handler makes a waiting writer sleep and retry (1, 2, 5 ... 100 ms), which left a second
    worker process mostly asleep; the kernel wakes a process waiting on the file as soon as it is free."""

    def __init__(self, engine: Engine) -> None:
        self.thread_lock = threading.Lock()
        database = engine.url.database
        self.lock_file = None if not database or database == ":memory:" else open(f"{database}.writers", "a+b")  # noqa: SIM115

    @contextmanager
    def held(self) -> Iterator[None]:
        with self.thread_lock:
            if self.lock_file is None:
                yield
                return
            fcntl.flock(self.lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.lock_file, fcntl.LOCK_UN)


_SQLITE_WRITERS: WeakKeyDictionary[Engine, _SQLiteWriters] = WeakKeyDictionary()
_WRITERS_LOCK = threading.Lock()
_HEAD_FOR_UPDATE = select(audit_head.c.seq).where(audit_head.c.id == 1).with_for_update()

HeadHook = Callable[[Connection, int, str], None]
_HEAD_HOOKS: WeakKeyDictionary[Engine, HeadHook] = WeakKeyDictionary()
_MOVED = "veil_head_moved"


def on_head_moved(engine: Engine, hook: HeadHook) -> None:
    """Run `hook(conn, seq, hash)` in every write transaction on `engine` that moved the audit head,
    just before it commits (the site's signer registers here)."""
    _HEAD_HOOKS[engine] = hook


def head_moved(conn: Connection, seq: int, head: str) -> None:
    """Note that this write transaction moved the audit head to (seq, head); `seal` acts on it."""
    conn.info[_MOVED] = (seq, head)


def seal(conn: Connection) -> None:
    """Run the engine's head hook now for the head this write transaction moved, if not yet done."""
    if not conn.get_execution_options().get("veil_write", False):
        return
    moved = conn.info.pop(_MOVED, None)
    hook = _HEAD_HOOKS.get(conn.engine)
    if moved is not None and hook is not None:
        hook(conn, *moved)


@contextmanager
def _sealed(conn: Connection) -> Iterator[Connection]:
    """Seal the transaction's head before it commits; `conn.info` outlives the checkout, so clear it."""
    conn.info.pop(_MOVED, None)
    try:
        yield conn
        seal(conn)
    finally:
        conn.info.pop(_MOVED, None)


@contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """One serialized write transaction: commit on success, roll back on any exception.

    On SQLite, writers queue first (`_SQLiteWriters`): SQLite's own busy handler makes waiting writers sleep
    and retry, which is slow and unfair under many concurrent requests."""
    if engine.dialect.name != "sqlite":
        with engine.connect() as conn, conn.execution_options(veil_write=True).begin():
            conn.execute(_HEAD_FOR_UPDATE)
            with _sealed(conn):
                yield conn
        return
    with _WRITERS_LOCK:
        writers = _SQLITE_WRITERS.get(engine)
        if writers is None:  # one per engine: it holds the lock file open
            writers = _SQLITE_WRITERS[engine] = _SQLiteWriters(engine)
    with writers.held(), engine.connect() as conn, conn.execution_options(veil_write=True).begin(), _sealed(conn):
        yield conn
