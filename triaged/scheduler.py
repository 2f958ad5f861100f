"""Periodic work on APScheduler 3: the completion sweep (dispatch retries and retention join later)."""

from __future__ import annotations

import logging

from apscheduler.schedulers.background import BackgroundScheduler

from triaged.stages import Stages

log = logging.getLogger(__name__)


def _sweep(stages: Stages) -> None:
    try:
        stages.complete_quiet_studies()
    except Exception:  # noqa: BLE001 - a failed sweep is retried at the next tick; never kill the scheduler
        log.exception("completion sweep failed")


def build_scheduler(stages: Stages, sweep_interval_seconds: float) -> BackgroundScheduler:
    """A scheduler with the completion sweep; one run at a time, missed runs coalesced."""
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(
        _sweep, "interval", args=[stages], seconds=sweep_interval_seconds, id="completion-sweep",
        max_instances=1, coalesce=True, misfire_grace_time=None,
    )
    return scheduler


def reschedule_sweep(scheduler: BackgroundScheduler, sweep_interval_seconds: float) -> None:
    scheduler.reschedule_job("completion-sweep", trigger="interval", seconds=sweep_interval_seconds)
