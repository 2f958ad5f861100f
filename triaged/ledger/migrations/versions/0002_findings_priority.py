"""Findings of each job and its triage priority.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("pipeline", sa.String(64), nullable=True))
        batch.add_column(sa.Column("priority_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("priority_level", sa.String(16), nullable=True))
        batch.add_column(sa.Column("priority_reasons", sa.Text(), nullable=True))
        batch.add_column(sa.Column("result_at", sa.DateTime(), nullable=True))
    op.create_table(
        "findings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("pipeline_version", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("severity_pct", sa.Float(), nullable=False),
        sa.Column("whole_lung_pct", sa.Float(), nullable=False),
        sa.Column("consolidation_pct", sa.Float(), nullable=False),
        sa.Column("ct_grade", sa.Integer(), nullable=False),
        sa.Column("p_covid", sa.Float(), nullable=True),
        sa.Column("data", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE", name="fk_findings_job_id_jobs"),
        sa.PrimaryKeyConstraint("id", name="pk_findings"),
        sa.UniqueConstraint("job_id", name="uq_findings_job_id"),
    )


def downgrade() -> None:
    op.drop_table("findings")
    with op.batch_alter_table("jobs") as batch:
        for name in ("result_at", "priority_reasons", "priority_level", "priority_score", "pipeline"):
            batch.drop_column(name)
