"""SQLAlchemy 2.0 declarative models of the ledger.

The migration in ``migrations/versions`` must create exactly these tables; a test compares them with
Alembic's autogenerate so the two cannot drift apart.  The :class:`~triaged.ledger.Ledger` uses these
tables through Core statements only (no ORM sessions): the models exist to describe the schema.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from triaged.domain import JobState, OutboxState

#: Deterministic constraint and index names, so later (batch) migrations on SQLite can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Byte counters: SQLite's INTEGER is 64-bit already; PostgreSQL's is 32-bit, too small for a study's bytes.
ByteCount = Integer().with_variant(BigInteger(), "postgresql")

#: SQL literal list of every job state, for the CHECK constraint on ``jobs.state``.
JOB_STATES_SQL = ", ".join(f"'{s.value}'" for s in JobState)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC text and read back as an aware UTC :class:`datetime`.

    SQLite has no time zone type; storing one fixed zone keeps the text sortable, so ``<`` in SQL
    compares instants.  Naive datetimes are refused rather than guessed at: a local time taken for UTC
    would silently shift the completion sweep by hours.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to naive UTC for storage."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given to the ledger; use an aware UTC time")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        """Attach UTC to the stored naive value."""
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base carrying the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Study(Base):
    """One study (Study Instance UID) ever received; counts cover the current instances."""

    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("study_instance_uid"),
        Index("ix_studies_last_seen", "last_seen"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    instance_count: Mapped[int] = mapped_column(Integer)
    byte_count: Mapped[int] = mapped_column(ByteCount)
    accession_number: Mapped[str] = mapped_column(String(16))
    study_date: Mapped[str] = mapped_column(String(8))
    study_description: Mapped[str] = mapped_column(String(64))
    # Added in 0005: when retention deleted the study's files (its series and instance rows go with them;
    # the study, its jobs and their history stay until ``retention.keep_ledger_days``).  A study re-opened
    # by a later instance counts as purged only while none of its jobs was created after this time.
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Series(Base):
    """One series of a study."""

    __tablename__ = "series"
    __table_args__ = (
        UniqueConstraint("series_instance_uid"),
        Index("ix_series_study_id", "study_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer)
    byte_count: Mapped[int] = mapped_column(ByteCount)


class Association(Base):
    """Audit trail of one association request, accepted or rejected."""

    __tablename__ = "associations"
    __table_args__ = (Index("ix_associations_started_at", "started_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    accepted: Mapped[bool] = mapped_column()
    reject_reason: Mapped[str] = mapped_column(Text)
    instances: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(ByteCount)
    failures: Mapped[int] = mapped_column(Integer)
    aborted: Mapped[bool] = mapped_column()


class Instance(Base):
    """One stored SOP instance; ``path`` is relative to the spool root."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid"),
        Index("ix_instances_series_id", "series_id"),
        Index("ix_instances_association_id", "association_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(ByteCount)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # SET NULL: pruning the audit trail must not delete the instances it brought.
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id", ondelete="SET NULL"))
    duplicate_count: Mapped[int] = mapped_column(Integer)


class Job(Base):
    """One analysis job: revision N of a study's results, moved through :data:`~triaged.domain.TRANSITIONS`."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("study_id", "revision"),
        CheckConstraint(f"state IN ({JOB_STATES_SQL})", name="state"),
        Index("ix_jobs_state", "state"),
        Index("ix_jobs_claimed_by", "claimed_by"),
        # At most one job per study collects instances: a late instance re-opens through a new
        # revision, and this index turns a race that would create two into a constraint error.
        Index(
            "uq_jobs_study_id_receiving",
            "study_id",
            unique=True,
            sqlite_where=text("state = 'RECEIVING'"),
            postgresql_where=text("state = 'RECEIVING'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer)
    # Added in 0002: the pipeline the job runs, and the triage priority its findings earned.
    pipeline: Mapped[str | None] = mapped_column(String(64))
    priority_score: Mapped[float | None] = mapped_column(Float)
    priority_level: Mapped[str | None] = mapped_column(String(16))
    priority_reasons: Mapped[str | None] = mapped_column(Text)
    result_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Added in 0003: the routing decision (JSON: rule, pipelines, destinations with outputs, policy).
    route: Mapped[str | None] = mapped_column(Text)
    # Added in 0006: the level the job waits in the analysis queue with (its route's analysis_priority),
    # and the node that claimed it (ANALYSING, ENCODING) with the time its lease runs out.
    queue_level: Mapped[str | None] = mapped_column(String(16))
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())


class JobTransition(Base):
    """History of a job: one row per state change, including its creation (``from_state`` NULL)."""

    __tablename__ = "job_transitions"
    __table_args__ = (Index("ix_job_transitions_job_id", "job_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text)


class FindingsRecord(Base):
    """What a job's pipeline measured (0002): summary columns for queries, the whole Findings as JSON."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    pipeline_version: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    severity_pct: Mapped[float] = mapped_column(Float)
    whole_lung_pct: Mapped[float] = mapped_column(Float)
    consolidation_pct: Mapped[float] = mapped_column(Float)
    ct_grade: Mapped[int] = mapped_column(Integer)
    p_covid: Mapped[float | None] = mapped_column(Float)
    data: Mapped[str] = mapped_column(Text)


#: SQL literal list of every outbox state, for the CHECK constraint on ``outbox.state``.
OUTBOX_STATES_SQL = ", ".join(f"'{s.value}'" for s in OutboxState)


class OutboxItem(Base):
    """One result object for one destination (0003): the durable outbox of dispatch.

    PENDING until the destination answers Success (SENT), or until the retry age runs out (DEAD,
    dead-lettered with an ERROR log); ``next_attempt_at`` drives the capped exponential backoff.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("job_id", "destination", "sop_instance_uid"),
        CheckConstraint(f"state IN ({OUTBOX_STATES_SQL})", name="state"),
        Index("ix_outbox_state", "state"),
        Index("ix_outbox_claimed_by", "claimed_by"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(8))
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text)
    # Added in 0006: the node sending the row now, until its lease runs out (the row stays PENDING).
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditEvent(Base):
    """One audit event that has no other row of its own (0004): a query, a refusal, a reload, a deletion.

    Associations (accepted or refused), stored instances and sent result objects are already rows of
    ``associations``, ``instances`` and ``outbox``; ``triaged audit`` lists the four together.
    ``detail`` is a JSON object of the event's fields (no patient names or birth dates).
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"), Index("ix_audit_events_kind", "kind"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: Dotted event name, e.g. ``find``, ``find.refused``, ``config.reloaded``, ``retention.deleted``.
    kind: Mapped[str] = mapped_column(String(32))
    #: Who: a calling AE title, ``admin`` (a CLI command) or ``node`` (the node itself, e.g. retention).
    actor: Mapped[str] = mapped_column(String(64))
    #: From where: ``address:port`` of a DICOM or HTTP peer, else empty.
    peer: Mapped[str] = mapped_column(String(80))
    study_uid: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)


class NodeRecord(Base):
    """One node that opened the ledger (0006): who it is, what it does, when it last said it was alive."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Comma-separated roles (``receive,complete,analyse,dispatch``).
    roles: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    version: Mapped[str] = mapped_column(String(32))
    #: Set by a clean stop; None while it runs (or after it died).
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
