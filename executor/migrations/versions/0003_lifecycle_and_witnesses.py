"""Datasets' lifecycle (their states and the stewards' requests to change them) and the audit heads a site
witnessed for its peers.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dataset_states",
        sa.Column("dataset", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("changed_by", sa.String(128), nullable=False),
        sa.Column("changed_at", sa.String(40), nullable=False),
        sa.Column("receipt", sa.String(64)),
    )
    op.create_table(
        "dataset_transitions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("requested_by", sa.String(128), nullable=False),
        sa.Column("requested_office", sa.String(64)),
        sa.Column("requested_at", sa.String(40), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reviewed_by", sa.String(128)),
        sa.Column("reviewed_office", sa.String(64)),
        sa.Column("reviewed_at", sa.String(40)),
        sa.Column("digests", sa.Text),
    )
    op.create_table(
        "witnessed_heads",
        sa.Column("site", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("ts", sa.String(40), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("received_at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("a site's state database is never downgraded: restore a backup instead")
