"""Standing DP counts (issue 18) and their released windows.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "standing_queries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("application_id", sa.Integer, nullable=False),
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("epsilon", sa.Float(53), nullable=False),
        sa.Column("delta", sa.Float(53), nullable=False),
        sa.Column("rho", sa.Float(53), nullable=False),
        sa.Column("levels", sa.Integer, nullable=False),
        sa.Column("scale", sa.Float(53), nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("windows_released", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.Text),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("receipt", sa.String(64), nullable=False),
    )
    op.create_table(
        "standing_windows",
        sa.Column("standing_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("window", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("start", sa.String(10), nullable=False),
        sa.Column("end", sa.String(10), nullable=False),
        sa.Column("cells", sa.Text, nullable=False),
        sa.Column("released_at", sa.String(40), nullable=False),
        sa.Column("receipt", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("a site's state database is never downgraded: restore a backup instead")
