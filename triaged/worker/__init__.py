"""Analysis worker processes fed by a priority queue.

:mod:`~triaged.worker.queue`
    The queue: urgent first, aged by waiting (:class:`TaskQueue`).
:mod:`~triaged.worker.task`
    What a worker process runs for one job and what comes back (:class:`AnalysisTask`,
    :class:`EncodingStarted`, :class:`TaskOutcome`).
:mod:`~triaged.worker.pool`
    The processes and their supervision: timeouts, memory guard, crashes (:class:`WorkerPool`).

The pipeline registry a task names is loaded by :func:`triaged.analysis.registry.load_registry`
(re-exported here).
"""

from triaged.analysis.registry import load_registry
from triaged.worker.pool import WorkerPool, WorkerProcess, WorkerSettings
from triaged.worker.queue import RANKS, TaskQueue
from triaged.worker.task import (
    AnalysisTask,
    EncodedOutput,
    EncodingStarted,
    PriorityResult,
    TaskOutcome,
    output_kind,
    registry_for,
)

__all__ = [
    "RANKS",
    "AnalysisTask",
    "EncodedOutput",
    "EncodingStarted",
    "PriorityResult",
    "TaskOutcome",
    "TaskQueue",
    "WorkerPool",
    "WorkerProcess",
    "WorkerSettings",
    "load_registry",
    "output_kind",
    "registry_for",
]
