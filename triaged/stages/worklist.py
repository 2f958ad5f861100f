"""The worklist view: studies in reading order (CLI, C-FIND and HTTP agree) and C-FIND header lookups."""

from __future__ import annotations

from pydicom import dcmread
from pydicom.dataset import Dataset

from triaged.domain import WorklistRow
from triaged.ledger import Ledger
from triaged.priority import order_worklist
from triaged.spool import Spool
from triaged.stages._common import Clock, ConfigProvider, utc_now


class Worklist:
    """Reads only: the ledger's priority order and the first readable header of a study."""

    def __init__(self, ledger: Ledger, spool: Spool, config: ConfigProvider, *, now: Clock = utc_now) -> None:
        self.ledger = ledger
        self.spool = spool
        self._config = config
        self._now = now

    def rows(self) -> list[WorklistRow]:
        """The ledger's studies in reading order, overdue ones flagged."""
        return order_worklist(self.ledger.worklist(), self._now(), self._config().priority.waiting_alert_minutes)

    def study_header(self, study_uid: str) -> Dataset | None:
        """Header of a study's first stored instance (patient and study attributes for C-FIND)."""
        for path, *_ in self.ledger.study_instances(study_uid)[:3]:
            try:
                return dcmread(self.spool.root / path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - try the next file
                continue
        return None
