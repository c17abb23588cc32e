"""Open datasets' published DP statistics sheets.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "published_sheets",
        sa.Column("dataset", sa.String(64), primary_key=True),
        sa.Column("epsilon", sa.Float(53), nullable=False),
        sa.Column("sheet", sa.Text, nullable=False),
        sa.Column("published_by", sa.String(128), nullable=False),
        sa.Column("published_at", sa.String(40), nullable=False),
        sa.Column("receipt", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("a site's state database is never downgraded: restore a backup instead")
