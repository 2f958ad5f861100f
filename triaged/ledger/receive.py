"""Receiving: the association audit trail, and studies, series and instances as C-STORE records them."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Dialect, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable

from triaged.domain import InstanceRecord, JobState, StoreOutcome
from triaged.errors import InvalidDatasetError, StateError, StorageError, TriagedError
from triaged.ledger.base import _associations, _findings, _instances, _jobs, _series, _studies, _utc, log
from triaged.ledger.jobs import JobsMixin
from triaged.ledger.schema import UTCDateTime

#: States whose results are not yet sent: a late instance cancels them (SUPERSEDED).  Later states
#: keep going; the next revision's SR names their SR as predecessor.
_SUPERSEDABLE = frozenset({JobState.COMPLETE, JobState.QUEUED, JobState.ANALYSING, JobState.ENCODING})

#: SOP Classes of the node's own results (:mod:`triaged.encode`): any SR, Segmentation, Secondary Capture.
_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_OUTPUT_CLASSES = frozenset(
    {"1.2.840.10008.5.1.4.1.1.66.4", *(f"1.2.840.10008.5.1.4.1.1.7{s}" for s in ("", ".1", ".2", ".3", ".4"))}
)


def _may_be_own_output(rec: InstanceRecord) -> bool:
    """The cheap part of :meth:`ReceiveMixin._is_own_output`: an SR, SEG or SC in a ``2.25.`` series."""
    cls = rec.sop_class_uid
    return rec.series_instance_uid.startswith("2.25.") and (
        cls.startswith(_SR_CLASS_PREFIX) or cls in _OUTPUT_CLASSES
    )


class _DriverStatement:
    """One prebuilt Core statement compiled once for the sqlite3 driver: its SQL text and parameter order.

    Executed on the driver's cursor, a statement costs what sqlite3 costs (tens of microseconds) instead
    of SQLAlchemy's execution context, parameter construction and result wrapping (~0.2 ms each on the
    C-STORE path).  The SQL is exactly what SQLAlchemy would send, and parameters go through the same
    bind processors (:class:`~triaged.ledger.schema.UTCDateTime` stores the same text); only statements
    whose results need no result processing (integers and strings) are run this way.
    """

    __slots__ = ("sql", "_order")

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        self.sql = compiled.string
        literals = compiled.params
        self._order: list[tuple[str, Any, bool, Any]] = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)  # what SQLAlchemy would apply
            self._order.append((name, process, bind.required, literals.get(name)))

    def params(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional parameters for ``values`` (every required bind parameter by name)."""
        out = []
        for name, process, required, literal in self._order:
            value = values[name] if required else values.get(name, literal)
            out.append(value if process is None else process(value))
        return tuple(out)

    def run(self, cur: sqlite3.Cursor, values: Mapping[str, Any]) -> sqlite3.Cursor:
        """Execute on the driver's cursor (inside the caller's transaction)."""
        return cur.execute(self.sql, self.params(values))


class _CoreStatement:
    """One prebuilt Core statement run through SQLAlchemy (PostgreSQL: no driver fast path needed there).

    Same interface as :class:`_DriverStatement`, with the SQLAlchemy connection in place of the cursor,
    so :meth:`ReceiveMixin.record_instance` is one body for both dialects.
    """

    __slots__ = ("statement",)

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = cast(Executable, statement)

    def run(self, conn: Connection, values: Mapping[str, Any]) -> Any:
        """Execute inside the caller's transaction; the result has ``fetchone()`` like a cursor."""
        return conn.execute(self.statement, dict(values))


class _DriverStatements:
    """The C-STORE path's statements of :class:`_ReceiveStatements`, compiled for one dialect.

    SQLite: compiled for the sqlite3 cursor (:class:`_DriverStatement`); any other dialect: run through
    SQLAlchemy (:class:`_CoreStatement`) on the transaction's connection.
    """

    def __init__(self, q: _ReceiveStatements, dialect: Dialect) -> None:
        def prepared(statement: ClauseElement) -> Any:
            return (
                _DriverStatement(statement, dialect)
                if dialect.name == "sqlite"
                else _CoreStatement(statement)
            )

        self.find_instance = prepared(q.find_instance)
        self.count_duplicate = prepared(q.count_duplicate)
        self.upsert_study = prepared(q.upsert_study)
        self.upsert_series = prepared(q.upsert_series)
        self.insert_instance = prepared(q.insert_instance)
        self.replace_instance = prepared(q.replace_instance)
        self.latest_job = prepared(q.latest_job)
        self.series_study = prepared(q.series_study)
        self.instance_place = prepared(q.instance_place)


class _ReceiveStatements:
    """The statements of :meth:`Ledger.record_instance`, built once with bind parameters.

    Building a Core statement and its cache key costs far more than executing it on SQLite (an
    upsert's ``excluded`` alone proxies every column); prebuilt statements keep the C-STORE path to
    parameter binding and execution, and :meth:`driver` compiles the per-instance ones once more for
    the sqlite3 cursor itself.

    Parameters
    ----------
    postgres
        Build the upserts for PostgreSQL (its ``INSERT ... ON CONFLICT`` and ``greatest()``) instead of SQLite.
    """

    def __init__(self, postgres: bool = False) -> None:
        self._driver: _DriverStatements | None = None
        st, se, ins, j = _studies, _series, _instances, _jobs
        dialect_insert = pg_insert if postgres else sqlite_insert
        # The later of two values: SQLite's two-argument max(), PostgreSQL's greatest().
        later = func.greatest if postgres else func.max
        now = bindparam("now", type_=UTCDateTime())

        self.find_instance = select(ins.c.id, ins.c.series_id, ins.c.size, ins.c.sha256).where(
            ins.c.sop_instance_uid == bindparam("sop")
        )
        # The hierarchy checks of :meth:`ReceiveMixin.hierarchy_conflict` (before the spool write).
        self.series_study = (
            select(st.c.study_instance_uid)
            .select_from(se.join(st, se.c.study_id == st.c.id))
            .where(se.c.series_instance_uid == bindparam("series_uid"))
        )
        self.instance_place = (
            select(st.c.study_instance_uid, se.c.series_instance_uid)
            .select_from(ins.join(se, ins.c.series_id == se.c.id).join(st, se.c.study_id == st.c.id))
            .where(ins.c.sop_instance_uid == bindparam("sop"))
        )
        self.count_duplicate = (
            update(ins).where(ins.c.id == bindparam("iid")).values(duplicate_count=ins.c.duplicate_count + 1)
        )

        study = dialect_insert(st).values(
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
                "last_seen": later(st.c.last_seen, ex.last_seen),
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

        series = dialect_insert(se).values(
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
        # Before a re-opening changes the latest job: on PostgreSQL its row stays locked until the commit,
        # so a worker's compare-and-set on it waits (SQLite's IMMEDIATE transaction already excludes it).
        self.latest_job_locked = self.latest_job.with_for_update() if postgres else self.latest_job
        # The analyses whose outputs' UIDs :meth:`ReceiveMixin._is_own_output` derives.
        self.analyses = (
            select(j.c.revision, _findings.c.pipeline, _findings.c.pipeline_version)
            .select_from(j.join(_findings, _findings.c.job_id == j.c.id))
            .where(j.c.study_id == bindparam("study_id"))
        )
        self.study_id = select(st.c.id).where(st.c.study_instance_uid == bindparam("study_uid"))

    def driver(self, dialect: Dialect) -> _DriverStatements:
        """The per-instance statements compiled for ``dialect`` (once; a race compiles them twice, harmlessly)."""
        if self._driver is None:
            self._driver = _DriverStatements(self, dialect)
        return self._driver


class ReceiveMixin(JobsMixin):
    """Receiving part of the :class:`~triaged.ledger.Ledger`; a received instance creates or re-opens jobs."""

    #: Built once by the ledger when it opens.
    _q: _ReceiveStatements

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

    # ------------------------------------------------------------------ receive

    @contextmanager
    def _driver_transaction(
        self, begin: str, what: str
    ) -> Iterator[tuple[Connection, Any, _DriverStatements]]:
        """:meth:`_write` / :meth:`_read` for the C-STORE path, with the driver's cursor on the same connection.

        The same pooled connection and transaction as the base class opens (``begin`` sent on the driver,
        committed by SQLAlchemy unless the block raises, rolled back otherwise); statements of
        :class:`_DriverStatements` run on the cursor, anything else on the yielded SQLAlchemy connection.
        sqlite3 and SQLAlchemy errors both become :class:`StorageError` naming ``what`` failed.
        PostgreSQL: the base class's transaction, and the SQLAlchemy connection in place of the cursor.
        """
        if self._closed.is_set():
            raise TriagedError(f"the ledger {self.location} is closed")
        statements = self._q.driver(self._engine.dialect)
        if self._postgres:
            with self._storage_transaction(begin, what) as conn:
                yield conn, conn, statements
            return
        try:
            with self._engine.connect() as conn, conn.begin():
                cur = cast(sqlite3.Connection, conn.connection.driver_connection).cursor()
                try:
                    cur.execute(begin)
                    yield conn, cur, statements
                finally:
                    cur.close()
        except (SQLAlchemyError, sqlite3.Error) as exc:
            raise StorageError(f"ledger: {what} failed: {exc}") from exc

    def record_instance(
        self, rec: InstanceRecord, *, association_id: int | None, now: datetime | None = None
    ) -> StoreOutcome:
        """Record one stored instance; called by the C-STORE handler after the spool write.

        In one write transaction (SQLite ``BEGIN IMMEDIATE``; PostgreSQL: holding the study's lock,
        :meth:`~triaged.ledger.base.LedgerBase._lock_study`): upsert the study and series (counts, last-seen time,
        descriptive fields when given), insert or update the instance, and make sure the study has a
        RECEIVING job (creating revision 1, or re-opening a finished study with a new revision and
        superseding a previous job whose results are not sent yet).  One of the node's own results coming
        back (:meth:`_is_own_output`: a PACS forwarding the study) is recorded but never re-opens the study.

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
        with self._driver_transaction("BEGIN IMMEDIATE", "record_instance") as (conn, cur, q):
            self._lock_study(conn, rec.study_instance_uid)
            known = q.find_instance.run(cur, {"sop": rec.sop_instance_uid}).fetchone()
            if known is not None and known[3] == rec.sha256:
                q.count_duplicate.run(cur, {"iid": known[0]})
                return StoreOutcome.DUPLICATE

            # NEW adds one instance; REPLACED swaps its bytes in place.
            d_count, d_bytes = (1, rec.size) if known is None else (0, rec.size - known[2])
            study_id: int = q.upsert_study.run(
                cur,
                {
                    "study_uid": rec.study_instance_uid,
                    "now": now,
                    "d_count": d_count,
                    "d_bytes": d_bytes,
                    "accession_number": rec.accession_number,
                    "study_date": rec.study_date,
                    "study_description": rec.study_description,
                },
            ).fetchone()[0]
            series_id, series_study_id = q.upsert_series.run(
                cur,
                {
                    "study_id": study_id,
                    "series_uid": rec.series_instance_uid,
                    "modality": rec.modality,
                    "series_number": rec.series_number,
                    "series_description": rec.series_description,
                    "d_count": d_count,
                    "d_bytes": d_bytes,
                },
            ).fetchone()
            # Raising rolls the whole transaction back, counts included.
            if series_study_id != study_id:
                raise InvalidDatasetError(
                    f"series {rec.series_instance_uid} is already recorded under another study "
                    f"than {rec.study_instance_uid}"
                )
            if known is not None and known[1] != series_id:
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
                q.insert_instance.run(cur, {**values, "series_id": series_id, "sop": rec.sop_instance_uid})
                outcome = StoreOutcome.NEW
            else:
                q.replace_instance.run(cur, {**values, "iid": known[0]})
                outcome = StoreOutcome.REPLACED
                log.info(
                    "study %s: instance %s replaced by a copy with different content",
                    rec.study_instance_uid,
                    rec.sop_instance_uid,
                )
            if self._is_own_output(conn, study_id, rec):
                log.info(
                    "study %s: instance %s is one of this node's results; stored, the study is not re-opened",
                    rec.study_instance_uid,
                    rec.sop_instance_uid,
                )
                return outcome
            latest = q.latest_job.run(cur, {"study_id": study_id}).fetchone()
            if latest is not None and latest[2] == JobState.RECEIVING:
                return outcome  # the common case: the study is still collecting instances
            self._ensure_receiving(conn, study_id, rec.study_instance_uid, now)
            return outcome

    def _is_own_output(self, conn: Connection, study_id: int, rec: InstanceRecord) -> bool:
        """Whether ``rec`` is an SR, SEG or SC this node made for the study (inside the caller's transaction).

        Ours when its Series Instance UID is one :func:`~triaged.encode.uids.output_uids` derives from an
        analysis recorded for the study (study, pipeline, version, revision): a UUID-derived UID no other
        creator can produce, whatever a PACS changed in the object's other attributes.
        """
        if not _may_be_own_output(rec):
            return False
        # Imported here: only results need it, and triaged.encode loads highdicom (seconds for a CLI command).
        from triaged.encode.uids import output_uids

        for a in conn.execute(self._q.analyses, {"study_id": study_id}):
            uids = output_uids(rec.study_instance_uid, a.pipeline, a.pipeline_version, a.revision)
            if rec.series_instance_uid in (uids.sr_series, uids.seg_series, uids.sc_series):
                return True
        return False

    def reanalyze(
        self,
        study_uid: str,
        *,
        requested_by: str,
        reason: str = "",
        pipeline: str | None = None,
        now: datetime | None = None,
    ) -> int:
        """Open a new revision of a study so it is routed and analysed again (``triaged reanalyze``).

        The new RECEIVING job is completed by the next completion sweep (the study is quiet) and then
        routed, queued and analysed like any other; a previous job whose results are not sent yet is
        SUPERSEDED, as by a late instance.  Who asked and why go into the new job's history.

        Parameters
        ----------
        study_uid
            The study.
        requested_by, reason
            Who asked (a login name) and why (may be empty), for the job history.
        pipeline
            The pipeline to run instead of the route's first one, or None.
        now
            Aware time of the request; defaults to the current UTC time.

        Returns
        -------
        int
            The new job's id.

        Raises
        ------
        TriagedError
            The study is not in the ledger.
        StateError
            The study is still receiving: it is analysed once complete.
        StorageError
            The database could not be written.
        """
        now = _utc(now)
        why = f"re-analysis requested by {requested_by}" + (f": {reason}" if reason else "")
        if pipeline:
            why += f"; pipeline {pipeline}"
        with self._write("reanalyze") as conn:
            self._lock_study(conn, study_uid)
            study_id = conn.execute(self._q.study_id, {"study_uid": study_uid}).scalar_one_or_none()
            if study_id is None:
                raise TriagedError(f"study {study_uid} is not in the ledger")
            latest = conn.execute(self._q.latest_job_locked, {"study_id": study_id}).first()
            if latest is not None and latest.state == JobState.RECEIVING:
                raise StateError(
                    f"study {study_uid} is still receiving (job {latest.id}); it is analysed once complete"
                )
            return self._open_revision(conn, study_id, study_uid, latest, why, now, pipeline=pipeline)

    def hierarchy_conflict(self, study_uid: str, series_uid: str, sop_uid: str) -> str | None:
        """Why :meth:`record_instance` would refuse this instance's place in the hierarchy, or None.

        The C-STORE handler asks before it writes anything, so a permanent conflict (a PACS split or
        merge re-using a Series or SOP Instance UID) is refused instead of spooled and retried.

        Parameters
        ----------
        study_uid, series_uid, sop_uid
            The instance's validated UIDs.

        Returns
        -------
        str or None
            A reason naming the conflicting UIDs (for our log and the quarantine, not for the peer):
            the series is recorded under another study, or the SOP Instance UID in another series.

        Raises
        ------
        StorageError
            The database could not be read.
        """
        with self._driver_transaction("BEGIN", "hierarchy_conflict") as (_conn, cur, q):
            owner = q.series_study.run(cur, {"series_uid": series_uid}).fetchone()
            if owner is not None and owner[0] != study_uid:
                return f"series {series_uid} is already recorded under study {owner[0]}, not {study_uid}"
            place = q.instance_place.run(cur, {"sop": sop_uid}).fetchone()
            if place is not None and place[1] != series_uid:
                return (
                    f"SOP Instance {sop_uid} is already recorded in series {place[1]} "
                    f"of study {place[0]}, not in series {series_uid}"
                )
        return None

    def _ensure_receiving(self, conn: Connection, study_id: int, study_uid: str, now: datetime) -> None:
        """Make sure the study has a RECEIVING job (inside the caller's write transaction)."""
        latest = conn.execute(self._q.latest_job_locked, {"study_id": study_id}).first()
        if latest is not None and latest.state == JobState.RECEIVING:
            return
        if latest is None:
            job_id = self._insert_job(conn, study_id, 1, "first instance received", now)
            log.info("study %s: job %d created (RECEIVING)", study_uid, job_id)
            return
        self._open_revision(conn, study_id, study_uid, latest, "re-opened by a late instance", now)

    def _open_revision(
        self,
        conn: Connection,
        study_id: int,
        study_uid: str,
        latest: Any,
        why: str,
        now: datetime,
        *,
        pipeline: str | None = None,
    ) -> int:
        """Insert the study's next RECEIVING job (``latest``: its newest job row, or None), superseding
        ``latest`` when its results are not sent yet; ``why`` goes into both histories.  Returns the job id."""
        if latest is None:
            job_id = self._insert_job(conn, study_id, 1, why, now, pipeline=pipeline)
            log.info("study %s: %s, job %d created (RECEIVING)", study_uid, why, job_id)
            return job_id
        detail = f"{why}; supersedes job {latest.id} ({latest.state})"
        job_id = self._insert_job(conn, study_id, latest.revision + 1, detail, now, pipeline=pipeline)
        log.info("study %s: %s, job %d supersedes job %d", study_uid, why, job_id, latest.id)
        previous = JobState(latest.state)
        if previous in _SUPERSEDABLE:
            self._move(
                conn, latest.id, previous, JobState.SUPERSEDED, f"{why}; job {job_id} supersedes it", now
            )
        return job_id

    def instance_paths(self) -> set[str]:
        """Every recorded instance path (relative to the spool root), for the start-up reconcile.

        A spool file whose path is not in this set was written but not recorded (crash between the
        fsync and the commit); the reconcile reads its header and calls :meth:`record_instance`.
        """
        with self._read("instance_paths") as conn:
            return set(conn.execute(select(_instances.c.path)).scalars())
