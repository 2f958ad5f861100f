"""What every stage shares: the config provider and clock types, the default clock."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from triaged.config import Config

#: Returns the current configuration (read on every call, so a reload applies at once).
ConfigProvider = Callable[[], Config]
#: Returns the current time, aware (UTC); tests inject their own.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The wall clock, aware, in UTC."""
    return datetime.now(UTC)
