"""The analysis queue: urgent first, but waiting raises an item's standing.

``aging_seconds`` of waiting is worth one priority level, so a stream of urgent studies cannot starve
routine ones.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from triaged.domain import PriorityLevel
from triaged.worker.task import AnalysisTask

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
