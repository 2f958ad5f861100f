"""Evaluation metrics of seed 004's Table 2, plus lung and consolidation Dice (pure functions).

Seed 004 (Goncharov et al. 2021, Section 5.1) evaluates triage by

* ROC AUC of the identification score for COVID-19 vs healthy (studies with other pathologies left
  out) and for COVID-19 vs all others (healthy + other pathologies),
* Spearman's ρ between predicted and reference affected-lung fractions on the COVID-19 studies,
* Dice between predicted and reference lesion masks (COVID-19 studies with masks).

For segmentation-based methods the identification score is the predicted affected percentage; for a
method with a classifier it is the predicted probability (Section 5.1). :func:`table2_row` follows that
rule: a case's ``score`` is whatever the caller decides to rank by (:func:`case_result` picks
``p_covid`` when the findings have one, else the severity). Seed 001 (Wu et al. 2020) adds the
consolidation Dice; triaged also reports the lung Dice (seed 004, Section 4.2: 0.976 ± 0.023).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

from triaged.domain import Findings

#: Labels counted as COVID-19 positives.
POSITIVE_LABEL = "covid"
#: Label of healthy studies (seed 004's "COVID vs healthy" column uses only these as negatives).
HEALTHY_LABEL = "healthy"


def roc_auc(labels: Sequence[bool] | npt.ArrayLike, scores: Sequence[float] | npt.ArrayLike) -> float:
    """Area under the ROC curve via the Mann–Whitney U statistic (ties count one half).

    ``AUC = (R₊ − n₊(n₊ + 1)/2) / (n₊ n₋)`` with R₊ the sum of the positives' mid-ranks among all
    scores; mid-ranks give tied positive/negative pairs half a win, which equals the trapezoidal area
    under the empirical ROC curve.

    Parameters
    ----------
    labels : array_like of bool
        True for positives.
    scores : array_like of float
        Higher means more likely positive.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        Lengths differ, or one class is absent (the AUC is undefined).
    """
    y = np.asarray(labels, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative case")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    ranks = stats.rankdata(s, method="average")
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def spearman(a: Sequence[float] | npt.ArrayLike, b: Sequence[float] | npt.ArrayLike) -> float:
    """Spearman's rank correlation ρ (Pearson correlation of mid-ranks, seed 004 Section 5.1).

    Returns NaN when fewer than two pairs are given or either side is constant (ρ is undefined).

    Raises
    ------
    ValueError
        Lengths differ.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{x.size} and {y.size} values")
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    rho = stats.spearmanr(x, y).statistic
    return float(rho)


def dice(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Dice coefficient 2|A ∩ B| / (|A| + |B|) of two boolean masks of the same shape.

    Convention: two empty masks agree perfectly, so the Dice is 1.0 (a healthy study whose
    prediction is empty scores 1, not NaN). Callers that average over COVID-19 cases only (seed 004)
    never meet that case.

    Raises
    ------
    ValueError
        Shapes differ.
    """
    x = np.asarray(a, dtype=bool)
    y = np.asarray(b, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    total = int(np.count_nonzero(x)) + int(np.count_nonzero(y))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(x & y)) / total


@dataclass(frozen=True)
class CaseResult:
    """One evaluated study.

    Attributes
    ----------
    case_id : str
    label : str
        Reference class: ``covid``, ``healthy``, or another pathology (``bacterial``, ``other``...).
    score : float
        Identification score (higher = more likely COVID-19).
    predicted_pct : float
        Predicted affected percentage of the worse lung (seed 004's severity).
    true_pct : float or None
        Reference affected percentage, when known.
    lesion_dice, lung_dice, consolidation_dice : float or None
        Per-case Dice against reference masks; None where there is no reference (or, for
        consolidation, no reference consolidation: see :func:`case_result`).
    """

    case_id: str
    label: str
    score: float
    predicted_pct: float
    true_pct: float | None = None
    lesion_dice: float | None = None
    lung_dice: float | None = None
    consolidation_dice: float | None = None


def case_result(
    case_id: str,
    label: str,
    findings: Findings,
    *,
    true_pct: float | None = None,
    lungs: npt.ArrayLike | None = None,
    true_lungs: npt.ArrayLike | None = None,
    lesions: npt.ArrayLike | None = None,
    true_lesions: npt.ArrayLike | None = None,
    consolidation: npt.ArrayLike | None = None,
    true_consolidation: npt.ArrayLike | None = None,
) -> CaseResult:
    """A :class:`CaseResult` from a pipeline's findings and (optionally) masks and references.

    The score is ``findings.p_covid`` when present, else ``findings.severity_pct`` (seed 004,
    Section 5.1). The lung Dice compares both lungs together (labels > 0; whether the sides are right
    is a separate check). The lesion Dice is reported for COVID-19 cases only (as in seed 004), the
    consolidation Dice only when the reference has consolidation (seed 001 evaluates it on
    consolidated cases).
    """
    score = findings.p_covid if findings.p_covid is not None else findings.severity_pct
    lung_d = None
    if lungs is not None and true_lungs is not None:
        lung_d = dice(np.asarray(lungs) > 0, np.asarray(true_lungs) > 0)
    lesion_d = None
    if lesions is not None and true_lesions is not None and label == POSITIVE_LABEL:
        lesion_d = dice(lesions, true_lesions)
    cons_d = None
    if consolidation is not None and true_consolidation is not None and np.any(true_consolidation):
        cons_d = dice(consolidation, true_consolidation)
    return CaseResult(
        case_id=case_id,
        label=label,
        score=float(score),
        predicted_pct=float(findings.severity_pct),
        true_pct=true_pct,
        lesion_dice=lesion_d,
        lung_dice=lung_d,
        consolidation_dice=cons_d,
    )


@dataclass(frozen=True)
class Table2Row:
    """One method's row of seed 004's Table 2 (plus lung and consolidation Dice and case counts).

    Metrics that cannot be computed from the given cases (a class missing, no references) are None.
    """

    method: str
    auc_vs_healthy: float | None
    auc_vs_all: float | None
    spearman_rho: float | None
    lesion_dice: float | None
    lung_dice: float | None = None
    consolidation_dice: float | None = None
    severity_mae: float | None = None
    n_covid: int = 0
    n_healthy: int = 0
    n_other: int = 0


def table2_row(method: str, cases: Sequence[CaseResult]) -> Table2Row:
    """Seed 004's Table 2 columns (Section 5.1) for one method's per-case results.

    * ROC AUC COVID vs healthy: positives = ``covid``, negatives = ``healthy``, other labels left out.
    * ROC AUC COVID vs all others: negatives = every non-COVID case.
    * Spearman ρ of predicted vs reference affected % on COVID cases with a reference.
    * Lesion Dice: mean over COVID cases with a lesion Dice.
    * Lung Dice, consolidation Dice: mean over cases that have one.
    * ``severity_mae``: mean absolute error of the affected % on COVID cases with a reference.
    """
    pos = [c for c in cases if c.label == POSITIVE_LABEL]
    healthy = [c for c in cases if c.label == HEALTHY_LABEL]
    others = [c for c in cases if c.label != POSITIVE_LABEL]

    def auc(neg: list[CaseResult]) -> float | None:
        if not pos or not neg:
            return None
        both = pos + neg
        return roc_auc([c.label == POSITIVE_LABEL for c in both], [c.score for c in both])

    ref = [c for c in pos if c.true_pct is not None]
    rho = None
    mae = None
    if ref:
        truth = [float(c.true_pct) for c in ref if c.true_pct is not None]
        pred = [c.predicted_pct for c in ref]
        r = spearman(pred, truth) if len(ref) >= 2 else math.nan
        rho = None if math.isnan(r) else r
        mae = float(np.mean(np.abs(np.asarray(pred) - np.asarray(truth))))

    def mean(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if vals else None

    return Table2Row(
        method=method,
        auc_vs_healthy=auc(healthy),
        auc_vs_all=auc(others),
        spearman_rho=rho,
        lesion_dice=mean([c.lesion_dice for c in pos]),
        lung_dice=mean([c.lung_dice for c in cases]),
        consolidation_dice=mean([c.consolidation_dice for c in cases]),
        severity_mae=mae,
        n_covid=len(pos),
        n_healthy=len(healthy),
        n_other=len(others) - len(healthy),
    )


def markdown_table(rows: Sequence[Table2Row]) -> str:
    """One Markdown table of :class:`Table2Row` s, seed 004's Table 2 columns first.

    Missing values print as an em dash; the last column gives the case counts (COVID / healthy /
    other) so a reader sees what each AUC rests on.
    """
    header = (
        "| method | ROC AUC vs healthy | ROC AUC vs all others | Spearman ρ | lesion Dice | lung Dice "
        "| consolidation Dice | severity MAE (pp) | cases (covid/healthy/other) |"
    )
    sep = "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"

    def fmt(v: float | None, digits: int = 3) -> str:
        return "—" if v is None else f"{v:.{digits}f}"

    lines = [header, sep]
    for r in rows:
        lines.append(
            f"| {r.method} | {fmt(r.auc_vs_healthy)} | {fmt(r.auc_vs_all)} | {fmt(r.spearman_rho, 2)} | "
            f"{fmt(r.lesion_dice, 2)} | {fmt(r.lung_dice, 3)} | {fmt(r.consolidation_dice, 2)} | "
            f"{fmt(r.severity_mae, 1)} | {r.n_covid}/{r.n_healthy}/{r.n_other} |"
        )
    return "\n".join(lines) + "\n"
