"""Analyse: routing, series choice, task building, and recording the analysis outcome."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

from pydicom import dcmread

from triaged.assembly import select_series
from triaged.domain import JobRow, JobState, findings_from_json
from triaged.encode.uids import output_uids
from triaged.errors import StateError, TriagedError
from triaged.ledger import Ledger
from triaged.routing import RouteDecision, StudyFacts, attributes_of, route
from triaged.spool import Spool
from triaged.stages._common import ConfigProvider
from triaged.stages.dispatch import Dispatch
from triaged.volume import read_headers
from triaged.worker import AnalysisTask, EncodingStarted, TaskOutcome, TaskQueue

log = logging.getLogger(__name__)


def route_to_json(decision: RouteDecision) -> str:
    """The parts of a routing decision a job needs later (pipelines, destinations, policy)."""
    data = asdict(decision)
    data.pop("explanation", None)
    return json.dumps(data)


def study_facts(ledger: Ledger, spool: Spool, study_uid: str) -> tuple[StudyFacts, list[str]]:
    """What routing rules match on: the sending AEs and address, study and per-series attributes.

    Reads one header per series (no pixel data); returns the facts and the relative paths of the
    study's instances.
    """
    rows = ledger.study_instances(study_uid)
    firsts: dict[str, str] = {}
    for path, _sop_class, series_uid, _sop in rows:
        firsts.setdefault(series_uid, path)
    series = []
    study_attrs: dict[str, Any] = {}
    for path in firsts.values():
        try:
            ds = dcmread(spool.root / path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable file is left out of routing
            log.warning("study %s: cannot read %s for routing: %s", study_uid, path, exc)
            continue
        attrs = attributes_of(ds)
        series.append(attrs)
        study_attrs = study_attrs or attrs
    calling, called, peer = ledger.study_source(study_uid) or ("", "", None)
    facts = StudyFacts(called_ae=called, calling_ae=calling, peer_address=peer, study=study_attrs,
                       series=tuple(series))
    return facts, [r[0] for r in rows]


class Analysis:
    """COMPLETE → QUEUED/IGNORED (route, series), QUEUED → ANALYSING → ENCODING (findings, priority)."""

    def __init__(self, ledger: Ledger, spool: Spool, config: ConfigProvider, dispatch: Dispatch) -> None:
        self.ledger = ledger
        self.spool = spool
        self._config = config
        self._dispatch = dispatch

    def choose_series(self, job_id: int, study_uid: str, decision: RouteDecision | None = None) -> None:
        """COMPLETE → QUEUED with the route and chosen series, or → IGNORED with the reason."""
        cfg = self._config()
        try:
            if decision is None:
                decision = route(cfg, study_facts(self.ledger, self.spool, study_uid)[0])
            if decision.ignored:
                reason = f"routing rule '{decision.rule}': {decision.ignore_reason}"
                self.ledger.transition(job_id, JobState.COMPLETE, JobState.IGNORED, reason)
                log.info("job %s study %s ignored: %s", job_id, study_uid, reason)
                return
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
            self.ledger.queue_job(
                job_id, route_json=route_to_json(decision), pipeline=decision.pipelines[0],
                series_instance_uid=choice.series_uid,
                detail=f"route '{decision.rule}' ({decision.pipelines[0]}, {decision.analysis_priority}); "
                       f"{choice.reason}",
            )
            log.info("job %s study %s queued: %s", job_id, study_uid, choice.reason)
        except StateError as exc:
            log.info("job %s moved on while its series was chosen (nothing recorded): %s", job_id, exc)
        except Exception as exc:  # noqa: BLE001 - stage boundary: record and carry on
            log.exception("job %s study %s: series choice failed", job_id, study_uid)
            try:
                self.ledger.transition(job_id, JobState.COMPLETE, JobState.FAILED, f"series choice: {exc}")
            except StateError:
                pass

    def analysis_task(self, job: JobRow) -> AnalysisTask:
        """The worker's task for a QUEUED job (instances of the chosen series, route, revision)."""
        cfg = self._config()
        if job.series_instance_uid is None:
            raise TriagedError(f"job {job.id} was queued without a series")
        paths = tuple(r[0] for r in self.ledger.study_instances(job.study_instance_uid)
                      if r[2] == job.series_instance_uid)
        routed = json.loads(job.route) if job.route else {}
        policy_name = routed.get("priority_policy")
        policy = cfg.priority.policies.get(policy_name) if policy_name else None
        return AnalysisTask(
            job_id=job.id, study_uid=job.study_instance_uid, series_uid=job.series_instance_uid,
            pipeline=job.pipeline or cfg.analysis.default_pipeline,
            fallbacks=tuple(p for p in routed.get("pipelines", ()) if p != job.pipeline),
            spool_root=str(self.spool.root),
            instance_paths=paths, work_dir=str(self.spool.work_dir(job.id)),
            level=routed.get("analysis_priority", "ROUTINE"),
            device=cfg.analysis.device, threads=cfg.analysis.threads, registry=cfg.analysis.registry,
            encode=bool(routed.get("destinations")), revision=job.revision,
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

    def analysis_wanted(self, job_id: int) -> bool:
        """Whether a running analysis (or its encoding) is still needed (False once its job was superseded)."""
        try:
            return self.ledger.job(job_id).state in (JobState.ANALYSING, JobState.ENCODING)
        except TriagedError:
            return True  # a ledger hiccup is no reason to throw the work away

    def start_encoding(self, task: AnalysisTask, started: EncodingStarted) -> bool:
        """ANALYSING → ENCODING with findings and priority, when the worker starts encoding.

        Returns False when the job moved on (nothing is recorded; the worker is stopped).
        """
        return self._record(task, started.findings_json, started.priority, started.seconds, started.peak_rss_mb)

    def finish_analysis(self, task: AnalysisTask, outcome: TaskOutcome) -> None:
        """Record the outcome: the outputs go to the outbox (ENCODING → DISPATCHING), or the failure.

        Findings and priority were recorded when encoding started; a task that encodes nothing
        records them here (ANALYSING → ENCODING → DISPATCHING).
        """
        state = self._state(task.job_id)
        if not outcome.ok:
            log.error("job %s study %s: %s", task.job_id, task.study_uid, outcome.error)
            self._fail(task.job_id, state if state is JobState.ENCODING else JobState.ANALYSING, outcome.error)
            return
        if state is not JobState.ENCODING and not self._record(
            task, outcome.findings_json, outcome.priority, outcome.seconds, outcome.peak_rss_mb
        ):
            return
        self._dispatch.enqueue_outputs(self.ledger.job(task.job_id), outcome.outputs)

    def _record(self, task: AnalysisTask, findings_json: str, priority: tuple[float, str, str] | None,
                seconds: float, peak_rss_mb: float) -> bool:
        findings = findings_from_json(findings_json)
        summary = (f"{findings.pipeline} {findings.pipeline_version}: {findings.ct_grade.name}, "
                   f"worse lung {findings.severity_pct:.1f} %, whole lung {findings.whole_lung_pct:.1f} % "
                   f"({seconds:.1f} s, peak {peak_rss_mb:.0f} MiB)")
        try:
            self.ledger.record_analysis(task.job_id, findings, priority=priority, detail=summary)
        except StateError as exc:  # superseded while it ran: nothing recorded, its results are not sent
            log.info("job %s finished analysis but moved on (findings not recorded): %s", task.job_id, exc)
            return False
        log.info("job %s study %s analysed: %s", task.job_id, task.study_uid, summary)
        return True

    def _state(self, job_id: int) -> JobState | None:
        try:
            return self.ledger.job(job_id).state
        except TriagedError:
            return None

    def _fail(self, job_id: int, from_state: JobState, reason: str) -> None:
        try:
            self.ledger.transition(job_id, from_state, JobState.FAILED, reason)
        except StateError as exc:
            log.info("job %s could not be marked failed: %s", job_id, exc)
