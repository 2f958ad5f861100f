"""The one error hierarchy of triaged.

Every error that crosses a module boundary is a :class:`TriagedError`. ``retryable`` tells the stage
that catches it whether the same work may succeed later (a peer that is down, a full disk) or never
will (a dataset without a Study Instance UID).
"""

from __future__ import annotations


class TriagedError(Exception):
    """Base class; ``retryable`` says whether trying again later may succeed."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class ConfigError(TriagedError):
    """The configuration is invalid; ``problems`` lists every error as ``(yaml path, message)``."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {path}: {msg}" for path, msg in problems)
        super().__init__(f"{source}: {len(problems)} error(s)\n{lines}")


class InvalidDatasetError(TriagedError):
    """A received or stored dataset cannot be understood (missing UIDs, undecodable bytes)."""


class StorageError(TriagedError):
    """The spool or ledger could not persist something; usually retryable (disk full, read-only)."""

    retryable = True


class AssemblyError(TriagedError):
    """No series of a study can be analysed, or the chosen one cannot be read into a volume."""


class StateError(TriagedError):
    """A job transition was attempted from a state the job is not in."""


class DispatchError(TriagedError):
    """A C-STORE to a destination failed; ``retryable`` tells whether to schedule another attempt."""

    retryable = True
