"""The analysis queue: urgent first, but waiting raises an item's standing.

:class:`TaskQueue` holds the tasks in memory (one node); :class:`ClaimQueue` claims them from the ledger
shared by every node, in the same order (:meth:`triaged.ledger.Ledger.claim_job`).

``aging_seconds`` of waiting is worth one priority level, so a stream of urgent studies cannot starve
routine ones.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from triaged.domain import PriorityLevel
from triaged.worker.task import AnalysisTask

log = logging.getLogger(__name__)

#: Queue ranks by level name: lower runs first.
RANKS = {level.value: level.rank for level in PriorityLevel}


@dataclass(order=True)
class _Entry:
    standing: float
    seq: int
    task: AnalysisTask = field(compare=False)
    enqueued: float = field(compare=False, default=0.0)


class TaskQueue:
    """A priority queue with aging: ``rank - waited / aging_seconds``, then arrival order."""

    def __init__(self, aging_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.aging_seconds = aging_seconds
        self._clock = clock
        self._items: list[_Entry] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, task: AnalysisTask) -> None:
        with self._cond:
            self._items.append(_Entry(0.0, next(self._seq), task, self._clock()))
            self._cond.notify()

    def job_ids(self) -> set[int]:
        with self._cond:
            return {e.task.job_id for e in self._items}

    def _best(self) -> _Entry:
        now = self._clock()
        for e in self._items:
            rank = RANKS.get(e.task.level, PriorityLevel.ROUTINE.rank)
            e.standing = rank - (now - e.enqueued) / self.aging_seconds
        return min(self._items)

    def get(
        self, timeout: float | None = None, claim: Callable[[AnalysisTask], None] | None = None
    ) -> AnalysisTask | None:
        """The task to run next, or None on timeout or once closed.

        ``claim`` is called with the task while the queue's lock is still held, so a caller that marks it
        running there is never seen with the task in neither place (:meth:`job_ids` takes the same lock).
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if self._closed and not self._items:
                return None
            best = self._best()
            self._items.remove(best)
            if claim is not None:
                claim(best.task)
            return best.task

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class ClaimQueue:
    """The analysis queue of a node that claims its tasks from the ledger (shared by every node).

    ``claim()`` takes the most urgent due job for this node (the ledger orders it as :class:`TaskQueue`
    does: urgent first, aging) and returns its task, or None when there is none.  Nothing waits in
    memory: :meth:`get` tries a claim at once when :meth:`nudge` was called since the last try (a job was
    queued on this node), else at most every ``poll_seconds`` (jobs queued by other nodes, retries
    coming due).  A failing ``claim`` is logged and tried again at the next poll.

    Parameters
    ----------
    claim
        Claims one job and returns its task (e.g. :meth:`triaged.stages.Analysis.claim_task`).
    poll_seconds
        The longest a queued job waits for an idle worker of this node.
    """

    def __init__(self, claim: Callable[[], AnalysisTask | None], poll_seconds: float = 1.0) -> None:
        self._claim = claim
        self.poll_seconds = poll_seconds
        self._cond = threading.Condition()
        self._nudged = True
        self._next_try = 0.0
        self._closed = False

    def nudge(self) -> None:
        """A job may be waiting: the next :meth:`get` (a waiting one at once) tries to claim it."""
        with self._cond:
            self._nudged = True
            self._cond.notify()

    def job_ids(self) -> set[int]:
        """Jobs waiting in memory: none, they wait in the ledger."""
        return set()

    def get(
        self, timeout: float | None = None, claim: Callable[[AnalysisTask], None] | None = None
    ) -> AnalysisTask | None:
        """The next claimed task, or None after ``timeout`` or once closed.

        ``claim`` is called with the task before it is returned (the pool marks it running).
        """
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while not self._closed and not self._nudged and time.monotonic() < self._next_try:
                    now = time.monotonic()
                    if end is not None and now >= end:
                        return None
                    self._cond.wait(
                        min(self._next_try, end) - now if end is not None else self._next_try - now
                    )
                if self._closed:
                    return None
                self._nudged = False
                self._next_try = time.monotonic() + self.poll_seconds
            try:
                task = self._claim()
            except Exception:  # noqa: BLE001 - a ledger hiccup: the next poll tries again
                log.exception("claiming an analysis job failed")
                task = None
            if task is not None:
                self.nudge()  # there may be more: the next get tries at once
                if claim is not None:
                    claim(task)
                return task
            if end is not None and time.monotonic() >= end:
                return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
