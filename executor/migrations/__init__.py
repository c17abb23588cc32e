"""The state database's schema migrations (Alembic): `store.open_store` upgrades every database to head.

A change to a table in `store.py` needs a new revision in `versions/` (tests/test_migrations.py checks that
the migrated schema equals `store.metadata`). Revisions are frozen: they never import `store`'s tables.
"""
