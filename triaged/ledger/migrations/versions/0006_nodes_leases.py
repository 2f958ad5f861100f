"""Several nodes on one ledger: the nodes table, leases on jobs and outbox rows, the queue level of a job.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("roles", sa.String(64), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_nodes"),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("queue_level", sa.String(16), nullable=True))
        batch.add_column(sa.Column("claimed_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(), nullable=True))
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(), nullable=True))
    op.create_index("ix_jobs_claimed_by", "jobs", ["claimed_by"])
    op.create_index("ix_outbox_claimed_by", "outbox", ["claimed_by"])
    _backfill_queue_level()


def _backfill_queue_level() -> None:
    """Jobs that may still wait for analysis keep their route's ``analysis_priority`` as their queue level."""
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.Integer()),
        sa.column("state", sa.String()),
        sa.column("route", sa.Text()),
        sa.column("queue_level", sa.String()),
    )
    bind = op.get_bind()
    waiting = sa.select(jobs.c.id, jobs.c.route).where(
        jobs.c.route.is_not(None), jobs.c.state.in_(["QUEUED", "ANALYSING", "ENCODING"])
    )
    for job_id, route in bind.execute(waiting).all():
        try:
            level = json.loads(route).get("analysis_priority")
        except (ValueError, AttributeError):
            continue
        if isinstance(level, str) and level:
            bind.execute(sa.update(jobs).where(jobs.c.id == job_id).values(queue_level=level[:16]))


def downgrade() -> None:
    op.drop_index("ix_outbox_claimed_by", "outbox")
    op.drop_index("ix_jobs_claimed_by", "jobs")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("claimed_by")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("claimed_by")
        batch.drop_column("queue_level")
    op.drop_table("nodes")
