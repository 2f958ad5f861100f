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
from triaged.domain import InstanceRecord, JobRow, JobState, findings_from_json
from triaged.errors import StateError, TriagedError
from triaged.ledger import Ledger
from triaged.spool import Spool, validate_uid
from triaged.volume import read_headers
from triaged.worker import AnalysisTask, TaskOutcome, TaskQueue

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
        """Put jobs a stop interrupted back on their way.

        COMPLETE: choose the series again.  ANALYSING: back to QUEUED (the analysis is re-run).
        ENCODING: delivered again from the recorded findings.
        """
        for job in self.ledger.jobs(states=[JobState.COMPLETE], limit=100000):
            log.info("job %s resumed after restart", job.id)
            self.choose_series(job.id, job.study_instance_uid)
        for job in self.ledger.jobs(states=[JobState.ANALYSING], limit=100000):
            try:
                self.ledger.transition(job.id, JobState.ANALYSING, JobState.QUEUED, "analysis interrupted by a stop")
            except StateError:
                continue
        for job in self.ledger.jobs(states=[JobState.ENCODING], limit=100000):
            self.deliver(job.id)

    # -- analysis ----------------------------------------------------------------------------
    def analysis_task(self, job: JobRow) -> AnalysisTask:
        """The worker's task for a QUEUED job (instances of its study, the chosen series)."""
        cfg = self._config().analysis
        if job.series_instance_uid is None:
            raise TriagedError(f"job {job.id} was queued without a series")
        paths = tuple(r[0] for r in self.ledger.study_instances(job.study_instance_uid)
                      if r[2] == job.series_instance_uid)
        return AnalysisTask(
            job_id=job.id, study_uid=job.study_instance_uid, series_uid=job.series_instance_uid,
            pipeline=job.pipeline or cfg.default_pipeline, spool_root=str(self.spool.root),
            instance_paths=paths, work_dir=str(self.spool.work_dir(job.id)),
            device=cfg.device, threads=cfg.threads, registry=cfg.registry,
        )

    def submit_queued(self, queue: TaskQueue, running: set[int]) -> int:
        """Put QUEUED jobs that are not yet waiting or running on the worker queue."""
        waiting = queue.job_ids() | running
        added = 0
        for job in reversed(self.ledger.jobs(states=[JobState.QUEUED], limit=100000)):  # oldest first
            if job.id in waiting:
                continue
            try:
                queue.put(self.analysis_task(job))
            except TriagedError as exc:
                self._fail(job.id, JobState.QUEUED, f"analysis: {exc}")
                continue
            added += 1
        return added

    def start_analysis(self, task: AnalysisTask) -> bool:
        """QUEUED → ANALYSING just before a worker takes the task; False if the job moved on."""
        try:
            self.ledger.transition(task.job_id, JobState.QUEUED, JobState.ANALYSING,
                                   f"pipeline {task.pipeline} on {task.device}")
        except StateError as exc:
            log.info("job %s not analysed: %s", task.job_id, exc)
            return False
        return True

    def finish_analysis(self, task: AnalysisTask, outcome: TaskOutcome) -> None:
        """Record findings (ANALYSING → ENCODING …) or the failure (ANALYSING → FAILED)."""
        if not outcome.ok:
            log.error("job %s study %s: %s", task.job_id, task.study_uid, outcome.error)
            self._fail(task.job_id, JobState.ANALYSING, outcome.error)
            return
        findings = findings_from_json(outcome.findings_json)
        self.ledger.record_findings(task.job_id, findings)
        summary = (f"{findings.pipeline} {findings.pipeline_version}: {findings.ct_grade.name}, "
                   f"worse lung {findings.severity_pct:.1f} %, whole lung {findings.whole_lung_pct:.1f} % "
                   f"({outcome.seconds:.1f} s, peak {outcome.peak_rss_mb:.0f} MiB)")
        try:
            self.ledger.transition(task.job_id, JobState.ANALYSING, JobState.ENCODING, summary)
        except StateError as exc:  # superseded while it ran: its results are not sent
            log.info("job %s finished analysis but moved on: %s", task.job_id, exc)
            return
        log.info("job %s study %s analysed: %s", task.job_id, task.study_uid, summary)
        self.deliver(task.job_id)

    def deliver(self, job_id: int) -> None:
        """ENCODING → DISPATCHING → DONE.  Result objects and C-STORE dispatch come with issue 5."""
        try:
            self.ledger.transition(job_id, JobState.ENCODING, JobState.DISPATCHING,
                                   "no result encoders configured yet; findings are in the ledger")
            self.ledger.transition(job_id, JobState.DISPATCHING, JobState.DONE, "findings recorded")
        except StateError as exc:
            log.info("job %s moved on during delivery: %s", job_id, exc)

    def _fail(self, job_id: int, from_state: JobState, reason: str) -> None:
        try:
            self.ledger.transition(job_id, from_state, JobState.FAILED, reason)
        except StateError as exc:
            log.info("job %s could not be marked failed: %s", job_id, exc)

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
