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


def _analysed(reasons: str, p_covid: float | None) -> WorklistRow:
    return WorklistRow("1.2.3", "ACC", "20261123", "CT chest", NOW, 1, "DONE", "URGENT", 0.46, reasons,
                       NOW + timedelta(minutes=2), severity_pct=31.0, ct_grade=2, p_covid=p_covid)


def test_without_p_covid_the_json_and_the_study_comments_say_not_assessed() -> None:
    from triaged.config import PriorityConfig
    from triaged.domain import CTGrade, Findings, LungMeasures
    from triaged.net.worklist import row_attributes
    from triaged.priority import prioritise

    findings = Findings("classical", "1", LungMeasures(2000.0, 620.0, 0.0), LungMeasures(2000.0, 100.0, 0.0),
                        CTGrade.CT2)
    priority = prioritise(findings, PriorityConfig().policies["identification"])
    row = _analysed(priority.summary, None)
    data = row.as_dict()
    assert data["p_covid"] is None and data["p_covid_text"] == "P(COVID-19): not assessed"
    assert data["note"] == "research use only - not for diagnosis"
    comments = row_attributes(row, None)["StudyComments"]
    assert comments.startswith(
        "CT2: 31 % of the right lung affected; P(COVID-19): not assessed; ranked by severity"
    ), comments
    assert comments.endswith("Research use only - not for diagnosis.")
    assert "0.00" not in comments


def test_reasons_stored_before_the_not_assessed_wording_still_state_it() -> None:
    from triaged.net.worklist import row_attributes

    comments = row_attributes(_analysed("CT2: 31 % of the right lung affected", None), None)["StudyComments"]
    assert comments == (
        "CT2: 31 % of the right lung affected; P(COVID-19): not assessed. Research use only - not for diagnosis."
    )


def test_a_given_p_covid_is_shown_as_before() -> None:
    from triaged.net.worklist import row_attributes

    row = _analysed("CT2: 31 % of the right lung affected; P(COVID-19) 0.94", 0.94)
    assert row.as_dict()["p_covid"] == 0.94 and row.as_dict()["p_covid_text"] == "P(COVID-19) 0.94"
    assert row_attributes(row, None)["StudyComments"].startswith(
        "CT2: 31 % of the right lung affected; P(COVID-19) 0.94."
    )


def test_a_study_still_in_analysis_has_no_p_covid_text_yet() -> None:
    row = WorklistRow("1.2.3", "", "", "", NOW, 1, "ANALYSING", None, None, "", None)
    assert row.as_dict()["p_covid_text"] is None
