"""Glue between the adapters: completion, routing, series choice, analysis, dispatch, recovery.

Every state change goes through :meth:`Ledger.transition`, so what this module does is visible in
``triaged jobs`` with its reason.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from triaged.assembly import select_series
from triaged.config import Config
from triaged.domain import InstanceRecord, JobRow, JobState, OutboxEntry, WorklistRow, findings_from_json
from triaged.encode.uids import output_uids
from triaged.errors import DispatchError, StateError, TriagedError
from triaged.ledger import Ledger
from triaged.net.scu import send_files
from triaged.priority import order_worklist
from triaged.routing import RouteDecision, StudyFacts, attributes_of, route
from triaged.spool import Spool, validate_uid
from triaged.volume import read_headers
from triaged.worker import AnalysisTask, TaskOutcome, TaskQueue

log = logging.getLogger(__name__)


def route_to_json(decision: RouteDecision) -> str:
    """The parts of a routing decision a job needs later (pipelines, destinations, policy)."""
    data = asdict(decision)
    data.pop("explanation", None)
    return json.dumps(data)


class Stages:
    """The node's stages, sharing one ledger and spool; ``config`` is read on every call (reloads)."""

    def __init__(self, ledger: Ledger, spool: Spool, config: Callable[[], Config]) -> None:
        self.ledger = ledger
        self.spool = spool
        self._config = config

    def study_facts(self, study_uid: str) -> tuple[StudyFacts, list[str]]:
        """What routing rules match on: the sending AEs and address, study and per-series attributes.

        Reads one header per series (no pixel data); returns the facts and the relative paths read.
        """
        rows = self.ledger.study_instances(study_uid)
        firsts: dict[str, str] = {}
        for path, _sop_class, series_uid, _sop in rows:
            firsts.setdefault(series_uid, path)
        series = []
        study_attrs: dict[str, Any] = {}
        for path in firsts.values():
            try:
                ds = dcmread(self.spool.root / path, stop_before_pixels=True)
            except Exception as exc:  # noqa: BLE001 - an unreadable file is left out of routing
                log.warning("study %s: cannot read %s for routing: %s", study_uid, path, exc)
                continue
            attrs = attributes_of(ds)
            series.append(attrs)
            study_attrs = study_attrs or attrs
        calling, called, peer = self.ledger.study_source(study_uid) or ("", "", None)
        facts = StudyFacts(called_ae=called, calling_ae=calling, peer_address=peer, study=study_attrs,
                           series=tuple(series))
        return facts, [r[0] for r in rows]

    def complete_quiet_studies(self, now: datetime | None = None) -> list[int]:
        """Complete studies quiet for their route's completion delay, then route, choose and queue them.

        Returns the ids of the jobs that were completed.
        """
        cfg = self._config()
        now = now or datetime.now(UTC)
        delays = [cfg.completion.delay_seconds, *(r.action.completion_delay_seconds for r in cfg.routing.rules
                                                  if r.action.completion_delay_seconds),
                  *([cfg.routing.default.completion_delay_seconds] if cfg.routing.default.completion_delay_seconds
                    else [])]
        done = []
        for job_id, study_uid in self.ledger.quiet_jobs(now - timedelta(seconds=min(delays))):
            try:
                facts, _ = self.study_facts(study_uid)
                decision = route(cfg, facts)
                if min(delays) < decision.completion_delay_seconds:
                    quiet_since = now - timedelta(seconds=decision.completion_delay_seconds)
                    if job_id not in {j for j, _ in self.ledger.quiet_jobs(quiet_since)}:
                        continue  # this route waits longer
                self.ledger.transition(
                    job_id, JobState.RECEIVING, JobState.COMPLETE,
                    f"no instance for {decision.completion_delay_seconds:g} s; route '{decision.rule}'",
                )
            except StateError:
                continue  # a late instance or another sweep got there first
            except Exception:  # noqa: BLE001 - stage boundary; retried at the next sweep
                log.exception("job %s study %s: completion failed", job_id, study_uid)
                continue
            done.append(job_id)
            self.choose_series(job_id, study_uid, decision)
        return done

    def choose_series(self, job_id: int, study_uid: str, decision: RouteDecision | None = None) -> None:
        """COMPLETE → QUEUED with the route and chosen series, or → IGNORED with the reason."""
        cfg = self._config()
        try:
            if decision is None:
                decision = route(cfg, self.study_facts(study_uid)[0])
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
            self.ledger.set_route(job_id, route_to_json(decision))
            self.ledger.set_pipeline(job_id, decision.pipelines[0])
            self.ledger.transition(
                job_id, JobState.COMPLETE, JobState.QUEUED,
                f"route '{decision.rule}' ({decision.pipelines[0]}, {decision.analysis_priority}); {choice.reason}",
                series_instance_uid=choice.series_uid,
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

        COMPLETE: route and choose again.  ANALYSING: back to QUEUED (the analysis is re-run).
        ENCODING: the encoded objects on disk go to the outbox.  DISPATCHING/RETRY_WAIT need nothing:
        their outbox is durable and the dispatcher picks it up.
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
            self.enqueue_outputs(job, self._outputs_on_disk(job.id))

    # -- analysis and encoding -----------------------------------------------------------------
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
        """Whether a running analysis is still needed (False once its job was superseded)."""
        try:
            return self.ledger.job(job_id).state is JobState.ANALYSING
        except TriagedError:
            return True  # a ledger hiccup is no reason to throw the work away

    def finish_analysis(self, task: AnalysisTask, outcome: TaskOutcome) -> None:
        """Record findings and priority (ANALYSING → ENCODING → DISPATCHING) or the failure."""
        if not outcome.ok:
            log.error("job %s study %s: %s", task.job_id, task.study_uid, outcome.error)
            self._fail(task.job_id, JobState.ANALYSING, outcome.error)
            return
        findings = findings_from_json(outcome.findings_json)
        self.ledger.record_findings(task.job_id, findings)
        if outcome.priority is not None:
            score, level, reasons = outcome.priority
            self.ledger.set_priority(task.job_id, score=score, level=level, reasons=reasons)
        summary = (f"{findings.pipeline} {findings.pipeline_version}: {findings.ct_grade.name}, "
                   f"worse lung {findings.severity_pct:.1f} %, whole lung {findings.whole_lung_pct:.1f} % "
                   f"({outcome.seconds:.1f} s, peak {outcome.peak_rss_mb:.0f} MiB)")
        try:
            self.ledger.transition(task.job_id, JobState.ANALYSING, JobState.ENCODING, summary)
        except StateError as exc:  # superseded while it ran: its results are not sent
            log.info("job %s finished analysis but moved on: %s", task.job_id, exc)
            return
        log.info("job %s study %s analysed: %s", task.job_id, task.study_uid, summary)
        self.enqueue_outputs(self.ledger.job(task.job_id), outcome.outputs)

    def _outputs_on_disk(self, job_id: int) -> tuple[tuple[str, str, str, str], ...]:
        out = []
        folder = self.spool.work_dir(job_id) / "outputs"
        for path in sorted(folder.glob("*.dcm")) if folder.is_dir() else []:
            ds = dcmread(path, stop_before_pixels=True)
            out.append((path.name.split("-", 1)[0], path.relative_to(self.spool.root).as_posix(),
                        str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        return tuple(out)

    def enqueue_outputs(self, job: JobRow, outputs: tuple[tuple[str, str, str, str], ...]) -> None:
        """ENCODING → DISPATCHING with one outbox item per (destination, output of a kind it takes)."""
        routed = json.loads(job.route) if job.route else {}
        items = [
            (dest["name"], kind, path, sop_class, sop_uid)
            for dest in routed.get("destinations", [])
            for kind, path, sop_class, sop_uid in outputs
            if kind in dest.get("outputs", ())
        ]
        added = self.ledger.enqueue_outbox(job.id, items)
        names = sorted({i[0] for i in items})
        try:
            self.ledger.transition(
                job.id, JobState.ENCODING, JobState.DISPATCHING,
                f"{len(outputs)} object(s) encoded; {added} queued for {', '.join(names) or 'no destination'}",
            )
        except StateError as exc:
            log.info("job %s moved on during encoding: %s", job.id, exc)
            return
        if not items:
            self._settle(job.id)

    # -- dispatch ------------------------------------------------------------------------------
    def dispatch_due(self, now: datetime | None = None) -> int:
        """Send every due outbox item, one association per destination and job; returns items sent."""
        cfg = self._config()
        now = now or datetime.now(UTC)
        due = self.ledger.outbox(states=["PENDING"], due_before=now, limit=10000)
        by_job: dict[int, list[OutboxEntry]] = defaultdict(list)
        for item in due:
            by_job[item.job_id].append(item)
        sent = 0
        for job_id, items in by_job.items():
            job = self.ledger.job(job_id)
            if job.state is JobState.RETRY_WAIT:
                try:
                    self.ledger.transition(job_id, JobState.RETRY_WAIT, JobState.DISPATCHING,
                                           f"retrying {len(items)} object(s)")
                except StateError:
                    continue
            elif job.state is not JobState.DISPATCHING:
                continue
            by_dest: dict[str, list[OutboxEntry]] = defaultdict(list)
            for item in items:
                by_dest[item.destination].append(item)
            for dest, dest_items in by_dest.items():
                sent += self._send(cfg, dest, dest_items, now)
            self._settle(job_id)
        return sent

    def _send(self, cfg: Config, dest_name: str, items: list[OutboxEntry], now: datetime) -> int:
        dest = cfg.destinations.get(dest_name)
        if dest is None:
            for item in items:
                self._retry_or_dead(cfg, item, None, f"destination {dest_name!r} is not configured", now)
            return 0
        try:
            results = send_files(
                [self.spool.absolute(i.path) for i in items], dest.host, dest.port, dest.ae_title,
                calling_ae=dest.calling_ae_title or cfg.dispatch.calling_ae_title, timeout=cfg.dispatch.timeout_seconds,
            )
        except (DispatchError, OSError) as exc:
            for item in items:
                self._retry_or_dead(cfg, item, None, str(exc), now)
            return 0
        ok = 0
        for item, result in zip(items, results, strict=True):
            if result.ok and result.status is not None:
                self.ledger.mark_sent(item.id, result.status)
                ok += 1
            elif result.status is not None and not _retryable_status(result.status):
                reason = f"{dest_name} refused {item.kind} with 0x{result.status:04X} {result.comment}".strip()
                log.error("job %s: dead-lettered %s: %s", item.job_id, item.sop_instance_uid, reason)
                self.ledger.mark_dead(item.id, reason)
            else:
                status = f"0x{result.status:04X} " if result.status is not None else ""
                self._retry_or_dead(cfg, item, result.status, f"{dest_name}: {status}{result.comment}".strip(), now)
        log.info("sent %d of %d object(s) to %s", ok, len(items), dest_name)
        return ok

    def _retry_or_dead(self, cfg: Config, item: OutboxEntry, status: int | None, error: str, now: datetime) -> None:
        d = cfg.dispatch
        if now - item.created_at > timedelta(hours=d.max_age_hours):
            reason = f"no success for {d.max_age_hours:g} h ({item.attempts + 1} attempts); last error: {error}"
            log.error("job %s: dead-lettered %s for %s: %s", item.job_id, item.kind, item.destination, reason)
            self.ledger.mark_dead(item.id, reason)
            return
        delay = min(d.max_delay_seconds, d.base_delay_seconds * d.multiplier ** item.attempts)
        self.ledger.mark_attempt_failed(item.id, status=status, error=error,
                                        next_attempt_at=now + timedelta(seconds=delay))

    def _settle(self, job_id: int) -> None:
        """DISPATCHING → DONE, RETRY_WAIT (next attempt) or FAILED (dead letters), from the outbox."""
        items = self.ledger.outbox(job_id=job_id)
        pending = [i for i in items if i.state == "PENDING"]
        dead = [i for i in items if i.state == "DEAD"]
        sent = [i for i in items if i.state == "SENT"]
        try:
            if pending:
                nxt = min(i.next_attempt_at for i in pending)
                self.ledger.transition(
                    job_id, JobState.DISPATCHING, JobState.RETRY_WAIT,
                    f"{len(sent)} of {len(items)} delivered; next attempt {nxt:%H:%M:%S} UTC; "
                    f"last error: {pending[0].last_error}", next_attempt_at=nxt,
                )
            elif dead:
                self.ledger.transition(job_id, JobState.DISPATCHING, JobState.FAILED,
                                       f"dispatch: {len(dead)} object(s) dead-lettered: {dead[0].last_error}")
            else:
                dests = sorted({i.destination for i in sent})
                self.ledger.transition(job_id, JobState.DISPATCHING, JobState.DONE,
                                       f"{len(sent)} object(s) delivered to {', '.join(dests)}" if sent
                                       else "findings recorded; no destination")
        except StateError as exc:
            log.info("job %s moved on during dispatch: %s", job_id, exc)

    def resend(self, job_id: int) -> int:
        """Send a job's outputs again (``triaged resend``); returns how many objects were re-queued."""
        job = self.ledger.job(job_id)
        if job.state not in (JobState.DONE, JobState.FAILED, JobState.RETRY_WAIT, JobState.DISPATCHING):
            raise TriagedError(f"job {job_id} is {job.state.value}; only a job past encoding can be re-sent")
        count = self.ledger.requeue_outbox(job_id)
        if count == 0:
            raise TriagedError(f"job {job_id} has no encoded outputs to send")
        if job.state in (JobState.DONE, JobState.FAILED):
            self.ledger.transition(job_id, job.state, JobState.DISPATCHING, f"resend of {count} object(s) requested")
        return count

    # -- worklist ------------------------------------------------------------------------------
    def worklist(self, now: datetime | None = None) -> list[WorklistRow]:
        """The ledger's studies in reading order, overdue ones flagged (CLI, C-FIND and HTTP agree)."""
        cfg = self._config()
        return order_worklist(self.ledger.worklist(), now or datetime.now(UTC), cfg.priority.waiting_alert_minutes)

    def study_header(self, study_uid: str) -> Dataset | None:
        """Header of a study's first stored instance (patient and study attributes for C-FIND)."""
        rows = self.ledger.study_instances(study_uid)
        for path, *_ in rows[:3]:
            try:
                return dcmread(self.spool.root / path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - try the next file
                continue
        return None

    def _fail(self, job_id: int, from_state: JobState, reason: str) -> None:
        try:
            self.ledger.transition(job_id, from_state, JobState.FAILED, reason)
        except StateError as exc:
            log.info("job %s could not be marked failed: %s", job_id, exc)



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


def _retryable_status(status: int) -> bool:
    """PS3.4 B.2.3: 0xA7xx (out of resources) may succeed later; 0xA9xx and 0xCxxx never will."""
    return (status & 0xFF00) == 0xA700
