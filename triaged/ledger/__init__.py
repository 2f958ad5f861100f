"""The SQLite ledger: studies, instances, the association audit trail and the job state machine."""

from triaged.ledger.ledger import AssociationRow, Ledger

__all__ = ["AssociationRow", "Ledger"]
