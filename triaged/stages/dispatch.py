"""Dispatch: the outbox, sending with capped exponential backoff and dead letters, settling, resend.

Each destination has its own sender thread, so a slow or hung peer delays only its own objects; every
acknowledgement is recorded in the ledger as the peer gives it, and :meth:`Dispatch.stop` cuts open
associations instead of waiting for their timeouts.  With ``send_at_once`` (the daemon's) a job's
outputs are started for sending as soon as they are in the outbox (:meth:`Dispatch.start_job`); a
destination still busy sends them as soon as its sender is done.  The scheduler's tick
(:meth:`Dispatch.start_due`) stays for retries and recovery.
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
from typing import Protocol

from triaged.audit import audit, peer_text
from triaged.config import Config, DestinationConfig, DispatchConfig
from triaged.domain import JobRow, JobState, OutboxEntry, OutboxState
from triaged.errors import DispatchError, StateError, TriagedError
from triaged.ledger import Ledger, OutboxRequest
from triaged.net.scu import SendResult, StopSignal, send_files
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
    """Where result objects go: one association per call, one result per path, in order."""

    def send(self, paths: Sequence[Path], dest: DestinationConfig, *, calling_ae: str, timeout: float,
             on_result: Callable[[SendResult], None], stop: StopSignal) -> list[SendResult]:
        """Send ``paths``; raise :class:`DispatchError` or ``OSError` when no association was made.

        ``on_result`` is called with each path's result, in order, as soon as the peer answers it;
        ``stop`` set means: end the association now and leave the rest unsent.
        """
        ...


class SCUDestination:
    """The real destination: DICOM C-STORE with :func:`triaged.net.scu.send_files`."""

    def send(self, paths: Sequence[Path], dest: DestinationConfig, *, calling_ae: str, timeout: float,
             on_result: Callable[[SendResult], None], stop: StopSignal) -> list[SendResult]:
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
                 destination: Destination | None = None, now: Clock = utc_now, send_at_once: bool = False) -> None:
        self.ledger = ledger
        self.spool = spool
        self._config = config
        self._destination = destination or SCUDestination()
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
        """ENCODING → DISPATCHING with one outbox item per (destination, output of a kind it takes)."""
        routed = self.ledger.route_decision(job)
        items = [
            OutboxRequest(dest.name, kind, path, sop_class, sop_uid)
            for dest in (routed.destinations if routed else ())
            for kind, path, sop_class, sop_uid in outputs
            if kind in dest.outputs
        ]
        added = self.ledger.enqueue_outbox(job.id, items)
        names = sorted({i.destination for i in items})
        try:
            self.ledger.transition(
                job.id, JobState.ENCODING, JobState.DISPATCHING,
                f"{len(outputs)} object(s) encoded; {added} queued for {', '.join(names) or 'no destination'}",
            )
        except StateError as exc:
            log.info("job %s moved on during encoding: %s", job.id, exc)
            return
        if not items:
            self.settle(job.id)
        elif self._send_at_once:
            self.start_job(job.id)

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

        Objects not acknowledged stay PENDING (their attempt is not counted) and go at the next start.
        """
        self._stop.set()
        deadline = time.monotonic() + grace_seconds
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            if not run.done.wait(max(0.0, deadline - time.monotonic())):
                log.warning("dispatch to %s did not end within %g s of the stop", run.destination, grace_seconds)

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
            due = self.ledger.outbox(states=[OutboxState.PENDING], due_before=now, job_id=job_id, limit=10000)
            by_job: dict[int, list[OutboxEntry]] = defaultdict(list)
            for item in due:
                if only is not None and item.destination != only:
                    continue
                if item.destination not in busy:
                    by_job[item.job_id].append(item)
                elif job_id is not None:
                    self._waiting.add(item.destination)  # sent when that destination's sender is done
            batches: dict[str, list[list[OutboxEntry]]] = defaultdict(list)
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
                    batches[dest].append(dest_items)
                    self._in_flight[job_id] += 1
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
            results = self._destination.send(
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
        if result.ok and result.status is not None:
            self.ledger.mark_sent(item.id, result.status)
            audit(
                "result.sent",
                f"job {item.job_id}: {item.kind} {item.sop_instance_uid} acknowledged by {dest_name} "
                f"with 0x{result.status:04X}",
                actor="node", peer=self._peer_of(dest_name), job=item.job_id, destination=dest_name,
                output=item.kind, sop_instance_uid=item.sop_instance_uid, status=f"0x{result.status:04X}",
            )  # the row is the outbox item, now SENT
            return True
        if result.status is not None and not retryable_status(result.status):
            reason = f"{dest_name} refused {item.kind} with 0x{result.status:04X} {result.comment}".strip()
            self._dead(item, reason, f"0x{result.status:04X}")
            return False
        status = f"0x{result.status:04X} " if result.status is not None else ""
        self.retry_or_dead(item, result.status, f"{dest_name}: {status}{result.comment}".strip(), now)
        return False

    def retry_or_dead(self, item: OutboxEntry, status: int | None, error: str, now: datetime) -> None:
        """One failed attempt: schedule the next with backoff, or dead-letter past ``max_age_hours``."""
        d = self._config().dispatch
        if now - item.created_at > timedelta(hours=d.max_age_hours):
            reason = f"no success for {d.max_age_hours:g} h ({item.attempts + 1} attempts); last error: {error}"
            self._dead(item, reason, f"0x{status:04X}" if status is not None else None)
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
        return peer_text(dest.host, dest.port) if dest is not None else ""

    def settle(self, job_id: int) -> None:
        """DISPATCHING → DONE, RETRY_WAIT (next attempt) or FAILED (dead letters), from the outbox."""
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
