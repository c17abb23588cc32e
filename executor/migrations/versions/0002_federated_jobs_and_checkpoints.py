"""Federated training jobs (the last round, the accountant's history, the holdout's seed) and the signed
audit checkpoints. Idempotent: a database made by a Veil between the two changes has one of them already.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    found = sa.inspect(op.get_bind())
    have = {c["name"] for c in found.get_columns("jobs")}
    for column in (sa.Column("round", sa.Integer, nullable=False, server_default="0"),
                   sa.Column("history", sa.Text),
                   sa.Column("split_seed", sa.BigInteger)):
        if column.name not in have:
            op.add_column("jobs", column)
    if not found.has_table("checkpoints"):
        op.create_table(
            "checkpoints",
            sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("hash", sa.String(64), nullable=False),
            sa.Column("ts", sa.String(40), nullable=False),
            sa.Column("key_id", sa.String(16), nullable=False),
            sa.Column("public_key", sa.String(64), nullable=False),
            sa.Column("signature", sa.String(128), nullable=False),
        )


def downgrade() -> None:
    raise NotImplementedError("a site's state database is never downgraded: restore a backup instead")
