"""Baseline: the state database as Veil created it before migrations were kept (tokens, applications,
reviews, grants, caps, mocks, jobs, audit and its head), frozen here.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("token_id", sa.String(32), primary_key=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("principal", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("project", sa.String(64)),
        sa.Column("office", sa.String(32)),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
    )
    op.create_table(
        "applications",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("applicant", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
        sa.Column("decided_at", sa.String(40)),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("application_id", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("office", sa.String(32)),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("ts", sa.String(40), nullable=False),
        sa.UniqueConstraint("application_id", "version", "reviewer"),
    )
    op.create_table(
        "grants",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("epsilon", sa.Float(53), nullable=False),
        sa.Column("delta", sa.Float(53), nullable=False),
        sa.Column("rho_total", sa.Float(53), nullable=False),
        sa.Column("rho_spent", sa.Float(53), nullable=False),
        sa.Column("delta_spent", sa.Float(53), nullable=False),
        sa.Column("approx_epsilon_spent", sa.Float(53), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("expires_at", sa.String(40)),
        sa.Column("application_id", sa.Integer),
        sa.Column("uses", sa.String(32), nullable=False),
        sa.UniqueConstraint("project", "dataset"),
    )
    op.create_table(
        "dataset_caps",
        sa.Column("dataset", sa.String(64), primary_key=True),
        sa.Column("epsilon", sa.Float(53), nullable=False),
        sa.Column("delta", sa.Float(53), nullable=False),
        sa.Column("rho_total", sa.Float(53), nullable=False),
        sa.Column("rho_spent", sa.Float(53), nullable=False),
        sa.Column("delta_spent", sa.Float(53), nullable=False),
        sa.Column("approx_epsilon_spent", sa.Float(53), nullable=False),
        sa.Column("set_by", sa.String(128), nullable=False),
    )
    op.create_table(
        "mocks",
        sa.Column("dataset", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("epsilon", sa.Float(53), nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("receipt", sa.String(64)),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("principal", sa.String(128), nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(53), nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("epsilon", sa.Float(53), nullable=False),
        sa.Column("rows", sa.Integer),
        sa.Column("cancel", sa.Boolean, nullable=False),
        sa.Column("owner", sa.String(160), nullable=False),
        sa.Column("evaluation", sa.Text),
        sa.Column("weights", sa.LargeBinary),
        sa.Column("error", sa.Text),
        sa.Column("receipt", sa.String(64)),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("ts", sa.String(40), nullable=False),
        sa.Column("principal", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("project", sa.String(64)),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("dataset", sa.String(64)),
        sa.Column("query", sa.Text),
        sa.Column("rho", sa.Float(53), nullable=False),
        sa.Column("epsilon", sa.Float(53), nullable=False),
        sa.Column("delta", sa.Float(53), nullable=False),
        sa.Column("result_digest", sa.String(64)),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
    )
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("a site's state database is never downgraded: restore a backup instead")
