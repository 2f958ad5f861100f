"""Retention: delete what finished long enough ago, or the oldest finished studies when the spool is full.

Policy (``retention`` in the config, :class:`~triaged.config.schema.RetentionConfig`), like Orthanc's
MaximumStorageSize with recycling or mercure's retention of processed cases:

* a study is *finished* when its newest job is DONE, IGNORED or FAILED and no result object of any of
  its jobs is PENDING; anything else (receiving, inside its completion window, queued, analysing,
  encoding, dispatching, waiting to retry) is never deleted;
* finished and delivered (DONE or IGNORED, nothing dead-lettered): files deleted ``keep_done_days``
  after it finished; FAILED or dead-lettered: after ``keep_failed_days``;
* over ``max_spool_gb``: finished studies oldest first, whatever their age, until it fits; if only
  unfinished ones are left an ERROR says so (once, until the spool fits again);
* ledger rows of purged studies, associations and audit events: after ``keep_ledger_days``.

Order of one deletion, safe against a kill at any point: the study is marked purged in the ledger
(its instance rows go in the same transaction), then its files and work folders are deleted, then the
deletion is audited.  Files a kill left behind are older than the mark, so the start-up reconcile does
not record them again (:meth:`~triaged.stages.recovery.Recovery.reconcile_spool`) and the next run
deletes them.  While a study is being deleted the spool refuses new instances of it (0xA700, the sender
retries), so nothing acknowledged is deleted.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from triaged.audit import audit
from triaged.config.schema import RetentionConfig
from triaged.domain import JobState
from triaged.errors import TriagedError
from triaged.ledger import Ledger
from triaged.ledger.retention import LedgerPrune, RetentionCandidate
from triaged.spool import Spool
from triaged.stages._common import Clock, ConfigProvider, utc_now

log = logging.getLogger(__name__)

#: Newest-job states of a finished study; DONE and IGNORED count as delivered unless dead-lettered.
FINISHED_STATES = frozenset({JobState.DONE.value, JobState.IGNORED.value, JobState.FAILED.value})
GIB = 2**30


@dataclass
class Deletion:
    """One study whose files are (or, in a dry run, would be) deleted, and why."""

    study_instance_uid: str
    reason: str
    #: ``done`` / ``failed`` (by age or size), ``leftover`` (finishing a deletion a crash interrupted).
    category: str
    finished_at: datetime | None
    files: int
    bytes: int
    #: ``deleted``, ``would delete`` (dry run), ``skipped`` (it changed since it was chosen) or ``error``.
    outcome: str = "would delete"


@dataclass
class RetentionReport:
    """What one retention run did (or would do with ``dry_run``)."""

    at: datetime
    dry_run: bool
    deletions: list[Deletion] = field(default_factory=list)
    ledger: LedgerPrune = field(default_factory=lambda: LedgerPrune(0, 0, 0))
    #: Bytes of received instances and work folders before the run, and the limit (0: none).
    spool_bytes: int = 0
    limit_bytes: int = 0
    #: Over the limit with only unfinished studies left to delete.
    over_limit: bool = False

    @property
    def files(self) -> int:
        return sum(d.files for d in self.deletions if d.outcome in ("deleted", "would delete"))

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.deletions if d.outcome in ("deleted", "would delete"))

    def as_dict(self) -> dict[str, object]:
        """JSON-ready (``triaged retention --json``)."""
        return {
            "at": self.at.isoformat(),
            "dry_run": self.dry_run,
            "deletions": [
                {**asdict(d), "finished_at": d.finished_at.isoformat() if d.finished_at else None}
                for d in self.deletions
            ],
            "files": self.files,
            "bytes": self.bytes,
            "ledger_rows": asdict(self.ledger),
            "spool_bytes": self.spool_bytes,
            "limit_bytes": self.limit_bytes,
            "over_limit_with_only_unfinished_studies": self.over_limit,
        }


def _days(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 86400:.1f}"


class Retention:
    """Applies the retention policy; the scheduler calls :meth:`run_scheduled`, the CLI :meth:`run`.

    Parameters
    ----------
    ledger, spool, config
        As for every stage.
    now
        The clock (tests inject theirs).
    actor
        Who the audit rows name: ``node`` on schedule, ``admin`` from ``triaged retention``.
    """

    def __init__(
        self,
        ledger: Ledger,
        spool: Spool,
        config: ConfigProvider,
        *,
        now: Clock = utc_now,
        actor: str = "node",
    ) -> None:
        self.ledger = ledger
        self.spool = spool
        self._config = config
        self._now = now
        self._actor = actor
        self._over_limit_logged = False

    def run_scheduled(self) -> RetentionReport | None:
        """One scheduled run, unless ``retention.enabled`` is false (read at each run: reloads apply)."""
        if not self._config().retention.enabled:
            return None
        return self.run()

    def run(self, *, dry_run: bool = False, now: datetime | None = None) -> RetentionReport:
        """Delete what the policy says is due (or, with ``dry_run``, only say what); returns the report."""
        cfg = self._config().retention
        at = now or self._now()
        report = RetentionReport(at=at, dry_run=dry_run, limit_bytes=int(cfg.max_spool_gb * GIB))
        if not dry_run:
            self._finish_interrupted(report)
        candidates = self.ledger.retention_candidates()
        self._choose(cfg, candidates, report)
        chosen = {c.study_instance_uid: c for c in candidates}
        for d in [d for d in report.deletions if d.category != "leftover"]:
            if not dry_run:
                self._delete(chosen[d.study_instance_uid], d, at)
        if cfg.keep_ledger_days is not None:
            report.ledger = self.ledger.prune_ledger(
                at - timedelta(days=cfg.keep_ledger_days), dry_run=dry_run
            )
            if report.ledger.total and not dry_run:
                audit(
                    "retention.ledger_pruned",
                    f"retention: deleted ledger rows older than {cfg.keep_ledger_days:g} days: "
                    f"{report.ledger.studies} purged studies, {report.ledger.associations} associations, "
                    f"{report.ledger.audit_events} audit events",
                    actor=self._actor,
                    recorder=self.ledger,
                    studies=report.ledger.studies,
                    associations=report.ledger.associations,
                    audit_events=report.ledger.audit_events,
                    reason=f"older than keep_ledger_days {cfg.keep_ledger_days:g}",
                )
        done = [d for d in report.deletions if d.outcome == "deleted"]
        if done:
            log.info(
                "retention: %d studies deleted, %d files, %d bytes", len(done), report.files, report.bytes
            )
        return report

    # ------------------------------------------------------------------ choosing

    def _choose(
        self, cfg: RetentionConfig, candidates: list[RetentionCandidate], report: RetentionReport
    ) -> None:
        at = report.at
        work = self.spool.work_names()
        work_bytes: dict[int, tuple[int, int]] = {}

        def size(c: RetentionCandidate) -> tuple[int, int]:
            files, total = c.instances, c.bytes
            for job_id in c.job_ids:
                if str(job_id) in work:
                    if job_id not in work_bytes:
                        work_bytes[job_id] = self.spool.work_bytes(job_id)
                    files, total = files + work_bytes[job_id][0], total + work_bytes[job_id][1]
            return files, total

        finished: list[tuple[datetime, RetentionCandidate, str]] = []
        for c in candidates:
            if c.latest_state not in FINISHED_STATES or c.pending or c.finished_at is None:
                continue  # unfinished: never deleted
            category = "done" if c.latest_state != JobState.FAILED.value and not c.dead else "failed"
            finished.append((max(c.finished_at, c.last_seen), c, category))
        finished.sort(key=lambda t: t[0])
        due: set[str] = set()
        for since, c, category in finished:
            keep = cfg.keep_done_days if category == "done" else cfg.keep_failed_days
            if keep is not None and at - since >= timedelta(days=keep):
                files, total = size(c)
                what = "finished and delivered" if category == "done" else "failed"
                report.deletions.append(
                    Deletion(
                        c.study_instance_uid,
                        f"{what} {_days(at - since)} days ago (keep_{category}_days: {keep:g})",
                        category,
                        since,
                        files,
                        total,
                    )
                )
                due.add(c.study_instance_uid)
        if not report.limit_bytes:
            return
        report.spool_bytes = sum(size(c)[1] for c in candidates)
        left = report.spool_bytes - sum(d.bytes for d in report.deletions)
        for since, c, category in finished:
            if left <= report.limit_bytes:
                break
            if c.study_instance_uid in due:
                continue
            files, total = size(c)
            report.deletions.append(
                Deletion(
                    c.study_instance_uid,
                    f"spool over max_spool_gb {cfg.max_spool_gb:g} GiB: oldest "
                    f"{category} study, finished {_days(at - since)} days ago",
                    category,
                    since,
                    files,
                    total,
                )
            )
            left -= total
        report.over_limit = left > report.limit_bytes
        if report.over_limit and not report.dry_run and not self._over_limit_logged:
            log.error(
                "retention: the spool holds %d bytes, over max_spool_gb %g GiB, and every study left is "
                "unfinished (receiving, queued, analysing or sending): nothing more may be deleted",
                left,
                cfg.max_spool_gb,
            )
        if not report.dry_run:
            self._over_limit_logged = report.over_limit

    # ------------------------------------------------------------------ deleting

    def _delete(self, c: RetentionCandidate, d: Deletion, at: datetime) -> None:
        """Mark, delete files and work folders, audit: one study (see the module docstring for the order)."""
        assert c.latest_job_id is not None
        try:
            with self.spool.purging(c.study_instance_uid):
                mark = self.ledger.mark_purged(
                    c.study_instance_uid,
                    latest_job_id=c.latest_job_id,
                    last_seen=c.last_seen,
                    finished_states=FINISHED_STATES,
                    now=at,
                )
                if mark is None:
                    d.outcome, d.files, d.bytes = "skipped", 0, 0
                    log.info("retention: study %s changed since it was chosen; kept", c.study_instance_uid)
                    return
                d.files, d.bytes = self._remove(c.study_instance_uid, mark.paths, mark.job_ids)
        except TriagedError as exc:
            d.outcome = "error"
            log.error(
                "retention: deleting study %s failed (the next run goes on): %s", c.study_instance_uid, exc
            )
            return
        d.outcome = "deleted"
        self._audit(d)

    def _remove(self, study_uid: str, paths: tuple[str, ...], job_ids: tuple[int, ...]) -> tuple[int, int]:
        """Delete instance files (except any the ledger records again: it arrived meanwhile) and work folders."""
        recorded = self.ledger.study_instance_paths(study_uid)
        files, size = self.spool.remove_files([p for p in paths if p not in recorded])
        for job_id in job_ids:
            f, b = self.spool.remove_work(job_id)
            files, size = files + f, size + b
        return files, size

    def _finish_interrupted(self, report: RetentionReport) -> None:
        """Delete what a kill left of earlier deletions: files and work folders older than their mark."""
        marks = self.ledger.purge_marks()
        if not marks:
            return
        studies, work = self.spool.study_names(), self.spool.work_names()
        for uid, (purged_at, job_ids) in marks.items():
            jobs = tuple(j for j in job_ids if str(j) in work)
            if uid not in studies and not jobs:
                continue
            try:
                with self.spool.purging(uid):
                    stamp = purged_at.timestamp()
                    old = [rel for rel, _, mtime in self.spool.study_files(uid) if mtime < stamp]
                    files, size = self._remove(uid, tuple(old), jobs)
            except TriagedError as exc:
                log.error("retention: finishing the deletion of study %s failed: %s", uid, exc)
                continue
            if files:
                d = Deletion(
                    uid,
                    f"finishing a deletion interrupted after {purged_at:%Y-%m-%d %H:%M} UTC",
                    "leftover",
                    None,
                    files,
                    size,
                    "deleted",
                )
                report.deletions.append(d)
                log.warning(
                    "retention: study %s: %d file(s) left by an interrupted deletion deleted", uid, files
                )
                self._audit(d)

    def _audit(self, d: Deletion) -> None:
        audit(
            "retention.deleted",
            f"retention: study {d.study_instance_uid}: {d.files} file(s), {d.bytes} bytes deleted ({d.reason})",
            actor=self._actor,
            study_uid=d.study_instance_uid,
            recorder=self.ledger,
            files=d.files,
            bytes=d.bytes,
            reason=d.reason,
        )
