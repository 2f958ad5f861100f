"""Periodic work on APScheduler 3: the completion sweep, the analysis feeder, the dispatcher and retention.

The hand-offs between stages are events (a study's own completion deadline, a queued job offered to the
workers at once, encoded results sent at once); these periodic jobs are their safety net: studies and
jobs left by a restart, a timer that fired too early, retries after a backoff.  Each runs once at the start.

Several nodes on one ledger: the completion sweep, retention and the lease recovery (``reclaim``) are
singletons, run only while ``leader()`` says this node leads (:meth:`triaged.ledger.Ledger.is_leader`);
the heartbeat runs on every node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger(__name__)


def _leading(leader: Callable[[], bool] | None, what: str) -> bool:
    """Whether a singleton may run now (no ``leader`` check: always)."""
    if leader is None:
        return True
    try:
        return leader()
    except Exception:  # noqa: BLE001 - not knowing means not leading: another node may be
        log.exception("leader check before the %s failed", what)
        return False


def _sweep(sweep: Callable[[], object], leader: Callable[[], bool] | None = None) -> None:
    if not _leading(leader, "completion sweep"):
        return
    try:
        sweep()
    except Exception:  # noqa: BLE001 - a failed sweep is retried at the next tick; never kill the scheduler
        log.exception("completion sweep failed")


def _submit(submit: Callable[[], int]) -> None:
    try:
        submit()
    except Exception:  # noqa: BLE001
        log.exception("submitting queued jobs failed")


def _dispatch(dispatch: Callable[[], int]) -> None:
    try:
        dispatch()
    except Exception:  # noqa: BLE001 - the outbox is durable: the next tick tries again
        log.exception("dispatch failed")


def _retention(retention: Callable[[], object], leader: Callable[[], bool] | None = None) -> None:
    if not _leading(leader, "retention"):
        return
    try:
        retention()
    except Exception:  # noqa: BLE001 - nothing is lost: what is due is due again at the next run
        log.exception("retention failed")


def _heartbeat(heartbeat: Callable[[], object], reclaim: Callable[[], object] | None,
               leader: Callable[[], bool] | None) -> None:
    try:
        heartbeat()
    except Exception:  # noqa: BLE001 - the next beat tries again (the leases last several beats)
        log.exception("heartbeat failed")
    if reclaim is None or not _leading(leader, "lease recovery"):
        return
    try:
        reclaim()
    except Exception:  # noqa: BLE001 - expired leases are still expired at the next beat
        log.exception("taking back expired leases failed")


#: The feeder's longest period: jobs queued outside the node's own events (``triaged reanalyze`` from the
#: CLI, a transient failure's retry time coming due) wait at most this long for a worker.
FEEDER_MAX_SECONDS = 5.0


def feeder_seconds(sweep_interval_seconds: float) -> float:
    """Period of the analysis feeder: the sweep's, but never longer than :data:`FEEDER_MAX_SECONDS`."""
    return min(sweep_interval_seconds, FEEDER_MAX_SECONDS)


class _Scheduler(BackgroundScheduler):  # type: ignore[misc]
    """A background scheduler that runs stop hooks before it shuts down and waits for running jobs."""

    stop_hooks: list[Callable[[], None]]

    def shutdown(self, wait: bool = True) -> None:
        for hook in self.stop_hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - shutting down goes on regardless
                log.exception("stop hook failed")
        super().shutdown(wait)


def build_scheduler(
    sweep: Callable[[], object],
    sweep_interval_seconds: float,
    submit: Callable[[], int] | None = None,
    dispatch: Callable[[], int] | None = None,
    dispatch_interval_seconds: float | None = None,
    stop_dispatch: Callable[[], None] | None = None,
    retention: Callable[[], object] | None = None,
    retention_interval_seconds: float | None = None,
    *,
    leader: Callable[[], bool] | None = None,
    heartbeat: Callable[[], object] | None = None,
    heartbeat_interval_seconds: float | None = None,
    reclaim: Callable[[], object] | None = None,
) -> BackgroundScheduler:
    """Completion sweep, analysis feeder and dispatcher; one run of each at a time, missed runs coalesced.

    The sweep, the feeder and the dispatcher run first when the scheduler starts, then every interval.

    ``sweep``, ``submit`` and ``dispatch`` are the stages' entry points (no arguments); a failing run is
    logged and retried at the next tick.  ``dispatch`` should only start the sending (one sender per
    destination, :meth:`~triaged.stages.Dispatch.start_due`) so a slow destination never holds the tick;
    ``stop_dispatch`` (:meth:`~triaged.stages.Dispatch.stop`) is called first when the scheduler shuts
    down, so a stop does not wait for a peer's timeouts.  ``retention``
    (:meth:`~triaged.stages.Retention.run_scheduled`) runs every ``retention_interval_seconds``, the first
    time one minute after the start (or one interval, when shorter).

    ``leader`` (:meth:`~triaged.ledger.Ledger.is_leader`), when given, is asked before each run of the
    sweep, retention and ``reclaim``: they run on the leader only.  ``heartbeat`` runs every
    ``heartbeat_interval_seconds`` (first at the start), followed on the leader by ``reclaim``
    (:meth:`~triaged.ledger.Ledger.reclaim_expired`).
    """
    scheduler = _Scheduler(timezone="UTC")
    scheduler.stop_hooks = [stop_dispatch] if stop_dispatch is not None else []
    at_start = datetime.now(UTC)
    scheduler.add_job(
        _sweep, "interval", args=[sweep, leader], seconds=sweep_interval_seconds, id="completion-sweep",
        max_instances=1, coalesce=True, misfire_grace_time=None, next_run_time=at_start,
    )
    if submit is not None:
        scheduler.add_job(
            _submit, "interval", args=[submit], seconds=feeder_seconds(sweep_interval_seconds), id="submit-queued",
            max_instances=1, coalesce=True, misfire_grace_time=None, next_run_time=at_start,
        )
    if dispatch is not None and dispatch_interval_seconds is not None:
        scheduler.add_job(
            _dispatch, "interval", args=[dispatch], seconds=dispatch_interval_seconds, id="dispatch",
            max_instances=1, coalesce=True, misfire_grace_time=None, next_run_time=at_start,
        )
    if retention is not None and retention_interval_seconds is not None:
        first = datetime.now(UTC) + timedelta(seconds=min(60.0, retention_interval_seconds))
        scheduler.add_job(
            _retention, "interval", args=[retention, leader], seconds=retention_interval_seconds, id="retention",
            max_instances=1, coalesce=True, misfire_grace_time=None, next_run_time=first,
        )
    if heartbeat is not None and heartbeat_interval_seconds is not None:
        scheduler.add_job(
            _heartbeat, "interval", args=[heartbeat, reclaim, leader], seconds=heartbeat_interval_seconds,
            id="heartbeat", max_instances=1, coalesce=True, misfire_grace_time=None, next_run_time=at_start,
        )
    return scheduler


def reschedule(
    scheduler: BackgroundScheduler,
    sweep_interval_seconds: float,
    dispatch_interval_seconds: float,
    retention_interval_seconds: float | None = None,
) -> None:
    """Apply reloaded intervals to the running jobs (retention's only when given)."""
    intervals = [("completion-sweep", sweep_interval_seconds), ("submit-queued", feeder_seconds(sweep_interval_seconds)),
                 ("dispatch", dispatch_interval_seconds)]
    if retention_interval_seconds is not None:
        intervals.append(("retention", retention_interval_seconds))
    for job_id, seconds in intervals:
        if scheduler.get_job(job_id) is not None:
            scheduler.reschedule_job(job_id, trigger="interval", seconds=seconds)
