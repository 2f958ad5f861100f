"""The SQLite ledger: the only owner of database connections and of job state transitions.

Thread model: one :class:`Ledger` is shared by the association threads of the SCP, the scheduler
thread and the CLI.  SQLAlchemy's pool hands each thread its own sqlite3 connection
(``check_same_thread=False`` only lets a pooled connection move between threads over time).  In WAL
mode readers never block the single writer; every write transaction starts with ``BEGIN IMMEDIATE``
so it takes the write lock up front and waits for it under ``busy_timeout``.  A deferred transaction
that reads and then writes could instead fail at once with SQLITE_BUSY when it tries to upgrade its
lock, which is the deadlock the IMMEDIATE begin avoids.

Durability: ``synchronous=NORMAL`` in WAL mode may lose the last commits on power loss (never corrupts).
That is acceptable because the spool files are fsynced before the ledger write and a start-up reconcile
re-records every spool file missing from :meth:`Ledger.instance_paths`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.util import CommandError
from sqlalchemy import (
    Connection,
    Engine,
    Select,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from triaged.domain import (
    TRANSITIONS,
    Findings,
    InstanceRecord,
    JobRow,
    JobState,
    OutboxEntry,
    StoreOutcome,
    StudyRow,
    WorklistRow,
    findings_from_json,
    findings_to_json,
)
from triaged.errors import InvalidDatasetError, StateError, StorageError, TriagedError
from triaged.ledger.schema import (
    Association,
    FindingsRecord,
    Instance,
    Job,
    JobTransition,
    OutboxItem,
    Series,
    Study,
    UTCDateTime,
)

log = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"

#: States whose results are not yet sent: a late instance cancels them (SUPERSEDED).  Later states
#: keep going; the next revision's SR names their SR as predecessor.
_SUPERSEDABLE = frozenset({JobState.COMPLETE, JobState.QUEUED, JobState.ANALYSING, JobState.ENCODING})

# Core tables behind the models (the declarative attribute is typed as a generic FromClause).
_studies = cast(Table, Study.__table__)
_series = cast(Table, Series.__table__)
_instances = cast(Table, Instance.__table__)
_associations = cast(Table, Association.__table__)
_jobs = cast(Table, Job.__table__)
_transitions = cast(Table, JobTransition.__table__)
_findings = cast(Table, FindingsRecord.__table__)
_outbox = cast(Table, OutboxItem.__table__)


@dataclass(frozen=True)
class AssociationRow:
    """One association as the audit trail shows it."""

    id: int
    calling_ae: str
    called_ae: str
    peer_address: str
    peer_port: int
    started_at: datetime
    ended_at: datetime | None
    accepted: bool
    reject_reason: str
    instances: int
    bytes: int
    failures: int
    aborted: bool


class _ReceiveStatements:
    """The statements of :meth:`Ledger.record_instance`, built once with bind parameters.

    Building a Core statement and its cache key costs far more than executing it on SQLite (an
    upsert's ``excluded`` alone proxies every column); prebuilt statements keep the C-STORE path to
    parameter binding and execution.
    """

    def __init__(self) -> None:
        st, se, ins, j = _studies, _series, _instances, _jobs
        now = bindparam("now", type_=UTCDateTime())

        self.find_instance = select(ins.c.id, ins.c.series_id, ins.c.size, ins.c.sha256).where(
            ins.c.sop_instance_uid == bindparam("sop")
        )
        self.count_duplicate = (
            update(ins).where(ins.c.id == bindparam("iid")).values(duplicate_count=ins.c.duplicate_count + 1)
        )

        study = sqlite_insert(st).values(
            study_instance_uid=bindparam("study_uid"),
            first_seen=now,
            last_seen=now,
            instance_count=bindparam("d_count"),
            byte_count=bindparam("d_bytes"),
            accession_number=bindparam("accession_number"),
            study_date=bindparam("study_date"),
            study_description=bindparam("study_description"),
        )
        ex = study.excluded
        self.upsert_study = study.on_conflict_do_update(
            index_elements=[st.c.study_instance_uid],
            set_={
                # max(): a reconcile or a caller-given time must not move last_seen back.
                "last_seen": func.max(st.c.last_seen, ex.last_seen),
                "instance_count": st.c.instance_count + ex.instance_count,
                "byte_count": st.c.byte_count + ex.byte_count,
                # Descriptive fields: a later instance that lacks them must not blank them.
                "accession_number": func.coalesce(
                    func.nullif(ex.accession_number, ""), st.c.accession_number
                ),
                "study_date": func.coalesce(func.nullif(ex.study_date, ""), st.c.study_date),
                "study_description": func.coalesce(
                    func.nullif(ex.study_description, ""), st.c.study_description
                ),
            },
        ).returning(st.c.id)

        series = sqlite_insert(se).values(
            study_id=bindparam("study_id"),
            series_instance_uid=bindparam("series_uid"),
            modality=bindparam("modality"),
            series_number=bindparam("series_number"),
            series_description=bindparam("series_description"),
            instance_count=bindparam("d_count"),
            byte_count=bindparam("d_bytes"),
        )
        ex = series.excluded
        self.upsert_series = series.on_conflict_do_update(
            index_elements=[se.c.series_instance_uid],
            set_={
                "instance_count": se.c.instance_count + ex.instance_count,
                "byte_count": se.c.byte_count + ex.byte_count,
                "modality": func.coalesce(func.nullif(ex.modality, ""), se.c.modality),
                "series_number": func.coalesce(ex.series_number, se.c.series_number),
                "series_description": func.coalesce(
                    func.nullif(ex.series_description, ""), se.c.series_description
                ),
            },
        ).returning(se.c.id, se.c.study_id)

        content = {
            "sop_class_uid": bindparam("sop_class_uid"),
            "transfer_syntax_uid": bindparam("transfer_syntax_uid"),
            "path": bindparam("path"),
            "size": bindparam("size"),
            "sha256": bindparam("sha256"),
            "received_at": now,
            "association_id": bindparam("association_id"),
        }
        self.insert_instance = insert(ins).values(
            series_id=bindparam("series_id"),
            sop_instance_uid=bindparam("sop"),
            duplicate_count=0,
            **content,
        )
        self.replace_instance = update(ins).where(ins.c.id == bindparam("iid")).values(**content)
        self.latest_job = (
            select(j.c.id, j.c.revision, j.c.state)
            .where(j.c.study_id == bindparam("study_id"))
            .order_by(j.c.revision.desc())
            .limit(1)
        )


def _utc(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} given to the ledger; use an aware UTC time")
    return value


def _on_connect(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
    # Take BEGIN away from the sqlite3 module (it would otherwise start deferred transactions on its
    # own, and none for SELECT); Ledger._transaction emits it instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching to WAL may itself have to wait for another connection's lock.
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


class Ledger:
    """The node's SQLite ledger (studies, instances, associations, jobs and their history).

    Parameters
    ----------
    path
        The SQLite file; its folder is created, and the schema is migrated to the newest revision
        (``alembic upgrade head``) on open, so an older ledger is upgraded in place.

    Notes
    -----
    Safe to share between threads.  Every method is one transaction.  Database failures (disk full,
    read-only file, lock timeout) surface as :class:`~triaged.errors.StorageError` (retryable).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the ledger folder {self.path.parent}: {exc.strerror}") from exc
        self._engine: Engine = create_engine(
            f"sqlite:///{self.path}",
            connect_args={"check_same_thread": False},
            # One connection per concurrent caller (16 associations + scheduler + CLI) without
            # opening and closing connections under load.
            pool_size=20,
            max_overflow=20,
        )
        event.listen(self._engine, "connect", _on_connect)
        self._q = _ReceiveStatements()
        self._closed = threading.Event()
        try:
            self._migrate()
        except Exception:
            self._engine.dispose()
            raise
        log.info("ledger open at %s", self.path)

    def _migrate(self) -> None:
        cfg = AlembicConfig()
        # ConfigParser interpolation would choke on a '%' in the install path.
        cfg.set_main_option("script_location", str(_MIGRATIONS).replace("%", "%%"))
        try:
            # One IMMEDIATE transaction: two processes opening the same old ledger migrate it once.
            with self._transaction("BEGIN IMMEDIATE") as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except CommandError as exc:
            # Typically a ledger written by a newer triaged: its revision is not among ours.
            raise TriagedError(f"cannot migrate the ledger {self.path}: {exc}") from exc
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot open or migrate the ledger {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close every pooled connection; the ledger must not be used afterwards."""
        if not self._closed.is_set():
            self._closed.set()
            self._engine.dispose()
            log.info("ledger closed")

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Connection]:
        """A transaction opened with our own ``begin`` statement, committed unless the block raises.

        The sqlite3 module's own BEGIN handling is off (``_on_connect``), so SQLAlchemy's begin is a
        no-op on the driver and this statement opens the real transaction; COMMIT and ROLLBACK still
        go through the driver.  Doing it here rather than in a ``begin`` event hook (the SQLAlchemy
        recipe) leaves the engine without connection events, which would otherwise be dispatched on
        every statement of the C-STORE path.
        """
        if self._closed.is_set():
            raise TriagedError(f"the ledger {self.path} is closed")
        with self._engine.connect() as conn, conn.begin():
            conn.exec_driver_sql(begin)
            yield conn

    @contextmanager
    def _write(self, what: str) -> Iterator[Connection]:
        """A ``BEGIN IMMEDIATE`` transaction; database errors become :class:`StorageError`."""
        try:
            with self._transaction("BEGIN IMMEDIATE") as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StorageError(f"ledger: {what} failed: {exc}") from exc

    @contextmanager
    def _read(self, what: str) -> Iterator[Connection]:
        """A deferred (read) transaction: one snapshot, and it never waits for the writer in WAL mode."""
        try:
            with self._transaction("BEGIN") as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StorageError(f"ledger: {what} failed: {exc}") from exc

    # ------------------------------------------------------------------ audit trail

    def open_association(
        self,
        *,
        calling_ae: str,
        called_ae: str,
        peer_address: str,
        peer_port: int,
        accepted: bool = True,
        reject_reason: str = "",
    ) -> int:
        """Record an association request (accepted or rejected).

        Parameters
        ----------
        calling_ae, called_ae
            AE titles of the requestor and of us as requested.
        peer_address, peer_port
            Where the request came from.
        accepted
            False for a rejected request; it is then recorded as already ended.
        reject_reason
            Why it was rejected (empty when accepted).

        Returns
        -------
        int
            The association id to pass to :meth:`record_instance` and :meth:`close_association`.
        """
        now = datetime.now(UTC)
        with self._write("open_association") as conn:
            result = conn.execute(
                insert(_associations).values(
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    peer_address=peer_address,
                    peer_port=peer_port,
                    started_at=now,
                    ended_at=None if accepted else now,
                    accepted=accepted,
                    reject_reason=reject_reason,
                    instances=0,
                    bytes=0,
                    failures=0,
                    aborted=False,
                )
            )
            pk = result.inserted_primary_key
            assert pk is not None
            return int(pk[0])

    def close_association(
        self, association_id: int, *, instances: int, bytes: int, failures: int, aborted: bool
    ) -> None:
        """Record the end of an association with its totals.

        Parameters
        ----------
        association_id
            As returned by :meth:`open_association`.
        instances, bytes, failures
            Instances stored, their total size, and C-STOREs answered with a failure status.
        aborted
            True when the association ended with an A-ABORT or a network error.

        Raises
        ------
        TriagedError
            The association id is unknown.
        """
        with self._write("close_association") as conn:
            result = conn.execute(
                update(_associations)
                .where(_associations.c.id == association_id)
                .values(
                    ended_at=datetime.now(UTC),
                    instances=instances,
                    bytes=bytes,
                    failures=failures,
                    aborted=aborted,
                )
            )
            if result.rowcount != 1:
                raise TriagedError(f"association {association_id} is not in the ledger")

    def associations(self, limit: int = 50) -> list[AssociationRow]:
        """The most recent associations, newest first.

        Parameters
        ----------
        limit
            How many to return at most.
        """
        a = _associations
        stmt = select(a).order_by(a.c.id.desc()).limit(limit)
        with self._read("associations") as conn:
            return [
                AssociationRow(
                    id=r.id,
                    calling_ae=r.calling_ae,
                    called_ae=r.called_ae,
                    peer_address=r.peer_address,
                    peer_port=r.peer_port,
                    started_at=r.started_at,
                    ended_at=r.ended_at,
                    accepted=bool(r.accepted),
                    reject_reason=r.reject_reason,
                    instances=r.instances,
                    bytes=r.bytes,
                    failures=r.failures,
                    aborted=bool(r.aborted),
                )
                for r in conn.execute(stmt)
            ]

    # ------------------------------------------------------------------ receive

    def record_instance(
        self, rec: InstanceRecord, *, association_id: int | None, now: datetime | None = None
    ) -> StoreOutcome:
        """Record one stored instance; called by the C-STORE handler after the spool write.

        In one ``BEGIN IMMEDIATE`` transaction: upsert the study and series (counts, last-seen time,
        descriptive fields when given), insert or update the instance, and make sure the study has a
        RECEIVING job (creating revision 1, or re-opening a finished study with a new revision and
        superseding a previous job whose results are not sent yet).

        Parameters
        ----------
        rec
            The instance as written to the spool (``path`` relative to the spool root).
        association_id
            The association it came on, or None (start-up reconcile, imports).
        now
            Receive time, aware; defaults to the current UTC time.

        Returns
        -------
        StoreOutcome
            NEW; DUPLICATE (same SOP Instance UID and identical bytes: only ``duplicate_count``
            changes, the study is not bumped); or REPLACED (same UID, different bytes: the row now
            describes the new copy, and the study is bumped as for a new instance).

        Raises
        ------
        InvalidDatasetError
            A UID is empty, the series is recorded under another study, or the SOP Instance UID is
            recorded in another series with different bytes.
        StorageError
            The database could not be written.
        """
        now = _utc(now)
        if not (rec.study_instance_uid and rec.series_instance_uid and rec.sop_instance_uid):
            raise InvalidDatasetError("an instance needs Study, Series and SOP Instance UIDs")
        q = self._q
        with self._write("record_instance") as conn:
            known = conn.execute(q.find_instance, {"sop": rec.sop_instance_uid}).first()
            if known is not None and known.sha256 == rec.sha256:
                conn.execute(q.count_duplicate, {"iid": known.id})
                return StoreOutcome.DUPLICATE

            # NEW adds one instance; REPLACED swaps its bytes in place.
            d_count, d_bytes = (1, rec.size) if known is None else (0, rec.size - known.size)
            study_id: int = conn.execute(
                q.upsert_study,
                {
                    "study_uid": rec.study_instance_uid,
                    "now": now,
                    "d_count": d_count,
                    "d_bytes": d_bytes,
                    "accession_number": rec.accession_number,
                    "study_date": rec.study_date,
                    "study_description": rec.study_description,
                },
            ).scalar_one()
            series_row = conn.execute(
                q.upsert_series,
                {
                    "study_id": study_id,
                    "series_uid": rec.series_instance_uid,
                    "modality": rec.modality,
                    "series_number": rec.series_number,
                    "series_description": rec.series_description,
                    "d_count": d_count,
                    "d_bytes": d_bytes,
                },
            ).one()
            # Raising rolls the whole transaction back, counts included.
            if series_row.study_id != study_id:
                raise InvalidDatasetError(
                    f"series {rec.series_instance_uid} is already recorded under another study "
                    f"than {rec.study_instance_uid}"
                )
            if known is not None and known.series_id != series_row.id:
                raise InvalidDatasetError(
                    f"SOP Instance {rec.sop_instance_uid} is already recorded in another series "
                    "with different content"
                )
            values = {
                "sop_class_uid": rec.sop_class_uid,
                "transfer_syntax_uid": rec.transfer_syntax_uid,
                "path": rec.path,
                "size": rec.size,
                "sha256": rec.sha256,
                "now": now,
                "association_id": association_id,
            }
            if known is None:
                conn.execute(
                    q.insert_instance, {**values, "series_id": series_row.id, "sop": rec.sop_instance_uid}
                )
                outcome = StoreOutcome.NEW
            else:
                conn.execute(q.replace_instance, {**values, "iid": known.id})
                outcome = StoreOutcome.REPLACED
                log.info(
                    "study %s: instance %s replaced by a copy with different content",
                    rec.study_instance_uid,
                    rec.sop_instance_uid,
                )
            self._ensure_receiving(conn, study_id, rec.study_instance_uid, now)
            return outcome

    def _ensure_receiving(self, conn: Connection, study_id: int, study_uid: str, now: datetime) -> None:
        """Make sure the study has a RECEIVING job (inside the caller's IMMEDIATE transaction)."""
        latest = conn.execute(self._q.latest_job, {"study_id": study_id}).first()
        if latest is not None and latest.state == JobState.RECEIVING:
            return
        if latest is None:
            revision, detail = 1, "first instance received"
        else:
            revision = latest.revision + 1
            detail = f"re-opened by a late instance; supersedes job {latest.id} ({latest.state})"
        job_id = self._insert_job(conn, study_id, revision, detail, now)
        if latest is None:
            log.info("study %s: job %d created (RECEIVING)", study_uid, job_id)
            return
        log.info(
            "study %s: re-opened by a late instance, job %d supersedes job %d", study_uid, job_id, latest.id
        )
        previous = JobState(latest.state)
        if previous in _SUPERSEDABLE:
            self._move(
                conn,
                latest.id,
                previous,
                JobState.SUPERSEDED,
                f"re-opened by a late instance; job {job_id} supersedes it",
                now,
            )

    @staticmethod
    def _insert_job(conn: Connection, study_id: int, revision: int, detail: str, now: datetime) -> int:
        result = conn.execute(
            insert(_jobs).values(
                study_id=study_id,
                revision=revision,
                state=JobState.RECEIVING.value,
                detail=detail,
                series_instance_uid=None,
                created_at=now,
                updated_at=now,
                next_attempt_at=None,
                attempts=0,
            )
        )
        pk = result.inserted_primary_key
        assert pk is not None
        job_id = int(pk[0])
        conn.execute(
            insert(_transitions).values(
                job_id=job_id, at=now, from_state=None, to_state=JobState.RECEIVING.value, detail=detail
            )
        )
        return job_id

    def instance_paths(self) -> set[str]:
        """Every recorded instance path (relative to the spool root), for the start-up reconcile.

        A spool file whose path is not in this set was written but not recorded (crash between the
        fsync and the commit); the reconcile reads its header and calls :meth:`record_instance`.
        """
        with self._read("instance_paths") as conn:
            return set(conn.execute(select(_instances.c.path)).scalars())

    # ------------------------------------------------------------------ completion

    def quiet_jobs(self, older_than: datetime) -> list[tuple[int, str]]:
        """RECEIVING jobs whose study received nothing since ``older_than``, quietest first.

        Parameters
        ----------
        older_than
            Aware cut-off time: a study whose last instance arrived strictly before it is quiet.

        Returns
        -------
        list of (job id, Study Instance UID)
        """
        older_than = _utc(older_than)
        j, st = _jobs, _studies
        stmt = (
            select(j.c.id, st.c.study_instance_uid)
            .join(st, st.c.id == j.c.study_id)
            .where(j.c.state == JobState.RECEIVING.value, st.c.last_seen < older_than)
            .order_by(st.c.last_seen, j.c.id)
        )
        with self._read("quiet_jobs") as conn:
            return [(r.id, r.study_instance_uid) for r in conn.execute(stmt)]

    def study_instances(self, study_uid: str) -> list[tuple[str, str, str, str]]:
        """Every current instance of a study (empty when the study is unknown).

        Returns
        -------
        list of (path, SOP Class UID, Series Instance UID, SOP Instance UID)
            Ordered by series, then SOP Instance UID.
        """
        st, se, ins = _studies, _series, _instances
        stmt = (
            select(ins.c.path, ins.c.sop_class_uid, se.c.series_instance_uid, ins.c.sop_instance_uid)
            .join(se, se.c.id == ins.c.series_id)
            .join(st, st.c.id == se.c.study_id)
            .where(st.c.study_instance_uid == study_uid)
            .order_by(se.c.series_instance_uid, ins.c.sop_instance_uid)
        )
        with self._read("study_instances") as conn:
            return [(r[0], r[1], r[2], r[3]) for r in conn.execute(stmt)]

    # ------------------------------------------------------------------ the state machine

    def transition(
        self,
        job_id: int,
        from_state: JobState,
        to_state: JobState,
        detail: str = "",
        *,
        series_instance_uid: str | None = None,
        next_attempt_at: datetime | None = None,
    ) -> None:
        """Move a job from ``from_state`` to ``to_state``, atomically, and record it in its history.

        Parameters
        ----------
        job_id
            The job.
        from_state
            The state the caller believes the job is in; the move happens only if it still is
            (compare-and-set), so two workers can never both take the same job.
        to_state
            Must be allowed by :data:`triaged.domain.TRANSITIONS` from ``from_state``.
        detail
            Why (an IGNORED reason, a FAILED stage and reason, a dispatch report); becomes the job's
            current detail.
        series_instance_uid
            The chosen series, when given.
        next_attempt_at
            When to retry (RETRY_WAIT), when given; aware.

        Raises
        ------
        StateError
            The job is unknown, not in ``from_state``, or the transition is not allowed.
        """
        now = datetime.now(UTC)
        if next_attempt_at is not None:
            _utc(next_attempt_at)
        with self._write("transition") as conn:
            self._move(
                conn,
                job_id,
                from_state,
                to_state,
                detail,
                now,
                series_instance_uid=series_instance_uid,
                next_attempt_at=next_attempt_at,
            )
        log.info("job %d: %s -> %s %s", job_id, from_state, to_state, detail)

    def _move(
        self,
        conn: Connection,
        job_id: int,
        from_state: JobState,
        to_state: JobState,
        detail: str,
        now: datetime,
        *,
        series_instance_uid: str | None = None,
        next_attempt_at: datetime | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Compare-and-set the state and record the transition (inside the caller's transaction).

        ``extra`` holds further job columns written by the same guarded UPDATE (route, priority, ...),
        so they land only if the job is still in ``from_state``.
        """
        j = _jobs
        if to_state not in TRANSITIONS[from_state]:
            actual = self._state_of(conn, job_id)
            raise StateError(
                f"job {job_id}: {from_state} -> {to_state} is not an allowed transition (job is in {actual})"
            )
        values: dict[str, Any] = {**(extra or {}), "state": to_state.value, "detail": detail, "updated_at": now}
        if series_instance_uid is not None:
            values["series_instance_uid"] = series_instance_uid
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        if to_state == JobState.DISPATCHING:
            values["attempts"] = j.c.attempts + 1
        result = conn.execute(
            update(j).where(j.c.id == job_id, j.c.state == from_state.value).values(**values)
        )
        if result.rowcount != 1:
            actual = self._state_of(conn, job_id)
            raise StateError(f"job {job_id}: expected state {from_state}, but it is in {actual}")
        conn.execute(
            insert(_transitions).values(
                job_id=job_id, at=now, from_state=from_state.value, to_state=to_state.value, detail=detail
            )
        )

    @staticmethod
    def _state_of(conn: Connection, job_id: int) -> str:
        state = conn.execute(select(_jobs.c.state).where(_jobs.c.id == job_id)).scalar_one_or_none()
        if state is None:
            raise StateError(f"job {job_id} does not exist")
        return str(state)

    @staticmethod
    def _job_select() -> Select[Any]:
        j, st = _jobs, _studies
        return select(
            j.c.id,
            st.c.study_instance_uid,
            j.c.revision,
            j.c.state,
            j.c.detail,
            j.c.created_at,
            j.c.updated_at,
            j.c.series_instance_uid,
            j.c.next_attempt_at,
            j.c.attempts,
            j.c.pipeline,
            j.c.priority_level,
            j.c.priority_score,
            j.c.priority_reasons,
            j.c.result_at,
            j.c.route,
        ).join(st, st.c.id == j.c.study_id)

    @staticmethod
    def _job_row(r: Any, history: tuple[tuple[datetime, str, str, str], ...] = ()) -> JobRow:
        return JobRow(
            id=r.id,
            study_instance_uid=r.study_instance_uid,
            revision=r.revision,
            state=JobState(r.state),
            detail=r.detail,
            created_at=r.created_at,
            updated_at=r.updated_at,
            series_instance_uid=r.series_instance_uid,
            next_attempt_at=r.next_attempt_at,
            attempts=r.attempts,
            pipeline=r.pipeline,
            priority_level=r.priority_level,
            priority_score=r.priority_score,
            priority_reasons=r.priority_reasons or "",
            result_at=r.result_at,
            route=r.route or "",
            history=history,
        )

    def job(self, job_id: int) -> JobRow:
        """One job with its history, oldest transition first.

        Returns
        -------
        JobRow
            ``history`` holds ``(at, from_state, to_state, detail)``; ``from_state`` is ``""`` for
            the job's creation.

        Raises
        ------
        TriagedError
            The job is unknown.
        """
        t = _transitions
        with self._read("job") as conn:
            row = conn.execute(self._job_select().where(_jobs.c.id == job_id)).first()
            if row is None:
                raise TriagedError(f"job {job_id} is not in the ledger")
            history = tuple(
                (h.at, h.from_state or "", h.to_state, h.detail)
                for h in conn.execute(
                    select(t.c.at, t.c.from_state, t.c.to_state, t.c.detail)
                    .where(t.c.job_id == job_id)
                    .order_by(t.c.id)
                )
            )
        return self._job_row(row, history)

    def jobs(
        self, *, states: Iterable[JobState] | None = None, study_uid: str | None = None, limit: int = 50
    ) -> list[JobRow]:
        """Jobs, newest first, optionally only those in ``states`` (without history; see :meth:`job`).

        Parameters
        ----------
        states
            Only jobs in one of these states; None for all.
        study_uid
            Only the jobs (revisions) of this study.
        limit
            How many to return at most.
        """
        stmt = self._job_select()
        if states is not None:
            stmt = stmt.where(_jobs.c.state.in_([JobState(s).value for s in states]))
        if study_uid is not None:
            stmt = stmt.where(_studies.c.study_instance_uid == study_uid)
        # By id, not created_at: ids follow commit order, while a caller's clock reading may precede
        # a wait for the write lock.
        stmt = stmt.order_by(_jobs.c.id.desc()).limit(limit)
        with self._read("jobs") as conn:
            return [self._job_row(r) for r in conn.execute(stmt)]

    def studies(self, limit: int = 50) -> list[StudyRow]:
        """Studies, most recently active first; ``state`` is that of the study's latest job.

        Parameters
        ----------
        limit
            How many to return at most.
        """
        st, se, j = _studies, _series, _jobs
        series_count = select(func.count()).where(se.c.study_id == st.c.id).scalar_subquery()
        latest_state = (
            select(j.c.state)
            .where(j.c.study_id == st.c.id)
            .order_by(j.c.revision.desc())
            .limit(1)
            .scalar_subquery()
        )
        stmt = (
            select(st, series_count.label("series"), func.coalesce(latest_state, "").label("state"))
            .order_by(st.c.last_seen.desc(), st.c.id.desc())
            .limit(limit)
        )
        with self._read("studies") as conn:
            return [
                StudyRow(
                    study_instance_uid=r.study_instance_uid,
                    first_seen=r.first_seen,
                    last_seen=r.last_seen,
                    instances=r.instance_count,
                    bytes=r.byte_count,
                    series=r.series,
                    state=r.state,
                    accession_number=r.accession_number,
                    study_date=r.study_date,
                    study_description=r.study_description,
                )
                for r in conn.execute(stmt)
            ]

    def queue_depth(self) -> dict[JobState, int]:
        """Number of jobs in each state; every state is present, zeros included."""
        j = _jobs
        depth = dict.fromkeys(JobState, 0)
        with self._read("queue_depth") as conn:
            for state, count in conn.execute(select(j.c.state, func.count()).group_by(j.c.state)):
                depth[JobState(state)] = int(count)
        return depth

    def queue_job(
        self, job_id: int, *, route_json: str, pipeline: str, series_instance_uid: str, detail: str
    ) -> None:
        """COMPLETE → QUEUED with the route, pipeline and chosen series, in one compare-and-set transaction.

        Parameters
        ----------
        job_id
            The job.
        route_json
            The routing decision the job follows (JSON).
        pipeline
            The pipeline it runs.
        series_instance_uid
            The chosen series.
        detail
            Why (route and series choice), the job's new detail.

        Raises
        ------
        StateError
            The job is not COMPLETE (e.g. a late instance superseded it): nothing is written.
        """
        now = datetime.now(UTC)
        with self._write("queue_job") as conn:
            self._move(conn, job_id, JobState.COMPLETE, JobState.QUEUED, detail, now,
                       series_instance_uid=series_instance_uid, extra={"route": route_json, "pipeline": pipeline})
        log.info("job %d: %s -> %s %s", job_id, JobState.COMPLETE, JobState.QUEUED, detail)

    def record_analysis(
        self, job_id: int, findings: Findings, *, priority: tuple[float, str, str] | None, detail: str
    ) -> None:
        """ANALYSING → ENCODING with the findings and priority, in one compare-and-set transaction.

        Parameters
        ----------
        job_id
            The job.
        findings
            What the pipeline measured (replaces earlier findings of the same job).
        priority
            ``(score, level, reasons)`` from the route's policy, or None.
        detail
            The analysis summary, the job's new detail.

        Raises
        ------
        StateError
            The job is no longer ANALYSING (e.g. superseded while it ran): neither findings nor
            priority are written.
        """
        now = datetime.now(UTC)
        extra: dict[str, Any] = {"result_at": now}
        if priority is not None:
            score, level, reasons = priority
            extra.update(priority_score=score, priority_level=level, priority_reasons=reasons)
        with self._write("record_analysis") as conn:
            self._move(conn, job_id, JobState.ANALYSING, JobState.ENCODING, detail, now, extra=extra)
            conn.execute(self._findings_upsert(job_id, findings, now))
        log.info("job %d: %s -> %s %s", job_id, JobState.ANALYSING, JobState.ENCODING, detail)

    # ------------------------------------------------------------------ analysis results

    @staticmethod
    def _findings_upsert(job_id: int, findings: Findings, now: datetime) -> Any:
        values = {
            "job_id": job_id,
            "pipeline": findings.pipeline,
            "pipeline_version": findings.pipeline_version,
            "created_at": now,
            "severity_pct": findings.severity_pct,
            "whole_lung_pct": findings.whole_lung_pct,
            "consolidation_pct": findings.consolidation_pct,
            "ct_grade": int(findings.ct_grade),
            "p_covid": findings.p_covid,
            "data": findings_to_json(findings),
        }
        stmt = sqlite_insert(_findings).values(**values)
        return stmt.on_conflict_do_update(index_elements=[_findings.c.job_id], set_=values)

    def findings(self, job_id: int) -> Findings | None:
        """The findings a job recorded, or None."""
        with self._read("findings") as conn:
            data = conn.execute(select(_findings.c.data).where(_findings.c.job_id == job_id)).scalar_one_or_none()
        return findings_from_json(data) if data is not None else None

    def study_source(self, study_uid: str) -> tuple[str, str, str] | None:
        """(calling AE, called AE, peer address) of the association that last brought the study an instance."""
        a, ins, se, st = _associations, _instances, _series, _studies
        stmt = (
            select(a.c.calling_ae, a.c.called_ae, a.c.peer_address)
            .join(ins, ins.c.association_id == a.c.id)
            .join(se, se.c.id == ins.c.series_id)
            .join(st, st.c.id == se.c.study_id)
            .where(st.c.study_instance_uid == study_uid)
            .order_by(ins.c.received_at.desc())
            .limit(1)
        )
        with self._read("study_source") as conn:
            row = conn.execute(stmt).first()
        return (row.calling_ae, row.called_ae, row.peer_address) if row else None

    # ------------------------------------------------------------------ outbox

    def enqueue_outbox(self, job_id: int, items: Iterable[tuple[str, str, str, str, str]]) -> int:
        """Add result objects ``(destination, kind, path, sop_class_uid, sop_instance_uid)`` as PENDING.

        Idempotent: an item already in the outbox (same job, destination and SOP Instance UID) is kept
        as it is, so a resumed job never sends twice.  Returns how many were added.
        """
        now = datetime.now(UTC)
        rows = [
            {"job_id": job_id, "destination": d, "kind": k, "path": p, "sop_class_uid": c, "sop_instance_uid": u,
             "state": "PENDING", "attempts": 0, "created_at": now, "next_attempt_at": now, "last_error": ""}
            for d, k, p, c, u in items
        ]
        if not rows:
            return 0
        stmt = sqlite_insert(_outbox).on_conflict_do_nothing(
            index_elements=[_outbox.c.job_id, _outbox.c.destination, _outbox.c.sop_instance_uid]
        )
        with self._write("enqueue_outbox") as conn:
            return int(conn.execute(stmt, rows).rowcount or 0)

    @staticmethod
    def _outbox_row(r: Any) -> OutboxEntry:
        return OutboxEntry(
            id=r.id, job_id=r.job_id, destination=r.destination, kind=r.kind, path=r.path,
            sop_class_uid=r.sop_class_uid, sop_instance_uid=r.sop_instance_uid, state=r.state,
            attempts=r.attempts, created_at=r.created_at, next_attempt_at=r.next_attempt_at,
            sent_at=r.sent_at, last_status=r.last_status, last_error=r.last_error,
        )

    def outbox(
        self, *, job_id: int | None = None, states: Iterable[str] | None = None, due_before: datetime | None = None,
        limit: int = 1000,
    ) -> list[OutboxEntry]:
        """Outbox items, oldest first, filtered by job, state and due time."""
        o = _outbox
        stmt = select(o).order_by(o.c.id).limit(limit)
        if job_id is not None:
            stmt = stmt.where(o.c.job_id == job_id)
        if states is not None:
            stmt = stmt.where(o.c.state.in_(list(states)))
        if due_before is not None:
            stmt = stmt.where(o.c.next_attempt_at <= _utc(due_before))
        with self._read("outbox") as conn:
            return [self._outbox_row(r) for r in conn.execute(stmt)]

    def mark_sent(self, item_id: int, status: int) -> None:
        """The destination stored the object (Success or a warning status)."""
        with self._write("mark_sent") as conn:
            conn.execute(update(_outbox).where(_outbox.c.id == item_id).values(
                state="SENT", sent_at=datetime.now(UTC), last_status=status, last_error="",
                attempts=_outbox.c.attempts + 1))

    def mark_attempt_failed(self, item_id: int, *, status: int | None, error: str, next_attempt_at: datetime) -> None:
        """One failed attempt; the item stays PENDING until ``next_attempt_at``."""
        with self._write("mark_attempt_failed") as conn:
            conn.execute(update(_outbox).where(_outbox.c.id == item_id).values(
                last_status=status, last_error=error, next_attempt_at=_utc(next_attempt_at),
                attempts=_outbox.c.attempts + 1))

    def mark_dead(self, item_id: int, reason: str) -> None:
        """Give up on an item (dead letter); ``triaged resend`` puts it back."""
        with self._write("mark_dead") as conn:
            conn.execute(update(_outbox).where(_outbox.c.id == item_id).values(state="DEAD", last_error=reason))

    def requeue_outbox(self, job_id: int) -> int:
        """Put every item of a job back to PENDING, due now (``triaged resend``); returns how many."""
        now = datetime.now(UTC)
        with self._write("requeue_outbox") as conn:
            result = conn.execute(update(_outbox).where(_outbox.c.job_id == job_id).values(
                state="PENDING", attempts=0, next_attempt_at=now, created_at=now, sent_at=None, last_error=""))
            return int(result.rowcount or 0)

    # ------------------------------------------------------------------ worklist

    def worklist(self) -> list[WorklistRow]:
        """Every study with its latest job and priority (unsorted: the caller applies the policy order)."""
        j, st, f = _jobs, _studies, _findings
        latest = select(j.c.study_id, func.max(j.c.revision).label("revision")).group_by(j.c.study_id).subquery()
        stmt = (
            select(
                st.c.study_instance_uid, st.c.accession_number, st.c.study_date, st.c.study_description,
                st.c.first_seen, j.c.id, j.c.state, j.c.priority_level, j.c.priority_score, j.c.priority_reasons,
                j.c.result_at, f.c.severity_pct, f.c.ct_grade, f.c.p_covid,
            )
            .join(latest, latest.c.study_id == st.c.id)
            .join(j, (j.c.study_id == st.c.id) & (j.c.revision == latest.c.revision))
            .outerjoin(f, f.c.job_id == j.c.id)
        )
        with self._read("worklist") as conn:
            return [
                WorklistRow(
                    study_instance_uid=r.study_instance_uid, accession_number=r.accession_number,
                    study_date=r.study_date, study_description=r.study_description, arrived=r.first_seen,
                    job_id=r.id, state=r.state, priority_level=r.priority_level, priority_score=r.priority_score,
                    priority_reasons=r.priority_reasons or "", result_at=r.result_at, severity_pct=r.severity_pct,
                    ct_grade=r.ct_grade, p_covid=r.p_covid,
                )
                for r in conn.execute(stmt)
            ]


__all__ = ["AssociationRow", "Ledger"]
