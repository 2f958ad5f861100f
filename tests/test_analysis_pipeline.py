"""The pipeline registry and the two non-learned pipelines end to end (Volume in, AnalysisResult out)."""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PET_CT_DX
from triaged.analysis import (
    ClassicalPipeline,
    Pipeline,
    PipelineRegistry,
    ThresholdPipeline,
    UnknownPipelineError,
    default_registry,
    get_pipeline,
    pipeline_names,
)
from triaged.analysis.severity import key_slices, lesion_boxes, lung_measures
from triaged.assembly import select_series
from triaged.config import SeriesSelectionConfig
from triaged.domain import CT1_MIN_ML, CT1_MIN_PCT, AnalysisResult, CTGrade, Masks, Volume
from triaged.errors import TriagedError
from triaged.lab.phantom import Phantom, PhantomSpec, generate, to_volume
from triaged.volume import load_volume, read_headers


@cache
def _phantom() -> Phantom:
    return generate(PhantomSpec(kind="covid", severity=35.0, seed=71, matrix=192, slice_thickness=2.5))


@cache
def _result(name: str) -> tuple[Volume, AnalysisResult]:
    volume = to_volume(_phantom())
    return volume, default_registry().get_pipeline(name).run(volume)


# ---- registry -------------------------------------------------------------------------------------------
def test_default_registry_holds_threshold_and_classical_and_is_fresh_each_time() -> None:
    a = default_registry()
    b = default_registry()
    assert a.pipeline_names() == ("classical", "threshold") == pipeline_names()
    a.register(replace(ThresholdPipeline(), name="mine"))
    assert "mine" in a and "mine" not in b
    assert isinstance(get_pipeline("classical"), ClassicalPipeline)
    assert a.get("threshold") is a.get_pipeline("threshold")


def test_unknown_pipeline_names_every_known_one() -> None:
    with pytest.raises(TriagedError) as err:
        default_registry().get_pipeline("multitask")
    assert isinstance(err.value, UnknownPipelineError)
    assert "classical" in str(err.value) and "threshold" in str(err.value)


def test_a_second_pipeline_with_the_same_name_is_refused_unless_replacing() -> None:
    reg = PipelineRegistry([ThresholdPipeline()])
    with pytest.raises(TriagedError):
        reg.register(ThresholdPipeline())
    other = replace(ThresholdPipeline(), version="2.0")
    reg.register(other, replace=True)
    assert reg.get("threshold").version == "2.0"
    assert len(reg) == 1 and [p.name for p in reg] == ["threshold"]


def test_built_in_pipelines_satisfy_the_protocol_and_need_only_the_volume() -> None:
    for p in default_registry():
        assert isinstance(p, Pipeline)
        assert p.needs == frozenset({"volume"})
        assert p.version == "1.5" and p.description


def test_extra_pipelines_join_the_default_registry() -> None:
    extra = replace(ClassicalPipeline(), name="classical-b")
    assert default_registry([extra]).pipeline_names() == ("classical", "classical-b", "threshold")


# ---- end to end on a phantom ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["threshold", "classical"])
def test_pipeline_results_are_consistent_with_their_masks(name: str) -> None:
    volume, result = _result(name)
    f, m = result.findings, result.masks
    assert f.pipeline == name and f.pipeline_version == "1.5"
    assert m.lungs.shape == m.lesions.shape == m.consolidation.shape == volume.hu.shape
    assert m.lungs.dtype == np.uint8 and m.lesions.dtype == bool and m.consolidation.dtype == bool
    assert not np.any(m.lesions & (m.lungs == 0)) and not np.any(m.consolidation & ~m.lesions)
    ml = float(np.prod(volume.spacing)) / 1000.0
    assert f.right.lung_ml == pytest.approx(np.count_nonzero(m.lungs == 1) * ml)
    assert f.left.lesion_ml == pytest.approx(np.count_nonzero(m.lesions & (m.lungs == 2)) * ml)
    assert f.ct_grade == CTGrade.from_affected_pct(f.severity_pct, f.both.lesion_ml)
    areas = m.lesions.sum(axis=(1, 2))
    assert list(f.key_slices) == sorted(f.key_slices, key=lambda z: -areas[z])
    assert len(f.key_slices) == 3 and areas[f.key_slices[0]] == areas.max()
    prov = dict(f.provenance)
    assert float(prov["time.total_s"]) > 0 and "lesions.method" in prov and "lungs.split" in prov


def test_classical_pipeline_measures_the_requested_severity_and_grade() -> None:
    _, result = _result("classical")
    truth = _phantom().truth
    assert abs(result.findings.severity_pct - truth.affected_pct_max) <= 8.0
    assert result.findings.ct_grade == CTGrade.CT2


def test_lesion_boxes_name_the_slice_image_and_side_of_the_largest_lesions() -> None:
    volume, result = _result("classical")
    boxes = result.findings.lesion_boxes
    assert 1 <= len(boxes) <= 10
    assert [b.volume_ml for b in boxes] == sorted((b.volume_ml for b in boxes), reverse=True)
    lesions, lungs = result.masks.lesions, result.masks.lungs
    for b in boxes:
        assert b.sop_instance_uid == volume.sop_instance_uids[b.z]
        assert b.frame_number is None
        sl = lesions[b.z, b.row_min : b.row_max + 1, b.col_min : b.col_max + 1]
        assert sl.any() and sl[0].any() and sl[-1].any() and sl[:, 0].any() and sl[:, -1].any()
        side = 2 if b.side == "left" else 1
        assert np.count_nonzero(lungs[b.z][lesions[b.z]] == side) > 0


def test_lesion_boxes_carry_frame_numbers_of_multi_frame_sources() -> None:
    hu = np.full((6, 40, 40), -850, np.int16)
    lesions = np.zeros(hu.shape, bool)
    lesions[1:4, 10:20, 5:12] = True
    lungs = np.zeros(hu.shape, np.uint8)
    lungs[:, 5:35, 2:18] = 1
    lungs[:, 5:35, 22:38] = 2
    volume = Volume(
        hu, (2.0, 1.0, 1.0), np.eye(4), ("1.2.3",) * 6, "1", "2", frame_numbers=(1, 2, 3, 4, 5, 6)
    )
    (box,) = lesion_boxes(volume, lungs, lesions)
    assert (box.z, box.frame_number, box.sop_instance_uid) == (1, 2, "1.2.3")
    assert (box.row_min, box.col_min, box.row_max, box.col_max) == (10, 5, 19, 11)
    assert box.side == "right" and box.volume_ml == pytest.approx(3 * 10 * 7 * 2.0 / 1000)


def test_measures_count_lesions_per_lung_and_ignore_voxels_outside_the_lungs() -> None:
    lungs = np.zeros((2, 4, 4), np.uint8)
    lungs[:, :, :2] = 1
    lungs[:, :, 2:] = 2
    lungs[0, 0, 0] = 0
    lesions = np.zeros(lungs.shape, bool)
    lesions[0, 0, :] = True  # one voxel outside the lungs, one right, two left
    cons = lesions & (np.arange(4) == 3)
    right, left = lung_measures(lungs, lesions, cons, (10.0, 10.0, 10.0))
    assert (right.lung_ml, right.lesion_ml, right.consolidation_ml) == (15.0, 1.0, 0.0)
    assert (left.lung_ml, left.lesion_ml, left.consolidation_ml) == (16.0, 2.0, 1.0)
    assert key_slices(lesions) == (0,) and key_slices(np.zeros_like(lesions)) == ()


def test_progress_is_reported_from_zero_to_one_in_order() -> None:
    calls: list[tuple[float, str]] = []
    volume = to_volume(_phantom())
    ThresholdPipeline().run(volume, progress=lambda f, msg: calls.append((f, msg)))
    fractions = [c[0] for c in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert all(msg for _, msg in calls)


def test_a_healthy_study_without_lesions_is_ct0_with_no_key_slices() -> None:
    lungs = np.zeros((4, 8, 8), np.uint8)
    lungs[:, :, :4] = 1
    lungs[:, :, 4:] = 2
    none = np.zeros(lungs.shape, bool)
    volume = Volume(np.zeros(lungs.shape, np.int16), (1.0, 1.0, 1.0), np.eye(4), tuple("abcd"), "1", "2")
    from triaged.analysis.severity import findings_from_masks

    f = findings_from_masks(volume, Masks(lungs, none, none), pipeline="x", version="1")
    assert f.ct_grade == CTGrade.CT0 and f.key_slices == () and f.lesion_boxes == ()
    assert dict(f.provenance)["grade.reason"].startswith("CT0: no opacity")


# ---- the explicit CT0 ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pct", "ml", "grade"),
    [
        (0.0, None, CTGrade.CT0),
        (0.99, None, CTGrade.CT0),  # a trace is not a finding
        (1.0, None, CTGrade.CT1),
        (1.0, 4.9, CTGrade.CT0),  # 1 % of a short stack's small lungs, but under 5 mL
        (1.0, 5.0, CTGrade.CT1),
        (25.0, 400.0, CTGrade.CT1),
        (25.1, 400.0, CTGrade.CT2),
        (50.0, 900.0, CTGrade.CT2),
        (74.9, 900.0, CTGrade.CT3),
        (75.0, 900.0, CTGrade.CT4),
    ],
)
def test_ct0_is_below_one_percent_of_the_worse_lung_or_five_ml(
    pct: float, ml: float | None, grade: CTGrade
) -> None:
    assert (CT1_MIN_PCT, CT1_MIN_ML) == (1.0, 5.0)
    assert CTGrade.from_affected_pct(pct, ml) == grade
    reason = CTGrade.reason(pct, ml)
    assert reason.startswith(f"{grade.name}: ")
    if grade == CTGrade.CT0:
        assert "no opacity reaching 1 % of a lung and 5 mL" in reason


def _two_lungs_with_lesion(lesion_voxels: int) -> tuple[Volume, Masks]:
    lungs = np.zeros((10, 40, 40), np.uint8)
    lungs[:, :, :20] = 1
    lungs[:, :, 20:] = 2
    lesions = np.zeros(lungs.shape, bool)
    lesions.reshape(-1)[np.flatnonzero(lungs.reshape(-1) == 2)[:lesion_voxels]] = True
    uids = tuple("abcdefghij")
    volume = Volume(np.zeros(lungs.shape, np.int16), (2.0, 1.0, 1.0), np.eye(4), uids, "1", "2")
    return volume, Masks(lungs, lesions, np.zeros_like(lesions))


def test_findings_grade_a_trace_ct0_and_say_why_while_reporting_the_measured_percentage() -> None:
    from triaged.analysis.severity import findings_from_masks

    # each lung 8000 voxels of 2 uL = 16 mL: 100 voxels (0.2 mL) are 1.25 % of the left lung but a trace
    volume, masks = _two_lungs_with_lesion(100)
    f = findings_from_masks(volume, masks, pipeline="x", version="1")
    assert f.left.affected_pct == pytest.approx(1.25) and f.left.lesion_ml == pytest.approx(0.2)
    assert f.ct_grade == CTGrade.CT0
    assert dict(f.provenance)["grade.reason"] == CTGrade.reason(1.25, 0.2)
    assert f.key_slices and f.lesion_boxes  # the measured trace is still shown, only not graded
    # 2600 voxels (5.2 mL, 32.5 %) are a finding
    volume, masks = _two_lungs_with_lesion(2600)
    f = findings_from_masks(volume, masks, pipeline="x", version="1")
    assert f.ct_grade == CTGrade.CT2
    assert dict(f.provenance)["grade.reason"].startswith("CT2: worse lung 32.5 %")


@pytest.mark.parametrize("name", ["threshold", "classical"])
def test_a_healthy_phantom_is_ct0(name: str) -> None:
    # vessels, fissures and partial volume measure 0.4-0.8 % with classical on healthy phantoms
    ph = generate(PhantomSpec(kind="healthy", seed=82, matrix=192, slice_thickness=2.5))
    f = get_pipeline(name).run(to_volume(ph)).findings
    assert f.ct_grade == CTGrade.CT0 and f.severity_pct < CT1_MIN_PCT, (name, f.severity_pct)


# ---- real CT ------------------------------------------------------------------------------------------
def test_both_pipelines_run_on_the_real_thorax_series(tmp_path: Path) -> None:
    if not PET_CT_DX.is_dir():
        pytest.skip(f"real data folder {PET_CT_DX} is absent (only on development machines)")
    rels = sorted(p.name for p in PET_CT_DX.glob("*.dcm"))
    headers, _ = read_headers(PET_CT_DX, rels)
    choice = select_series(headers, SeriesSelectionConfig(min_slices=10, min_coverage_mm=10))
    volume = load_volume(PET_CT_DX, choice, "1.2.3")
    for name in ("threshold", "classical"):
        f = get_pipeline(name).run(volume).findings
        assert 1000 < f.right.lung_ml < 4000 and 1000 < f.left.lung_ml < 4000
        # a lung mass and no COVID-19: at most a mild grade from the mass and hila
        assert f.severity_pct < 25.0, (name, f.severity_pct)
        for b in f.lesion_boxes:
            assert b.sop_instance_uid in volume.sop_instance_uids
