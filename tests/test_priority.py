from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from triaged.config import PRIORITY_LEVELS, PriorityConfig, PriorityPolicyConfig
from triaged.domain import CTGrade, Findings, LungMeasures, pct_text
from triaged.priority import (
    PRIORITY_ORDER,
    Priority,
    PriorityLevel,
    is_overdue,
    prioritise,
    severity_score,
)


def findings(
    right_pct: float, left_pct: float = 0.0, p: float | None = None, grade: CTGrade | None = None
) -> Findings:
    """Findings of two 2000 mL lungs with the given affected percentages."""
    worse = max(right_pct, left_pct)
    return Findings(
        pipeline="multitask" if p is not None else "classical",
        pipeline_version="1",
        right=LungMeasures(2000.0, 20.0 * right_pct, 0.0),
        left=LungMeasures(2000.0, 20.0 * left_pct, 2.0 * left_pct),
        ct_grade=grade if grade is not None else CTGrade.from_affected_pct(worse),
        p_covid=p,
    )


def policy(scenario: str, **extra: Any) -> PriorityPolicyConfig:
    return PriorityPolicyConfig.model_validate({"scenario": scenario, **extra})


SEVERE_LOW_P = findings(58.0, 20.0, p=0.30)  # CT3, probably another pathology
MILD_HIGH_P = findings(8.0, 4.0, p=0.95)  # CT1, almost surely COVID-19
HEALTHY = findings(0.0, 0.0, p=0.05)  # CT0


def ranking(policy_config: PriorityPolicyConfig, cases: dict[str, Findings]) -> list[str]:
    scored = {name: prioritise(f, policy_config) for name, f in cases.items()}
    return sorted(scored, key=lambda name: scored[name].sort_key())


CASES = {"severe, low P": SEVERE_LOW_P, "mild, high P": MILD_HIGH_P, "healthy": HEALTHY}


def test_identification_ranks_by_probability_and_severity_by_the_worse_lung() -> None:
    # Seed 004: an outpatient clinic wants the likely infected first, an infectious-diseases hospital
    # the severe cases first; the same two studies swap places.
    assert ranking(policy("identification"), CASES) == ["mild, high P", "severe, low P", "healthy"]
    assert ranking(policy("severity"), CASES) == ["severe, low P", "mild, high P", "healthy"]


@pytest.mark.parametrize(
    ("weights", "first"),
    [
        ({"p_covid": 0.8, "severity": 0.2}, "mild, high P"),
        ({"p_covid": 0.2, "severity": 0.8}, "severe, low P"),
    ],
)
def test_both_weighs_identification_and_severity(weights: dict[str, float], first: str) -> None:
    assert ranking(policy("both", weights=weights), CASES)[0] == first


@pytest.mark.parametrize("case", [SEVERE_LOW_P, MILD_HIGH_P, HEALTHY])
def test_a_both_score_lies_between_the_identification_and_severity_scores(case: Findings) -> None:
    ident = prioritise(case, policy("identification")).score
    sev = prioritise(case, policy("severity")).score
    both = prioritise(case, policy("both", weights={"p_covid": 3, "severity": 1})).score
    assert min(ident, sev) <= both <= max(ident, sev)
    assert both == pytest.approx(0.75 * ident + 0.25 * sev)


def test_severity_score_orders_by_grade_then_by_the_worse_lung() -> None:
    assert severity_score(HEALTHY) == 0.0
    assert severity_score(findings(100.0, 100.0)) == 1.0
    scores = [severity_score(findings(pct)) for pct in (1, 24, 26, 49, 51, 74, 76, 99)]
    assert scores == sorted(scores)
    # A grade set by a model outranks a larger percentage in a lower grade (CT3 means hospitalise).
    assert severity_score(findings(40.0, grade=CTGrade.CT3)) > severity_score(findings(49.0))


def test_scores_stay_in_the_unit_interval_for_every_policy() -> None:
    extremes = [findings(100.0, 100.0, p=1.0), findings(0.0, p=0.0), findings(100.0, p=None)]
    for scenario in ("identification", "severity", "both"):
        for case in extremes:
            assert 0.0 <= prioritise(case, policy(scenario)).score <= 1.0


ESCALATIONS = [
    # (escalate list, findings, expected level)
    ([{"measure": "ct_grade", "at_least": "CT3", "level": "STAT"}], SEVERE_LOW_P, "STAT"),
    ([{"measure": "ct_grade", "at_least": "CT3", "level": "STAT"}], MILD_HIGH_P, "ROUTINE"),
    ([{"measure": "p_covid", "at_least": 0.9, "level": "URGENT"}], MILD_HIGH_P, "URGENT"),
    ([{"measure": "p_covid", "at_least": 0.9, "level": "URGENT"}], findings(8.0), "ROUTINE"),  # no P
    ([{"measure": "severity_pct", "at_least": 50, "level": "STAT"}], SEVERE_LOW_P, "STAT"),
    ([{"measure": "whole_lung_pct", "at_least": 50, "level": "STAT"}], SEVERE_LOW_P, "ROUTINE"),  # 39 %
    ([{"measure": "consolidation_pct", "at_least": 1, "level": "URGENT"}], SEVERE_LOW_P, "URGENT"),
    ([{"measure": "score", "at_least": 0.9, "level": "URGENT"}], MILD_HIGH_P, "URGENT"),
    # the most urgent escalation that holds decides
    (
        [
            {"measure": "p_covid", "at_least": 0.2, "level": "URGENT"},
            {"measure": "ct_grade", "at_least": "CT3", "level": "STAT"},
        ],
        SEVERE_LOW_P,
        "STAT",
    ),
    ([], SEVERE_LOW_P, "ROUTINE"),
]


@pytest.mark.parametrize(("escalate", "case", "level"), ESCALATIONS)
def test_escalations_raise_the_level(escalate: list[dict[str, Any]], case: Findings, level: str) -> None:
    assert prioritise(case, policy("identification", escalate=escalate)).level == level


def test_reasons_say_the_grade_the_worse_lung_the_probability_and_each_escalation() -> None:
    severe_covid = findings(12.0, 58.0, p=0.94)
    result = prioritise(severe_covid, PriorityConfig().policies["both"])
    assert result.level is PriorityLevel.STAT
    assert result.reasons == (
        "CT3: 58 % of the left lung affected",
        "P(COVID-19) 0.94 (multitask)",  # names the pipeline that gave it
        "STAT: CT grade CT3 >= CT3",
        "URGENT: P(COVID-19) 0.94 (multitask) >= 0.9",
        "score 0.83 by 0.5 x P(COVID-19) + 0.5 x severity",
    )
    assert result.summary.startswith("CT3: 58 % of the left lung affected; P(COVID-19) 0.94 (multitask); STAT")
    assert prioritise(HEALTHY, policy("severity")).reasons[0] == "CT0: no affected lung tissue found"


@pytest.mark.parametrize(
    ("pct", "text"),
    [
        (0.0, "0.0"), (0.5, "0.5"), (0.96, "0.96"), (0.999, "0.99"), (1.0, "1.0"), (12.34, "12.3"),
        (24.96, "24.96"), (25.0, "25.0"), (25.03, "25.03"), (25.0001, "25.01"), (50.04, "50.04"),
        (74.96, "74.96"), (74.9999, "74.99"), (75.0, "75.0"), (99.99, "100.0"),
    ],
)
def test_a_percentage_never_reads_as_a_grade_edge_it_is_not_on(pct: float, text: str) -> None:
    assert pct_text(pct) == text
    shown = float(text)  # the grade read from the text is the grade of the value
    assert CTGrade.from_affected_pct(shown) == CTGrade.from_affected_pct(pct)


@pytest.mark.parametrize(
    ("right", "reason"),
    [
        (0.96, "CT0: 0.96 % of the right lung affected"),  # CMB-CRC measures 0.95 %: not "1 %" beside CT0
        (1.4, "CT1: 1.4 % of the right lung affected"),
        (25.3, "CT2: 25.3 % of the right lung affected"),
        (74.7, "CT3: 74.7 % of the right lung affected"),
        (31.4, "CT2: 31 % of the right lung affected"),
    ],
)
def test_short_reasons_round_to_whole_percent_but_not_onto_a_grade_edge(right: float, reason: str) -> None:
    assert prioritise(findings(right), policy("severity")).reasons[0] == reason


@pytest.mark.parametrize("scenario", ["identification", "both"])
def test_without_a_probability_a_policy_falls_back_to_severity_and_says_so(scenario: str) -> None:
    no_p = findings(31.0)
    result = prioritise(no_p, policy(scenario))
    assert result.score == severity_score(no_p)
    assert result.reasons[:2] == (
        "CT2: 31 % of the right lung affected",
        "P(COVID-19): not assessed; ranked by severity "
        "(pipeline 'classical' gives no P(COVID-19) validated on real data)",
    )
    assert result.reasons[-1] == f"score {result.score:.2f} by severity (fallback)"
    assert "0.00" not in result.summary


@pytest.mark.parametrize("scenario", ["identification", "both"])
def test_without_a_probability_studies_are_ranked_by_severity_not_alike(scenario: str) -> None:
    cases = {
        "mild": findings(8.0), "severe": findings(58.0, 20.0), "healthy": findings(0.0), "moderate": findings(31.0)
    }
    assert ranking(policy(scenario), cases) == ["severe", "moderate", "mild", "healthy"]
    assert prioritise(cases["healthy"], policy(scenario)).reasons[:2] == (
        "CT0: no affected lung tissue found",
        "P(COVID-19): not assessed; ranked by severity "
        "(pipeline 'classical' gives no P(COVID-19) validated on real data)",
    )


def test_the_severity_policy_also_says_that_p_covid_was_not_assessed() -> None:
    result = prioritise(findings(31.0), policy("severity"))
    assert result.reasons[1] == "P(COVID-19): not assessed"
    assert "ranked by severity" not in result.summary  # severity is the configured ranking, no fallback


def test_a_probability_that_is_not_a_number_counts_as_missing() -> None:
    result = prioritise(findings(10.0, p=float("nan")), policy("identification"))
    assert result.reasons[1] == (
        "P(COVID-19): not assessed; ranked by severity (P(COVID-19) from pipeline 'multitask' is not a number)"
    )
    assert result.score == severity_score(findings(10.0))


def test_the_built_in_policies_follow_the_three_scenarios_of_seed_004() -> None:
    policies = PriorityConfig().policies
    assert {n: p.scenario for n, p in policies.items()} == {
        "identification": "identification",
        "severity": "severity",
        "both": "both",
    }
    assert prioritise(SEVERE_LOW_P, policies["severity"]).level is PriorityLevel.STAT
    assert prioritise(findings(30.0, p=0.1), policies["severity"]).level is PriorityLevel.URGENT
    assert prioritise(MILD_HIGH_P, policies["identification"]).level is PriorityLevel.URGENT
    assert prioritise(HEALTHY, policies["both"]).level is PriorityLevel.ROUTINE


def test_levels_sort_stat_first_then_by_score() -> None:
    assert [level.value for level in sorted(PriorityLevel, key=PRIORITY_ORDER.__getitem__)] == list(
        PRIORITY_LEVELS
    )
    items = [
        Priority(0.9, PriorityLevel.ROUTINE, ()),
        Priority(0.2, PriorityLevel.STAT, ()),
        Priority(0.5, PriorityLevel.URGENT, ()),
        Priority(0.8, PriorityLevel.STAT, ()),
    ]
    ordered = sorted(items, key=Priority.sort_key)
    assert [(p.level.value, p.score) for p in ordered] == [
        ("STAT", 0.8),
        ("STAT", 0.2),
        ("URGENT", 0.5),
        ("ROUTINE", 0.9),
    ]


def test_a_study_is_overdue_only_after_the_waiting_threshold() -> None:
    arrived = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
    assert not is_overdue(arrived, arrived + timedelta(minutes=60), 60)
    assert is_overdue(arrived, arrived + timedelta(minutes=61), 60)
    assert not is_overdue(arrived, arrived + timedelta(days=3), None)
    assert PriorityConfig().waiting_alert_minutes == 60


# ---- the CT severity score as a measure (issue 14) -------------------------------------------------------
def test_ctss_escalates_when_lobes_score_high_and_never_without_lobes() -> None:
    from dataclasses import replace

    from triaged.domain import LobeMeasures

    rule = policy("severity", escalate=[{"measure": "ctss", "at_least": 15, "level": "STAT"}])
    scores = (4, 3, 4, 2, 3)  # 16 of 25
    lobes = tuple(LobeMeasures(label, 500.0, 250.0, s) for label, s in enumerate(scores, start=1))
    severe = replace(findings(30.0, 20.0), lobes=lobes)
    result = prioritise(severe, rule)
    assert result.level == PriorityLevel.STAT
    assert "STAT: CT severity score 16/25 >= 15" in result.reasons
    milder = replace(severe, lobes=tuple(replace(lobe, score=2) for lobe in lobes))  # 10 of 25
    assert prioritise(milder, rule).level == PriorityLevel.ROUTINE
    # a study without lobes has no CT-SS: the escalation does not apply
    assert prioritise(findings(30.0, 20.0), rule).level == PriorityLevel.ROUTINE


def test_ctss_thresholds_are_checked_against_the_0_to_25_range() -> None:
    assert policy("severity", escalate=[{"measure": "ctss", "at_least": 25, "level": "URGENT"}])
    with pytest.raises(ValueError, match="ctss threshold must be between 0 and 25"):
        policy("severity", escalate=[{"measure": "ctss", "at_least": 26, "level": "URGENT"}])
