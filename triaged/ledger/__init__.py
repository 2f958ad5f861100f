"""The SQLite ledger: studies, instances, the association audit trail and the job state machine."""

from triaged.ledger.claims import NodeRow
from triaged.ledger.ledger import Ledger
from triaged.ledger.rows import AssociationRow, InstanceRow, OutboxRequest, QuietJob, StudySource

__all__ = ["AssociationRow", "InstanceRow", "Ledger", "NodeRow", "OutboxRequest", "QuietJob", "StudySource"]
