"""Evaluation metrics (triaged.analysis.metrics): ROC AUC, Spearman ρ, Dice and seed 004's Table 2."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from triaged.analysis.metrics import (
    CaseResult,
    Table2Row,
    case_result,
    dice,
    markdown_table,
    roc_auc,
    spearman,
    table2_row,
)
from triaged.domain import CTGrade, Findings, LungMeasures


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
    return Findings("t", "1", lung, LungMeasures(1000.0, 0.0, 0.0), CTGrade.from_affected_pct(pct), p_covid=p_covid)


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
    assert lines[0].startswith("| method | ROC AUC vs healthy | ROC AUC vs all others | Spearman ρ | lesion Dice")
    assert len(lines) == 4
    assert "| thresholding | 0.649 | 0.567 | 0.87 | 0.45 |" in lines[2]
    assert lines[3].count("—") >= 4
