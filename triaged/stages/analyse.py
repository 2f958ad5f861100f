"""Analyse: routing, series choice, task building, and recording the analysis outcome."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydicom.dataset import Dataset

from triaged.assembly import select_series
from triaged.domain import JobRow, JobState, findings_from_json, pct_text
from triaged.encode.uids import output_uids
from triaged.errors import StateError, TriagedError
from triaged.ledger import Ledger
from triaged.routing import RouteDecision, StudyFacts, attributes_of, route
from triaged.spool import Spool
from triaged.stages._common import Clock, ConfigProvider, utc_now
from triaged.stages.dispatch import Dispatch
from triaged.volume import read_dataset, read_headers
from triaged.worker import AnalysisTask, EncodingStarted, PriorityResult, TaskOutcome, TaskQueue

log = logging.getLogger(__name__)

#: Why routing leaves out a file without the 128-byte preamble (it is read, forced, for series choice).
_NO_PREAMBLE = "no 128-byte preamble and 'DICM' prefix (not in DICOM file format)"

#: A transient failure (:func:`transient_failure`) puts the job back to QUEUED, to run again after
#: :func:`retry_delay_seconds`, this many times (about three hours in all); the next one fails it for good.
TRANSIENT_RETRIES = 8
TRANSIENT_RETRY_BASE_SECONDS = 60.0
TRANSIENT_RETRY_MAX_SECONDS = 3600.0
#: How a retry's job detail starts; a job's retries so far are the QUEUED transitions with it in its history.
_RETRY_DETAIL = "transient failure, retry"
#: OS errors that may clear by themselves: disk full, quota exceeded, an I/O error, "try again".
_TRANSIENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN)


def transient_failure(error: str) -> bool:
    """Whether a worker's failure (``"stage: reason"``) may not recur: retry it rather than fail the study.

    Conservative: an OS error of :data:`_TRANSIENT_ERRNOS` (its ``[Errno n]`` text), or the worker process
    dying without an answer (an OOM kill).  Failures on the data (no lungs found, an unreadable series), the
    timeout and the memory guard would fail again the same way.
    """
    if error.startswith("analysis: worker process crashed"):
        return True
    return any(f"[Errno {n}]" in error for n in _TRANSIENT_ERRNOS)


def retry_delay_seconds(retries: int) -> float:
    """Delay before transient retry number ``retries + 1``: 60 s doubling, at most an hour."""
    return float(min(TRANSIENT_RETRY_MAX_SECONDS, TRANSIENT_RETRY_BASE_SECONDS * 2**retries))


@dataclass(frozen=True)
class StudyRead:
    """One read of a study's routing headers: the routing facts, the relative paths of its instances and
    the datasets read (by path), which the series choice reuses instead of opening those files again."""

    facts: StudyFacts
    paths: list[str]
    datasets: dict[str, Dataset]


def study_facts(ledger: Ledger, spool: Spool, study_uid: str) -> tuple[StudyFacts, list[str]]:
    """What routing rules match on, and the relative paths of the study's instances (:func:`read_study`)."""
    read = read_study(ledger, spool, study_uid)
    return read.facts, read.paths


def read_study(ledger: Ledger, spool: Spool, study_uid: str) -> StudyRead:
    """What routing rules match on: the sending AEs and address, study and per-series attributes, from
    the header of the first instance of each series (no pixel data).

    Each header is read once, forced and whole.  Routing takes only files in DICOM file format (with
    the 128-byte preamble and ``DICM`` prefix); series choice takes the others too, as it reads forced.
    A file that cannot be read is not returned: the series choice reads it again and says why it failed.
    """
    rows = ledger.study_instances(study_uid)
    firsts: dict[str, str] = {}
    for path, _sop_class, series_uid, _sop in rows:
        firsts.setdefault(series_uid, path)
    series = []
    study_attrs: dict[str, Any] = {}
    datasets: dict[str, Dataset] = {}
    for path in firsts.values():
        try:
            ds = read_dataset(spool.root, path, whole=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable file is left out of routing
            log.warning("study %s: cannot read %s for routing: %s", study_uid, path, exc.__cause__ or exc)
            continue
        datasets[path] = ds
        if getattr(ds, "preamble", None) is None:
            log.warning("study %s: cannot read %s for routing: %s", study_uid, path, _NO_PREAMBLE)
            continue
        attrs = attributes_of(ds)
        series.append(attrs)
        study_attrs = study_attrs or attrs
    calling, called, peer = ledger.study_source(study_uid) or ("", "", None)
    facts = StudyFacts(called_ae=called, calling_ae=calling, peer_address=peer, study=study_attrs,
                       series=tuple(series))
    return StudyRead(facts, [r.path for r in rows], datasets)


class Analysis:
    """COMPLETE → QUEUED/IGNORED (route, series), QUEUED → ANALYSING → ENCODING (findings, priority).

    A transient failure puts the job back to QUEUED with a ``next_attempt_at`` (capped exponential
    backoff); :meth:`submit_queued` leaves it until then.  ``on_queued`` (the daemon's: offer QUEUED
    jobs to the worker queue) is called as soon as a job is queued, so it need not wait for a tick.

    With ``node`` (the daemon's ``node.name``) the workers claim their jobs from the ledger shared by every
    node (:meth:`claim_task`, QUEUED → ANALYSING with a lease), and every later move of an analysing job is
    made only while this node still holds it.
    """

    def __init__(
        self, ledger: Ledger, spool: Spool, config: ConfigProvider, dispatch: Dispatch, *, now: Clock = utc_now,
        on_queued: Callable[[int], object] | None = None, node: str | None = None,
    ) -> None:
        self.ledger = ledger
        self._node = node
        self.spool = spool
        self._config = config
        self._dispatch = dispatch
        self._now = now
        self._on_queued = on_queued
        #: One submission at a time (the timers, the sweep's feeder and the start may all submit).
        self._submit_lock = threading.Lock()

    def choose_series(
        self,
        job_id: int,
        study_uid: str,
        decision: RouteDecision | None = None,
        datasets: dict[str, Dataset] | None = None,
    ) -> None:
        """COMPLETE → QUEUED with the route and chosen series, or → IGNORED with the reason.

        Every instance's header is read once: the ``datasets`` that :func:`read_study` read for
        ``decision`` (or reads here, without one) are reused, the others are read for the series-choice
        attributes only.
        """
        cfg = self._config()
        try:
            if decision is None:
                read = read_study(self.ledger, self.spool, study_uid)
                decision, datasets = route(cfg, read.facts), read.datasets
            if decision.ignored:
                reason = f"routing rule '{decision.rule}': {decision.ignore_reason}"
                self.ledger.transition(job_id, JobState.COMPLETE, JobState.IGNORED, reason)
                log.info("job %s study %s ignored: %s", job_id, study_uid, reason)
                self._dispatch.enqueue_ignored_report(job_id, reason, decision)
                return
            rows = self.ledger.study_instances(study_uid)
            headers, problems = read_headers(self.spool.root, [r.path for r in rows], datasets=datasets)
            choice = select_series(headers, cfg.series_selection)
            if choice.series_uid is None:
                reason = choice.reason
                if problems:
                    reason += f"; {len(problems)} unreadable file(s): {problems[0]}"
                self.ledger.transition(job_id, JobState.COMPLETE, JobState.IGNORED, reason)
                log.info("job %s study %s ignored: %s", job_id, study_uid, reason)
                self._dispatch.enqueue_ignored_report(job_id, reason, decision)
                return
            requested = self.ledger.job(job_id).pipeline  # set by `triaged reanalyze --pipeline`
            pipeline = requested or decision.pipelines[0]
            self.ledger.queue_job(
                job_id, route=decision, pipeline=pipeline,
                series_instance_uid=choice.series_uid,
                detail=f"route '{decision.rule}' ({pipeline}{' as requested' if requested else ''}, "
                       f"{decision.analysis_priority}); {choice.reason}",
            )
            log.info("job %s study %s queued: %s", job_id, study_uid, choice.reason)
            self._queued(job_id)
        except StateError as exc:
            log.info("job %s moved on while its series was chosen (nothing recorded): %s", job_id, exc)
        except Exception as exc:  # noqa: BLE001 - stage boundary: record and carry on
            log.exception("job %s study %s: series choice failed", job_id, study_uid)
            try:
                self.ledger.transition(job_id, JobState.COMPLETE, JobState.FAILED, f"series choice: {exc}")
            except StateError:
                pass

    def _queued(self, job_id: int) -> None:
        """Tell ``on_queued`` (a failure there is logged: the feeder's tick submits the job instead)."""
        if self._on_queued is None:
            return
        try:
            self._on_queued(job_id)
        except Exception:  # noqa: BLE001 - the periodic feeder is the safety net
            log.exception("job %s: could not offer it to the workers at once", job_id)

    def analysis_task(self, job: JobRow) -> AnalysisTask:
        """The worker's task for a QUEUED job (instances of the chosen series, route, revision)."""
        cfg = self._config()
        if job.series_instance_uid is None:
            raise TriagedError(f"job {job.id} was queued without a series")
        paths = tuple(r.path for r in self.ledger.study_instances(job.study_instance_uid)
                      if r.series_instance_uid == job.series_instance_uid)
        routed = self.ledger.route_decision(job)
        policy_name = routed.priority_policy if routed else None
        policy = cfg.priority.policies.get(policy_name) if policy_name else None
        return AnalysisTask(
            job_id=job.id, study_uid=job.study_instance_uid, series_uid=job.series_instance_uid,
            pipeline=job.pipeline or cfg.analysis.default_pipeline,
            fallbacks=tuple(p for p in (routed.pipelines if routed else ()) if p != job.pipeline),
            spool_root=str(self.spool.root),
            instance_paths=paths, work_dir=str(self.spool.work_dir(job.id)),
            level=routed.analysis_priority if routed else "ROUTINE",
            device=cfg.analysis.device, threads=cfg.analysis.threads, registry=cfg.analysis.registry,
            encode=bool(routed and routed.destinations), revision=job.revision,
            predecessor_sr=self.predecessor_sr(job), policy=policy,
        )

    def predecessor_sr(self, job: JobRow) -> tuple[str, str, str] | None:
        """The SR of the newest earlier revision that produced one (its UIDs are derived, not stored)."""
        for earlier in self.ledger.jobs(study_uid=job.study_instance_uid, limit=1000):  # newest first
            if earlier.revision >= job.revision:
                continue
            if not any(o.kind == "sr" for o in self.ledger.outbox(job_id=earlier.id)):
                continue
            findings = self.ledger.findings(earlier.id)
            if findings is None:
                continue
            uids = output_uids(job.study_instance_uid, findings.pipeline, findings.pipeline_version, earlier.revision)
            return (job.study_instance_uid, uids.sr_series, uids.sr_instance)
        return None

    def submit_queued(self, queue: TaskQueue, running: set[int] | Callable[[], set[int]]) -> int:
        """Put QUEUED jobs that are not yet waiting or running on the worker queue.

        A job waiting out a transient failure's backoff (``next_attempt_at`` still ahead) is left for later.
        Safe to call from several threads at once (one runs at a time), so a job is put once.
        ``running`` is read after the queue (a callable: read when the lock is held), so a task that the
        workers take meanwhile is seen in one or the other.
        """
        with self._submit_lock:
            waiting = queue.job_ids()
            waiting |= running() if callable(running) else running
            added = 0
            now = self._now()
            for job in reversed(self.ledger.jobs(states=[JobState.QUEUED], limit=100000)):  # oldest first
                if job.id in waiting or (job.next_attempt_at is not None and job.next_attempt_at > now):
                    continue
                try:
                    queue.put(self.analysis_task(job))
                except TriagedError as exc:
                    self._fail(job.id, JobState.QUEUED, f"analysis: {exc}")
                    continue
                added += 1
            return added

    def claim_task(self) -> AnalysisTask | None:
        """Claim the most urgent due QUEUED job for this node (QUEUED → ANALYSING with a lease); its task.

        None when no job is due.  A job whose task cannot be built (its series is gone) is failed and the
        next one is claimed.  Needs ``node``.
        """
        if self._node is None:
            raise TriagedError("claiming jobs needs the node's name")
        cfg = self._config()
        while True:
            job_id = self.ledger.claim_job(
                self._node, cfg.node.lease_seconds, aging_seconds=cfg.analysis.aging_seconds,
                detail=f"claimed by node {self._node} for {cfg.analysis.device}",
            )
            if job_id is None:
                return None
            try:
                return self.analysis_task(self.ledger.job(job_id))
            except TriagedError as exc:
                self._fail(job_id, JobState.ANALYSING, f"analysis: {exc}")

    def owns(self, task: AnalysisTask) -> bool:
        """Whether this node still holds a claimed task's job (ANALYSING, claimed by it): start it then."""
        try:
            state, owner = self.ledger.job_owner(task.job_id)
        except TriagedError as exc:
            log.info("job %s not analysed: %s", task.job_id, exc)
            return False
        if state is not JobState.ANALYSING or owner != self._node:
            log.info("job %s not analysed: it is %s, held by %s", task.job_id, state, owner or "no node")
            return False
        return True

    def start_analysis(self, task: AnalysisTask) -> bool:
        """QUEUED → ANALYSING just before a worker takes the task; False if the job moved on."""
        try:
            self.ledger.transition(task.job_id, JobState.QUEUED, JobState.ANALYSING,
                                   f"pipeline {task.pipeline} on {task.device}")
        except StateError as exc:
            log.info("job %s not analysed: %s", task.job_id, exc)
            return False
        return True

    def analysis_wanted(self, job_id: int) -> bool:
        """Whether a running analysis (or its encoding) is still needed (False once its job was superseded)."""
        try:
            state, owner = self.ledger.job_owner(job_id)
        except TriagedError:
            return True  # a ledger hiccup is no reason to throw the work away
        mine = self._node is None or owner is None or owner == self._node  # else: taken back and claimed again
        return state in (JobState.ANALYSING, JobState.ENCODING) and mine

    def start_encoding(self, task: AnalysisTask, started: EncodingStarted) -> bool:
        """ANALYSING → ENCODING with findings and priority, when the worker starts encoding.

        Returns False when the job moved on (nothing is recorded; the worker is stopped).
        """
        return self._record(task, started.findings_json, started.priority, started.seconds, started.peak_rss_mb)

    def finish_analysis(self, task: AnalysisTask, outcome: TaskOutcome) -> None:
        """Record the outcome: the outputs go to the outbox (ENCODING → DISPATCHING), or the failure.

        Findings and priority were recorded when encoding started; a task that encodes nothing
        records them here (ANALYSING → ENCODING → DISPATCHING).  A transient failure
        (:func:`transient_failure`) goes back to QUEUED for a later retry (:meth:`_retry_later`).
        """
        job = self._job(task.job_id)
        state = job.state if job is not None else None
        if not outcome.ok:
            from_state = state if state is JobState.ENCODING else JobState.ANALYSING
            if job is not None and transient_failure(outcome.error):
                self._retry_later(job, from_state, outcome.error)
                return
            log.error("job %s study %s: %s", task.job_id, task.study_uid, outcome.error)
            self._fail(task.job_id, from_state, outcome.error, owner=self._node)
            return
        if state is not JobState.ENCODING and not self._record(
            task, outcome.findings_json, outcome.priority, outcome.seconds, outcome.peak_rss_mb
        ):
            return
        self._dispatch.enqueue_outputs(self.ledger.job(task.job_id), outcome.outputs)

    def _record(self, task: AnalysisTask, findings_json: str, priority: PriorityResult | None,
                seconds: float, peak_rss_mb: float) -> bool:
        findings = findings_from_json(findings_json)
        summary = (f"{findings.pipeline} {findings.pipeline_version}: {findings.ct_grade.name}, "
                   f"worse lung {pct_text(findings.severity_pct)} %, whole lung {pct_text(findings.whole_lung_pct)} % "
                   f"({seconds:.1f} s, peak {peak_rss_mb:.0f} MiB)")
        try:
            self.ledger.record_analysis(task.job_id, findings, priority=priority, detail=summary, owner=self._node)
        except StateError as exc:  # superseded while it ran: nothing recorded, its results are not sent
            log.info("job %s finished analysis but moved on (findings not recorded): %s", task.job_id, exc)
            return False
        log.info("job %s study %s analysed: %s", task.job_id, task.study_uid, summary)
        return True

    def _retry_later(self, job: JobRow, from_state: JobState, error: str) -> None:
        """A transient failure: back to QUEUED, not before its backoff; FAILED once the retries are spent."""
        retries = sum(1 for _at, _from, to, detail in job.history
                      if to == JobState.QUEUED and detail.startswith(_RETRY_DETAIL))
        if retries >= TRANSIENT_RETRIES:
            log.error("job %s study %s: %s; gave up after %d retries", job.id, job.study_instance_uid, error, retries)
            self._fail(job.id, from_state, f"{error} (transient; gave up after {retries} retries)", owner=self._node)
            return
        when = self._now() + timedelta(seconds=retry_delay_seconds(retries))
        detail = (f"{_RETRY_DETAIL} {retries + 1} of {TRANSIENT_RETRIES} not before "
                  f"{when:%Y-%m-%d %H:%M:%S} UTC: {error}")
        try:
            self.ledger.transition(job.id, from_state, JobState.QUEUED, detail, next_attempt_at=when, owner=self._node)
        except StateError as exc:
            log.info("job %s moved on before its transient failure was recorded: %s", job.id, exc)
            return
        log.warning("job %s study %s: %s", job.id, job.study_instance_uid, detail)

    def _job(self, job_id: int) -> JobRow | None:
        try:
            return self.ledger.job(job_id)
        except TriagedError:
            return None

    def _fail(self, job_id: int, from_state: JobState, reason: str, *, owner: str | None = None) -> None:
        try:
            self.ledger.transition(job_id, from_state, JobState.FAILED, reason, owner=owner)
        except StateError as exc:
            log.info("job %s could not be marked failed: %s", job_id, exc)
