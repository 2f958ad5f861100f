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

Real labelled sets (issue 11) have their own summaries:

* **Slice sets** (8-bit MedSeg/Ma et al. slices with infection masks): per image the pixel-wise Dice,
  sensitivity TP / (TP + FN) and specificity TN / (TN + FP), then the mean over images, as the MedSeg
  and Inf-Net papers report them (:func:`slice_score`, :func:`slice_set_row`).
* **Volume sets** (real series with a diagnosis ``covid``, ``cap`` or ``normal`` = no pneumonia): every
  case's affected % and CT grade, the worst no-pneumonia case, ROC AUC of COVID-19 vs all others and of
  the severity for COVID-19 vs no-pneumonia (:func:`volume_case_score`, :func:`volume_set_row`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

from triaged.domain import CTGrade, Findings

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


def _bool_pair(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """``a`` and ``b`` as boolean arrays; ValueError when their shapes differ."""
    x = np.asarray(a, dtype=bool)
    y = np.asarray(b, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    return x, y


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
    x, y = _bool_pair(a, b)
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
    lobe_dice : float or None
        Mean Dice of the reference's lobes (seed 000's lobe Dice); None without reference lobes or when
        the pipeline made none.
    lobe_dices : tuple of float
        Dice of each lobe 1 RUL … 5 LLL (NaN for a lobe the reference lacks); empty when ``lobe_dice``
        is None.
    """

    case_id: str
    label: str
    score: float
    predicted_pct: float
    true_pct: float | None = None
    lesion_dice: float | None = None
    lung_dice: float | None = None
    consolidation_dice: float | None = None
    lobe_dice: float | None = None
    lobe_dices: tuple[float, ...] = ()


def lobe_dices(lobes: npt.ArrayLike, true_lobes: npt.ArrayLike) -> tuple[float, ...]:
    """Dice of each lobe label 1–5 between two lobe label arrays (NaN where the reference lacks it)."""
    pred, truth = np.asarray(lobes), np.asarray(true_lobes)
    return tuple(dice(pred == k, truth == k) if np.any(truth == k) else math.nan for k in range(1, 6))


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
    lobes: npt.ArrayLike | None = None,
    true_lobes: npt.ArrayLike | None = None,
) -> CaseResult:
    """A :class:`CaseResult` from a pipeline's findings and (optionally) masks and references.

    The score is ``findings.p_covid`` when present, else ``findings.severity_pct`` (seed 004,
    Section 5.1). The lung Dice compares both lungs together (labels > 0; whether the sides are right
    is a separate check). The lesion Dice is reported for COVID-19 cases only (as in seed 004), the
    consolidation Dice only when the reference has consolidation (seed 001 evaluates it on
    consolidated cases). The lobe Dice is the mean over the reference's lobes (seed 000), reported when
    both the pipeline and the reference have lobes.
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
    each: tuple[float, ...] = ()
    lobe_d = None
    if lobes is not None and true_lobes is not None and np.any(np.asarray(true_lobes) > 0):
        each = lobe_dices(lobes, true_lobes)
        lobe_d = float(np.nanmean(each))
    return CaseResult(
        case_id=case_id,
        label=label,
        score=float(score),
        predicted_pct=float(findings.severity_pct),
        true_pct=true_pct,
        lesion_dice=lesion_d,
        lung_dice=lung_d,
        consolidation_dice=cons_d,
        lobe_dice=lobe_d,
        lobe_dices=each,
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
    lobe_dice: float | None = None
    lobe_dices: tuple[float | None, ...] = ()


def table2_row(method: str, cases: Sequence[CaseResult]) -> Table2Row:
    """Seed 004's Table 2 columns (Section 5.1) for one method's per-case results.

    * ROC AUC COVID vs healthy: positives = ``covid``, negatives = ``healthy``, other labels left out.
    * ROC AUC COVID vs all others: negatives = every non-COVID case.
    * Spearman ρ of predicted vs reference affected % on COVID cases with a reference.
    * Lesion Dice: mean over COVID cases with a lesion Dice.
    * Lung Dice, consolidation Dice, lobe Dice (each lobe, and their mean): mean over cases that have one.
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

    per_lobe = [c.lobe_dices for c in cases if c.lobe_dices]
    each: tuple[float | None, ...] = ()
    if per_lobe:
        arr = np.asarray(per_lobe, dtype=np.float64)
        each = tuple(None if np.all(np.isnan(col)) else float(np.nanmean(col)) for col in arr.T)
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
        lobe_dice=mean([c.lobe_dice for c in cases]),
        lobe_dices=each,
    )


def _fmt(v: float | None, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals; an em dash for None."""
    return "—" if v is None else f"{v:.{digits}f}"


def markdown_table(rows: Sequence[Table2Row]) -> str:
    """One Markdown table of :class:`Table2Row` s, seed 004's Table 2 columns first.

    Missing values print as an em dash; the case counts (COVID / healthy / other) show what each AUC
    rests on; the last column is seed 000's lobe Dice (mean over the five lobes, phantoms only).
    """
    header = (
        "| method | ROC AUC vs healthy | ROC AUC vs all others | Spearman ρ | lesion Dice | lung Dice "
        "| consolidation Dice | severity MAE (pp) | cases (covid/healthy/other) | lobe Dice |"
    )
    sep = "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    lines = [header, sep]
    for r in rows:
        lines.append(
            f"| {r.method} | {_fmt(r.auc_vs_healthy)} | {_fmt(r.auc_vs_all)} | {_fmt(r.spearman_rho, 2)} | "
            f"{_fmt(r.lesion_dice, 2)} | {_fmt(r.lung_dice, 3)} | {_fmt(r.consolidation_dice, 2)} | "
            f"{_fmt(r.severity_mae, 1)} | {r.n_covid}/{r.n_healthy}/{r.n_other} | {_fmt(r.lobe_dice)} |"
        )
    return "\n".join(lines) + "\n"


def lobe_dice_table(rows: Sequence[Table2Row]) -> str:
    """Markdown table of the per-lobe Dice of each method (rows without lobe Dice left out; "" if none)."""
    with_lobes = [r for r in rows if r.lobe_dices]
    if not with_lobes:
        return ""
    lines = ["| method | RUL | RML | RLL | LUL | LLL | mean |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in with_lobes:
        cells = " | ".join(_fmt(d) for d in r.lobe_dices)
        # "<method> (lobes)": each method's row name appears once in the Table 2 table only
        lines.append(f"| {r.method} (lobes) | {cells} | {_fmt(r.lobe_dice)} |")
    return "\n".join(lines) + "\n"


# ---- real slice sets ----------------------------------------------------------------------------------
def confusion(pred: npt.ArrayLike, truth: npt.ArrayLike) -> tuple[int, int, int, int]:
    """Pixel counts (TP, FP, FN, TN) of a predicted against a reference boolean mask.

    Raises
    ------
    ValueError
        Shapes differ.
    """
    p, t = _bool_pair(pred, truth)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return tp, fp, fn, int(p.size) - tp - fp - fn


def sensitivity(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """TP / (TP + FN): the share of reference pixels found; NaN when the reference is empty."""
    tp, _fp, fn, _tn = confusion(pred, truth)
    return tp / (tp + fn) if tp + fn else math.nan


def specificity(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """TN / (TN + FP): the share of reference-negative pixels left out; NaN when there are none."""
    _tp, fp, _fn, tn = confusion(pred, truth)
    return tn / (tn + fp) if tn + fp else math.nan


@dataclass(frozen=True)
class SliceScore:
    """One real slice scored against its reference mask (pixel-wise, on the slice's own grid).

    ``sensitivity`` is None when the reference is empty, ``specificity`` when the reference covers the
    whole image; ``consolidation_dice`` only when the reference has consolidation; ``lesion_in_lungs``
    the share of the reference lesion inside the pipeline's lung mask (None without a reference lesion
    or lung mask: a lesion outside the lungs can never be found). ``failed`` marks a pipeline that could
    not analyse the slice (its prediction counts as empty; ``error`` says why).

    The pixel counts give the slice's affected percentage (:attr:`affected_pct`: predicted lesion inside
    the pipeline's lungs over those lungs, what the pipeline would report) and the reference's
    (:attr:`reference_pct`: reference lesion over the same lungs joined with the reference lesion, the
    slices having no reference lung mask); summed over the slices of one volume they give its severity.
    """

    name: str
    dice: float
    sensitivity: float | None
    specificity: float | None
    has_lesion: bool
    consolidation_dice: float | None = None
    lesion_in_lungs: float | None = None
    failed: bool = False
    error: str = ""
    #: predicted lesion pixels inside the lungs; lung pixels; reference lesion pixels; lungs ∪ reference
    lesion_px: int = 0
    lung_px: int = 0
    reference_px: int = 0
    reference_lung_px: int = 0

    @property
    def affected_pct(self) -> float | None:
        """Predicted lesion / lungs × 100 on this slice (None without lungs)."""
        return _pct(self.lesion_px, self.lung_px)

    @property
    def reference_pct(self) -> float | None:
        """Reference lesion / (lungs ∪ reference lesion) × 100 on this slice (None when both are empty)."""
        return _pct(self.reference_px, self.reference_lung_px)


def _pct(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


def slice_score(
    name: str,
    pred: npt.ArrayLike,
    truth: npt.ArrayLike,
    *,
    consolidation: npt.ArrayLike | None = None,
    true_consolidation: npt.ArrayLike | None = None,
    lungs: npt.ArrayLike | None = None,
    error: str = "",
) -> SliceScore:
    """Score one slice: Dice (:func:`dice`), sensitivity and specificity of ``pred`` vs ``truth``, and
    (given the pipeline's ``lungs``) the share of the reference lesion inside them.

    Pass ``error`` (and an empty ``pred``) when the pipeline failed on the slice: the slice still counts,
    with an empty prediction, so failures lower the means instead of vanishing from them.
    """
    t = np.asarray(truth, dtype=bool)
    sens = sensitivity(pred, t)
    spec = specificity(pred, t)
    cons = None
    if consolidation is not None and true_consolidation is not None and np.any(true_consolidation):
        cons = dice(consolidation, true_consolidation)
    inside = None
    counts: dict[str, int] = {}
    if lungs is not None:
        lung = np.asarray(lungs) > 0
        if t.any():
            inside = sensitivity(lung, t)
        counts = {
            "lesion_px": int(np.count_nonzero(np.asarray(pred, dtype=bool) & lung)),
            "lung_px": int(np.count_nonzero(lung)),
            "reference_px": int(np.count_nonzero(t)),
            "reference_lung_px": int(np.count_nonzero(lung | t)),
        }
    return SliceScore(
        name=name,
        dice=dice(pred, t),
        sensitivity=None if math.isnan(sens) else sens,
        specificity=None if math.isnan(spec) else spec,
        has_lesion=bool(t.any()),
        consolidation_dice=cons,
        lesion_in_lungs=inside,
        failed=bool(error),
        error=error,
        **counts,
    )


@dataclass(frozen=True)
class SliceSetRow:
    """One method on a slice set: means over images (see :func:`slice_set_row`)."""

    method: str
    n_images: int
    n_with_lesion: int
    dice: float | None
    sensitivity: float | None
    specificity: float | None
    consolidation_dice: float | None = None
    n_consolidation: int = 0
    n_failed: int = 0
    lesion_in_lungs: float | None = None
    #: affected % of the lungs, pipeline − reference, percentage points: mean (bias) and mean |·| over
    #: the analysed slices with lungs (see :attr:`SliceScore.affected_pct`)
    severity_bias: float | None = None
    severity_mae: float | None = None
    #: Spearman ρ of the affected % against the reference % over the same slices (None below 3 slices)
    severity_rho: float | None = None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def slice_set_row(method: str, scores: Sequence[SliceScore]) -> SliceSetRow:
    """Mean per-image Dice and sensitivity over the images whose reference has a lesion, mean
    specificity over all images (MedSeg / Inf-Net protocol: per image, then averaged).

    Images without a reference lesion (frequent among pseudo-labelled slices) have no sensitivity and
    would score Dice 1 for an empty prediction, so they enter only the specificity.
    """
    with_lesion = [s for s in scores if s.has_lesion]
    cons = [s.consolidation_dice for s in scores if s.consolidation_dice is not None]
    errors = [severity_error(s) for s in scores]
    paired = [(s.affected_pct, s.reference_pct) for s, e in zip(scores, errors, strict=True) if e is not None]
    return SliceSetRow(
        method=method,
        n_images=len(scores),
        n_with_lesion=len(with_lesion),
        dice=_mean([s.dice for s in with_lesion]),
        sensitivity=_mean([s.sensitivity for s in with_lesion]),
        specificity=_mean([s.specificity for s in scores]),
        consolidation_dice=_mean(cons),
        n_consolidation=len(cons),
        n_failed=sum(1 for s in scores if s.failed),
        lesion_in_lungs=_mean([s.lesion_in_lungs for s in with_lesion]),
        severity_bias=_mean(errors),
        severity_mae=_mean([None if e is None else abs(e) for e in errors]),
        severity_rho=_rho(paired),
    )


def _rho(pairs: Sequence[tuple[float | None, float | None]]) -> float | None:
    """Spearman ρ of the pairs (None with fewer than 3 or when either side is constant)."""
    a = [x for x, y in pairs if x is not None and y is not None]
    b = [y for x, y in pairs if x is not None and y is not None]
    if len(a) < 3:
        return None
    rho = spearman(a, b)
    return None if math.isnan(rho) else rho


def severity_error(score: SliceScore) -> float | None:
    """Affected % minus reference %, percentage points (None for a failed slice or one without lungs)."""
    got, ref = score.affected_pct, score.reference_pct
    return None if score.failed or got is None or ref is None else got - ref


def slice_markdown_table(rows: Sequence[SliceSetRow]) -> str:
    """Markdown table of :class:`SliceSetRow` s (consolidation Dice column only when some row has one;
    "reference lesion in lung mask" is the mean share of the reference lesion inside the lung mask; the
    affected-% column is :attr:`SliceSetRow.severity_bias` with :attr:`SliceSetRow.severity_mae` and
    :attr:`SliceSetRow.severity_rho`)."""
    with_cons = any(r.consolidation_dice is not None for r in rows)
    head = ["method", "images (with lesion)", "Dice", "sensitivity", "specificity"]
    if with_cons:
        head.append("consolidation Dice (images)")
    head += ["reference lesion in lung mask", "affected % − reference, pp: mean (mean \\|·\\|), ρ", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [
            r.method,
            f"{r.n_images} ({r.n_with_lesion})",
            _fmt(r.dice),
            _fmt(r.sensitivity),
            _fmt(r.specificity),
        ]
        if with_cons:
            cells.append(f"{_fmt(r.consolidation_dice)} ({r.n_consolidation})")
        rho = "" if r.severity_rho is None else f", ρ {r.severity_rho:.2f}"
        cells += [_fmt(r.lesion_in_lungs), _pp(r.severity_bias, r.severity_mae) + rho, str(r.n_failed)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pp(bias: float | None, mae: float | None) -> str:
    return "–" if bias is None or mae is None else f"{bias:+.1f} ({mae:.1f})"


@dataclass(frozen=True)
class VolumeSeverity:
    """One pipeline on the slices of one volume of a slice set: affected % of the lungs over all its
    slices (lesion pixels summed over lung pixels summed) and the reference's, as in
    :attr:`SliceScore.affected_pct` and :attr:`SliceScore.reference_pct`."""

    source: str
    n_slices: int
    affected_pct: float | None
    reference_pct: float | None


def volume_severity(source: str, scores: Sequence[SliceScore]) -> VolumeSeverity:
    """Sum the pixel counts of one volume's analysed slices (failed ones are left out: they have no
    lungs) into its affected and reference percentages."""
    ok = [s for s in scores if not s.failed]
    return VolumeSeverity(
        source=source,
        n_slices=len(scores),
        affected_pct=_pct(sum(s.lesion_px for s in ok), sum(s.lung_px for s in ok)),
        reference_pct=_pct(sum(s.reference_px for s in ok), sum(s.reference_lung_px for s in ok)),
    )


def volume_severity_markdown(results: Mapping[str, Sequence[VolumeSeverity]]) -> str:
    """One row per volume: each method's affected % with the reference % on its own lungs in brackets;
    then per method the mean error, mean absolute error (percentage points) and Spearman ρ over volumes."""
    methods = list(results)
    first = results[methods[0]] if methods else []
    head = ["volume", "slices", *[f"{m}: affected % (reference %)" for m in methods]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, v in enumerate(first):
        cells = [v.source, str(v.n_slices)]
        for m in methods:
            w = results[m][i]
            cells.append(f"{_fmt(w.affected_pct, 1)} ({_fmt(w.reference_pct, 1)})")
        lines.append("| " + " | ".join(cells) + " |")
    summary = ["**error: mean (mean \\|·\\|), ρ**", ""]
    for m in methods:
        pairs = [
            (v.affected_pct, v.reference_pct)
            for v in results[m]
            if v.affected_pct is not None and v.reference_pct is not None
        ]
        errs = [a - r for a, r in pairs]
        rho = _rho(pairs)
        rho_text = "–" if rho is None else f"{rho:.2f}"
        summary.append(f"{_pp(_mean(errs), _mean([abs(e) for e in errs]))} pp, ρ {rho_text}")
    lines.append("| " + " | ".join(summary) + " |")
    return "\n".join(lines) + "\n"


# ---- real volume sets ---------------------------------------------------------------------------------
#: Diagnoses of a volume manifest: COVID-19, community-acquired (non-COVID) pneumonia, no pneumonia.
DIAGNOSES: tuple[str, ...] = ("covid", "cap", "normal")
#: The no-pneumonia diagnosis (the negatives of the severity AUC and the "worst normal" case).
NORMAL_DIAGNOSIS = "normal"


@dataclass(frozen=True)
class VolumeCaseScore:
    """One pipeline's result on one real series.

    Affected percentages are lesion / lung volume × 100 (``severity_pct`` is the worse lung, seed 004;
    ``whole_pct`` both lungs together, seed 001). ``failed`` cases carry only ``error``.
    """

    case_id: str
    diagnosis: str
    right_pct: float = 0.0
    left_pct: float = 0.0
    whole_pct: float = 0.0
    ct_grade: int = 0
    p_covid: float | None = None
    lesion_dice: float | None = None
    note: str = ""
    error: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.error)

    @property
    def severity_pct(self) -> float:
        return max(self.right_pct, self.left_pct)


def volume_case_score(
    case_id: str,
    diagnosis: str,
    findings: Findings,
    *,
    lesions: npt.ArrayLike | None = None,
    true_lesions: npt.ArrayLike | None = None,
    note: str = "",
) -> VolumeCaseScore:
    """A :class:`VolumeCaseScore` from a pipeline's findings (and the lesion Dice when a reference mask
    is given)."""
    d = None
    if lesions is not None and true_lesions is not None:
        d = dice(lesions, true_lesions)
    return VolumeCaseScore(
        case_id=case_id,
        diagnosis=diagnosis,
        right_pct=float(findings.right.affected_pct),
        left_pct=float(findings.left.affected_pct),
        whole_pct=float(findings.whole_lung_pct),
        ct_grade=int(findings.ct_grade),
        p_covid=None if findings.p_covid is None else float(findings.p_covid),
        lesion_dice=d,
        note=note,
    )


@dataclass(frozen=True)
class VolumeSetRow:
    """One method's summary on a volume set (see :func:`volume_set_row`)."""

    method: str
    auc_covid_vs_others: float | None
    auc_score: str
    auc_severity_covid_vs_normal: float | None
    worst_normal: VolumeCaseScore | None
    n_covid: int
    n_cap: int
    n_normal: int
    n_failed: int = 0
    lesion_dice: float | None = None
    n_lesion_dice: int = 0


#: Names of the identification scores :func:`volume_set_row` may rank by.
SCORE_P_COVID = "P(COVID-19)"
SCORE_AFFECTED = "affected % (worse lung)"


def volume_set_row(method: str, cases: Sequence[VolumeCaseScore]) -> VolumeSetRow:
    """Summarise one method's results on a volume set.

    * ROC AUC COVID-19 vs all others (``cap`` and ``normal``): the score is P(COVID-19) when the method
      gave one for every analysed case, else the affected % of the worse lung (seed 004, Section 5.1);
      ``auc_score`` says which.
    * ROC AUC of the severity (worse lung affected %) for COVID-19 vs no pneumonia.
    * The worst no-pneumonia case: the ``normal`` case with the highest worse-lung affected %.

    Failed cases are left out of every figure and counted in ``n_failed``; an AUC is None when a class
    is missing.
    """
    ok = [c for c in cases if not c.failed]
    pos = [c for c in ok if c.diagnosis == POSITIVE_LABEL]
    normal = [c for c in ok if c.diagnosis == NORMAL_DIAGNOSIS]
    others = [c for c in ok if c.diagnosis != POSITIVE_LABEL]
    use_p = bool(ok) and all(c.p_covid is not None for c in ok)

    def score(c: VolumeCaseScore) -> float:
        return float(c.p_covid) if use_p and c.p_covid is not None else c.severity_pct

    auc_all = None
    if pos and others:
        both = pos + others
        auc_all = roc_auc([c.diagnosis == POSITIVE_LABEL for c in both], [score(c) for c in both])
    auc_sev = None
    if pos and normal:
        both = pos + normal
        auc_sev = roc_auc([c.diagnosis == POSITIVE_LABEL for c in both], [c.severity_pct for c in both])
    worst = max(normal, key=lambda c: (c.severity_pct, c.whole_pct)) if normal else None
    dices = [c.lesion_dice for c in ok if c.lesion_dice is not None]
    return VolumeSetRow(
        method=method,
        auc_covid_vs_others=auc_all,
        auc_score=SCORE_P_COVID if use_p else SCORE_AFFECTED,
        auc_severity_covid_vs_normal=auc_sev,
        worst_normal=worst,
        n_covid=len(pos),
        n_cap=sum(1 for c in ok if c.diagnosis == "cap"),
        n_normal=len(normal),
        n_failed=len(cases) - len(ok),
        lesion_dice=_mean(dices),
        n_lesion_dice=len(dices),
    )


def volume_cases_markdown(results: Mapping[str, Sequence[VolumeCaseScore]]) -> str:
    """Markdown table of every case under every method: affected % per lung and whole, CT grade,
    P(COVID-19) (— where the method has none) and the lesion Dice where the manifest gives a mask."""
    with_dice = any(c.lesion_dice is not None for cs in results.values() for c in cs)
    head = ["case", "diagnosis", "method", "right %", "left %", "whole lungs %", "CT grade", "P(COVID-19)"]
    if with_dice:
        head.append("lesion Dice")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    order: list[str] = []
    for cs in results.values():
        order += [c.case_id for c in cs if c.case_id not in order]
    for case_id in order:
        for method, cs in results.items():
            for c in cs:
                if c.case_id != case_id:
                    continue
                if c.failed:
                    cells = [c.case_id, c.diagnosis, method, f"failed: {c.error}"] + [""] * (len(head) - 4)
                else:
                    cells = [
                        c.case_id,
                        c.diagnosis,
                        method,
                        f"{c.right_pct:.2f}",
                        f"{c.left_pct:.2f}",
                        f"{c.whole_pct:.2f}",
                        CTGrade(c.ct_grade).name,
                        _fmt(c.p_covid, 2),
                    ]
                    if with_dice:
                        cells.append(_fmt(c.lesion_dice, 2))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def volume_summary_markdown(rows: Sequence[VolumeSetRow]) -> str:
    """Markdown table of :class:`VolumeSetRow` s: both AUCs (with the score used), the worst
    no-pneumonia case and the number of cases per class."""
    head = [
        "method",
        "ROC AUC COVID-19 vs others",
        "score",
        "ROC AUC severity COVID-19 vs no pneumonia",
        "worst no-pneumonia case (whole / worse lung %, grade)",
        "cases covid/cap/normal",
        "failed",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        w = r.worst_normal
        worst = (
            "—"
            if w is None
            else (f"{w.case_id} ({w.whole_pct:.2f} / {w.severity_pct:.2f} %, {CTGrade(w.ct_grade).name})")
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    r.method,
                    _fmt(r.auc_covid_vs_others),
                    r.auc_score,
                    _fmt(r.auc_severity_covid_vs_normal),
                    worst,
                    f"{r.n_covid}/{r.n_cap}/{r.n_normal}",
                    str(r.n_failed),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


# ---- the papers' classifier columns (issue 14: seeds 000, 002, 003) ------------------------------------
#: Seed 002's two classes (DA-CMIL: COVID-19 vs bacterial pneumonia), in ``Findings.class_probabilities``.
CLASSES_COVID_BACTERIAL: tuple[str, ...] = ("covid", "bacterial")
#: Seed 003's three classes (normal / community-acquired pneumonia / COVID-19), in that order.
CLASSES_THREE_WAY: tuple[str, ...] = ("normal", "cap", "covid")
#: Reference class of a label: phantom ``healthy`` and ``other`` (tumours, nodules) and a manifest's
#: ``normal`` are no pneumonia; phantom ``bacterial`` and a manifest's ``cap`` are non-COVID pneumonia.
_REFERENCE_CLASS: dict[str, str] = {
    "covid": "covid",
    "healthy": "normal",
    "other": "normal",
    "normal": "normal",
    "bacterial": "cap",
    "cap": "cap",
}
#: Severe (seed 000): a COVID-19 case whose reference worse lung is more than 50 % affected (CT3–CT4).
SEVERE_MIN_PCT = 50.0


def reference_class(label: str) -> str:
    """``normal``, ``cap`` or ``covid`` for a phantom label or a manifest diagnosis ("" when unknown)."""
    return _REFERENCE_CLASS.get(label.strip().lower(), "")


def saliency_box_hits(findings: Findings, true_lesions: npt.ArrayLike) -> tuple[int, int]:
    """(boxes that overlap a reference lesion on their own slice, boxes) of ``findings.saliency_boxes``.

    ``true_lesions`` is the reference lesion mask on the analysed volume's (z, y, x) grid; a box overlaps
    when any reference lesion pixel lies inside it (inclusive bounds) on slice ``box.z``.
    """
    truth = np.asarray(true_lesions)
    hits = 0
    for box in findings.saliency_boxes:
        if 0 <= box.z < truth.shape[0]:
            patch = truth[box.z, max(box.row_min, 0) : box.row_max + 1, max(box.col_min, 0) : box.col_max + 1]
            hits += int(bool(np.any(patch)))
    return hits, len(findings.saliency_boxes)


@dataclass(frozen=True)
class PaperCase:
    """One case's classifier outputs and references for the papers' columns (:func:`paper_row`).

    ``reference`` is ``normal``, ``cap`` or ``covid`` (:func:`reference_class`); ``severe`` is the
    reference severity of a COVID-19 case (None without a reference affected % or for another class);
    ``box_hits``/``boxes`` count saliency boxes overlapping a reference lesion (``boxes`` is None when
    the case has no reference lesion mask or is not a pneumonia case).
    """

    case_id: str
    reference: str
    severe: bool | None
    p_severe: float | None
    probabilities: tuple[tuple[str, float], ...]
    box_hits: int = 0
    boxes: int | None = None


def paper_case(
    case_id: str,
    label: str,
    findings: Findings,
    *,
    true_pct: float | None = None,
    true_lesions: npt.ArrayLike | None = None,
) -> PaperCase:
    """A :class:`PaperCase` from a pipeline's findings, the case's label and (optionally) its reference
    worse-lung affected % and lesion mask."""
    reference = reference_class(label)
    severe = None
    if reference == "covid" and true_pct is not None and math.isfinite(true_pct):
        severe = true_pct > SEVERE_MIN_PCT
    hits, boxes = 0, None
    if true_lesions is not None and reference in ("covid", "cap"):
        hits, boxes = saliency_box_hits(findings, true_lesions)
    p_severe = (
        findings.p_severe if findings.p_severe is not None and math.isfinite(findings.p_severe) else None
    )
    return PaperCase(
        case_id=case_id,
        reference=reference,
        severe=severe,
        p_severe=p_severe,
        probabilities=tuple((str(k), float(v)) for k, v in findings.class_probabilities),
        box_hits=hits,
        boxes=boxes,
    )


@dataclass(frozen=True)
class Metric:
    """One figure of the papers' columns: ``value``, or None with ``why`` ("n/a (n=…)")."""

    value: float | None
    n: int
    why: str = ""

    def text(self, digits: int = 3) -> str:
        """``"0.917 (n=12)"``, or ``"n/a (…)"``: never a number that was not computed."""
        if self.value is None:
            return f"n/a ({self.why})" if self.why else f"n/a (n={self.n})"
        return f"{self.value:.{digits}f} (n={self.n})"


@dataclass(frozen=True)
class PaperRow:
    """The papers' classifier columns of one method; a task is None when the method does not output it.

    * seed 000 (P(severe), COVID-19 cases with a reference only): ``severe_accuracy`` (P ≥ 0.5),
      ``severe_auc``;
    * seed 002 (covid / bacterial probabilities, covid and bacterial/CAP cases only): accuracy, ROC AUC of
      P(covid), F1 of COVID-19 as the positive class;
    * seed 003 (normal / cap / covid probabilities): 3-way accuracy (argmax), macro one-vs-rest AUC,
      per-pair AUC (Hand & Till: the mean of the two one-vs-one AUCs), box hit rate.
    """

    method: str
    severe_accuracy: Metric | None = None
    severe_auc: Metric | None = None
    severe_counts: str = ""
    cvb_accuracy: Metric | None = None
    cvb_auc: Metric | None = None
    cvb_f1: Metric | None = None
    cvb_counts: str = ""
    three_accuracy: Metric | None = None
    three_auc_macro: Metric | None = None
    three_auc_pairs: tuple[tuple[str, Metric], ...] = ()
    three_counts: str = ""
    box_hit_rate: Metric | None = None

    @property
    def empty(self) -> bool:
        return self.severe_auc is None and self.cvb_auc is None and self.three_accuracy is None


def _probability(case: PaperCase, name: str) -> float | None:
    for k, v in case.probabilities:
        if k == name:
            return v if math.isfinite(v) else None
    return None


def _has_classes(cases: Sequence[PaperCase], classes: Sequence[str]) -> list[PaperCase]:
    """Cases whose probabilities name every class (with a number)."""
    return [c for c in cases if all(_probability(c, k) is not None for k in classes)]


def _missing(counts: Mapping[str, int]) -> str:
    absent = [k for k, n in counts.items() if n == 0]
    listed = ", ".join(f"{k} {n}" for k, n in counts.items())
    return f"n={listed}; no {' or '.join(absent)} case" if absent else ""


def severe_metrics(cases: Sequence[PaperCase]) -> tuple[Metric, Metric, str]:
    """Seed 000: accuracy (P(severe) ≥ 0.5 is severe) and ROC AUC of P(severe), severe vs non-severe.

    Only COVID-19 cases with a reference severity and a P(severe) count; both metrics are n/a when the
    severe or the non-severe class is missing.
    """
    used = [c for c in cases if c.reference == "covid" and c.severe is not None and c.p_severe is not None]
    counts = {"severe": sum(1 for c in used if c.severe), "non-severe": sum(1 for c in used if not c.severe)}
    text = f"{counts['severe']}/{counts['non-severe']}"
    why = _missing(counts)
    if why:
        return Metric(None, len(used), why), Metric(None, len(used), why), text
    truth = [bool(c.severe) for c in used]
    scores = [float(c.p_severe or 0.0) for c in used]
    acc = float(np.mean([(s >= 0.5) == t for s, t in zip(scores, truth, strict=True)]))
    return Metric(acc, len(used)), Metric(roc_auc(truth, scores), len(used)), text


def covid_bacterial_metrics(cases: Sequence[PaperCase]) -> tuple[Metric, Metric, Metric, str]:
    """Seed 002: accuracy, ROC AUC and F1 (COVID-19 positive) of COVID-19 vs bacterial pneumonia.

    Only covid and bacterial/CAP cases count; a case is called COVID-19 when P(covid) ≥ P(bacterial).
    Every metric is n/a when either class is missing.
    """
    used = [c for c in _has_classes(cases, CLASSES_COVID_BACTERIAL) if c.reference in ("covid", "cap")]
    counts = {
        "covid": sum(1 for c in used if c.reference == "covid"),
        "bacterial": sum(1 for c in used if c.reference == "cap"),
    }
    text = f"{counts['covid']}/{counts['bacterial']}"
    why = _missing(counts)
    if why:
        na = Metric(None, len(used), why)
        return na, na, na, text
    truth = np.array([c.reference == "covid" for c in used])
    p_covid = np.array([_probability(c, "covid") or 0.0 for c in used])
    p_bact = np.array([_probability(c, "bacterial") or 0.0 for c in used])
    pred = p_covid >= p_bact
    tp, fp, fn = int(np.sum(pred & truth)), int(np.sum(pred & ~truth)), int(np.sum(~pred & truth))
    f1 = 2 * tp / (2 * tp + fp + fn)  # 2tp + fn > 0: there is a covid case
    return (
        Metric(float(np.mean(pred == truth)), len(used)),
        Metric(roc_auc(truth, p_covid), len(used)),
        Metric(float(f1), len(used)),
        text,
    )


def three_way_metrics(
    cases: Sequence[PaperCase],
) -> tuple[Metric, Metric, tuple[tuple[str, Metric], ...], str]:
    """Seed 003: 3-way accuracy (argmax of normal / cap / covid), macro one-vs-rest ROC AUC and per-pair
    AUC (Hand & Till 2001: the mean of AUC(P(a); a vs b) and AUC(P(b); b vs a) on the a and b cases).

    Accuracy and the macro AUC are n/a unless all three classes are present; a pair's AUC is n/a unless
    both its classes are.
    """
    used = [c for c in _has_classes(cases, CLASSES_THREE_WAY) if c.reference in CLASSES_THREE_WAY]
    counts = {k: sum(1 for c in used if c.reference == k) for k in CLASSES_THREE_WAY}
    text = "/".join(str(counts[k]) for k in CLASSES_THREE_WAY)
    why = _missing(counts)
    probs = {k: np.array([_probability(c, k) or 0.0 for c in used]) for k in CLASSES_THREE_WAY}
    refs = np.array([c.reference for c in used])
    if why:
        acc = macro = Metric(None, len(used), why)
    else:
        stacked = np.stack([probs[k] for k in CLASSES_THREE_WAY], axis=1)
        pred = np.array(CLASSES_THREE_WAY)[np.argmax(stacked, axis=1)]
        acc = Metric(float(np.mean(pred == refs)), len(used))
        macro = Metric(float(np.mean([roc_auc(refs == k, probs[k]) for k in CLASSES_THREE_WAY])), len(used))
    pairs: list[tuple[str, Metric]] = []
    for i, a in enumerate(CLASSES_THREE_WAY):
        for b in CLASSES_THREE_WAY[i + 1 :]:
            sel = (refs == a) | (refs == b)
            n = int(np.sum(sel))
            pair_why = _missing({a: counts[a], b: counts[b]})
            if pair_why:
                pairs.append((f"{a}/{b}", Metric(None, n, pair_why)))
                continue
            auc_a = roc_auc(refs[sel] == a, probs[a][sel])
            auc_b = roc_auc(refs[sel] == b, probs[b][sel])
            pairs.append((f"{a}/{b}", Metric((auc_a + auc_b) / 2.0, n)))
    return acc, macro, tuple(pairs), text


def box_hit_rate(cases: Sequence[PaperCase]) -> Metric:
    """Share of the saliency boxes on covid and CAP cases with a reference lesion mask that overlap a
    reference lesion on their slice; n/a when no such box exists."""
    with_ref = [c for c in cases if c.boxes is not None]
    boxes = sum(c.boxes or 0 for c in with_ref)
    if boxes == 0:
        return Metric(None, 0, f"n=0 boxes on {len(with_ref)} pneumonia case(s) with a lesion reference")
    return Metric(sum(c.box_hits for c in with_ref) / boxes, boxes)


def paper_row(method: str, cases: Sequence[PaperCase]) -> PaperRow:
    """The papers' columns for the tasks the method's outputs cover (a task is left out, None, when no
    case of the method has its output: no P(severe), no covid/bacterial or normal/cap/covid
    probabilities)."""
    row = PaperRow(method)
    if any(c.p_severe is not None for c in cases):
        acc, auc, counts = severe_metrics(cases)
        row = dataclasses.replace(row, severe_accuracy=acc, severe_auc=auc, severe_counts=counts)
    if _has_classes(cases, CLASSES_COVID_BACTERIAL):
        acc, auc, f1, counts = covid_bacterial_metrics(cases)
        row = dataclasses.replace(row, cvb_accuracy=acc, cvb_auc=auc, cvb_f1=f1, cvb_counts=counts)
    if _has_classes(cases, CLASSES_THREE_WAY):
        acc, macro, pairs, counts = three_way_metrics(cases)
        row = dataclasses.replace(
            row,
            three_accuracy=acc,
            three_auc_macro=macro,
            three_auc_pairs=pairs,
            three_counts=counts,
            box_hit_rate=box_hit_rate(cases),
        )
    return row


def papers_markdown(rows: Sequence[PaperRow]) -> str:
    """Markdown tables of the papers' columns, one per task that some method outputs ("" when none)."""
    out: list[str] = []
    severe = [r for r in rows if r.severe_auc is not None]
    if severe:
        out += [
            "Seed 000, severe (CT3–CT4) vs non-severe COVID-19, from P(severe):",
            "| method | accuracy | ROC AUC | cases severe/non-severe |",
            "| --- | --- | --- | --- |",
        ]
        out += [
            f"| {r.method} | {_metric(r.severe_accuracy)} | {_metric(r.severe_auc)} | {r.severe_counts} |"
            for r in severe
        ]
        out.append("")
    cvb = [r for r in rows if r.cvb_auc is not None]
    if cvb:
        out += [
            "Seed 002, COVID-19 vs bacterial pneumonia (covid and bacterial cases only):",
            "| method | accuracy | ROC AUC | F1 (COVID-19) | cases covid/bacterial |",
            "| --- | --- | --- | --- | --- |",
        ]
        out += [
            f"| {r.method} | {_metric(r.cvb_accuracy)} | {_metric(r.cvb_auc)} | {_metric(r.cvb_f1)} "
            f"| {r.cvb_counts} |"
            for r in cvb
        ]
        out.append("")
    three = [r for r in rows if r.three_accuracy is not None]
    if three:
        names = [name for name, _ in three[0].three_auc_pairs]
        out += [
            "Seed 003, normal / CAP / COVID-19 (phantom healthy and other = normal, bacterial = CAP):",
            "| method | 3-way accuracy | macro ROC AUC (one vs rest) | "
            + " | ".join(f"AUC {n}" for n in names)
            + " | box hit rate | cases normal/cap/covid |",
            "|" + " --- |" * (5 + len(names)),
        ]
        for r in three:
            pairs = " | ".join(_metric(m) for _, m in r.three_auc_pairs)
            out.append(
                f"| {r.method} | {_metric(r.three_accuracy)} | {_metric(r.three_auc_macro)} | {pairs} | "
                f"{_metric(r.box_hit_rate)} | {r.three_counts} |"
            )
        out.append("")
    return "\n".join(out)


def _metric(m: Metric | None) -> str:
    return "—" if m is None else m.text()


def paper_row_json(row: PaperRow) -> dict[str, object]:
    """A :class:`PaperRow` as JSON-ready data (``None`` for n/a, with the reason beside it)."""

    def one(m: Metric | None) -> dict[str, object] | None:
        if m is None:
            return None
        return {"value": None if m.value is None else round(m.value, 4), "n": m.n, "why": m.why or None}

    return {
        "method": row.method,
        "seed000_severe": None
        if row.severe_auc is None
        else {"accuracy": one(row.severe_accuracy), "auc": one(row.severe_auc), "cases": row.severe_counts},
        "seed002_covid_vs_bacterial": None
        if row.cvb_auc is None
        else {
            "accuracy": one(row.cvb_accuracy),
            "auc": one(row.cvb_auc),
            "f1": one(row.cvb_f1),
            "cases": row.cvb_counts,
        },
        "seed003_three_way": None
        if row.three_accuracy is None
        else {
            "accuracy": one(row.three_accuracy),
            "auc_macro": one(row.three_auc_macro),
            "auc_pairs": {name: one(m) for name, m in row.three_auc_pairs},
            "box_hit_rate": one(row.box_hit_rate),
            "cases": row.three_counts,
        },
    }
