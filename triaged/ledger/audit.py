"""Audit events without a row of their own: queries, refusals, reloads, retention deletions, re-runs.

Associations, stored instances and sent result objects are rows of their own tables already; these are
the rest (:class:`~triaged.ledger.schema.AuditEvent`).  :func:`triaged.audit.audit` writes the log line
and, given a ledger, the row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import cast

from sqlalchemy import Table, insert, or_, select

from triaged.ledger.base import LedgerBase, _utc
from triaged.ledger.rows import AuditEventRow
from triaged.ledger.schema import AuditEvent

_events = cast(Table, AuditEvent.__table__)


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
        q = select(_events).order_by(_events.c.at, _events.c.id)
        if since is not None:
            q = q.where(_events.c.at >= _utc(since))
        if until is not None:
            q = q.where(_events.c.at < _utc(until))
        wanted = list(kinds)
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
        with self._read("read the audit events") as conn:
            rows = conn.execute(q).all()
        return [
            AuditEventRow(r.id, r.at, r.kind, r.actor, r.peer, r.study_uid, json.loads(r.detail or "{}"))
            for r in rows
        ]
