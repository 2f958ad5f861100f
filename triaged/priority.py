"""Worklist priority from Findings under a named policy (pure, no I/O).

Seed 004 (Goncharov et al., "CT-based COVID-19 triage", sec. 1) describes three triage scenarios:

* an outpatient clinic with few infected patients ranks by *identification*, P(COVID-19), to isolate
  infected patients early;
* an infectious-diseases hospital ranks by *severity*, the affected share of the worse lung (the
  paper's ranking index) and its CT0-CT4 grade, to route patients to intensive care;
* an outpatient clinic during an outbreak needs *both*.

A policy (``priority.policies`` in the config) picks one scenario and adds escalations: structured
thresholds such as ``{measure: ct_grade, at_least: CT3, level: STAT}``.  :func:`prioritise` turns one
study's Findings into a score in [0, 1], a level (STAT, URGENT, ROUTINE) and the reasons, in words,
that the worklist shows next to the study.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from types import MappingProxyType

from triaged.config import Escalation, PriorityPolicyConfig
from triaged.domain import (
    GRADE_EDGES_PCT,
    P_COVID_NOT_ASSESSED,
    CTGrade,
    Findings,
    PriorityLevel,
    WorklistRow,
    pct_text,
)

#: Sort rank of each level (:attr:`PriorityLevel.rank`): lower is read first (STAT < URGENT < ROUTINE).
PRIORITY_ORDER: Mapping[PriorityLevel, int] = MappingProxyType({level: level.rank for level in PriorityLevel})


@dataclass(frozen=True)
class Priority:
    """A study's place on the worklist: ``score`` in [0, 1] (higher first within a level), ``level``,
    and ``reasons`` in words, most telling first."""

    score: float
    level: PriorityLevel
    reasons: tuple[str, ...]

    @property
    def summary(self) -> str:
        """The reasons on one line, e.g. ``"CT3: 58 % of the right lung affected; P(COVID-19) 0.94"``."""
        return "; ".join(self.reasons)

    def sort_key(self) -> tuple[int, float]:
        """Sort key: level first (STAT first), then the higher score."""
        return PRIORITY_ORDER[self.level], -self.score


def severity_score(findings: Findings) -> float:
    """Severity as a score in [0, 1]: the CT grade first, the affected % of the worse lung within it.

    ``(grade + pct / 100) / 5``.  Seed 004 ranks by the worse lung's affected fraction; the grade is
    derived from that fraction (``CTGrade.from_affected_pct``), so the order is the paper's whenever the
    two agree, and a grade set by a model that disagrees still decides first (CT3: hospitalise).

    Parameters
    ----------
    findings : Findings
        ``ct_grade`` and ``severity_pct`` (affected % of the worse lung) are used.

    Returns
    -------
    float
        0 for CT0 with no lesions, 1 for CT4 with the worse lung fully affected.
    """
    pct = min(max(findings.severity_pct, 0.0), 100.0)
    return (int(findings.ct_grade) + pct / 100.0) / 5.0


def prioritise(findings: Findings, policy: PriorityPolicyConfig) -> Priority:
    """Score, level and reasons of one study under a policy (seed 004's triage scenarios).

    Parameters
    ----------
    findings : Findings
        What the pipeline measured.  ``p_covid`` is None when the pipeline has no classifier validated
        on real data: the reasons then say "P(COVID-19): not assessed", and a policy that needs it
        (identification, both) ranks by severity instead and says so.  ``p_severe`` (seed 000's
        P(severe)) is named with its pipeline in the reasons and feeds the ``severity_mil`` escalation;
        without it that escalation does not fire and the reasons say "P(severe) not available".
    policy : PriorityPolicyConfig
        ``scenario`` (identification, severity, both), ``weights`` for both, and ``escalate``.

    Returns
    -------
    Priority
        ``score`` in [0, 1]; ``level`` the most urgent escalation that holds, else ROUTINE; ``reasons``.
    """
    reasons = [_severity_text(findings)]
    p, p_note = _p_covid(findings)
    sev = severity_score(findings)

    if p is not None:
        reasons.append(f"P(COVID-19) {p:.2f} ({findings.pipeline})")  # the pipeline that gave it
    elif policy.scenario == "severity":
        reasons.append(f"{P_COVID_NOT_ASSESSED}{p_note}")
    else:
        # Identification without a probability would rank every study alike; severity is the best
        # evidence left, and the reason tells the radiologist the ranking is not the configured one.
        reasons.append(f"{P_COVID_NOT_ASSESSED}; ranked by severity{p_note or _no_p_note(findings)}")

    if policy.scenario == "severity":
        score, how = sev, "severity (CT grade, then affected % of the worse lung)"
    elif p is None:
        score, how = sev, "severity (fallback)"
    elif policy.scenario == "identification":
        score, how = p, "identification (P(COVID-19))"
    else:
        w = policy.effective_weights
        total = w.p_covid + w.severity
        wp, ws = w.p_covid / total, w.severity / total
        score, how = wp * p + ws * sev, f"{wp:.2g} x P(COVID-19) + {ws:.2g} x severity"
    score = min(max(score, 0.0), 1.0)

    p_severe_reason = _p_severe_reason(findings, policy)
    if p_severe_reason:
        reasons.append(p_severe_reason)

    level = PriorityLevel.ROUTINE
    for esc in policy.escalate:
        value = _measure(esc, findings, p, score)
        if value is not None and value >= esc.at_least:
            esc_level = PriorityLevel(esc.level)
            reasons.append(f"{esc_level}: {_escalation_text(esc, value, findings.pipeline)}")
            if PRIORITY_ORDER[esc_level] < PRIORITY_ORDER[level]:
                level = esc_level
    reasons.append(f"score {score:.2f} by {how}")
    return Priority(score, level, tuple(reasons))


def is_overdue(arrived: datetime, now: datetime, threshold_minutes: float | None) -> bool:
    """Whether a study has waited longer than ``priority.waiting_alert_minutes``.

    Parameters
    ----------
    arrived, now : datetime
        Both naive or both aware (the ledger stores UTC).
    threshold_minutes : float or None
        None disables the alert.
    """
    if threshold_minutes is None:
        return False
    return now - arrived > timedelta(minutes=threshold_minutes)


def _p_covid(findings: Findings) -> tuple[float | None, str]:
    """P(COVID-19) clipped to [0, 1], or None with a note (in parentheses) when it is not usable."""
    p = findings.p_covid
    if p is None:
        return None, ""
    if not math.isfinite(p):
        return None, f" (P(COVID-19) from pipeline {findings.pipeline!r} is not a number)"
    return min(max(p, 0.0), 1.0), ""


def p_severe_value(findings: Findings) -> float | None:
    """P(severe) (seed 000's hierarchical MIL, ``Findings.p_severe``) clipped to [0, 1]; None when the
    pipeline gives none or it is not a number (an escalation on ``severity_mil`` then does not hold)."""
    p = findings.p_severe
    if p is None or not math.isfinite(p):
        return None
    return min(max(p, 0.0), 1.0)


def p_severe_text(findings: Findings) -> str:
    """``"P(severe) 0.91 (m2unet)"``, naming the pipeline that gave it, or ``"P(severe) not available"``."""
    p = p_severe_value(findings)
    if p is None:
        if findings.p_severe is not None:
            return (
                f"P(severe) not available (pipeline {findings.pipeline!r} gave a value that is not a number)"
            )
        return (
            f"P(severe) not available (pipeline {findings.pipeline!r} has no severe / non-severe classifier)"
        )
    return f"P(severe) {p:.2f} ({findings.pipeline})"


def _p_severe_reason(findings: Findings, policy: PriorityPolicyConfig) -> str:
    """The P(severe) reason: whenever the pipeline gives one, and "not available" when the policy would
    escalate on it (``severity_mil``) but the pipeline gives none; "" otherwise."""
    if findings.p_severe is not None or any(esc.measure == "severity_mil" for esc in policy.escalate):
        return p_severe_text(findings)
    return ""


def _no_p_note(findings: Findings) -> str:
    return f" (pipeline {findings.pipeline!r} gives no P(COVID-19) validated on real data)"


def _severity_text(findings: Findings) -> str:
    grade = findings.ct_grade.name
    pct = findings.severity_pct
    if pct <= 0:
        return f"{grade}: no affected lung tissue found"
    side = "right" if findings.right.affected_pct >= findings.left.affected_pct else "left"
    return f"{grade}: {_pct(pct)} of the {side} lung affected"


def _pct(x: float) -> str:
    """Whole percent for the worklist's short reasons, unless that would round onto a grade edge."""
    whole = f"{x:.0f}"
    return f"{whole} %" if x >= 1 and float(whole) not in GRADE_EDGES_PCT else f"{pct_text(x)} %"


def _measure(esc: Escalation, findings: Findings, p: float | None, score: float) -> float | None:
    if esc.measure == "p_covid":
        return p
    if esc.measure == "ct_grade":
        return float(int(findings.ct_grade))
    if esc.measure == "score":
        return score
    if esc.measure == "severity_pct":
        return findings.severity_pct
    if esc.measure == "whole_lung_pct":
        return findings.whole_lung_pct
    if esc.measure == "severity_mil":
        return p_severe_value(findings)  # None: the escalation does not fire
    if esc.measure == "ctss":
        # None without lobes (a stack that does not cover the lungs): the escalation does not apply
        ctss = findings.ct_severity_score
        return None if ctss is None else float(ctss)
    return findings.consolidation_pct


def _escalation_text(esc: Escalation, value: float, pipeline: str = "") -> str:
    if esc.measure == "ct_grade":
        return f"CT grade {CTGrade(int(value)).name} >= {CTGrade(int(esc.at_least)).name}"
    if esc.measure == "p_covid":
        return f"P(COVID-19) {value:.2f} ({pipeline}) >= {esc.at_least:g}"
    if esc.measure == "score":
        return f"score {value:.2f} >= {esc.at_least:g}"
    if esc.measure == "severity_mil":
        return f"P(severe) {value:.2f} ({pipeline}) >= {esc.at_least:g}"
    if esc.measure == "ctss":
        return f"CT severity score {value:.0f}/25 >= {esc.at_least:g}"
    label = {
        "severity_pct": "worse lung affected",
        "whole_lung_pct": "both lungs affected",
        "consolidation_pct": "consolidation",
    }[esc.measure]
    return f"{label} {_pct(value)} >= {esc.at_least:g} %"


def order_worklist(
    rows: Sequence[WorklistRow], now: datetime, waiting_alert_minutes: float | None
) -> list[WorklistRow]:
    """The worklist in reading order: priority level (STAT first), higher score, then earlier arrival.

    Studies without a priority yet (still being received or analysed, or ignored) come after every
    prioritised one, oldest first.  ``overdue`` marks studies still without a result after
    ``waiting_alert_minutes`` (the triage itself is late).
    """
    ranks = {level.value: rank for level, rank in PRIORITY_ORDER.items()}

    def key(row: WorklistRow) -> tuple[int, float, datetime]:
        rank = ranks.get(row.priority_level or "", len(ranks))
        return (rank, -(row.priority_score or 0.0), row.arrived)

    out = []
    for row in sorted(rows, key=key):
        late = (
            row.result_at is None
            and row.state not in ("IGNORED", "FAILED", "SUPERSEDED")
            and is_overdue(row.arrived, now, waiting_alert_minutes)
        )
        out.append(replace(row, overdue=late))
    return out
