"""Rows the :class:`~triaged.ledger.Ledger` takes and returns that are not domain types.

The NamedTuples keep the tuple shape the ledger always had (unpacking and comparison with plain tuples
still work) and add field names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple


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


class InstanceRow(NamedTuple):
    """One current instance of a study (:meth:`~triaged.ledger.Ledger.study_instances`)."""

    path: str  # relative to the spool root
    sop_class_uid: str
    series_instance_uid: str
    sop_instance_uid: str


class QuietJob(NamedTuple):
    """A RECEIVING job whose study is quiet (:meth:`~triaged.ledger.Ledger.quiet_jobs`)."""

    job_id: int
    study_instance_uid: str


class StudySource(NamedTuple):
    """Where a study's latest instance came from (:meth:`~triaged.ledger.Ledger.study_source`)."""

    calling_ae: str
    called_ae: str
    peer_address: str


class OutboxRequest(NamedTuple):
    """One result object to queue for one destination (:meth:`~triaged.ledger.Ledger.enqueue_outbox`)."""

    destination: str
    kind: str  # "sr" | "seg" | "sc"
    path: str  # relative to the spool root
    sop_class_uid: str
    sop_instance_uid: str


class AuditEventRow(NamedTuple):
    """One row of ``audit_events`` (:meth:`~triaged.ledger.Ledger.audit_events`); ``detail`` parsed."""

    id: int
    at: datetime
    kind: str
    actor: str
    peer: str
    study_uid: str | None
    detail: dict[str, object]
