"""The state database's migrations (Alembic): a database made by an older Veil is upgraded in place, keeping
its tokens, grants, jobs and audit chain; a new one gets the schema at once; both end equal to
`store.metadata`. On SQLite, and on PostgreSQL when VEIL_TEST_POSTGRES_URL names a server."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
    inspect,
    select,
)

from conftest import BACKENDS, PROJECT, deploy, make_database
from veil.errors import CatalogError
from veil.executor import audit, ledger, store
from veil.executor.auth import authenticate, create_token
from veil.executor.catalog import load_catalog
from veil.executor.store import GENESIS, open_store, write


def _old_schema() -> MetaData:
    """The tables as Veil made them before migrations were kept (git: executor/store.py at bd9595a): no
    table added since (`store.AFTER_BASELINE`: checkpoints, the datasets' lifecycle, witnessed heads), and `jobs`
    without the federated columns (round, history, split_seed)."""
    old = MetaData()
    added = {name for name, columns in store.AFTER_BASELINE.items() if columns is None}
    for table in store.metadata.sorted_tables:
        if table.name != "jobs" and table.name not in added:
            table.to_metadata(old)
    Table(
        "jobs", old,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("project", String(64), nullable=False),
        Column("principal", String(128), nullable=False),
        Column("dataset", String(64), nullable=False),
        Column("request", Text, nullable=False),
        Column("state", String(16), nullable=False),
        Column("progress", Float(53), nullable=False, default=0.0),
        Column("epoch", Integer, nullable=False, default=0),
        Column("epsilon", Float(53), nullable=False, default=0.0),
        Column("rows", Integer),
        Column("cancel", Boolean, nullable=False, default=False),
        Column("owner", String(160), nullable=False),
        Column("evaluation", Text),
        Column("weights", LargeBinary),
        Column("error", Text),
        Column("receipt", String(64)),
        Column("created_at", String(40), nullable=False),
        Column("updated_at", String(40), nullable=False),
    )
    return old


def _raw_engine(url: str) -> Engine:
    """An engine on the database with Veil's transactions (store.write) but no schema work."""
    return store._sqlite_engine(url) if url.startswith("sqlite") else create_engine(url)


def _schema_drift(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), store.metadata))


def _revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_database_made_before_migrations_is_upgraded_keeping_grants_tokens_jobs_and_the_audit_chain(
        backend: str, site_config: Path, tmp_path: Path) -> None:
    url, drop = make_database(backend, tmp_path)
    try:
        old = _raw_engine(url)
        schema = _old_schema()
        schema.create_all(old)
        catalog = load_catalog(site_config)
        with old.begin() as conn:
            conn.execute(insert(store.audit_head).values(id=1, seq=0, hash=GENESIS))
        token = create_token(old, "alice", "researcher", PROJECT)  # audited
        with write(old) as conn:
            ledger.set_grant(conn, catalog, PROJECT, catalog.dataset("encounters"), 3.0, by="steward_old")
            conn.execute(insert(schema.tables["jobs"]).values(  # a finished job, as that Veil stored it
                project=PROJECT, principal="alice", dataset="encounters", request="{}", state="done", progress=1.0,
                epoch=3, epsilon=1.5, cancel=False, owner="", created_at=audit.now(), updated_at=audit.now()))
        before = audit.entries(old)
        assert len(before) >= 2 and audit.verify(old, None, []).ok
        assert "alembic_version" not in inspect(old).get_table_names()
        old.dispose()

        engine = open_store(url)  # what an upgraded executor does first
        try:
            assert _revision(engine) == store._head()
            assert _schema_drift(engine) == []
            assert [e.hash for e in audit.entries(engine)] == [e.hash for e in before]
            assert audit.verify(engine, None, []).ok
            assert authenticate(engine, f"Bearer {token}").name == "alice"
            grant = next(g for g in ledger.list_grants(engine, PROJECT, catalog.reporting_delta)
                         if g.dataset == "encounters")
            assert grant.epsilon == pytest.approx(3.0)
            with engine.connect() as conn:
                job = conn.execute(select(store.jobs)).mappings().one()
            assert (job["state"], job["epsilon"], job["round"], job["history"], job["split_seed"]) == (
                "done", 1.5, 0, None, None)
        finally:
            engine.dispose()

        # the executor runs on it: the old grant is charged, entries are signed into the new checkpoints table
        d = deploy(site_config, url, tmp_path, grants={})
        try:
            release = d.client().query("SELECT COUNT(*) FROM encounters", epsilon=0.5)
            assert release.receipt and d.spent("encounters")["rho"] > 0
        finally:
            d.stop()
        engine = open_store(url)
        try:
            after = audit.entries(engine)
            assert [e.hash for e in after[:len(before)]] == [e.hash for e in before]
            assert any(e.action == "query" and e.decision == "released" for e in after[len(before):])
            with engine.connect() as conn:
                assert conn.execute(select(store.checkpoints)).first() is not None
            assert audit.verify(engine, None, []).ok
        finally:
            engine.dispose()
    finally:
        drop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_database_is_made_at_the_newest_revision(backend: str, tmp_path: Path) -> None:
    url, drop = make_database(backend, tmp_path)
    try:
        engine = open_store(url)
        assert _revision(engine) == store._head()
        assert _schema_drift(engine) == []
        engine.dispose()
        again = open_store(url)  # nothing to do the second time
        assert _revision(again) == store._head()
        again.dispose()
    finally:
        drop()


def test_a_database_older_than_the_baseline_is_refused_with_what_to_do(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ancient.db'}"
    old = _old_schema()
    grants = old.tables["grants"]
    ancient = MetaData()
    for table in old.sorted_tables:
        if table.name != "grants":
            table.to_metadata(ancient)
    Table("grants", ancient, *[Column(c.name, c.type, primary_key=c.primary_key) for c in grants.columns
                               if c.name != "uses"])
    engine = create_engine(url)
    ancient.create_all(engine)
    engine.dispose()
    with pytest.raises(CatalogError) as refused:
        open_store(url)
    assert refused.value.code == "stale_database" and "uses" in refused.value.message
    assert "new database" in (refused.value.hint or "")


def test_a_database_migrated_by_a_newer_veil_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    open_store(url).dispose()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    engine.dispose()
    with pytest.raises(CatalogError) as refused:
        open_store(url)
    assert refused.value.code == "newer_database" and "9999" in refused.value.message
