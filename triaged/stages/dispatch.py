"""Dispatch: the outbox, sending with capped exponential backoff and dead letters, settling, resend.

Each destination has its own sender thread, so a slow or hung peer delays only its own objects; every
acknowledgement is recorded in the ledger as the peer gives it, and :meth:`Dispatch.stop` cuts open
associations instead of waiting for their timeouts.  With ``send_at_once`` (the daemon's) a job's
outputs are started for sending as soon as they are in the outbox (:meth:`Dispatch.start_job`); a
destination still busy sends them as soon as its sender is done.  The scheduler's tick
(:meth:`Dispatch.start_due`) stays for retries and recovery.

Outbox rows are claimed before they are sent (:meth:`~triaged.ledger.Ledger.claim_outbox`, a lease in
the name of ``node``), so several nodes sharing a ledger never send the same row; a node that dies loses
its claims when their lease runs out, and another node sends the rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from triaged.audit import audit, peer_text
from triaged.config import Config, DestinationConfig, DispatchConfig
from triaged.config.schema import NOTIFICATION_TYPES, AnyDestinationConfig, HL7DestinationConfig
from triaged.domain import (
    NOTIFY_KIND,
    JobRow,
    JobState,
    OutboxEntry,
    OutboxState,
    PriorityLevel,
    p_covid_text,
)
from triaged.errors import DispatchError, StateError, TriagedError
from triaged.ledger import Ledger, OutboxRequest
from triaged.net.hl7v2 import HL7Destination
from triaged.net.notify import Delivery, Notification
from triaged.net.scu import SendResult, StopSignal, send_files
from triaged.net.stow import StowDestination
from triaged.net.webhook import WebhookDestination
from triaged.routing import RouteDecision, RouteTarget
from triaged.spool import Spool
from triaged.stages._common import Clock, ConfigProvider, utc_now

log = logging.getLogger(__name__)

#: One encoded object: (kind, path relative to the spool root, SOP Class UID, SOP Instance UID).
Output = tuple[str, str, str, str]

#: How long :meth:`Dispatch.stop` waits for the senders it has cut before leaving them behind.
STOP_GRACE_SECONDS = 5.0


def backoff_seconds(attempts: int, d: DispatchConfig) -> float:
    """Delay before the next attempt after ``attempts`` failed ones: capped exponential backoff.

    ``base_delay_seconds * multiplier ** attempts``, at most ``max_delay_seconds``.
    """
    return float(min(d.max_delay_seconds, d.base_delay_seconds * d.multiplier ** attempts))


def retryable_status(status: int) -> bool:
    """PS3.4 B.2.3: 0xA7xx (out of resources) may succeed later; 0xA9xx and 0xCxxx never will."""
    return (status & 0xFF00) == 0xA700


class Destination(Protocol):
    """Where outbox items go: one association (request, connection) per call, one result per path, in order.

    Each destination type has its class: :class:`SCUDestination` (``dicom``),
    :class:`~triaged.net.stow.StowDestination` (``stow-rs``), :class:`~triaged.net.webhook.WebhookDestination`
    (``webhook``) and :class:`~triaged.net.hl7v2.HL7Destination` (``hl7``); the last two are given the
    notification file of :class:`~triaged.net.notify.Notification` as their path.  A result that is a
    :class:`~triaged.net.notify.Delivery` says itself whether it was delivered or refused for good; a
    plain :class:`SendResult` is read as a DICOM status.
    """

    def send(self, paths: Sequence[Path], dest: AnyDestinationConfig, *, calling_ae: str, timeout: float,
             on_result: Callable[[SendResult], None], stop: StopSignal) -> list[SendResult]:
        """Send ``paths``; raise :class:`DispatchError` or ``OSError` when no association was made.

        ``on_result`` is called with each path's result, in order, as soon as the peer answers it;
        ``stop`` set means: end the association now and leave the rest unsent.
        """
        ...


def _notifies(job: JobRow, dest: AnyDestinationConfig) -> bool:
    """True when ``job``'s priority level is ``dest.min_priority`` or more urgent (no level: ROUTINE)."""
    minimum = getattr(dest, "min_priority", PriorityLevel.ROUTINE)
    try:
        level = PriorityLevel(job.priority_level or PriorityLevel.ROUTINE.value)
    except ValueError:
        level = PriorityLevel.ROUTINE
    return level.rank <= PriorityLevel(minimum).rank


def _status_text(result: SendResult) -> str:
    """How a result's status reads: ``HTTP 200`` / ``ACK AA`` for a :class:`Delivery`, ``0x0000`` for DICOM."""
    if isinstance(result, Delivery):
        return result.label or (str(result.status) if result.status is not None else "")
    return f"0x{result.status:04X}" if result.status is not None else ""


class SCUDestination:
    """The real destination: DICOM C-STORE with :func:`triaged.net.scu.send_files`."""

    def send(self, paths: Sequence[Path], dest: AnyDestinationConfig, *, calling_ae: str, timeout: float,
             on_result: Callable[[SendResult], None], stop: StopSignal) -> list[SendResult]:
        if not isinstance(dest, DestinationConfig):
            raise DispatchError(f"a C-STORE sender was given a {dest.type} destination")
        return send_files(paths, dest.host, dest.port, dest.ae_title,
                          calling_ae=dest.calling_ae_title or calling_ae, timeout=timeout,
                          on_result=on_result, stop=stop, tls=dest.tls)


@dataclass(eq=False)
class _Run:
    """One destination's sender: its batches (one per job, one association each) and what it delivered."""

    destination: str
    batches: list[list[OutboxEntry]]
    sent: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def items(self) -> int:
        return sum(len(b) for b in self.batches)


class Dispatch:
    """ENCODING → DISPATCHING → DONE / RETRY_WAIT / FAILED, from a durable outbox."""

    def __init__(self, ledger: Ledger, spool: Spool, config: ConfigProvider, *,
                 destination: Destination | None = None, now: Clock = utc_now, send_at_once: bool = False,
                 node: str = "local", lease_seconds: float = 60.0) -> None:
        self.ledger = ledger
        #: The name outbox rows are claimed in, and how long a claim lasts without a heartbeat.
        self.node = node
        self.lease_seconds = lease_seconds
        self.spool = spool
        self._config = config
        #: The sender of each destination type; ``destination`` replaces the C-STORE one (tests).
        self._senders: dict[str, Destination] = {
            "dicom": destination or SCUDestination(),
            "stow-rs": StowDestination(),
            "webhook": WebhookDestination(),
            "hl7": HL7Destination(),
        }
        self._now = now
        self._send_at_once = send_at_once
        self._stop = StopSignal()
        #: Guards the three below and settling, so a job is settled once, when none of its batches is out.
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._in_flight: dict[int, int] = defaultdict(int)
        #: Destinations that had new items while their sender was busy: started again when it is done.
        self._waiting: set[str] = set()

    def enqueue_outputs(self, job: JobRow, outputs: tuple[Output, ...]) -> None:
        """ENCODING → DISPATCHING with one outbox item per (destination, output of a kind it takes).

        A notification destination (``webhook``, ``hl7``) gets one item instead, the job's notification,
        when the job's priority level is ``min_priority`` or more urgent; below it, none.
        """
        routed = self.ledger.route_decision(job)
        configured = self._config().destinations
        items: list[OutboxRequest] = []
        quiet: list[str] = []
        notification: str | None = None
        for target in routed.destinations if routed else ():
            dest = configured.get(target.name)
            if dest is None or dest.type not in NOTIFICATION_TYPES:
                items += [OutboxRequest(target.name, kind, path, sop_class, sop_uid)
                          for kind, path, sop_class, sop_uid in outputs if kind in target.outputs]
                continue
            if not _notifies(job, dest):
                quiet.append(f"{target.name} (below {getattr(dest, 'min_priority', '')})")
                continue
            notification = notification or self._write_notification(job)
            items.append(OutboxRequest(target.name, NOTIFY_KIND, notification, "", job.study_instance_uid))
        added = self.ledger.enqueue_outbox(job.id, items)
        names = sorted({i.destination for i in items})
        not_notified = f"; not notified: {', '.join(quiet)}" if quiet else ""
        try:
            self.ledger.transition(
                job.id, JobState.ENCODING, JobState.DISPATCHING,
                f"{len(outputs)} object(s) encoded; {added} queued for {', '.join(names) or 'no destination'}"
                + not_notified,
            )
        except StateError as exc:
            log.info("job %s moved on during encoding: %s", job.id, exc)
            return
        if not items:
            self.settle(job.id)
        elif self._send_at_once:
            self.start_job(job.id)

    def _write_notification(self, job: JobRow) -> str:
        """Write the job's notification into its work folder; returns its path relative to the spool."""
        findings = self.ledger.findings(job.id)
        header = self._study_header(job.study_instance_uid)

        def text(keyword: str) -> str:
            return str(header.get(keyword, "") or "") if header is not None else ""

        n = Notification(
            job_id=job.id, study_instance_uid=job.study_instance_uid, accession_number=text("AccessionNumber"),
            priority_level=job.priority_level or PriorityLevel.ROUTINE.value,
            priority_reasons=job.priority_reasons, pipeline=job.pipeline or "",
            p_covid_text=p_covid_text(findings.p_covid) if findings is not None else None,
            severity_pct=round(findings.severity_pct, 2) if findings is not None else None,
            whole_lung_pct=round(findings.whole_lung_pct, 2) if findings is not None else None,
            ct_grade=findings.ct_grade.name if findings is not None else None,
            created_at=self._now().isoformat(), patient_id=text("PatientID"), patient_name=text("PatientName"),
            study_date=text("StudyDate"), study_description=text("StudyDescription"),
        )
        rel = f"work/{job.id}/notification.json"
        n.write(self.spool.absolute(rel))
        return rel

    def _study_header(self, study_uid: str) -> Any:
        """Header of a study's first readable stored instance (patient and study attributes), or None."""
        for path, *_ in self.ledger.study_instances(study_uid)[:3]:
            try:
                return dcmread(self.spool.absolute(path), stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - try the next file
                continue
        return None

    def enqueue_ignored_report(self, job_id: int, reason: str, decision: RouteDecision | None) -> int:
        """Queue the "not analysed" SR of an IGNORED job for its study's SR destinations.

        ``dispatch.ignored_report: none`` sends nothing.  The destinations are the route's (a study
        without a usable series), else routing's default ones (a study a rule ignored has none of its
        own); only those whose outputs include ``sr``, and no notification destination.  Never raises:
        an IGNORED study is recorded whatever happens here.  Returns how many items were queued.
        """
        from triaged import __version__
        from triaged.encode import OutputContext
        from triaged.encode.notice import build_ignored_sr

        cfg = self._config()
        if cfg.dispatch.ignored_report != "sr":
            return 0
        try:
            job = self.ledger.job(job_id)
            targets = decision.destinations if decision is not None and decision.destinations else ()
            if not targets:  # routing's default destinations, as triaged.routing.route gives them
                default = cfg.routing.default.destinations
                targets = (tuple(RouteTarget(t.name, t.outputs) for t in default) if default is not None
                           else tuple(RouteTarget(n) for n in cfg.destinations))
            names = [t.name for t in targets if "sr" in t.outputs
                     and getattr(cfg.destinations.get(t.name), "type", "dicom") not in NOTIFICATION_TYPES]
            header = self._study_header(job.study_instance_uid)
            if not names or header is None:
                return 0
            sr = build_ignored_sr(header, reason, OutputContext(software_version=__version__,
                                                                revision=job.revision))
            rel = f"work/{job.id}/outputs/sr-{sr.SOPInstanceUID}.dcm"
            buffer = DicomBytesIO()
            sr.save_as(buffer, enforce_file_format=True)
            self.spool.store_instance(rel, buffer.getvalue())
            added = self.ledger.enqueue_outbox(
                job.id, [OutboxRequest(n, "sr", rel, str(sr.SOPClassUID), str(sr.SOPInstanceUID)) for n in names]
            )
        except Exception:  # noqa: BLE001 - the study stays IGNORED; the report is a courtesy
            log.exception("job %s: could not queue the 'not analysed' SR", job_id)
            return 0
        log.info("job %s: 'not analysed' SR queued for %s", job_id, ", ".join(names))
        if self._send_at_once:
            self.start_job(job_id)
        return added

    def start_job(self, job_id: int) -> int:
        """Start sending a job's due items now, to each idle destination; do not wait.

        A destination whose sender is busy takes them as soon as it is done.  Returns how many items
        were handed to senders.  Safe beside the tick: items are claimed under one lock.
        """
        return sum(run.items for run in self._start(None, job_id=job_id))

    def dispatch_due(self, now: datetime | None = None) -> int:
        """Send every due outbox item and wait for the senders; returns items sent.

        Destinations are sent to concurrently; one whose sender is still busy (started by
        :meth:`start_due`) is left for a later call.
        """
        runs = self._start(now)
        for run in runs:
            run.done.wait()
        return sum(run.sent for run in runs)

    def start_due(self, now: datetime | None = None) -> int:
        """The scheduler's tick: start a sender for each idle destination with due items; do not wait.

        Returns how many items were handed to senders.  A destination that does not answer holds only
        its own sender: the next tick serves every other destination as usual.
        """
        return sum(run.items for run in self._start(now))

    def stop(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        """Stop for good: start nothing more, cut open associations, wait up to ``grace_seconds``.

        Objects not acknowledged stay PENDING (their attempt is not counted) and go at the next start; their
        claims are given back at once, so another node may send them.
        """
        self._stop.set()
        deadline = time.monotonic() + grace_seconds
        with self._lock:
            runs = list(self._runs.values())
        finished = True
        for run in runs:
            if not run.done.wait(max(0.0, deadline - time.monotonic())):
                finished = False
                log.warning("dispatch to %s did not end within %g s of the stop", run.destination, grace_seconds)
        if finished:  # else a sender left behind may still record an answer: its claims expire instead
            try:
                self.ledger.release_outbox(node=self.node)
            except TriagedError as exc:
                log.warning("dispatch: could not give back the outbox claims of node %s: %s", self.node, exc)

    def _start(self, now: datetime | None, *, job_id: int | None = None,
               only: str | None = None) -> list[_Run]:
        """Claim the due items of idle destinations, one batch per (destination, job), and start senders.

        ``job_id``: only that job's items; ``only``: only that destination's.
        """
        cfg = self._config()
        now = now or self._now()
        with self._lock:
            if self._stop.is_set():
                return []
            busy = {name for name, run in self._runs.items() if not run.done.is_set()}
            if job_id is not None and busy:
                for item in self.ledger.outbox(states=[OutboxState.PENDING], due_before=now, job_id=job_id):
                    if item.destination in busy and (only is None or item.destination == only):
                        self._waiting.add(item.destination)  # sent when that destination's sender is done
            due = self.ledger.claim_outbox(self.node, self.lease_seconds, now=now, job_id=job_id, only=only,
                                           exclude=busy)
            by_job: dict[int, list[OutboxEntry]] = defaultdict(list)
            for item in due:
                by_job[item.job_id].append(item)
            batches: dict[str, list[list[OutboxEntry]]] = defaultdict(list)
            unsent: list[int] = []
            for job_id, items in by_job.items():
                job = self.ledger.job(job_id)
                if job.state is JobState.RETRY_WAIT:
                    try:
                        self.ledger.transition(job_id, JobState.RETRY_WAIT, JobState.DISPATCHING,
                                               f"retrying {len(items)} object(s)")
                    except StateError:
                        unsent += [i.id for i in items]
                        continue
                elif job.state not in (JobState.DISPATCHING, JobState.IGNORED):  # IGNORED: "not analysed" SR
                    unsent += [i.id for i in items]
                    continue
                by_dest: dict[str, list[OutboxEntry]] = defaultdict(list)
                for item in items:
                    by_dest[item.destination].append(item)
                for dest, dest_items in by_dest.items():
                    batches[dest].append(dest_items)
                    self._in_flight[job_id] += 1
            if unsent:
                self.ledger.release_outbox(unsent)
            runs = [_Run(dest, dest_batches) for dest, dest_batches in batches.items()]
            for run in runs:
                self._runs[run.destination] = run
        for run in runs:
            threading.Thread(target=self._run, args=(cfg, run, now), name=f"dispatch-{run.destination}",
                             daemon=True).start()
        return runs

    def _run(self, cfg: Config, run: _Run, now: datetime) -> None:
        """A destination's sender: its batches in turn, each job settled as soon as its last batch is done."""
        try:
            for batch in run.batches:
                try:
                    if not self._stop.is_set():
                        run.sent += self._send(cfg, run.destination, batch, now)
                except Exception:  # noqa: BLE001 - the outbox is durable: a later tick tries again
                    log.exception("dispatch to %s failed", run.destination)
                finally:
                    self._give_back(batch)
                    self._batch_done(batch[0].job_id)
        finally:
            run.done.set()
        with self._lock:
            again = run.destination in self._waiting and not self._stop.is_set()
            self._waiting.discard(run.destination)
        if again:
            try:
                self._start(None, only=run.destination)
            except Exception:  # noqa: BLE001 - the tick sends them instead
                log.exception("dispatch to %s: could not start the items that came meanwhile", run.destination)

    def _give_back(self, batch: list[OutboxEntry]) -> None:
        """Release the claims of a batch's rows that got no outcome (a stop, an error): sent again later."""
        try:
            self.ledger.release_outbox([i.id for i in batch], node=self.node)
        except Exception:  # noqa: BLE001 - the claims then expire with their lease
            log.exception("dispatch: could not give back the claims of job %s's objects", batch[0].job_id)

    def _batch_done(self, job_id: int) -> None:
        with self._lock:
            self._in_flight[job_id] -= 1
            if self._in_flight[job_id] > 0:
                return
            del self._in_flight[job_id]
            if self._stop.is_set():
                return  # left DISPATCHING: the next start sends what is still PENDING
            try:
                self.settle(job_id)
            except Exception:  # noqa: BLE001
                log.exception("settling job %s failed", job_id)

    def _send(self, cfg: Config, dest_name: str, items: list[OutboxEntry], now: datetime) -> int:
        """One association for ``items``; each answer is recorded in the ledger as it comes."""
        dest = cfg.destinations.get(dest_name)
        if dest is None:
            for item in items:
                self.retry_or_dead(item, None, f"destination {dest_name!r} is not configured", now)
            return 0
        handled = 0
        ok = 0

        def record(result: SendResult) -> None:
            nonlocal handled, ok
            item = items[handled]
            handled += 1
            ok += self._record(dest_name, item, result, now)

        try:
            results = self._senders[dest.type].send(
                [self.spool.absolute(i.path) for i in items], dest,
                calling_ae=cfg.dispatch.calling_ae_title, timeout=cfg.dispatch.timeout_seconds,
                on_result=record, stop=self._stop,
            )
        except (DispatchError, OSError) as exc:
            if self._stop.is_set():
                log.info("dispatch to %s stopped: %s", dest_name, exc)
                return ok
            for item in items[handled:]:
                self.retry_or_dead(item, None, str(exc), now)
            return ok
        if self._stop.is_set():
            log.info("dispatch to %s stopped after %d of %d object(s)", dest_name, handled, len(items))
            return ok
        for result in results[handled:]:
            record(result)  # a destination that reported less than it sent: the rest from its list
        log.info("sent %d of %d object(s) to %s", ok, len(items), dest_name)
        return ok

    def _record(self, dest_name: str, item: OutboxEntry, result: SendResult, now: datetime) -> bool:
        """One instance's answer into the outbox: SENT, dead-lettered, or retried later."""
        shown = _status_text(result)
        if result.ok:
            self.ledger.mark_sent(item.id, result.status if result.status is not None else 0)
            audit(
                "result.sent",
                f"job {item.job_id}: {item.kind} {item.sop_instance_uid} acknowledged by {dest_name} "
                f"with {shown}",
                actor="node", peer=self._peer_of(dest_name), job=item.job_id, destination=dest_name,
                output=item.kind, sop_instance_uid=item.sop_instance_uid, status=shown,
            )  # the row is the outbox item, now SENT
            return True
        if isinstance(result, Delivery):
            permanent = result.permanent
        else:
            permanent = result.status is not None and not retryable_status(result.status)
        if permanent:
            said = result.comment if shown and result.comment.startswith(shown) else f"{shown} {result.comment}"
            reason = f"{dest_name} refused {item.kind} with {said.strip()}"
            self._dead(item, reason, shown)
            return False
        status = f"{shown} " if shown else ""
        self.retry_or_dead(item, result.status, f"{dest_name}: {status}{result.comment}".strip(), now,
                           shown=shown or None)
        return False

    def retry_or_dead(self, item: OutboxEntry, status: int | None, error: str, now: datetime, *,
                      shown: str | None = None) -> None:
        """One failed attempt: schedule the next with backoff, or dead-letter past ``max_age_hours``.

        ``shown``: how ``status`` reads in the audit trail (default: as a DICOM status, ``0xA700``).
        """
        d = self._config().dispatch
        if now - item.created_at > timedelta(hours=d.max_age_hours):
            reason = f"no success for {d.max_age_hours:g} h ({item.attempts + 1} attempts); last error: {error}"
            self._dead(item, reason, shown or (f"0x{status:04X}" if status is not None else None))
            return
        self.ledger.mark_attempt_failed(item.id, status=status, error=error,
                                        next_attempt_at=now + timedelta(seconds=backoff_seconds(item.attempts, d)))

    def _dead(self, item: OutboxEntry, reason: str, status: str | None) -> None:
        """Dead-letter ``item``: the outbox row says DEAD, the audit trail says to whom, what and why."""
        self.ledger.mark_dead(item.id, reason)
        audit(
            "result.dead",
            f"job {item.job_id}: dead-lettered {item.kind} {item.sop_instance_uid} for {item.destination}: "
            f"{reason}",
            actor="node", peer=self._peer_of(item.destination), recorder=self.ledger, level=logging.ERROR,
            job=item.job_id, destination=item.destination, output=item.kind,
            sop_instance_uid=item.sop_instance_uid, status=status, reason=reason,
        )

    def _peer_of(self, dest_name: str) -> str:
        """``host:port`` of a configured destination, for the audit trail ("" when no longer configured)."""
        dest = self._config().destinations.get(dest_name)
        if dest is None:
            return ""
        if isinstance(dest, DestinationConfig | HL7DestinationConfig):
            return peer_text(dest.host, dest.port)
        url = urlsplit(dest.url)
        return peer_text(url.hostname or "", url.port or (443 if url.scheme == "https" else 80))

    def settle(self, job_id: int) -> None:
        """DISPATCHING → DONE, RETRY_WAIT (next attempt) or FAILED (dead letters), from the outbox.

        An IGNORED job stays IGNORED whatever became of its "not analysed" SR (retried or dead-lettered).
        """
        if self.ledger.job(job_id).state is JobState.IGNORED:
            return
        if self.ledger.outbox_held_elsewhere(job_id, self.node, self._now()):
            return  # another node is sending some of its objects: it settles the job when done
        items = self.ledger.outbox(job_id=job_id)
        pending = [i for i in items if i.state == OutboxState.PENDING]
        dead = [i for i in items if i.state == OutboxState.DEAD]
        sent = [i for i in items if i.state == OutboxState.SENT]
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
        purged = self.ledger.purged_at(job.study_instance_uid)
        if purged is not None:
            raise TriagedError(
                f"job {job_id} cannot be re-sent: retention deleted the files of study {job.study_instance_uid} "
                f"on {purged:%Y-%m-%d %H:%M} UTC, its result objects with them"
            )
        if job.state not in (JobState.DONE, JobState.FAILED, JobState.RETRY_WAIT, JobState.DISPATCHING):
            raise TriagedError(f"job {job_id} is {job.state.value}; only a job past encoding can be re-sent")
        count = self.ledger.requeue_outbox(job_id)
        if count == 0:
            raise TriagedError(f"job {job_id} has no encoded outputs to send")
        if job.state in (JobState.DONE, JobState.FAILED):
            self.ledger.transition(job_id, job.state, JobState.DISPATCHING, f"resend of {count} object(s) requested")
        return count
