"""Complete: a study quiet for its route's completion delay becomes COMPLETE, then is routed and queued.

Each study has its own deadline, its last instance's arrival plus the delay (:class:`CompletionTimers`,
re-armed by every stored instance without touching the ledger); when it passes the study is completed
(:meth:`Completion.complete_study`).  The periodic sweep (:meth:`Completion.complete_quiet_studies`)
stays as the safety net: studies received before a restart, a timer that fired a moment too early.  Both
go through the ledger's compare-and-set transitions, so whichever comes second does nothing.

The deadline itself lives in the ledger (the study's ``last_seen`` plus its route's delay), so with several
nodes a study received by a node without the ``complete`` role (no timers) is completed by the leader's
sweep, and one received by several nodes is completed once.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
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
            if self._complete(cfg, job_id, study_uid, now, shortest) is None:
                done.append(job_id)
        return done

    def complete_study(self, study_uid: str, now: datetime | None = None) -> float | None:
        """Complete one study if it is quiet for its route's delay (a :class:`CompletionTimers` deadline).

        Returns None when there is nothing more to wait for (completed now, by someone else, or not
        receiving), else the seconds its route still wants it quiet (a route with a longer delay).
        """
        cfg = self._config()
        now = now or self._now()
        shortest = shortest_delay(cfg)
        for job_id, uid in self.ledger.quiet_jobs(now - timedelta(seconds=shortest)):
            if uid == study_uid:
                wait = self._complete(cfg, job_id, study_uid, now, shortest)
                return wait if wait else None
        return None

    def _complete(self, cfg: Config, job_id: int, study_uid: str, now: datetime, shortest: float) -> float | None:
        """RECEIVING → COMPLETE for a job quiet for ``shortest``, then its series choice.

        Returns None when the job was completed here, 0 when it was not (moved on or failed: nothing to
        wait for), or the seconds more its route wants it quiet.
        """
        try:
            read = read_study(self.ledger, self.spool, study_uid)
            decision = route(cfg, read.facts)
            if shortest < decision.completion_delay_seconds:
                quiet_since = now - timedelta(seconds=decision.completion_delay_seconds)
                if job_id not in {j for j, _ in self.ledger.quiet_jobs(quiet_since)}:
                    return decision.completion_delay_seconds - shortest  # this route waits longer
            self.ledger.transition(
                job_id, JobState.RECEIVING, JobState.COMPLETE,
                f"no instance for {decision.completion_delay_seconds:g} s; route '{decision.rule}'",
            )
        except StateError:
            return 0.0  # a late instance or another sweep got there first
        except Exception:  # noqa: BLE001 - stage boundary; retried at the next sweep
            log.exception("job %s study %s: completion failed", job_id, study_uid)
            return 0.0
        self._analysis.choose_series(job_id, study_uid, decision, read.datasets)
        return None


class CompletionTimers:
    """Per-study completion deadlines on one thread: ``note(study)`` at each stored instance re-arms it.

    Parameters
    ----------
    fire
        Called with a study whose deadline passed (:meth:`Completion.complete_study`); it returns None,
        or seconds after which to call it again.
    delay
        Seconds from an instance to its study's deadline (the shortest delay of any route: the route's
        own delay is checked when the deadline fires).
    clock
        Monotonic seconds; tests inject their own and call :meth:`run_due` instead of :meth:`start`.

    :meth:`note` is cheap (a dict update under a lock, a heap push for a new study), so the C-STORE handler
    can call it for every instance.  A study's heap entry keeps its first deadline; when it comes up and
    the study has a later one, it is pushed again for that one.
    """

    def __init__(self, fire: Callable[[str], float | None], delay: Callable[[], float], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fire = fire
        self._delay = delay
        self._clock = clock
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def note(self, study_uid: str) -> None:
        """An instance of ``study_uid`` was stored: its deadline is now plus the delay."""
        self.arm(study_uid, self._delay())

    def arm(self, study_uid: str, seconds: float) -> None:
        """Set ``study_uid``'s deadline ``seconds`` from now (later than any earlier one)."""
        deadline = self._clock() + seconds
        with self._cond:
            known = study_uid in self._due
            self._due[study_uid] = max(deadline, self._due.get(study_uid, deadline))
            if not known:
                heapq.heappush(self._heap, (deadline, study_uid))
                if self._heap[0][1] == study_uid:
                    self._cond.notify()

    def pending(self) -> dict[str, float]:
        """The studies waiting and their deadlines (on the injected clock)."""
        with self._cond:
            return dict(self._due)

    def _pop_due(self, now: float) -> list[str]:
        """Studies whose deadline has passed, removed (caller holds the lock)."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            _, study = heapq.heappop(self._heap)
            deadline = self._due.get(study)
            if deadline is None:
                continue
            if deadline > now:
                heapq.heappush(self._heap, (deadline, study))  # re-armed since: wait for the later one
                continue
            del self._due[study]
            due.append(study)
        return due

    def run_due(self) -> list[str]:
        """Fire every study whose deadline has passed (in this thread); returns them."""
        with self._cond:
            due = self._pop_due(self._clock())
        for study in due:
            self._run(study)
        return due

    def _run(self, study: str) -> None:
        try:
            again = self._fire(study)
        except Exception:  # noqa: BLE001 - the safety-net sweep completes it instead
            log.exception("study %s: completion timer failed", study)
            return
        if again:
            self.arm(study, again)

    def start(self) -> None:
        """Run the deadlines on a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name="completion-timers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                now = self._clock()
                due = self._pop_due(now)
                if not due:
                    wait = self._heap[0][0] - now if self._heap else None
                    self._cond.wait(wait)
                    continue
            for study in due:
                with self._cond:
                    if self._stopped:
                        return
                self._run(study)
