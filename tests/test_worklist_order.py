"""Worklist order and the waiting flag (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from triaged.domain import WorklistRow
from triaged.priority import order_worklist

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _row(uid: str, level: str | None, score: float | None, arrived_min_ago: float, state: str = "DONE",
         result: bool = True) -> WorklistRow:
    arrived = NOW - timedelta(minutes=arrived_min_ago)
    return WorklistRow(uid, "", "", "", arrived, 1, state, level, score, "", arrived + timedelta(minutes=1)
                       if result else None)


def test_levels_first_then_score_then_arrival_and_unprioritised_last() -> None:
    rows = [
        _row("routine-old", "ROUTINE", 0.1, 50),
        _row("waiting", None, None, 80, state="ANALYSING", result=False),
        _row("stat-low", "STAT", 0.6, 5),
        _row("urgent", "URGENT", 0.9, 10),
        _row("stat-high", "STAT", 0.8, 1),
        _row("routine-new-same-score", "ROUTINE", 0.1, 20),
    ]
    order = [r.study_instance_uid for r in order_worklist(rows, NOW, None)]
    assert order == ["stat-high", "stat-low", "urgent", "routine-old", "routine-new-same-score", "waiting"]


def test_studies_without_a_result_past_the_threshold_are_flagged_overdue() -> None:
    rows = [
        _row("late", None, None, 90, state="ANALYSING", result=False),
        _row("fresh", None, None, 5, state="RECEIVING", result=False),
        _row("done", "ROUTINE", 0.1, 300),
        _row("ignored", None, None, 300, state="IGNORED", result=False),
    ]
    flagged = {r.study_instance_uid for r in order_worklist(rows, NOW, 60) if r.overdue}
    assert flagged == {"late"}
    assert not any(r.overdue for r in order_worklist(rows, NOW, None))
