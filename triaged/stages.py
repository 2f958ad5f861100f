"""Glue between the adapters: completion, series choice and start-up recovery.

Every state change goes through :meth:`Ledger.transition`, so what this module does is visible in
``triaged jobs`` with its reason.  Analysis, encoding and dispatch plug in after QUEUED.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom import dcmread

from triaged.assembly import select_series
from triaged.config import Config
from triaged.domain import InstanceRecord, JobState
from triaged.errors import StateError, TriagedError
from triaged.ledger import Ledger
from triaged.spool import Spool, validate_uid
from triaged.volume import read_headers

log = logging.getLogger(__name__)


class Stages:
    """The node's stages, sharing one ledger and spool; ``config`` is read on every call (reloads)."""

    def __init__(self, ledger: Ledger, spool: Spool, config: Callable[[], Config]) -> None:
        self.ledger = ledger
        self.spool = spool
        self._config = config

    def complete_quiet_studies(self, now: datetime | None = None) -> list[int]:
        """Mark studies quiet for the completion delay COMPLETE, then queue or ignore them.

        Returns the ids of the jobs that were completed.
        """
        cfg = self._config()
        now = now or datetime.now(UTC)
        done = []
        for job_id, study_uid in self.ledger.quiet_jobs(now - timedelta(seconds=cfg.completion.delay_seconds)):
            try:
                self.ledger.transition(
                    job_id, JobState.RECEIVING, JobState.COMPLETE,
                    f"no instance for {cfg.completion.delay_seconds:g} s",
                )
            except StateError:
                continue  # a late instance or another sweep got there first
            done.append(job_id)
            self.choose_series(job_id, study_uid)
        return done

    def choose_series(self, job_id: int, study_uid: str) -> None:
        """COMPLETE → QUEUED with the chosen series, or → IGNORED with the reason (headers only)."""
        cfg = self._config()
        try:
            rows = self.ledger.study_instances(study_uid)
            headers, problems = read_headers(self.spool.root, [r[0] for r in rows])
            choice = select_series(headers, cfg.series_selection)
            if choice.series_uid is None:
                reason = choice.reason
                if problems:
                    reason += f"; {len(problems)} unreadable file(s): {problems[0]}"
                self.ledger.transition(job_id, JobState.COMPLETE, JobState.IGNORED, reason)
                log.info("job %s study %s ignored: %s", job_id, study_uid, reason)
                return
            self.ledger.transition(
                job_id, JobState.COMPLETE, JobState.QUEUED, choice.reason, series_instance_uid=choice.series_uid
            )
            log.info("job %s study %s queued: %s", job_id, study_uid, choice.reason)
        except StateError as exc:
            log.info("job %s moved on while its series was chosen: %s", job_id, exc)
        except Exception as exc:  # noqa: BLE001 - stage boundary: record and carry on
            log.exception("job %s study %s: series choice failed", job_id, study_uid)
            try:
                self.ledger.transition(job_id, JobState.COMPLETE, JobState.FAILED, f"series choice: {exc}")
            except StateError:
                pass

    def reconcile_spool(self) -> int:
        """Record spool files the ledger does not know (a power loss after the file was fsynced).

        Returns how many were recorded.  Unreadable files are quarantined.
        """
        known = self.ledger.instance_paths()
        added = 0
        for rel in self.spool.stored_paths():
            if rel in known:
                continue
            path = self.spool.root / rel
            try:
                record = _record_from_file(path, rel)
            except (OSError, TriagedError, ValueError, AttributeError) as exc:
                data = path.read_bytes() if path.exists() else b""
                self.spool.quarantine(data, f"unreadable at start-up reconcile: {exc}", rel)
                path.unlink(missing_ok=True)
                continue
            self.ledger.record_instance(record, association_id=None)
            added += 1
        if added:
            log.warning("start-up: recorded %d spooled instance(s) missing from the ledger", added)
        return added

    def resume_interrupted(self) -> None:
        """Put jobs a stop interrupted back on their way (COMPLETE: choose again)."""
        for job in self.ledger.jobs(states=[JobState.COMPLETE], limit=100000):
            log.info("job %s resumed after restart", job.id)
            self.choose_series(job.id, job.study_instance_uid)

    def queue_summary(self) -> dict[str, int]:
        depth = self.ledger.queue_depth()
        return {s.value: n for s, n in depth.items() if n}


def _record_from_file(path: Path, rel: str) -> InstanceRecord:
    import hashlib

    data = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    return InstanceRecord(
        study_instance_uid=validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_instance_uid=validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        sop_instance_uid=validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
        path=rel,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        modality=str(ds.get("Modality", "") or ""),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
        accession_number=str(ds.get("AccessionNumber", "") or ""),
    )


def count_by(values: list[str]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in Counter(values).most_common())
