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

import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from triaged.errors import StorageError, TriagedError
from triaged.ledger.audit import AuditMixin
from triaged.ledger.base import log
from triaged.ledger.outbox import OutboxMixin
from triaged.ledger.receive import ReceiveMixin, _ReceiveStatements
from triaged.ledger.retention import RetentionMixin
from triaged.ledger.rows import AssociationRow
from triaged.ledger.views import ViewsMixin

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"


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


class Ledger(ReceiveMixin, OutboxMixin, ViewsMixin, AuditMixin, RetentionMixin):
    """The node's SQLite ledger (studies, instances, associations, jobs and their history).

    One facade over its parts: receiving (:class:`~triaged.ledger.receive.ReceiveMixin`), the job
    state machine (:class:`~triaged.ledger.jobs.JobsMixin`), the outbox
    (:class:`~triaged.ledger.outbox.OutboxMixin`), the read-only views
    (:class:`~triaged.ledger.views.ViewsMixin`), the audit events
    (:class:`~triaged.ledger.audit.AuditMixin`) and retention
    (:class:`~triaged.ledger.retention.RetentionMixin`), all running in the transactions of
    :class:`~triaged.ledger.base.LedgerBase`.  This class opens the engine and migrates the schema.

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


__all__ = ["AssociationRow", "Ledger"]
