"""Evaluation metrics (triaged.lab.metrics): ROC AUC, Spearman ρ, Dice, seed 004's Table 2, and the
real slice-set (per-image Dice / sensitivity / specificity) and volume-set summaries (issue 11)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from triaged.domain import CTGrade, Findings, LungMeasures
from triaged.lab.metrics import (
    SCORE_AFFECTED,
    SCORE_P_COVID,
    CaseResult,
    Table2Row,
    VolumeCaseScore,
    case_result,
    confusion,
    dice,
    markdown_table,
    roc_auc,
    sensitivity,
    severity_error,
    slice_markdown_table,
    slice_score,
    slice_set_row,
    spearman,
    specificity,
    table2_row,
    volume_case_score,
    volume_cases_markdown,
    volume_set_row,
    volume_severity,
    volume_severity_markdown,
    volume_summary_markdown,
)


def _pairwise_auc(labels: list[bool], scores: list[float]) -> float:
    """The definition: P(score of a positive > score of a negative) + ½ P(tie)."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y]
    neg = [s for y, s in zip(labels, scores, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_is_one_for_perfect_ranking_zero_for_reversed_and_half_for_all_ties() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert roc_auc([1, 0, 1, 0], [5, 5, 5, 5]) == 0.5


def test_roc_auc_counts_ties_as_half_a_win_like_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = [bool(v) for v in rng.integers(0, 2, 30)]
        if all(labels) or not any(labels):
            continue
        scores = [float(v) for v in rng.integers(0, 5, 30)]  # many ties
        assert roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))


def test_roc_auc_refuses_a_single_class_or_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError):
        roc_auc([1, 0], [0.2])


def test_spearman_is_rank_correlation_and_nan_when_undefined() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))


def test_dice_of_two_empty_masks_is_one_and_of_disjoint_masks_zero() -> None:
    empty = np.zeros((3, 3), bool)
    assert dice(empty, empty) == 1.0
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[0, 1, 1, 1]], bool)
    assert dice(a, b) == pytest.approx(2 * 1 / 5)
    assert dice(a, ~a) == 0.0
    with pytest.raises(ValueError):
        dice(a, empty)


def _findings(pct: float, p_covid: float | None = None) -> Findings:
    lung = LungMeasures(1000.0, 10.0 * pct, 0.0)
    return Findings(
        "t", "1", lung, LungMeasures(1000.0, 0.0, 0.0), CTGrade.from_affected_pct(pct), p_covid=p_covid
    )


def test_case_result_scores_by_probability_when_there_is_one_else_by_severity() -> None:
    assert case_result("a", "covid", _findings(20.0)).score == pytest.approx(20.0)
    assert case_result("a", "covid", _findings(20.0, p_covid=0.7)).score == 0.7
    masks = np.zeros((2, 2), bool)
    healthy = case_result("h", "healthy", _findings(0.0), lesions=masks, true_lesions=masks)
    assert healthy.lesion_dice is None  # lesion Dice is a COVID-only column (seed 004)
    assert healthy.consolidation_dice is None  # no reference consolidation


def test_table2_row_follows_seed_004_columns() -> None:
    cases = [
        CaseResult("c1", "covid", 30.0, 30.0, true_pct=25.0, lesion_dice=0.6, lung_dice=0.97),
        CaseResult("c2", "covid", 10.0, 10.0, true_pct=12.0, lesion_dice=0.4, lung_dice=0.95),
        CaseResult("c3", "covid", 50.0, 50.0, true_pct=60.0, lesion_dice=0.5, lung_dice=0.96),
        CaseResult("h1", "healthy", 0.0, 0.0, lung_dice=0.98),
        CaseResult("h2", "healthy", 12.0, 12.0, lung_dice=0.98),
        CaseResult("o1", "other", 40.0, 40.0),
    ]
    row = table2_row("x", cases)
    # vs healthy: covid scores 30, 10, 50 against 0, 12 -> 5 wins of 6 pairs
    assert row.auc_vs_healthy == pytest.approx(5 / 6)
    # vs all others adds 40: 10 and 30 lose to it, 50 wins
    assert row.auc_vs_all == pytest.approx((5 + 1) / 9)
    assert row.spearman_rho == pytest.approx(1.0)
    assert row.lesion_dice == pytest.approx(0.5)
    assert row.lung_dice == pytest.approx(np.mean([0.97, 0.95, 0.96, 0.98, 0.98]))
    assert row.consolidation_dice is None
    assert row.severity_mae == pytest.approx((5 + 2 + 10) / 3)
    assert (row.n_covid, row.n_healthy, row.n_other) == (3, 2, 1)


def test_markdown_table_prints_one_row_per_method_with_dashes_for_missing_values() -> None:
    rows = [
        Table2Row("thresholding", 0.649, 0.567, 0.87, 0.45),
        Table2Row("classical", None, None, None, None),
    ]
    text = markdown_table(rows)
    lines = text.strip().splitlines()
    assert lines[0].startswith(
        "| method | ROC AUC vs healthy | ROC AUC vs all others | Spearman ρ | lesion Dice"
    )
    assert len(lines) == 4
    assert "| thresholding | 0.649 | 0.567 | 0.87 | 0.45 |" in lines[2]
    assert lines[3].count("—") >= 4


# ---- real slice sets (issue 11) ------------------------------------------------------------------------
def _masks() -> tuple[np.ndarray, np.ndarray]:
    """A 4 × 5 image: reference = 4 pixels of row 0; prediction = 2 of those + 1 pixel of row 3."""
    truth = np.zeros((4, 5), bool)
    truth[0, :4] = True
    pred = np.zeros((4, 5), bool)
    pred[0, :2] = True
    pred[3, 4] = True
    return pred, truth


def test_confusion_sensitivity_and_specificity_are_the_pixel_counts_by_hand() -> None:
    pred, truth = _masks()
    assert confusion(pred, truth) == (2, 1, 2, 15)  # TP, FP, FN, TN of 20 pixels
    assert sensitivity(pred, truth) == pytest.approx(2 / 4)
    assert specificity(pred, truth) == pytest.approx(15 / 16)
    assert dice(pred, truth) == pytest.approx(2 * 2 / (3 + 4))
    assert math.isnan(sensitivity(pred, np.zeros_like(truth)))  # nothing to find
    assert math.isnan(specificity(pred, np.ones_like(truth)))  # nothing to leave out
    with pytest.raises(ValueError, match="shapes differ"):
        confusion(pred, truth[:3])


def test_slice_set_row_averages_per_image_and_keeps_lesion_free_images_for_specificity_only() -> None:
    pred, truth = _masks()
    empty = np.zeros_like(truth)
    a = slice_score("a", pred, truth)  # Dice 4/7, sens 1/2, spec 15/16
    b = slice_score("b", truth, truth)  # perfect: 1, 1, 1
    c = slice_score("c", pred, empty)  # no lesion: spec 17/20 only (3 false pixels)
    d = slice_score("d", empty, truth, error="no lungs")  # failed: empty prediction, spec 1
    assert c.sensitivity is None and not c.has_lesion and c.specificity == pytest.approx(17 / 20)
    assert d.failed and d.dice == 0.0 and d.sensitivity == 0.0
    row = slice_set_row("m", [a, b, c, d])
    assert (row.n_images, row.n_with_lesion, row.n_failed) == (4, 3, 1)
    assert row.dice == pytest.approx((4 / 7 + 1 + 0) / 3)
    assert row.sensitivity == pytest.approx((0.5 + 1 + 0) / 3)
    assert row.specificity == pytest.approx((15 / 16 + 1 + 17 / 20 + 1) / 4)
    assert row.consolidation_dice is None
    table = slice_markdown_table([row])
    assert "| m | 4 (3) | 0.524 | 0.500 | 0.947 | — | – | 1 |" in table
    assert "consolidation" not in table


def test_slice_score_measures_how_much_of_the_reference_lesion_the_lung_mask_holds() -> None:
    pred, truth = _masks()
    lungs = np.zeros(truth.shape, np.uint8)
    lungs[0, 1:] = 2  # holds 3 of the 4 reference pixels
    a = slice_score("a", pred, truth, lungs=lungs)
    assert a.lesion_in_lungs == pytest.approx(3 / 4)
    assert slice_score("b", pred, np.zeros_like(truth), lungs=lungs).lesion_in_lungs is None
    row = slice_set_row("m", [a, slice_score("c", truth, truth, lungs=np.ones_like(lungs))])
    assert row.lesion_in_lungs == pytest.approx((0.75 + 1.0) / 2)
    assert (
        "| reference lesion in lung mask | affected % − reference, pp: mean (mean \\|·\\|), ρ | failed |"
        in (slice_markdown_table([row]))
    )


def test_slice_affected_percentages_and_the_severity_error_are_the_pixel_counts_by_hand() -> None:
    pred, truth = _masks()
    lungs = np.zeros(truth.shape, np.uint8)
    lungs[:2] = 1  # rows 0-1: 10 pixels, hold all 4 reference pixels and 2 of the 3 predicted ones
    a = slice_score("a", pred, truth, lungs=lungs)
    assert (a.lesion_px, a.lung_px, a.reference_px, a.reference_lung_px) == (2, 10, 4, 10)
    assert a.affected_pct == pytest.approx(20.0) and a.reference_pct == pytest.approx(40.0)
    assert severity_error(a) == pytest.approx(-20.0)
    lungs[0] = 0  # the reference now lies outside the lungs: it joins the denominator
    b = slice_score("b", truth, truth, lungs=lungs)
    assert b.affected_pct == pytest.approx(0.0) and b.reference_pct == pytest.approx(4 / 9 * 100)
    failed = slice_score("f", np.zeros_like(truth), truth, error="no lungs")
    assert failed.affected_pct is None and severity_error(failed) is None
    row = slice_set_row("m", [a, b, failed])
    assert row.severity_bias == pytest.approx((-20.0 - 400 / 9) / 2)
    assert row.severity_mae == pytest.approx((20.0 + 400 / 9) / 2)
    assert row.severity_rho is None  # two analysed slices: no rank correlation
    assert "| -32.2 (32.2) |" in slice_markdown_table([row])
    exact = []
    for k in (1, 2, 3):  # exact predictions of 1, 2 and 3 pixels: the ranks agree
        t = np.zeros_like(truth)
        t[0, :k] = True
        exact.append(slice_score(str(k), t, t, lungs=np.ones_like(lungs)))
    ranked = slice_set_row("m", exact)
    assert ranked.severity_rho == pytest.approx(1.0) and ", ρ 1.00 |" in slice_markdown_table([ranked])


def test_volume_severity_sums_the_slices_pixels_and_the_table_scores_each_method() -> None:
    pred, truth = _masks()
    lungs = np.ones(truth.shape, np.uint8)  # 20 pixels
    over = slice_score("v/1", truth | pred, truth, lungs=lungs)  # 5 marked, 4 true
    clear = slice_score("v/2", np.zeros_like(truth), np.zeros_like(truth), lungs=lungs)
    failed = slice_score("v/3", np.zeros_like(truth), truth, error="no lungs")
    v = volume_severity("v", [over, clear, failed])
    assert v.n_slices == 3 and v.affected_pct == pytest.approx(5 / 40 * 100)
    assert v.reference_pct == pytest.approx(4 / 40 * 100)
    vols = []
    for k in (1, 2, 3):  # exact predictions of 1, 2 and 3 reference pixels
        t = np.zeros_like(truth)
        t[0, :k] = True
        vols.append(volume_severity(f"v{k}", [slice_score("s", t, t, lungs=lungs)]))
    table = volume_severity_markdown({"exact": vols, "over": [v, v, v]})
    assert "| v1 | 1 | 5.0 (5.0) | 12.5 (10.0) |" in table
    assert "+0.0 (0.0) pp, ρ 1.00" in table and "+2.5 (2.5) pp, ρ –" in table


def test_slice_score_reports_consolidation_dice_only_where_the_reference_has_consolidation() -> None:
    pred, truth = _masks()
    empty = np.zeros_like(truth)
    with_cons = slice_score("a", pred, truth, consolidation=pred, true_consolidation=truth)
    without = slice_score("b", pred, truth, consolidation=pred, true_consolidation=empty)
    assert with_cons.consolidation_dice == pytest.approx(4 / 7) and without.consolidation_dice is None
    row = slice_set_row("m", [with_cons, without])
    assert row.n_consolidation == 1 and "consolidation Dice (images)" in slice_markdown_table([row])


# ---- real volume sets (issue 11) -----------------------------------------------------------------------
def _vcase(
    case_id: str, diagnosis: str, right: float, left: float, p: float | None = None
) -> VolumeCaseScore:
    return VolumeCaseScore(
        case_id,
        diagnosis,
        right_pct=right,
        left_pct=left,
        whole_pct=(right + left) / 2,
        ct_grade=int(CTGrade.from_affected_pct(max(right, left))),
        p_covid=p,
    )


def test_volume_set_row_aucs_worst_normal_and_counts_by_hand() -> None:
    cases = [
        _vcase("c1", "covid", 30.0, 10.0),
        _vcase("c2", "covid", 0.5, 0.2),
        _vcase("p1", "cap", 40.0, 0.0),
        _vcase("n1", "normal", 0.0, 0.0),
        _vcase("n2", "normal", 1.5, 0.8),
        VolumeCaseScore("n3", "normal", error="no lungs"),
    ]
    row = volume_set_row("m", cases)
    assert row.auc_score == SCORE_AFFECTED  # no P(COVID-19): severity ranks
    # covid {30, 0.5} vs others {40, 0, 1.5}: pairs won 30>0, 30>1.5, 0.5>0 → 3 of 6
    assert row.auc_covid_vs_others == pytest.approx(3 / 6)
    # covid {30, 0.5} vs normal {0, 1.5}: 30>0, 30>1.5, 0.5>0 → 3 of 4
    assert row.auc_severity_covid_vs_normal == pytest.approx(3 / 4)
    assert row.worst_normal is not None and row.worst_normal.case_id == "n2"
    assert (row.n_covid, row.n_cap, row.n_normal, row.n_failed) == (2, 1, 2, 1)
    summary = volume_summary_markdown([row])
    assert "| m | 0.500 | affected % (worse lung) | 0.750 | n2 (1.15 / 1.50 %, CT1) | 2/1/2 | 1 |" in summary


def test_volume_set_row_ranks_by_probability_only_when_every_case_has_one() -> None:
    with_p = [_vcase("c", "covid", 1.0, 0.0, p=0.9), _vcase("n", "normal", 5.0, 0.0, p=0.2)]
    row = volume_set_row("m", with_p)
    assert row.auc_score == SCORE_P_COVID and row.auc_covid_vs_others == 1.0
    assert row.auc_severity_covid_vs_normal == 0.0  # severity still ranks the normal case higher
    mixed = [with_p[0], _vcase("n", "normal", 5.0, 0.0)]
    assert volume_set_row("m", mixed).auc_score == SCORE_AFFECTED
    only_covid = volume_set_row("m", [with_p[0]])
    assert only_covid.auc_covid_vs_others is None and only_covid.worst_normal is None


def test_volume_case_score_takes_per_lung_and_whole_percentages_from_the_findings() -> None:
    f = Findings(
        "p",
        "1",
        right=LungMeasures(1000.0, 50.0, 5.0),
        left=LungMeasures(800.0, 0.0, 0.0),
        ct_grade=CTGrade.CT1,
        p_covid=None,
    )
    c = volume_case_score("x", "covid", f, lesions=np.ones((2, 2), bool), true_lesions=np.eye(2, dtype=bool))
    assert (c.right_pct, c.left_pct) == (5.0, 0.0)
    assert c.whole_pct == pytest.approx(100 * 50 / 1800) and c.severity_pct == 5.0
    assert c.lesion_dice == pytest.approx(2 * 2 / 6)
    table = volume_cases_markdown({"p": [c, VolumeCaseScore("y", "normal", error="series: none")]})
    assert "| x | covid | p | 5.00 | 0.00 | 2.78 | CT1 | — | 0.67 |" in table
    assert "| y | normal | p | failed: series: none |" in table
