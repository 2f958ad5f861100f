"""The ledger (SQLite file or PostgreSQL database): the only owner of database connections and job transitions.

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

PostgreSQL (``storage.ledger: postgresql://user:password@host:port/database``, psycopg 3): the same
schema and Alembic migrations; writes run in READ COMMITTED with compare-and-set updates, in-place
counters and a per-study advisory lock on the receive path (:meth:`LedgerBase._lock_study`), reads in
one REPEATABLE READ snapshot; the first node to open an older schema migrates it under an advisory lock.
Every commit is durable (the server's ``synchronous_commit``), before the C-STORE answers Success.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from triaged.config.ledger_url import LedgerURL, parse_ledger_location
from triaged.errors import StorageError, TriagedError
from triaged.ledger.audit import AuditMixin
from triaged.ledger.base import ADVISORY_MIGRATE, ADVISORY_NAMESPACE, log
from triaged.ledger.claims import ClaimsMixin, NodeRow
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


def _first_line(exc: BaseException) -> str:
    """The driver's own message, first line only (psycopg adds hints on further lines)."""
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def _postgres_engine(url: LedgerURL) -> Engine:
    return create_engine(
        url.url,
        # As for SQLite: one connection per concurrent caller without reconnecting under load.
        pool_size=20,
        max_overflow=20,
        # A server restart or failover leaves dead pooled connections: test each before use.
        pool_pre_ping=True,
        connect_args={"connect_timeout": 10, "application_name": "triaged"},
    )


class Ledger(ReceiveMixin, ClaimsMixin, OutboxMixin, ViewsMixin, AuditMixin, RetentionMixin):
    """The node's ledger (studies, instances, associations, jobs and their history).

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
        The SQLite file (a path, or ``sqlite:///path``), or a PostgreSQL database
        (:class:`~triaged.config.ledger_url.LedgerURL` or its text, ``postgresql://...``; the database
        must exist).  A file's folder is created; the schema is migrated to the newest revision
        (``alembic upgrade head``) on open, so an older ledger is upgraded in place.

    Notes
    -----
    Safe to share between threads.  Every method is one transaction.  Database failures (disk full,
    read-only file, lock timeout) surface as :class:`~triaged.errors.StorageError` (retryable).
    """

    def __init__(self, path: Path | str | LedgerURL) -> None:
        try:
            target = parse_ledger_location(path)
        except ValueError as exc:
            raise TriagedError(f"ledger location: {exc}") from exc
        self._closed = threading.Event()
        self._url: LedgerURL | None = None
        if isinstance(target, LedgerURL):
            self.path = None
            self.location = str(target)
            self._url = target
            self._dialect = "postgresql"
            self._engine: Engine = _postgres_engine(target)
            self._connect_check(target)
        else:
            self.path = target
            self.location = str(target)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(
                    f"cannot create the ledger folder {target.parent}: {exc.strerror}"
                ) from exc
            self._engine = create_engine(
                f"sqlite:///{target}",
                connect_args={"check_same_thread": False},
                # One connection per concurrent caller (16 associations + scheduler + CLI) without
                # opening and closing connections under load.
                pool_size=20,
                max_overflow=20,
            )
            event.listen(self._engine, "connect", _on_connect)
        self._q = _ReceiveStatements(postgres=self._postgres)
        try:
            self._migrate()
        except Exception:
            self._engine.dispose()
            raise
        log.info("ledger open at %s", self.location)

    def _mask(self, text: str) -> str:
        return self._url.mask(text) if self._url is not None else text

    def _connect_check(self, url: LedgerURL) -> None:
        """Reach the server once, so an unreachable or refusing one is one line naming it, not a traceback."""
        try:
            with self._engine.connect():
                pass
        except SQLAlchemyError as exc:
            self._engine.dispose()
            who = f" as {url.user}" if url.user else ""
            raise StorageError(
                self._mask(f"cannot reach the PostgreSQL ledger at {url.server}{who}: {_first_line(exc)}")
            ) from exc

    def _migrate(self) -> None:
        cfg = AlembicConfig()
        # ConfigParser interpolation would choke on a '%' in the install path.
        cfg.set_main_option("script_location", str(_MIGRATIONS).replace("%", "%%"))
        try:
            # One IMMEDIATE transaction (PostgreSQL: holding an advisory lock): two processes or nodes
            # opening the same old ledger migrate it once.
            with self._transaction("BEGIN IMMEDIATE") as conn:
                if self._postgres:
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:ns, :key)"),
                        {"ns": ADVISORY_NAMESPACE, "key": ADVISORY_MIGRATE},
                    )
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except CommandError as exc:
            # Typically a ledger written by a newer triaged: its revision is not among ours.
            raise TriagedError(self._mask(f"cannot migrate the ledger {self.location}: {exc}")) from exc
        except SQLAlchemyError as exc:
            raise StorageError(
                self._mask(f"cannot open or migrate the ledger {self.location}: {exc}")
            ) from exc

    def close(self) -> None:
        """Close every pooled connection; the ledger must not be used afterwards."""
        if not self._closed.is_set():
            self.resign_leadership()  # first: the other nodes need not wait for the connection to time out
            self._closed.set()
            self._engine.dispose()
            log.info("ledger closed")

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AssociationRow", "Ledger", "NodeRow"]
