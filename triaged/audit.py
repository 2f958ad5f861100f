"""The audit trail's log side: one structured line per security-relevant event on ``triaged.audit``.

A security officer reads the trail two ways: the log (journald or ``logging.file``; with
``logging.format: json`` each line carries the event's fields as JSON keys) and the ledger
(``triaged audit``).  :func:`audit` writes the line and, when given a recorder (the ledger), the row in
``audit_events``; events that have a row of their own elsewhere (associations, instances, outbox) are
logged here without a second row.  No patient names, IDs or birth dates go into either.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

#: The audit logger; filter or route it on its own (``triaged.audit``).
AUDIT_LOG = logging.getLogger("triaged.audit")
log = logging.getLogger(__name__)


class EventRecorder(Protocol):
    """What :func:`audit` writes rows through (:class:`~triaged.ledger.Ledger` is one)."""

    def record_event(
        self,
        kind: str,
        *,
        actor: str = ...,
        peer: str = ...,
        study_uid: str | None = ...,
        detail: Mapping[str, object] | None = ...,
    ) -> int: ...


def audit(
    kind: str,
    message: str,
    *,
    actor: str = "",
    peer: str = "",
    study_uid: str | None = None,
    recorder: EventRecorder | None = None,
    level: int = logging.INFO,
    **detail: object,
) -> None:
    """Log one audit event (``message`` is the human line) and, with ``recorder``, store it as a row.

    The structured fields (``event``, ``actor``, ``peer``, ``study_uid`` and ``detail``'s keys) travel
    on the log record as ``record.audit``; the JSON log format writes them out.  A failing row write is
    logged and swallowed: an audit row must never fail the operation it records.
    """
    fields: dict[str, object] = {"event": kind}
    if actor:
        fields["actor"] = actor
    if peer:
        fields["peer"] = peer
    if study_uid:
        fields["study_uid"] = study_uid
    fields.update(detail)
    AUDIT_LOG.log(level, "%s", message, extra={"audit": fields})
    if recorder is None:
        return
    try:
        recorder.record_event(kind, actor=actor, peer=peer, study_uid=study_uid, detail=detail)
    except Exception:  # noqa: BLE001 - see above
        log.exception("could not record the audit event %s", kind)


def peer_text(address: str, port: int | None) -> str:
    """``address:port`` as the trail writes a peer (``[address]:port`` for IPv6); no port: ``address``."""
    if port is None:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
