"""What every part of the :class:`~triaged.ledger.Ledger` shares: the tables, the transactions, UTC checks.

The ledger is one class composed of mixins (:mod:`~triaged.ledger.receive`, :mod:`~triaged.ledger.jobs`,
:mod:`~triaged.ledger.outbox`, :mod:`~triaged.ledger.views`) over :class:`LedgerBase`, which owns the
engine and opens the transactions; :mod:`triaged.ledger.ledger` creates the engine and migrates the schema.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from sqlalchemy import Connection, Engine, Table
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


class LedgerBase:
    """The engine and the transactions every part of the ledger runs its statements in.

    :class:`~triaged.ledger.Ledger` sets ``path``, ``_engine`` and ``_closed`` when it opens.
    """

    path: Path
    _engine: Engine
    _closed: threading.Event

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
    def _storage_transaction(self, begin: str, what: str) -> Iterator[Connection]:
        """:meth:`_transaction`, database errors become :class:`StorageError` naming ``what`` failed."""
        try:
            with self._transaction(begin) as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StorageError(f"ledger: {what} failed: {exc}") from exc

    def _write(self, what: str) -> AbstractContextManager[Connection]:
        """A ``BEGIN IMMEDIATE`` transaction; database errors become :class:`StorageError`."""
        return self._storage_transaction("BEGIN IMMEDIATE", what)

    def _read(self, what: str) -> AbstractContextManager[Connection]:
        """A deferred (read) transaction: one snapshot, and it never waits for the writer in WAL mode."""
        return self._storage_transaction("BEGIN", what)
