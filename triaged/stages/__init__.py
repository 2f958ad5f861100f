"""The node's stages between the adapters: complete, analyse, dispatch, recover, retention, plus the worklist.

Each stage is a small class taking the ledger, the spool and a config provider (a callable returning
the current :class:`~triaged.config.Config`, so reloads apply) and, where time matters, ``now``.  The
daemon composes them; the CLI builds only the one it needs.  Every state change goes through the
ledger's compare-and-set methods, so what a stage does is visible in ``triaged jobs`` with its reason.
"""

from triaged.stages.analyse import Analysis, StudyRead, read_study, study_facts
from triaged.stages.complete import Completion, CompletionTimers
from triaged.stages.dispatch import Destination, Dispatch, SCUDestination, backoff_seconds, retryable_status
from triaged.stages.recovery import Recovery
from triaged.stages.retention import Retention, RetentionReport
from triaged.stages.worklist import Worklist

__all__ = [
    "Analysis",
    "Completion",
    "CompletionTimers",
    "Destination",
    "Dispatch",
    "Recovery",
    "Retention",
    "RetentionReport",
    "SCUDestination",
    "Worklist",
    "backoff_seconds",
    "retryable_status",
    "study_facts",
    "read_study",
    "StudyRead",
]
