"""Audit events without a row of their own: queries, refusals, reloads, retention deletions, re-runs.

Associations, stored instances and sent result objects are rows of their own tables already; these are
the rest (:class:`~triaged.ledger.schema.AuditEvent`).  :func:`triaged.audit.audit` writes the log line
and, given a ledger, the row.  :meth:`AuditMixin.audit_trail` merges the four into one chronological
trail (``triaged audit``), and :class:`AuditTrailReader` reads it from a ledger opened read-only.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, cast

from sqlalchemy import Connection, Table, create_engine, event, insert, inspect, or_, select
from sqlalchemy.pool import ConnectionPoolEntry

from triaged.audit import peer_text
from triaged.config.ledger_url import LedgerURL
from triaged.domain import OutboxState, status_text
from triaged.errors import StorageError
from triaged.ledger.base import LedgerBase, _associations, _instances, _jobs, _outbox, _series, _studies, _utc
from triaged.ledger.rows import AuditEventRow
from triaged.ledger.schema import AuditEvent

_events = cast(Table, AuditEvent.__table__)


class TrailEntry(NamedTuple):
    """One line of the merged audit trail (:meth:`AuditMixin.audit_trail`).

    ``kind``: ``association.accepted`` / ``association.refused`` (table ``associations``), ``store``
    (``instances``), ``result.sent`` (``outbox``) or an ``audit_events`` kind; ``source`` names the table
    and ``row`` the row's id in it.
    """

    at: datetime
    kind: str
    actor: str
    peer: str
    study_uid: str | None
    detail: dict[str, object]
    source: str
    row: int


def kind_wanted(kind: str, kinds: Iterable[str]) -> bool:
    """Whether ``kind`` is selected by ``kinds`` (none: all; a name also selects its dotted sub-events)."""
    wanted = list(kinds)
    return not wanted or any(kind == k or kind.startswith(k + ".") for k in wanted)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


class AuditMixin(LedgerBase):
    """Writing and reading ``audit_events``."""

    def record_event(
        self,
        kind: str,
        *,
        actor: str = "",
        peer: str = "",
        study_uid: str | None = None,
        detail: Mapping[str, object] | None = None,
        at: datetime | None = None,
    ) -> int:
        """Append one audit event and return its id (one transaction)."""
        values = {
            "at": _utc(at),
            "kind": kind[:32],
            "actor": actor[:64],
            "peer": peer[:80],
            "study_uid": study_uid,
            "detail": json.dumps(dict(detail or {}), default=str, sort_keys=True),
        }
        with self._write("record an audit event") as conn:
            key = conn.execute(insert(_events).values(**values)).inserted_primary_key
            assert key is not None
            return int(key[0])

    def audit_events(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        kinds: Iterable[str] = (),
        limit: int | None = None,
    ) -> list[AuditEventRow]:
        """Audit events oldest first, from ``since`` (inclusive) to ``until`` (exclusive).

        ``kinds``: event names to keep; a name also keeps its sub-events (``find`` keeps ``find.refused``).
        """
        with self._read("read the audit events") as conn:
            return self._event_rows(
                conn,
                _utc(since) if since is not None else None,
                _utc(until) if until is not None else None,
                list(kinds),
                limit,
            )

    @staticmethod
    def _event_rows(
        conn: Connection, since: datetime | None, until: datetime | None, wanted: list[str], limit: int | None
    ) -> list[AuditEventRow]:
        q = select(_events).order_by(_events.c.at, _events.c.id)
        if since is not None:
            q = q.where(_events.c.at >= since)
        if until is not None:
            q = q.where(_events.c.at < until)
        if wanted:
            q = q.where(
                or_(
                    *(
                        (_events.c.kind == k) | _events.c.kind.startswith(k + ".", autoescape=True)
                        for k in wanted
                    )
                )
            )
        if limit is not None:
            q = q.limit(limit)
        return [
            AuditEventRow(r.id, r.at, r.kind, r.actor, r.peer, r.study_uid, json.loads(r.detail or "{}"))
            for r in conn.execute(q).all()
        ]

    def audit_trail(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        kinds: Iterable[str] = (),
        stores: bool = False,
    ) -> list[TrailEntry]:
        """One chronological trail from ``associations``, ``audit_events`` and, optionally, stores and sends.

        Parameters
        ----------
        since, until
            Aware times: from ``since`` (inclusive) to ``until`` (exclusive); None: no bound.
        kinds
            Event names to keep (a name keeps its dotted sub-events: ``association`` keeps
            ``association.refused``); empty: all.
        stores
            Also every stored instance (``store``, one per row of ``instances``) and every result object
            acknowledged by a destination (``result.sent``, the SENT rows of ``outbox``): many rows, so off
            unless asked for, or unless ``kinds`` names them.
        """
        wanted = list(kinds)
        explicit = bool(wanted)
        lo = _utc(since) if since is not None else None
        hi = _utc(until) if until is not None else None
        out: list[TrailEntry] = []
        with self._read("read the audit trail") as conn:
            tables = set(inspect(conn).get_table_names())
            if kind_wanted("association.accepted", wanted) or kind_wanted("association.refused", wanted):
                out += self._association_entries(conn, lo, hi, wanted)
            if "audit_events" in tables:
                out += [
                    TrailEntry(e.at, e.kind, e.actor, e.peer, e.study_uid, e.detail, "audit_events", e.id)
                    for e in self._event_rows(conn, lo, hi, wanted, None)
                ]
            if (stores or explicit) and kind_wanted("store", wanted):
                out += self._store_entries(conn, lo, hi)
            if (stores or explicit) and kind_wanted("result.sent", wanted):
                out += self._sent_entries(conn, lo, hi)
        order = {"associations": 0, "instances": 1, "audit_events": 2, "outbox": 3}
        out.sort(key=lambda e: (e.at, order.get(e.source, 9), e.row))
        return out

    @staticmethod
    def _association_entries(
        conn: Connection, lo: datetime | None, hi: datetime | None, wanted: list[str]
    ) -> list[TrailEntry]:
        a = _associations
        q = select(a).order_by(a.c.started_at, a.c.id)
        if lo is not None:
            q = q.where(a.c.started_at >= lo)
        if hi is not None:
            q = q.where(a.c.started_at < hi)
        entries = []
        for r in conn.execute(q):
            kind = "association.accepted" if r.accepted else "association.refused"
            if not kind_wanted(kind, wanted):
                continue
            detail: dict[str, object] = {"called_ae": r.called_ae, "association": r.id}
            if r.accepted:
                detail.update(
                    ended_at=_iso(r.ended_at),
                    instances=r.instances,
                    bytes=r.bytes,
                    refused=r.failures,
                    aborted=bool(r.aborted),
                )
            else:
                detail["reason"] = r.reject_reason
            entries.append(
                TrailEntry(
                    r.started_at,
                    kind,
                    r.calling_ae,
                    peer_text(r.peer_address, r.peer_port),
                    None,
                    detail,
                    "associations",
                    r.id,
                )
            )
        return entries

    @staticmethod
    def _store_entries(conn: Connection, lo: datetime | None, hi: datetime | None) -> list[TrailEntry]:
        i, se, st, a = _instances, _series, _studies, _associations
        q = (
            select(
                i.c.id,
                i.c.received_at,
                i.c.sop_instance_uid,
                i.c.sop_class_uid,
                i.c.size,
                i.c.sha256,
                i.c.association_id,
                i.c.duplicate_count,
                se.c.series_instance_uid,
                st.c.study_instance_uid,
                a.c.calling_ae,
                a.c.peer_address,
                a.c.peer_port,
            )
            .join(se, se.c.id == i.c.series_id)
            .join(st, st.c.id == se.c.study_id)
            .outerjoin(a, a.c.id == i.c.association_id)
            .order_by(i.c.received_at, i.c.id)
        )
        if lo is not None:
            q = q.where(i.c.received_at >= lo)
        if hi is not None:
            q = q.where(i.c.received_at < hi)
        return [
            TrailEntry(
                r.received_at,
                "store",
                r.calling_ae or "",
                peer_text(r.peer_address, r.peer_port) if r.peer_address else "",
                r.study_instance_uid,
                {
                    "sop_instance_uid": r.sop_instance_uid,
                    "series_instance_uid": r.series_instance_uid,
                    "sop_class_uid": r.sop_class_uid,
                    "bytes": r.size,
                    "sha256": r.sha256,
                    "association": r.association_id,
                    "duplicates": r.duplicate_count,
                },
                "instances",
                r.id,
            )
            for r in conn.execute(q)
        ]

    @staticmethod
    def _sent_entries(conn: Connection, lo: datetime | None, hi: datetime | None) -> list[TrailEntry]:
        o, j, st = _outbox, _jobs, _studies
        q = (
            select(
                o.c.id,
                o.c.sent_at,
                o.c.job_id,
                o.c.destination,
                o.c.kind,
                o.c.sop_instance_uid,
                o.c.last_status,
                o.c.last_error,
                o.c.attempts,
                st.c.study_instance_uid,
            )
            .join(j, j.c.id == o.c.job_id)
            .join(st, st.c.id == j.c.study_id)
            .where(o.c.state == OutboxState.SENT.value, o.c.sent_at.is_not(None))
            .order_by(o.c.sent_at, o.c.id)
        )
        if lo is not None:
            q = q.where(o.c.sent_at >= lo)
        if hi is not None:
            q = q.where(o.c.sent_at < hi)
        return [
            TrailEntry(
                r.sent_at,
                "result.sent",
                "node",
                "",
                r.study_instance_uid,
                {
                    "job": r.job_id,
                    "destination": r.destination,
                    "output": r.kind,
                    "sop_instance_uid": r.sop_instance_uid,
                    # in the peer's own terms (0x0000, HTTP 200, ACK AA), as `triaged outbox` shows it
                    "status": status_text(r.last_status, r.last_error or "", r.kind) or None,
                    "attempts": r.attempts,
                },
                "outbox",
                r.id,
            )
            for r in conn.execute(q)
        ]


def _read_only_connect(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
    dbapi_connection.isolation_level = None  # BEGIN comes from LedgerBase._transaction, as in the Ledger
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA query_only=ON")
    finally:
        cursor.close()


class AuditTrailReader(AuditMixin):
    """The ledger opened read-only (SQLite ``mode=ro``, ``query_only``) to read the audit trail.

    It never migrates or writes, so it reads while the node runs (WAL: readers never wait for the writer)
    and leaves the file as it found it.

    Parameters
    ----------
    path
        The ledger file; it must exist.  Or a PostgreSQL ledger's URL: read in read-only transactions
        (``default_transaction_read_only``), never migrated.
    """

    def __init__(self, path: Path | LedgerURL) -> None:
        self._closed = threading.Event()
        if isinstance(path, LedgerURL):
            self.path = None
            self.location = str(path)
            self._dialect = "postgresql"
            self._engine = create_engine(
                path.url,
                pool_pre_ping=True,
                connect_args={"connect_timeout": 10, "options": "-c default_transaction_read_only=on"},
            )
            return
        self.path = Path(path)
        self.location = str(self.path)
        if not self.path.is_file():
            raise StorageError(f"no ledger at {self.path}")
        uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, check_same_thread=False)

        self._engine = create_engine("sqlite://", creator=connect)
        event.listen(self._engine, "connect", _read_only_connect)

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._engine.dispose()

    def __enter__(self) -> AuditTrailReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
