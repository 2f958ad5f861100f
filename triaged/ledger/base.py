"""What every part of the :class:`~triaged.ledger.Ledger` shares: the tables, the transactions, UTC checks.

The ledger is one class composed of mixins (:mod:`~triaged.ledger.receive`, :mod:`~triaged.ledger.jobs`,
:mod:`~triaged.ledger.outbox`, :mod:`~triaged.ledger.views`) over :class:`LedgerBase`, which owns the
engine and opens the transactions; :mod:`triaged.ledger.ledger` creates the engine and migrates the schema.
The ledger is a SQLite file or a PostgreSQL database; the few statements that differ (how a transaction
begins, upserts, per-study locks) are switched on the dialect here and in :mod:`~triaged.ledger.receive`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from triaged.errors import StorageError, TriagedError
from triaged.ledger.schema import (
    Association,
    FindingsRecord,
    Instance,
    Job,
    JobTransition,
    OutboxItem,
    Series,
    Study,
)

#: One logger for every part, under the name the ledger always logged as (log filters may rely on it).
log = logging.getLogger("triaged.ledger.ledger")

# Core tables behind the models (the declarative attribute is typed as a generic FromClause).
_studies = cast(Table, Study.__table__)
_series = cast(Table, Series.__table__)
_instances = cast(Table, Instance.__table__)
_associations = cast(Table, Association.__table__)
_jobs = cast(Table, Job.__table__)
_transitions = cast(Table, JobTransition.__table__)
_findings = cast(Table, FindingsRecord.__table__)
_outbox = cast(Table, OutboxItem.__table__)


def _utc(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} given to the ledger; use an aware UTC time")
    return value


#: First key of the transaction-level advisory locks a PostgreSQL ledger takes (``pg_advisory_xact_lock(ns, k)``);
#: arbitrary, fixed, so that locks of triaged never collide with another application's on the same server.
ADVISORY_NAMESPACE = 0x7419_0ED0
#: Second keys: the schema migration (one node migrates, the others wait and find it done).  A study's
#: lock uses ``hashtext(study_instance_uid)`` as second key instead.
ADVISORY_MIGRATE = 1


class LedgerBase:
    """The engine and the transactions every part of the ledger runs its statements in.

    :class:`~triaged.ledger.Ledger` sets ``path``, ``location``, ``_engine``, ``_dialect`` and ``_closed``
    when it opens.  ``path`` is the SQLite file, None for a PostgreSQL ledger; ``location`` is what
    messages show (the path, or the server URL with its password masked).
    """

    path: Path | None
    location: str
    _engine: Engine
    _closed: threading.Event
    #: ``"sqlite"`` or ``"postgresql"``: the few statements that differ are switched on it.
    _dialect: str = "sqlite"

    @property
    def _postgres(self) -> bool:
        return self._dialect == "postgresql"

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Connection]:
        """A transaction opened with our own ``begin`` statement, committed unless the block raises.

        SQLite: the sqlite3 module's own BEGIN handling is off (``_on_connect``), so SQLAlchemy's begin
        is a no-op on the driver and this statement (``BEGIN IMMEDIATE`` to write, ``BEGIN`` to read)
        opens the real transaction; COMMIT and ROLLBACK still go through the driver.  Doing it here
        rather than in a ``begin`` event hook (the SQLAlchemy recipe) leaves the engine without
        connection events, which would otherwise be dispatched on every statement of the C-STORE path.

        PostgreSQL: psycopg opens the transaction itself.  A write runs in READ COMMITTED, where every
        compare-and-set ``UPDATE ... WHERE state = ...`` re-checks its condition after waiting for a
        concurrent writer's row lock, and counters are bumped in place (``SET n = n + 1``); a read
        (``begin == "BEGIN"``) runs REPEATABLE READ, READ ONLY: one snapshot, as SQLite's deferred read.
        """
        if self._closed.is_set():
            raise TriagedError(f"the ledger {self.location} is closed")
        with self._engine.connect() as conn, conn.begin():
            if not self._postgres:
                conn.exec_driver_sql(begin)
            elif begin == "BEGIN":
                conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield conn

    def _mask(self, text: str) -> str:
        """``text`` without the server password (a no-op for SQLite); set by the ledger when it opens."""
        return text

    @contextmanager
    def _storage_transaction(self, begin: str, what: str) -> Iterator[Connection]:
        """:meth:`_transaction`, database errors become :class:`StorageError` naming ``what`` failed."""
        try:
            with self._transaction(begin) as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StorageError(self._mask(f"ledger: {what} failed: {exc}")) from exc

    def _write(self, what: str) -> AbstractContextManager[Connection]:
        """A write transaction (SQLite: ``BEGIN IMMEDIATE``); database errors become :class:`StorageError`."""
        return self._storage_transaction("BEGIN IMMEDIATE", what)

    def _read(self, what: str) -> AbstractContextManager[Connection]:
        """A read transaction: one snapshot, and it never waits for a writer (SQLite WAL, PostgreSQL MVCC)."""
        return self._storage_transaction("BEGIN", what)

    def _lock_study(self, conn: Connection, study_uid: str) -> None:
        """Serialise the writers of one study until the transaction ends (PostgreSQL; SQLite: no-op).

        SQLite's ``BEGIN IMMEDIATE`` already admits one writer at a time.  On PostgreSQL, receivers
        (threads, processes or nodes) writing instances of the same study take this transaction-level
        advisory lock first, so "is this SOP Instance known?", "does the study have a RECEIVING job?"
        and the writes that follow see each other's commits, exactly as on SQLite; writers of other
        studies do not wait.
        """
        if self._postgres:
            conn.execute(
                text("SELECT pg_advisory_xact_lock(:ns, hashtext(:uid))"),
                {"ns": ADVISORY_NAMESPACE, "uid": study_uid},
            )

    def _insert(self, table: Table) -> Any:
        """An INSERT for ``table`` in the ledger's dialect: it has ``on_conflict_do_update``/``_do_nothing``."""
        return (pg_insert if self._postgres else sqlite_insert)(table)
