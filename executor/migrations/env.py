"""Alembic's environment: migrations run on the connection `store.open_store` hands over (in its transaction,
under its lock), or, from the `alembic` command line, on `sqlalchemy.url`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from veil.executor.store import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is not None:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
