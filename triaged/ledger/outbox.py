"""The durable outbox of dispatch: result objects per destination, delivery attempts and their backoff."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from triaged.domain import OutboxEntry, OutboxState
from triaged.ledger.base import LedgerBase, _outbox, _utc


class OutboxMixin(LedgerBase):
    """Outbox part of the :class:`~triaged.ledger.Ledger`: items stay PENDING until SENT or DEAD.

    States are :class:`~triaged.domain.OutboxState` values; ``next_attempt_at`` and ``attempts`` carry
    the backoff the dispatcher computes.
    """

    def enqueue_outbox(self, job_id: int, items: Iterable[tuple[str, str, str, str, str]]) -> int:
        """Add result objects ``(destination, kind, path, sop_class_uid, sop_instance_uid)`` as PENDING.

        Idempotent: an item already in the outbox (same job, destination and SOP Instance UID) is kept
        as it is, so a resumed job never sends twice.  Returns how many were added.

        Parameters
        ----------
        job_id
            The job the objects belong to.
        items
            :class:`~triaged.ledger.rows.OutboxRequest` (or plain tuples of the same shape).
        """
        now = datetime.now(UTC)
        rows = [
            {
                "job_id": job_id,
                "destination": d,
                "kind": k,
                "path": p,
                "sop_class_uid": c,
                "sop_instance_uid": u,
                "state": OutboxState.PENDING.value,
                "attempts": 0,
                "created_at": now,
                "next_attempt_at": now,
                "last_error": "",
            }
            for d, k, p, c, u in items
        ]
        if not rows:
            return 0
        stmt = self._insert(_outbox).on_conflict_do_nothing(
            index_elements=[_outbox.c.job_id, _outbox.c.destination, _outbox.c.sop_instance_uid]
        )
        with self._write("enqueue_outbox") as conn:
            # RETURNING counts the rows added on both dialects (psycopg's executemany rowcount is -1)
            return len(conn.execute(stmt.returning(_outbox.c.id), rows).all())

    @staticmethod
    def _outbox_row(r: Any) -> OutboxEntry:
        return OutboxEntry(
            id=r.id,
            job_id=r.job_id,
            destination=r.destination,
            kind=r.kind,
            path=r.path,
            sop_class_uid=r.sop_class_uid,
            sop_instance_uid=r.sop_instance_uid,
            state=OutboxState(r.state),
            attempts=r.attempts,
            created_at=r.created_at,
            next_attempt_at=r.next_attempt_at,
            sent_at=r.sent_at,
            last_status=r.last_status,
            last_error=r.last_error,
        )

    def outbox(
        self,
        *,
        job_id: int | None = None,
        states: Iterable[str] | None = None,
        due_before: datetime | None = None,
        limit: int = 1000,
    ) -> list[OutboxEntry]:
        """Outbox items, oldest first, filtered by job, state (an :class:`OutboxState`) and due time."""
        o = _outbox
        stmt = select(o).order_by(o.c.id).limit(limit)
        if job_id is not None:
            stmt = stmt.where(o.c.job_id == job_id)
        if states is not None:
            stmt = stmt.where(o.c.state.in_([str(s) for s in states]))
        if due_before is not None:
            stmt = stmt.where(o.c.next_attempt_at <= _utc(due_before))
        with self._read("outbox") as conn:
            return [self._outbox_row(r) for r in conn.execute(stmt)]

    def mark_sent(self, item_id: int, status: int) -> None:
        """The destination stored the object (Success or a warning status)."""
        with self._write("mark_sent") as conn:
            conn.execute(
                update(_outbox)
                .where(_outbox.c.id == item_id)
                .values(
                    state=OutboxState.SENT.value,
                    sent_at=datetime.now(UTC),
                    last_status=status,
                    last_error="",
                    attempts=_outbox.c.attempts + 1,
                    claimed_by=None,
                    lease_until=None,
                )
            )

    def mark_attempt_failed(
        self, item_id: int, *, status: int | None, error: str, next_attempt_at: datetime
    ) -> None:
        """One failed attempt; the item stays PENDING until ``next_attempt_at``."""
        with self._write("mark_attempt_failed") as conn:
            conn.execute(
                update(_outbox)
                .where(_outbox.c.id == item_id)
                .values(
                    last_status=status,
                    last_error=error,
                    next_attempt_at=_utc(next_attempt_at),
                    attempts=_outbox.c.attempts + 1,
                    claimed_by=None,
                    lease_until=None,
                )
            )

    def mark_dead(self, item_id: int, reason: str) -> None:
        """Give up on an item (dead letter); ``triaged resend`` puts it back."""
        with self._write("mark_dead") as conn:
            conn.execute(
                update(_outbox)
                .where(_outbox.c.id == item_id)
                .values(state=OutboxState.DEAD.value, last_error=reason, claimed_by=None, lease_until=None)
            )

    def requeue_outbox(self, job_id: int) -> int:
        """Put every item of a job back to PENDING, due now (``triaged resend``); returns how many."""
        now = datetime.now(UTC)
        with self._write("requeue_outbox") as conn:
            result = conn.execute(
                update(_outbox)
                .where(_outbox.c.job_id == job_id)
                .values(
                    state=OutboxState.PENDING.value,
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    sent_at=None,
                    last_error="",
                    claimed_by=None,
                    lease_until=None,
                )
            )
            return int(result.rowcount or 0)
