"""TID 1500 SR encoder: phantom and real series, round trip, dciodvfy, the content tree read back by highdicom."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage
from scipy import ndimage

from tests.encode_fixtures import Case, dciodvfy, errors, load_real_case, round_trip
from triaged.encode import OutputContext, build_outputs, build_seg, build_sr, codes, segmentation_reference
from triaged.encode.context import RESEARCH_USE_TEXT, SR_SERIES_DESCRIPTION
from triaged.encode.seg import COVID_OPACITY_LABEL

WHEN = datetime(2026, 1, 2, 3, 4, 5)
PREDECESSOR = ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3")


@pytest.fixture(scope="module", params=["phantom", "real"])
def case(request: pytest.FixtureRequest, phantom_ct_series: Path) -> Case:
    """The session's phantom series (runs everywhere), then the real Lung-PET-CT-Dx series (a real export's
    headers go into the outputs; skips without the real data)."""
    from tests.conftest import PET_CT_DX

    if request.param == "phantom":
        return load_real_case(phantom_ct_series)
    if not PET_CT_DX.is_dir():
        pytest.skip(f"real data folder {PET_CT_DX} is absent (only on development machines)")
    return load_real_case(PET_CT_DX)


@pytest.fixture(scope="module")
def ctx() -> OutputContext:
    return OutputContext(
        software_version="0.1.0",
        revision=2,
        predecessor_sr=PREDECESSOR,
        priority_level="URGENT",
        institution="Test Hospital",
        content_datetime=WHEN,
    )


@pytest.fixture(scope="module")
def outputs(case: Case, ctx: OutputContext) -> list[Dataset]:
    return [round_trip(ds) for ds in build_outputs(case.findings, case.masks, case.volume, case.source, ctx)]


def _measurements(
    group: hd.sr.MeasurementsAndQualitativeEvaluations,
) -> dict[tuple[str, str], tuple[float, str]]:
    return {
        (m.name.value, m.name.scheme_designator): (float(m.value), m.unit.value)
        for m in group.get_measurements()
    }


def _key(code: Code) -> tuple[str, str]:
    return (code.value, code.scheme_designator)


def test_the_sr_round_trips_and_dciodvfy_reports_no_errors(outputs: list[Dataset], tmp_path: Path) -> None:
    sr = outputs[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    lines = dciodvfy(sr, tmp_path / "sr.dcm")
    assert errors(lines) == [], "\n".join(lines)


def test_the_sr_joins_the_source_study_in_its_own_series_and_names_its_predecessor(
    outputs: list[Dataset], case: Case
) -> None:
    sr, first = outputs[0], case.source[0]
    assert sr.StudyInstanceUID == first.StudyInstanceUID
    assert sr.PatientID == first.PatientID and sr.PatientName == first.PatientName
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in case.source}
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION and "research use only" in sr.SeriesDescription
    assert sr.InstitutionName == "Test Hospital"
    assert (sr.ContentDate, sr.ContentTime) == ("20260102", "030405")
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    pred = sr.PredecessorDocumentsSequence[0]
    assert pred.StudyInstanceUID == PREDECESSOR[0]
    assert pred.ReferencedSeriesSequence[0].SeriesInstanceUID == PREDECESSOR[1]
    assert (
        pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == PREDECESSOR[2]
    )
    schemes = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert codes.PRIVATE_SCHEME in schemes
    evidence = {
        sop.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert {ds.SOPInstanceUID for ds in case.source} | {outputs[1].SOPInstanceUID} == evidence


def test_the_lung_groups_carry_the_measurements_and_reference_the_seg_segments(
    outputs: list[Dataset], case: Case, tmp_path: Path
) -> None:
    sr_path = tmp_path / "sr.dcm"
    outputs[0].save_as(sr_path, enforce_file_format=True)
    report = hd.sr.srread(sr_path).content
    seg = outputs[1]
    numbers = {item.SegmentLabel: int(item.SegmentNumber) for item in seg.SegmentSequence}
    groups = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    assert set(groups) == {"Right lung", "Left lung", COVID_OPACITY_LABEL, "Consolidation"}
    # Every volumetric group is tracked under the label of the SEG segment with the same Tracking UID.
    for item in seg.SegmentSequence:
        group = groups[item.SegmentLabel]
        assert (group.tracking_uid, group.tracking_identifier) == (item.TrackingUID, item.TrackingID)

    for label, measures, site in (
        ("Right lung", case.findings.right, codes.RIGHT_LUNG),
        ("Left lung", case.findings.left, codes.LEFT_LUNG),
    ):
        group = groups[label]
        segment = group.referenced_segment
        assert (segment.referenced_sop_class_uid, segment.referenced_sop_instance_uid) == (
            SegmentationStorage,
            seg.SOPInstanceUID,
        )
        assert segment.referenced_segment_numbers == [numbers[label]]
        assert segment.source_series_for_segmentation.value == case.volume.series_instance_uid
        # The SR group and the SEG segment track the same structure.
        seg_item = seg.SegmentSequence[numbers[label] - 1]
        assert group.tracking_uid == seg_item.TrackingUID
        assert [fs.value for fs in group.finding_sites] == [hd.sr.CodedConcept.from_code(site)]
        values = _measurements(group)
        assert values[_key(codes.VOLUME)] == (pytest.approx(measures.lung_ml, abs=1e-3), "ml")
        assert values[_key(codes.LESION_VOLUME)] == (pytest.approx(measures.lesion_ml, abs=1e-3), "ml")
        assert values[_key(codes.CONSOLIDATION_VOLUME)][0] == pytest.approx(
            measures.consolidation_ml, abs=1e-3
        )
        assert values[_key(codes.AFFECTED_PERCENT)] == (pytest.approx(measures.affected_pct, abs=1e-3), "%")
        assert values[_key(codes.CONSOLIDATION_PERCENT)][0] == pytest.approx(
            measures.consolidation_pct, abs=1e-3
        )

    lesion_segment = groups[COVID_OPACITY_LABEL].referenced_segment
    assert lesion_segment.referenced_segment_numbers == [numbers[COVID_OPACITY_LABEL]]
    opacity = _measurements(groups[COVID_OPACITY_LABEL])
    assert opacity[_key(codes.VOLUME)][0] == pytest.approx(case.findings.both.lesion_ml, abs=1e-3)
    assert opacity[_key(codes.AFFECTED_PERCENT)] == (
        pytest.approx(case.findings.both.affected_pct, abs=1e-3),
        "%",
    )
    mean_hu = float(case.volume.hu[case.masks.lesions].mean())
    assert opacity[_key(codes.MEAN_ATTENUATION)] == (pytest.approx(mean_hu, abs=0.06), "[hnsf'U]")


def test_the_study_groups_hold_severity_grade_probabilities_and_key_slices(
    outputs: list[Dataset], case: Case, tmp_path: Path
) -> None:
    sr_path = tmp_path / "sr.dcm"
    outputs[0].save_as(sr_path, enforce_file_format=True)
    report = hd.sr.srread(sr_path).content
    f = case.findings
    groups = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}

    both = groups["Both lungs"]
    values = _measurements(both)
    assert values[_key(codes.VOLUME)][0] == pytest.approx(f.both.lung_ml, abs=1e-3)
    assert values[_key(codes.AFFECTED_PERCENT)][0] == pytest.approx(f.whole_lung_pct, abs=1e-3)
    assert values[_key(codes.CONSOLIDATION_PERCENT)][0] == pytest.approx(f.consolidation_pct, abs=1e-3)
    assert values[_key(codes.SEVERITY_PERCENT)] == (pytest.approx(f.severity_pct, abs=1e-3), "%")
    (grade,) = both.get_qualitative_evaluations()
    assert grade.name == hd.sr.CodedConcept.from_code(codes.CT_SEVERITY_GRADE)
    assert grade.value == hd.sr.CodedConcept.from_code(codes.ct_grade_code(f.ct_grade))
    assert grade.value.value == f.ct_grade.name

    probabilities = _measurements(groups["Classification"])
    assert probabilities[_key(codes.PROBABILITY_COVID_19)] == (pytest.approx(0.87), "{probability}")
    assert probabilities[_key(codes.class_probability_code("healthy"))][0] == pytest.approx(0.05)
    assert len(probabilities) == 4  # covid once (from p_covid), healthy, bacterial, other

    key = groups["Key slices, highest lesion burden first"]
    assert key.finding_type == hd.sr.CodedConcept.from_code(codes.KEY_IMAGES)
    referenced = [img.referenced_sop_instance_uid for img in key.source_images]
    assert referenced == [case.volume.sop_instance_uids[z] for z in f.key_slices]


def test_lesions_are_rectangles_with_2d_measurements_and_a_volume_group(
    outputs: list[Dataset], case: Case, tmp_path: Path
) -> None:
    """The planar group carries area, axes and mean HU on the slice (no 3-D volume); the lesion's volume
    and its share of its lung are in a TID 1501 group with the same Tracking UID and identifier."""
    sr_path = tmp_path / "sr.dcm"
    outputs[0].save_as(sr_path, enforce_file_format=True)
    report = hd.sr.srread(sr_path).content
    (group,) = report.get_planar_roi_measurement_groups()
    box = case.findings.lesion_boxes[0]
    region = group.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    points = region.value
    assert points.shape == (5, 2) and (points[0] == points[-1]).all()
    assert points.min(axis=0).tolist() == [box.col_min, box.row_min]
    assert points.max(axis=0).tolist() == [box.col_max + 1, box.row_max + 1]
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == box.sop_instance_uid
    planar = _measurements(group)
    assert _key(codes.VOLUME) not in planar
    dy, dx = case.volume.spacing[1], case.volume.spacing[2]
    labels, _ = ndimage.label(case.masks.lesions[box.z], np.ones((3, 3), bool))
    pixels = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1  # the largest piece on the slice
    assert planar[_key(codes.AREA)] == (pytest.approx(pixels.sum() * dy * dx, abs=0.06), "mm2")
    # The painted lesion is a 25 mm sphere cut by the lung: its largest section is at most 50 mm across.
    long_axis, short_axis = planar[_key(codes.LONG_AXIS)][0], planar[_key(codes.SHORT_AXIS)][0]
    assert 0 < short_axis <= long_axis <= 50.0 + 2 * max(dy, dx)
    assert planar[_key(codes.LONG_AXIS)][1] == "mm"
    rows, cols = np.nonzero(pixels)
    extent = max((rows.max() - rows.min() + 1) * dy, (cols.max() - cols.min() + 1) * dx)
    assert long_axis >= extent - 1e-6
    assert planar[_key(codes.MEAN_ATTENUATION)][0] == pytest.approx(
        float(case.volume.hu[box.z][pixels].mean()), abs=0.06
    )
    assert [fs.value for fs in group.finding_sites] == [hd.sr.CodedConcept.from_code(codes.RIGHT_LUNG)]
    volumetric = {g.tracking_uid: g for g in report.get_image_measurement_groups()}[group.tracking_uid]
    assert volumetric.tracking_identifier == group.tracking_identifier == "Lesion 1 (right lung)"
    values = _measurements(volumetric)
    assert values[_key(codes.VOLUME)] == (pytest.approx(box.volume_ml, abs=1e-3), "ml")
    share = 100.0 * box.volume_ml / case.findings.right.lung_ml
    assert values[_key(codes.AFFECTED_PERCENT)] == (pytest.approx(share, abs=1e-3), "%")


def test_sub_threshold_lesions_and_ct0_studies_report_no_lesion_findings(
    case: Case, ctx: OutputContext
) -> None:
    """Lesions below the CT0 rule's volume floor are not findings, nor is any lesion of a CT0 study."""
    from triaged.domain import CT1_MIN_ML, CTGrade

    big = case.findings.lesion_boxes[0]
    speck = replace(big, volume_ml=0.07)
    findings = replace(case.findings, lesion_boxes=(big, speck))
    sr = round_trip(build_sr(findings, case.masks, case.volume, case.source, ctx))
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert len(report.get_planar_roi_measurement_groups()) == 1
    labels = {g.tracking_identifier for g in report.get_image_measurement_groups()}
    assert "Lesion 1 (right lung)" in labels and "Lesion 2 (right lung)" not in labels
    assert big.volume_ml >= CT1_MIN_ML

    ct0 = replace(findings, ct_grade=CTGrade.CT0)
    sr = round_trip(build_sr(ct0, case.masks, case.volume, case.source, ctx))
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert report.get_planar_roi_measurement_groups() == []
    assert not any(g.tracking_identifier.startswith("Lesion") for g in report.get_image_measurement_groups())


def test_the_observer_algorithm_research_text_and_priority_are_in_the_tree(outputs: list[Dataset]) -> None:
    report = hd.sr.Comprehensive3DSR.from_dataset(outputs[0]).content
    (device,) = report.get_observer_contexts(observer_type=Code("121007", "DCM", "Device"))
    assert device.observer_identifying_attributes.name == "triaged"
    root = list(outputs[0].ContentSequence)
    texts = {
        (item.ConceptNameCodeSequence[0].CodeValue, item.TextValue)
        for item in _walk(root)
        if item.ValueType == "TEXT"
    }
    assert (codes.COMMENT.value, RESEARCH_USE_TEXT) in texts
    assert (codes.TRIAGE_PRIORITY.value, "URGENT") in texts
    assert ("111001", "threshold-test") in texts  # Algorithm Name (TID 4019)
    assert ("111003", "0.0.1") in texts  # Algorithm Version
    assert ("111002", "model_sha256=" + "ab" * 32) in texts  # Algorithm Parameters: the model card hash
    assert ("121013", "triaged") in texts  # Device Observer Name (TID 1004)
    assert ("121015", "threshold-test") in texts  # Device Observer Model Name: the pipeline
    assert "not for diagnosis" in RESEARCH_USE_TEXT


def test_without_a_seg_the_lung_groups_are_plain_measurement_groups(case: Case, ctx: OutputContext) -> None:
    sr = round_trip(build_sr(case.findings, case.masks, case.volume, case.source, ctx, segmentation=None))
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert report.get_volumetric_roi_measurement_groups() == []
    labels = {g.tracking_identifier for g in report.get_image_measurement_groups()}
    assert {"Right lung", "Left lung", "Both lungs"} <= labels


def test_the_same_analysis_gets_the_same_uids_and_a_revision_new_ones(case: Case, ctx: OutputContext) -> None:
    args = (case.findings, case.masks, case.volume, case.source)
    first = build_outputs(*args, ctx)
    again = build_outputs(*args, ctx)
    assert [ds.SOPInstanceUID for ds in first] == [ds.SOPInstanceUID for ds in again]
    assert [ds.SeriesInstanceUID for ds in first] == [ds.SeriesInstanceUID for ds in again]
    # With a fixed content time a re-send is the same object byte for byte (a PACS sees a duplicate).
    assert [_encoded(ds) for ds in first] == [_encoded(ds) for ds in again]
    revised = build_outputs(*args, replace(ctx, revision=3))
    assert not {ds.SOPInstanceUID for ds in first} & {ds.SOPInstanceUID for ds in revised}
    assert not {ds.SeriesInstanceUID for ds in first} & {ds.SeriesInstanceUID for ds in revised}
    other_version = build_outputs(replace(case.findings, pipeline_version="9"), *args[1:], ctx)
    assert other_version[0].SOPInstanceUID != first[0].SOPInstanceUID
    for ds in first:
        assert ds.SOPInstanceUID.startswith("2.25.") and len(ds.SOPInstanceUID) <= 64


def test_lobe_masks_add_lobe_groups_that_reference_lobe_segments(case: Case, ctx: OutputContext) -> None:
    lungs = case.masks.lungs
    z_mid = lungs.shape[0] // 2
    upper = (np.arange(lungs.shape[0]) >= z_mid)[:, None, None]
    lobes = np.where(
        lungs == 1, np.where(upper, 1, 3), np.where(lungs == 2, np.where(upper, 4, 5), 0)
    ).astype(np.uint8)
    masks = replace(case.masks, lobes=lobes)
    seg = build_seg(case.findings, masks, case.volume, case.source, ctx)
    assert seg is not None
    sr = round_trip(
        build_sr(
            case.findings, masks, case.volume, case.source, ctx, segmentation=segmentation_reference(seg)
        )
    )
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    groups = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    lobe = groups["Upper lobe of right lung"]
    voxel_ml = float(np.prod(case.volume.spacing)) / 1000.0
    assert _measurements(lobe)[_key(codes.VOLUME)][0] == pytest.approx(
        (lobes == 1).sum() * voxel_ml, abs=1e-3
    )
    assert "Middle lobe of right lung" not in groups  # empty lobes are left out, as in the SEG


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _walk(items: list[Dataset]) -> list[Dataset]:
    out: list[Dataset] = []
    for item in items:
        out.append(item)
        if "ContentSequence" in item:
            out.extend(_walk(list(item.ContentSequence)))
    return out


@pytest.fixture(scope="module")
def unassessed(case: Case, ctx: OutputContext) -> list[Dataset]:
    """The outputs of the same analysis from a pipeline without a validated classifier (p_covid None).

    The stand-in's class probabilities stay in the findings: they come from the same unvalidated
    classifier and must not be encoded either.
    """
    findings = replace(case.findings, p_covid=None)
    return [round_trip(ds) for ds in build_outputs(findings, case.masks, case.volume, case.source, ctx)]


def test_without_p_covid_the_sr_says_not_assessed_and_encodes_no_probability(
    unassessed: list[Dataset], tmp_path: Path
) -> None:
    sr_path = tmp_path / "sr.dcm"
    unassessed[0].save_as(sr_path, enforce_file_format=True)
    report = hd.sr.srread(sr_path).content
    groups = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    classification = groups["Classification"]
    assert classification.get_measurements() == []
    (evaluation,) = classification.get_qualitative_evaluations()
    assert evaluation.name == hd.sr.CodedConcept.from_code(codes.PROBABILITY_COVID_19)
    assert evaluation.value == hd.sr.CodedConcept.from_code(codes.NOT_ASSESSED)
    assert evaluation.value.meaning == "Not assessed"
    # No NUM item anywhere in the tree carries a probability.
    items = _walk(list(unassessed[0].ContentSequence))
    units = [
        item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
        for item in items
        if item.ValueType == "NUM" and item.get("MeasuredValueSequence")
    ]
    assert units and codes.UNIT_PROBABILITY.value not in units
    texts = [item.TextValue for item in items if item.ValueType == "TEXT"]
    assert RESEARCH_USE_TEXT in texts
    assert (
        "P(COVID-19): not assessed. Pipeline 'threshold-test' has no COVID-19 classifier validated on real "
        "data; the triage priority is ranked by severity."
    ) in texts
    # The severity figures are unchanged.
    (grade,) = groups["Both lungs"].get_qualitative_evaluations()
    assert grade.name == hd.sr.CodedConcept.from_code(codes.CT_SEVERITY_GRADE)


def test_the_not_assessed_sr_is_dciodvfy_clean(unassessed: list[Dataset], tmp_path: Path) -> None:
    lines = dciodvfy(unassessed[0], tmp_path / "sr.dcm")
    assert errors(lines) == [], "\n".join(lines)


def test_a_p_covid_that_is_not_a_number_is_not_assessed_either(case: Case, ctx: OutputContext) -> None:
    findings = replace(case.findings, p_covid=float("nan"), class_probabilities=())
    sr = round_trip(build_sr(findings, case.masks, case.volume, case.source, ctx, segmentation=None))
    groups = {
        g.tracking_identifier: g
        for g in hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    }
    (evaluation,) = groups["Classification"].get_qualitative_evaluations()
    assert evaluation.value.value == codes.NOT_ASSESSED.value
    assert groups["Classification"].get_measurements() == []


def test_ct_severity_score_in_the_both_lungs_group_and_per_lobe_scores_in_the_lobe_groups(
    case: Case, ctx: OutputContext, tmp_path: Path
) -> None:
    from triaged.analysis.severity import findings_from_masks

    lungs = case.masks.lungs
    z_mid = lungs.shape[0] // 2
    upper = (np.arange(lungs.shape[0]) >= z_mid)[:, None, None]
    lobes = np.where(
        lungs == 1, np.where(upper, 1, 3), np.where(lungs == 2, np.where(upper, 4, 5), 0)
    ).astype(np.uint8)
    masks = replace(case.masks, lobes=lobes)
    findings = findings_from_masks(case.volume, masks, pipeline="classical", version="1.1")
    assert findings.ct_severity_score is not None
    seg = build_seg(findings, masks, case.volume, case.source, ctx)
    assert seg is not None
    sr = round_trip(
        build_sr(findings, masks, case.volume, case.source, ctx, segmentation=segmentation_reference(seg))
    )
    assert errors(dciodvfy(sr, tmp_path / "sr.dcm")) == []
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    both = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}["Both lungs"]
    ctss = float(findings.ct_severity_score)
    assert _measurements(both)[_key(codes.CT_SEVERITY_SCORE)] == (ctss, "{score}")
    groups = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    names = dict(codes.LOBES)
    for lobe in findings.lobes:
        group = groups[names[lobe.label].meaning]
        assert _measurements(group)[_key(codes.CT_SEVERITY_LOBE_SCORE)] == (float(lobe.score), "{score}")
    assert sum(lobe.score for lobe in findings.lobes) == findings.ct_severity_score
    # without lobes there is no CT-SS item at all
    plain_sr = hd.sr.Comprehensive3DSR.from_dataset(
        round_trip(build_sr(case.findings, case.masks, case.volume, case.source, ctx))
    )
    names_used = {
        (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptNameCodeSequence[0].CodingSchemeDesignator)
        for item in _walk(list(plain_sr.ContentSequence))
        if "ConceptNameCodeSequence" in item
    }
    assert _key(codes.CT_SEVERITY_SCORE) not in names_used
    assert _key(codes.CT_SEVERITY_LOBE_SCORE) not in names_used
