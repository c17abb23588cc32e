"""A training job's reserved rho per DP release (its count of rows, its held-out evaluation), so that the
settlement refunds what a release that never ran had reserved, at the rho it was reserved at.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("release_rho", sa.Float(53)))


def downgrade() -> None:
    raise NotImplementedError("a site's state database is never downgraded: restore a backup instead")
