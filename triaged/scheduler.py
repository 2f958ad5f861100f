"""Periodic work on APScheduler 3: the completion sweep (dispatch retries and retention join later)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from triaged.stages import Stages

log = logging.getLogger(__name__)


def _sweep(stages: Stages) -> None:
    try:
        stages.complete_quiet_studies()
    except Exception:  # noqa: BLE001 - a failed sweep is retried at the next tick; never kill the scheduler
        log.exception("completion sweep failed")


def _submit(submit: Callable[[], int]) -> None:
    try:
        submit()
    except Exception:  # noqa: BLE001
        log.exception("submitting queued jobs failed")


def _dispatch(stages: Stages) -> None:
    try:
        stages.dispatch_due()
    except Exception:  # noqa: BLE001 - the outbox is durable: the next tick tries again
        log.exception("dispatch failed")


def build_scheduler(
    stages: Stages,
    sweep_interval_seconds: float,
    submit: Callable[[], int] | None = None,
    dispatch_interval_seconds: float | None = None,
) -> BackgroundScheduler:
    """Completion sweep, analysis feeder and dispatcher; one run of each at a time, missed runs coalesced."""
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(
        _sweep, "interval", args=[stages], seconds=sweep_interval_seconds, id="completion-sweep",
        max_instances=1, coalesce=True, misfire_grace_time=None,
    )
    if submit is not None:
        scheduler.add_job(
            _submit, "interval", args=[submit], seconds=sweep_interval_seconds, id="submit-queued",
            max_instances=1, coalesce=True, misfire_grace_time=None,
        )
    if dispatch_interval_seconds is not None:
        scheduler.add_job(
            _dispatch, "interval", args=[stages], seconds=dispatch_interval_seconds, id="dispatch",
            max_instances=1, coalesce=True, misfire_grace_time=None,
        )
    return scheduler


def reschedule(scheduler: BackgroundScheduler, sweep_interval_seconds: float, dispatch_interval_seconds: float) -> None:
    """Apply reloaded intervals to the running jobs."""
    for job_id, seconds in (("completion-sweep", sweep_interval_seconds), ("submit-queued", sweep_interval_seconds),
                            ("dispatch", dispatch_interval_seconds)):
        if scheduler.get_job(job_id) is not None:
            scheduler.reschedule_job(job_id, trigger="interval", seconds=seconds)
