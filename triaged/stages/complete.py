"""Complete: a study quiet for its route's completion delay becomes COMPLETE, then is routed and queued."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from triaged.config import Config
from triaged.domain import JobState
from triaged.errors import StateError
from triaged.ledger import Ledger
from triaged.routing import route
from triaged.spool import Spool
from triaged.stages._common import Clock, ConfigProvider, utc_now
from triaged.stages.analyse import Analysis, read_study

log = logging.getLogger(__name__)


def shortest_delay(cfg: Config) -> float:
    """The shortest completion delay any route can have: studies quieter than this are looked at."""
    delays = [cfg.completion.delay_seconds,
              *(r.action.completion_delay_seconds for r in cfg.routing.rules if r.action.completion_delay_seconds)]
    if cfg.routing.default.completion_delay_seconds:
        delays.append(cfg.routing.default.completion_delay_seconds)
    return min(delays)


class Completion:
    """RECEIVING → COMPLETE once a study is quiet for its route's delay; then hands it to :class:`Analysis`."""

    def __init__(self, ledger: Ledger, spool: Spool, config: ConfigProvider, analysis: Analysis, *,
                 now: Clock = utc_now) -> None:
        self.ledger = ledger
        self.spool = spool
        self._config = config
        self._analysis = analysis
        self._now = now

    def complete_quiet_studies(self, now: datetime | None = None) -> list[int]:
        """Complete studies quiet for their route's completion delay, then route, choose and queue them.

        Returns the ids of the jobs that were completed.
        """
        cfg = self._config()
        now = now or self._now()
        shortest = shortest_delay(cfg)
        done = []
        for job_id, study_uid in self.ledger.quiet_jobs(now - timedelta(seconds=shortest)):
            try:
                read = read_study(self.ledger, self.spool, study_uid)
                decision = route(cfg, read.facts)
                if shortest < decision.completion_delay_seconds:
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
            self._analysis.choose_series(job_id, study_uid, decision, read.datasets)
        return done
