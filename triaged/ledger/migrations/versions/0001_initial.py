"""Initial ledger schema: studies, series, instances, associations, jobs, job_transitions.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Types are spelled out here (plain ``sa.DateTime``, not the application's ``UTCDateTime``) so this
migration keeps working whatever later becomes of the application code.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Byte counters: INTEGER on SQLite (64-bit there; what every existing file has), BIGINT on PostgreSQL
# (whose INTEGER is 32-bit).  The partial index below carries its WHERE for both dialects.
_BYTES = sa.Integer().with_variant(sa.BigInteger(), "postgresql")

_JOB_STATES = (
    "RECEIVING",
    "COMPLETE",
    "QUEUED",
    "ANALYSING",
    "ENCODING",
    "DISPATCHING",
    "RETRY_WAIT",
    "DONE",
    "IGNORED",
    "FAILED",
    "SUPERSEDED",
)


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("first_seen", sa.DateTime(), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("byte_count", _BYTES, nullable=False),
        sa.Column("accession_number", sa.String(16), nullable=False),
        sa.Column("study_date", sa.String(8), nullable=False),
        sa.Column("study_description", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
        sa.UniqueConstraint("study_instance_uid", name="uq_studies_study_instance_uid"),
    )
    op.create_index("ix_studies_last_seen", "studies", ["last_seen"])

    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(64), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("byte_count", _BYTES, nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name="fk_series_study_id_studies", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_series"),
        sa.UniqueConstraint("series_instance_uid", name="uq_series_series_instance_uid"),
    )
    op.create_index("ix_series_study_id", "series", ["study_id"])

    op.create_table(
        "associations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("called_ae", sa.String(16), nullable=False),
        sa.Column("peer_address", sa.String(64), nullable=False),
        sa.Column("peer_port", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("accepted", sa.Boolean(), nullable=False),
        sa.Column("reject_reason", sa.Text(), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("bytes", _BYTES, nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("aborted", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_associations"),
    )
    op.create_index("ix_associations_started_at", "associations", ["started_at"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", _BYTES, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("association_id", sa.Integer(), nullable=True),
        sa.Column("duplicate_count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["association_id"],
            ["associations.id"],
            name="fk_instances_association_id_associations",
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name="fk_instances_series_id_series", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instances_sop_instance_uid"),
    )
    op.create_index("ix_instances_series_id", "instances", ["series_id"])
    op.create_index("ix_instances_association_id", "instances", ["association_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "state IN ({})".format(", ".join(f"'{s}'" for s in _JOB_STATES)), name="ck_jobs_state"
        ),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name="fk_jobs_study_id_studies", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("study_id", "revision", name="uq_jobs_study_id_revision"),
    )
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index(
        "uq_jobs_study_id_receiving",
        "jobs",
        ["study_id"],
        unique=True,
        sqlite_where=sa.text("state = 'RECEIVING'"),
        postgresql_where=sa.text("state = 'RECEIVING'"),
    )

    op.create_table(
        "job_transitions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_transitions_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_job_transitions"),
    )
    op.create_index("ix_job_transitions_job_id", "job_transitions", ["job_id"])


def downgrade() -> None:
    op.drop_table("job_transitions")
    op.drop_table("jobs")
    op.drop_table("instances")
    op.drop_table("associations")
    op.drop_table("series")
    op.drop_table("studies")
