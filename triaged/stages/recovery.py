"""Recovery at start-up: record spooled files the ledger lost, resume jobs a stop interrupted."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from triaged.domain import InstanceRecord, JobState
from triaged.errors import InvalidDatasetError, StateError, TriagedError
from triaged.ledger import Ledger
from triaged.net.scp import instance_record
from triaged.spool import Spool
from triaged.stages._common import ConfigProvider
from triaged.stages.analyse import Analysis

log = logging.getLogger(__name__)


def record_from_file(path: Path, rel: str) -> InstanceRecord:
    """The ledger record of a spooled file, built like the C-STORE handler builds it."""
    data = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    return instance_record(ds, path=rel, size=len(data), sha256=hashlib.sha256(data).hexdigest())


class Recovery:
    """Start-up work: :meth:`reconcile_spool`, then :meth:`resume_interrupted`."""

    def __init__(self, ledger: Ledger, spool: Spool, config: ConfigProvider, analysis: Analysis) -> None:
        self.ledger = ledger
        self.spool = spool
        self._config = config
        self._analysis = analysis

    def reconcile_spool(self) -> int:
        """Record spool files the ledger does not know (a power loss after the file was fsynced).

        Returns how many were recorded.  A file of a study retention marked purged that is older than
        the mark is a leftover of that deletion, not a new instance: it is not recorded (retention
        deletes it), so a half-deleted study is never resurrected.  File by file, so no file stops the
        start: one that cannot be read, or that the ledger refuses (its Series or SOP Instance UID is recorded under another
        study or series), is quarantined with the reason; one the ledger cannot take now (a database
        error) stays in the spool for the next start.
        """
        known = self.ledger.instance_paths()
        marks = self.ledger.purge_marks()
        added = leftovers = 0
        for rel in self.spool.stored_paths():
            if rel in known:
                continue
            path = self.spool.root / rel
            if self._purge_leftover(path, rel, marks):
                leftovers += 1
                continue
            try:
                record = record_from_file(path, rel)
            except (OSError, TriagedError, ValueError, AttributeError, InvalidDicomError) as exc:
                self._quarantine(path, rel, f"unreadable at start-up reconcile: {exc}")
                continue
            try:
                self.ledger.record_instance(record, association_id=None)
            except InvalidDatasetError as exc:
                self._quarantine(path, rel, f"refused by the ledger at start-up reconcile: {exc}")
                continue
            except TriagedError as exc:
                log.error("start-up: cannot record spooled %s now, left for the next start: %s", rel, exc)
                continue
            added += 1
        if added:
            log.warning("start-up: recorded %d spooled instance(s) missing from the ledger", added)
        if leftovers:
            log.warning(
                "start-up: %d spooled file(s) of studies retention was deleting when the node stopped were "
                "not recorded; retention deletes them at its next run",
                leftovers,
            )
        return added

    @staticmethod
    def _purge_leftover(path: Path, rel: str, marks: dict[str, tuple[datetime, tuple[int, ...]]]) -> bool:
        """Whether an unrecorded file is what an interrupted retention deletion left: written before its
        study was marked purged (a file written after the mark is an instance that arrived later)."""
        mark = marks.get(rel.split("/")[1])
        if mark is None:
            return False
        try:
            return path.stat().st_mtime < mark[0].timestamp()
        except OSError:
            return False

    def _quarantine(self, path: Path, rel: str, reason: str) -> None:
        """Move a spooled file the ledger cannot take to the quarantine; keep it where it is if that fails."""
        try:
            data = path.read_bytes() if path.exists() else b""
        except OSError as exc:
            log.error("start-up: cannot read spooled %s to quarantine it (%s): %s", rel, reason, exc)
            return
        where = self.spool.quarantine(data, reason, rel)
        if where is None:
            log.error("start-up: could not quarantine spooled %s (%s); left in the spool", rel, reason)
            return
        path.unlink(missing_ok=True)
        log.error("start-up: spooled %s quarantined as %s: %s", rel, where.name, reason)

    def resume_interrupted(self, node: str | None = None, *, shared: bool = False) -> None:
        """Put jobs a stop interrupted back on their way.

        COMPLETE: route and choose again.  ANALYSING and ENCODING: back to QUEUED (analysis and
        encoding are re-run; output UIDs are derived, so nothing is sent twice).  DISPATCHING and
        RETRY_WAIT need nothing: their outbox is durable and the dispatcher picks it up.

        On a ledger ``shared`` with other nodes, only the jobs and outbox claims this ``node`` held (and
        held jobs no node claimed) are taken back: those of other nodes are theirs while they beat, and the
        leader takes them back when their leases run out (:meth:`~triaged.ledger.Ledger.reclaim_expired`).
        """
        for job in self.ledger.jobs(states=[JobState.COMPLETE], limit=100000):
            log.info("job %s resumed after restart", job.id)
            self._analysis.choose_series(job.id, job.study_instance_uid)
        if node is not None:
            self.ledger.release_outbox(node=node)
        if shared and node is not None:
            for what, ids in (
                (
                    "held by this node",
                    self.ledger.release_jobs(node, reason=f"interrupted by a stop of node {node}"),
                ),
                ("held by no node", self.ledger.release_unclaimed_jobs(reason="interrupted by a stop")),
            ):
                if ids:
                    log.warning("start-up: %d job(s) %s re-queued: %s", len(ids), what, ids)
            return
        for state, what in ((JobState.ANALYSING, "analysis"), (JobState.ENCODING, "encoding")):
            for job in self.ledger.jobs(states=[state], limit=100000):
                try:
                    self.ledger.transition(job.id, state, JobState.QUEUED, f"{what} interrupted by a stop")
                except StateError:
                    continue
