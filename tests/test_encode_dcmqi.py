"""dcmqi (QIICR, an independent DICOM SEG/SR implementation) reads back the project's SR and SEG.

``tid1500reader`` parses the TID 1500 SR into dcmqi's JSON: its measurement groups must carry the
tracking identifiers, finding sites, finding types, units and values of the findings as the ledger
holds them.  ``segimage2itkimage`` converts the SEG into one NIfTI image per segment: their voxels must be
the masks the encoder was given, and its meta JSON must carry the segment labels, tracking identifiers,
algorithm type and anatomic region with laterality (dcmqi's JSON has no algorithm family; that is read
from the same file with pydicom).

The case is the session's phantom CT with two lesions (right lung, consolidated core; left lung), lobes,
and a sub-threshold speck box that must not be reported.  The expected values are computed here from the
masks, the volume and the ledger's findings, not taken from the encoder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from scipy import ndimage

from tests.encode_fixtures import Case, findings_from_masks, load_real_case, round_trip
from triaged.domain import Findings, InstanceRecord, JobState, LesionBox, Masks
from triaged.encode import OutputContext, build_seg, build_sr, segmentation_reference
from triaged.encode.seg import COVID_OPACITY_LABEL, OPACITY_LABEL
from triaged.ledger import Ledger
from triaged.routing import RouteDecision


def _tool(name: str) -> str | None:
    """A dcmqi command on PATH or next to this interpreter (the virtualenv's bin)."""
    found = shutil.which(name)
    if found is not None:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


TID1500READER = _tool("tid1500reader")
SEGIMAGE2ITKIMAGE = _tool("segimage2itkimage")

pytestmark = pytest.mark.skipif(
    TID1500READER is None or SEGIMAGE2ITKIMAGE is None,
    reason="dcmqi's tid1500reader/segimage2itkimage are not installed (pip install dcmqi, a dev dependency)",
)

CTX = OutputContext(
    software_version="0.1.0", priority_level="URGENT", content_datetime=datetime(2026, 1, 2, 3, 4)
)

#: Unit (UCUM code value) of every quantity the SR may hold, by concept code value: written out here, not
#: read from triaged.encode.codes, so a wrong unit there fails.
UNITS = {
    "118565006": "ml",  # SCT Volume
    "LESVOL": "ml",
    "CONSVOL": "ml",
    "AFFPCT": "%",
    "CONSPCT": "%",
    "SEVPCT": "%",
    "42798000": "mm2",  # SCT Area
    "103339001": "mm",  # SCT Long axis
    "103340004": "mm",  # SCT Short axis
    "112181": "[hnsf'U]",  # DCM Mean Attenuation Coefficient
    "PCOVID": "{probability}",
    "PHEALTHY": "{probability}",
    "PBACTERIAL": "{probability}",
    "POTHER": "{probability}",
}
LUNG, RIGHT_LUNG, LEFT_LUNG = "39607008", "3341006", "44029006"
OPACITY, CONSOLIDATION = ("112001", "DCM"), ("95436008", "SCT")
#: Lobe label of the test masks -> (SR tracking identifier / SEG label, SCT code, laterality).
LOBES = (
    (1, "Upper lobe of right lung", "42400003", "Right"),
    (3, "Lower lobe of right lung", "266005", "Right"),
    (4, "Upper lobe of left lung", "44714003", "Left"),
    (5, "Lower lobe of left lung", "41224006", "Left"),
)
SPECK_ML = 0.5


@dataclass(frozen=True)
class Encoded:
    """One analysis encoded and read back by dcmqi."""

    case: Case
    sr: Dataset
    seg: Dataset
    sr_json: dict[str, Any]
    seg_meta: dict[str, Any]
    seg_images: Path


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (
        f"{Path(args[0]).name} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    )


def _blob(case: Case, label: int, radius_mm: float) -> npt.NDArray[np.bool_]:
    """A ball of ``radius_mm`` around the median voxel of lung ``label``, cut by that lung."""
    lungs = case.masks.lungs
    centre = [float(np.median(a)) for a in np.nonzero(lungs == label)]
    grid = np.ogrid[: lungs.shape[0], : lungs.shape[1], : lungs.shape[2]]
    dist = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, case.volume.spacing, strict=True)))
    return np.asarray((dist < radius_mm) & (lungs == label))


def _box(case: Case, lesion: npt.NDArray[np.bool_], side: str) -> LesionBox:
    """The box of one lesion on its largest slice, with its volume."""
    z = int(np.argmax(lesion.sum(axis=(1, 2))))
    rows, cols = np.nonzero(lesion[z])
    voxel_ml = float(np.prod(case.volume.spacing)) / 1000.0
    return LesionBox(
        z=z,
        sop_instance_uid=case.volume.sop_instance_uids[z],
        row_min=int(rows.min()),
        col_min=int(cols.min()),
        row_max=int(rows.max()),
        col_max=int(cols.max()),
        volume_ml=float(lesion.sum()) * voxel_ml,
        side=side,
    )


def _through_the_ledger(findings: Findings, path: Path) -> Findings:
    """Record ``findings`` for a job in a real SQLite ledger and return what the ledger reads back."""
    record = InstanceRecord(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_instance_uid="1.2.3.4.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path="studies/1.2.3/1.2.3.4/1.2.3.4.1.dcm",
        size=10,
        sha256="0" * 64,
    )
    with Ledger(path) as ledger:
        ledger.record_instance(record, association_id=None)
        (job,) = ledger.jobs()
        ledger.transition(job.id, JobState.RECEIVING, JobState.COMPLETE)
        ledger.queue_job(
            job.id,
            route=RouteDecision.from_json("{}"),
            pipeline=findings.pipeline,
            series_instance_uid="1.2.3.4",
            detail="",
        )
        ledger.transition(job.id, JobState.QUEUED, JobState.ANALYSING)
        ledger.record_analysis(job.id, findings, priority=None, detail="analysed")
        stored = ledger.findings(job.id)
    assert stored == findings
    return stored


def _case(phantom: Path) -> Case:
    """The phantom with a right lesion (consolidated core), a left lesion, lobes and a speck box."""
    base = load_real_case(phantom)
    right, left = _blob(base, 1, 25.0), _blob(base, 2, 20.0)
    lungs = base.masks.lungs
    z = np.arange(lungs.shape[0])[:, None, None]
    upper = z >= lungs.shape[0] // 2
    lobes = np.where(lungs == 1, np.where(upper, 1, 3), np.where(lungs == 2, np.where(upper, 4, 5), 0))
    masks = Masks(
        lungs=lungs,
        lesions=right | left,
        consolidation=base.masks.consolidation & right,
        lobes=lobes.astype(np.uint8),
    )
    boxes = (_box(base, right, "right"), _box(base, left, "left"))
    speck = replace(boxes[1], volume_ml=SPECK_ML)  # below the 5 ml floor: not a finding
    findings = replace(
        findings_from_masks(base.volume, masks),
        pipeline="classical",
        pipeline_version="2.1",
        lesion_boxes=(*boxes, speck),
        p_covid=None,
        model_sha256=None,
    )
    return Case(base.volume, base.source, masks, findings)


def _encode(case: Case, findings: Findings, folder: Path) -> Encoded:
    """Build SEG and SR of ``findings`` on ``case`` and read both back with dcmqi."""
    folder.mkdir(parents=True, exist_ok=True)
    built = build_seg(findings, case.masks, case.volume, case.source, CTX)
    assert built is not None
    seg = round_trip(built)
    sr = round_trip(
        build_sr(
            findings, case.masks, case.volume, case.source, CTX, segmentation=segmentation_reference(seg)
        )
    )
    seg.save_as(folder / "seg.dcm", enforce_file_format=True)
    sr.save_as(folder / "sr.dcm", enforce_file_format=True)
    assert TID1500READER is not None and SEGIMAGE2ITKIMAGE is not None
    _run([TID1500READER, "--inputDICOM", str(folder / "sr.dcm"), "--outputMetadata", str(folder / "sr.json")])
    images = folder / "seg"
    images.mkdir()
    seg_args = ["--inputDICOM", str(folder / "seg.dcm"), "--outputDirectory", str(images), "-t", "nii"]
    _run([SEGIMAGE2ITKIMAGE, *seg_args])
    return Encoded(
        case=replace(case, findings=findings),
        sr=sr,
        seg=seg,
        sr_json=json.loads((folder / "sr.json").read_text()),
        seg_meta=json.loads((images / "meta.json").read_text()),
        seg_images=images,
    )


@pytest.fixture(scope="module")
def encoded(phantom_ct_series: Path, tmp_path_factory: pytest.TempPathFactory) -> Encoded:
    """A non-learned pipeline without a validated classifier: neutral lesion label, P(COVID-19) not assessed."""
    folder = tmp_path_factory.mktemp("dcmqi")
    case = _case(phantom_ct_series)
    findings = _through_the_ledger(case.findings, folder / "ledger.sqlite")
    return _encode(case, findings, folder / "unassessed")


def _groups(sr_json: dict[str, Any]) -> list[dict[str, Any]]:
    return list(sr_json["Measurements"])


def _values(group: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """Concept code value -> (value, UCUM unit) of a group's measurement items."""
    return {
        item["quantity"]["CodeValue"]: (float(item["value"]), item["units"]["CodeValue"])
        for item in group.get("measurementItems", [])
    }


def _code(item: dict[str, str]) -> tuple[str, str]:
    return (item["CodeValue"], item["CodingSchemeDesignator"])


def _segments(meta: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(s["labelID"]): s for group in meta["segmentAttributes"] for s in group}


def test_tid1500reader_lists_every_group_under_its_tracking_identifier(encoded: Encoded) -> None:
    sr = encoded.sr_json
    assert (sr["CompletionFlag"], sr["VerificationFlag"]) == ("COMPLETE", "UNVERIFIED")
    assert "research use only" in sr["SeriesDescription"]
    assert sr["observerContext"]["ObserverType"] == "DEVICE"
    assert sr["observerContext"]["DeviceObserverName"] == "triaged"
    assert _code(sr["procedureReported"]) == ("24627-2", "LN")
    assert set(sr["imageLibrary"]) == set(encoded.case.volume.sop_instance_uids)
    assert sr["compositeContext"] == [str(encoded.seg.SOPInstanceUID)]
    identifiers = [g["TrackingIdentifier"] for g in _groups(sr)]
    assert identifiers == [
        "Right lung",
        "Left lung",
        "Both lungs",
        OPACITY_LABEL,
        "Consolidation",
        *(name for _, name, _, _ in LOBES),
        "Classification",
        "Key slices, highest lesion burden first",
        # Each reported lesion twice (TID 1501 volume, TID 1410 planar), same Tracking UID; no speck.
        "Lesion 1 (right lung)",
        "Lesion 1 (right lung)",
        "Lesion 2 (left lung)",
        "Lesion 2 (left lung)",
    ]
    for group in _groups(sr):
        algorithm = group["measurementAlgorithmIdentification"]
        assert (algorithm["AlgorithmName"], algorithm["AlgorithmVersion"]) == ("classical", "2.1")
        assert "AlgorithmParameters" not in algorithm  # no model, no model hash
    lesions = [g for g in _groups(sr) if g["TrackingIdentifier"].startswith("Lesion")]
    assert lesions[0]["TrackingUniqueIdentifier"] == lesions[1]["TrackingUniqueIdentifier"]
    assert lesions[2]["TrackingUniqueIdentifier"] == lesions[3]["TrackingUniqueIdentifier"]
    assert lesions[0]["TrackingUniqueIdentifier"] != lesions[2]["TrackingUniqueIdentifier"]


def test_every_measurement_has_its_ucum_unit(encoded: Encoded) -> None:
    seen = set()
    for group in _groups(encoded.sr_json):
        for item in group.get("measurementItems", []):
            concept = item["quantity"]["CodeValue"]
            assert concept in UNITS, (
                f"unexpected quantity {item['quantity']} in {group['TrackingIdentifier']}"
            )
            assert _code(item["units"]) == (UNITS[concept], "UCUM"), (group["TrackingIdentifier"], item)
            seen.add(concept)
    assert seen == set(UNITS) - {"PCOVID", "PHEALTHY", "PBACTERIAL", "POTHER"}


def test_lung_and_lobe_groups_hold_the_ledgers_figures_at_their_finding_sites(encoded: Encoded) -> None:
    f = encoded.case.findings
    groups = {g["TrackingIdentifier"]: g for g in _groups(encoded.sr_json)}
    for label, site, m in (("Right lung", RIGHT_LUNG, f.right), ("Left lung", LEFT_LUNG, f.left)):
        group = groups[label]
        assert _code(group["FindingSite"]) == (site, "SCT")
        values = _values(group)
        assert values["118565006"][0] == pytest.approx(m.lung_ml, abs=1e-3)
        assert values["LESVOL"][0] == pytest.approx(m.lesion_ml, abs=1e-3)
        assert values["CONSVOL"][0] == pytest.approx(m.consolidation_ml, abs=1e-3)
        assert values["AFFPCT"][0] == pytest.approx(m.affected_pct, abs=1e-3)
        assert values["CONSPCT"][0] == pytest.approx(m.consolidation_pct, abs=1e-3)
    assert f.left.lesion_ml > 0 and f.right.consolidation_ml > 0 and f.left.consolidation_ml == 0

    both = groups["Both lungs"]
    assert _code(both["FindingSite"]) == (LUNG, "SCT")
    values = _values(both)
    assert values["118565006"][0] == pytest.approx(f.both.lung_ml, abs=1e-3)
    assert values["LESVOL"][0] == pytest.approx(f.both.lesion_ml, abs=1e-3)
    assert values["AFFPCT"][0] == pytest.approx(f.whole_lung_pct, abs=1e-3)
    assert values["SEVPCT"][0] == pytest.approx(f.severity_pct, abs=1e-3)
    (grade,) = both["qualitativeEvaluations"]
    assert _code(grade["conceptCode"]) == ("CTGRADE", "99TRIAGED")
    assert _code(grade["conceptValue"]) == (f.ct_grade.name, "99TRIAGED")

    volume, masks = encoded.case.volume, encoded.case.masks
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    assert masks.lobes is not None
    for lobe_label, name, code, _ in LOBES:
        group = groups[name]
        assert _code(group["FindingSite"]) == (code, "SCT")
        lobe = masks.lobes == lobe_label
        lesion = np.count_nonzero(masks.lesions & lobe)
        values = _values(group)
        assert values["118565006"][0] == pytest.approx(np.count_nonzero(lobe) * voxel_ml, abs=1e-3)
        assert values["LESVOL"][0] == pytest.approx(lesion * voxel_ml, abs=1e-3)
        assert values["AFFPCT"][0] == pytest.approx(100.0 * lesion / np.count_nonzero(lobe), abs=1e-3)


def test_opacity_and_consolidation_groups_reference_their_segments(encoded: Encoded) -> None:
    f, volume, masks = encoded.case.findings, encoded.case.volume, encoded.case.masks
    groups = {g["TrackingIdentifier"]: g for g in _groups(encoded.sr_json)}
    segments = {s["TrackingUniqueIdentifier"]: s for s in _segments(encoded.seg_meta).values()}
    referenced = [g for g in _groups(encoded.sr_json) if "ReferencedSegment" in g]
    assert len(referenced) == len(segments) == 8
    for group in referenced:
        # The SR group and the SEG segment it measures: same Tracking UID, identifier and segment number.
        segment = segments[group["TrackingUniqueIdentifier"]]
        assert group["TrackingIdentifier"] == segment["TrackingIdentifier"] == segment["SegmentLabel"]
        assert group["ReferencedSegment"] == segment["labelID"]
        assert group["segmentationSOPInstanceUID"] == encoded.seg.SOPInstanceUID
        assert group["SourceSeriesForImageSegmentation"] == volume.series_instance_uid

    for label, finding, ml, pct, mask in (
        (OPACITY_LABEL, OPACITY, f.both.lesion_ml, f.both.affected_pct, masks.lesions),
        (
            "Consolidation",
            CONSOLIDATION,
            f.both.consolidation_ml,
            f.both.consolidation_pct,
            masks.consolidation,
        ),
    ):
        group = groups[label]
        assert _code(group["Finding"]) == finding
        assert _code(group["FindingSite"]) == (LUNG, "SCT")
        values = _values(group)
        assert values["118565006"][0] == pytest.approx(ml, abs=1e-3)
        assert values["AFFPCT"][0] == pytest.approx(pct, abs=1e-3)
        assert values["112181"][0] == pytest.approx(float(volume.hu[mask.astype(bool)].mean()), abs=0.06)


def test_lesion_groups_hold_volume_share_and_planar_measures_on_their_side(encoded: Encoded) -> None:
    f, volume, masks = encoded.case.findings, encoded.case.volume, encoded.case.masks
    lesions = [g for g in _groups(encoded.sr_json) if g["TrackingIdentifier"].startswith("Lesion")]
    dy, dx = float(volume.spacing[1]), float(volume.spacing[2])
    for n, box in enumerate(f.lesion_boxes[:2]):
        whole, planar = lesions[2 * n], lesions[2 * n + 1]
        site, lung = (RIGHT_LUNG, f.right) if box.side == "right" else (LEFT_LUNG, f.left)
        for group in (whole, planar):
            assert _code(group["FindingSite"]) == (site, "SCT")
            assert _code(group["Finding"]) == OPACITY
        values = _values(whole)
        assert set(values) == {"118565006", "AFFPCT"}
        assert values["118565006"][0] == pytest.approx(box.volume_ml, abs=1e-3)
        assert values["AFFPCT"][0] == pytest.approx(100.0 * box.volume_ml / lung.lung_ml, abs=1e-3)

        section = masks.lesions[box.z, box.row_min : box.row_max + 1, box.col_min : box.col_max + 1]
        labels, _ = ndimage.label(section, np.ones((3, 3), bool))
        piece = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
        values = _values(planar)
        assert set(values) == {"42798000", "103339001", "103340004", "112181"}
        assert values["42798000"][0] == pytest.approx(piece.sum() * dy * dx, abs=0.06)
        rows, cols = np.nonzero(piece)
        extent = max((rows.max() - rows.min() + 1) * dy, (cols.max() - cols.min() + 1) * dx)
        assert 0 < values["103340004"][0] <= values["103339001"][0]
        assert values["103339001"][0] >= extent - 0.06
        hu = volume.hu[box.z, box.row_min : box.row_max + 1, box.col_min : box.col_max + 1][piece]
        assert values["112181"][0] == pytest.approx(float(hu.mean()), abs=0.06)
    assert f.lesion_boxes[2].volume_ml == SPECK_ML  # in the findings, not in the report


def test_without_a_validated_classifier_the_classification_is_not_assessed(encoded: Encoded) -> None:
    groups = {g["TrackingIdentifier"]: g for g in _groups(encoded.sr_json)}
    classification = groups["Classification"]
    assert "measurementItems" not in classification or classification["measurementItems"] == []
    (evaluation,) = classification["qualitativeEvaluations"]
    assert _code(evaluation["conceptCode"]) == ("PCOVID", "99TRIAGED")
    assert _code(evaluation["conceptValue"]) == ("NOTASSESSED", "99TRIAGED")
    key = groups["Key slices, highest lesion burden first"]
    assert _code(key["Finding"]) == ("121180", "DCM")


def _seg_expectation(case: Case) -> list[tuple[str, npt.NDArray[np.bool_], str, str]]:
    """(label, mask, property type code value, laterality) of each segment in SEG order."""
    m = case.masks
    assert m.lobes is not None
    return [
        ("Right lung", m.lungs == 1, RIGHT_LUNG, "Right"),
        ("Left lung", m.lungs == 2, LEFT_LUNG, "Left"),
        (OPACITY_LABEL, m.lesions.astype(bool), OPACITY[0], "Bilateral"),
        ("Consolidation", m.consolidation.astype(bool), CONSOLIDATION[0], "Right"),
        *((name, m.lobes == label, code, side) for label, name, code, side in LOBES),
    ]


def test_segimage2itkimage_gives_back_the_masks_voxel_for_voxel(encoded: Encoded) -> None:
    affine = encoded.case.volume.affine
    expected = _seg_expectation(encoded.case)
    assert sorted(p.name for p in encoded.seg_images.glob("*.nii.gz")) == sorted(
        f"{n}.nii.gz" for n in range(1, len(expected) + 1)
    )
    for number, (label, mask, _, _) in enumerate(expected, start=1):
        image = sitk.ReadImage(str(encoded.seg_images / f"{number}.nii.gz"))
        assert np.allclose(image.GetOrigin(), affine[:3, 3], atol=1e-3), label
        assert np.allclose(image.GetSpacing(), np.linalg.norm(affine[:3, :3], axis=0), atol=1e-4), label
        array = sitk.GetArrayFromImage(image) != 0
        assert int(array.sum()) == int(mask.sum()) > 0, label
        assert np.array_equal(array, mask), label


def test_segimage2itkimage_meta_carries_labels_algorithm_and_lung_laterality(encoded: Encoded) -> None:
    segments = _segments(encoded.seg_meta)
    assert "research use only" in encoded.seg_meta["SeriesDescription"]
    for number, (label, _, prop, side) in enumerate(_seg_expectation(encoded.case), start=1):
        s = segments[number]
        assert s["SegmentLabel"] == s["TrackingIdentifier"] == label
        assert _code(s["SegmentedPropertyTypeCodeSequence"])[0] == prop
        assert (s["SegmentAlgorithmType"], s["SegmentAlgorithmName"]) == ("AUTOMATIC", "classical")
        assert _code(s["AnatomicRegionSequence"]) == (LUNG, "SCT")
        assert s["AnatomicRegionModifierSequence"]["CodeMeaning"] == side
        assert "not for diagnosis" in s["SegmentDescription"]
    assert _code(segments[3]["AnatomicRegionModifierSequence"]) == ("51440002", "SCT")  # Bilateral
    assert _code(segments[3]["SegmentedPropertyCategoryCodeSequence"]) == ("49755003", "SCT")
    # dcmqi's meta JSON has no algorithm family: read it from the same file.  classical = opening and
    # component filtering, PS3.16 CID 7162 Morphological Operations.
    ds = pydicom.dcmread(encoded.seg_images.parent / "seg.dcm", stop_before_pixels=True)
    for item in ds.SegmentSequence:
        (algorithm,) = item.SegmentationAlgorithmIdentificationSequence
        assert _family(algorithm) == ("123104", "DCM")


def _family(algorithm: Dataset) -> tuple[str, str]:
    (family,) = algorithm.AlgorithmFamilyCodeSequence
    return (str(family.CodeValue), str(family.CodingSchemeDesignator))


def test_a_learned_pipeline_with_a_validated_classifier(encoded: Encoded, tmp_path: Path) -> None:
    """Model hash and P(COVID-19) >= 0.5: AI family, COVID-19 label on both sides, probabilities in units."""
    findings = replace(encoded.case.findings, model_sha256="ab" * 32, p_covid=0.87)
    learned = _encode(encoded.case, findings, tmp_path)
    groups = {g["TrackingIdentifier"]: g for g in _groups(learned.sr_json)}
    assert OPACITY_LABEL not in groups
    segment = _segments(learned.seg_meta)[3]
    assert segment["SegmentLabel"] == COVID_OPACITY_LABEL
    assert groups[COVID_OPACITY_LABEL]["TrackingUniqueIdentifier"] == segment["TrackingUniqueIdentifier"]
    probabilities = _values(groups["Classification"])
    assert probabilities["PCOVID"] == (pytest.approx(0.87), "{probability}")
    assert set(probabilities) == {"PCOVID", "PHEALTHY", "PBACTERIAL", "POTHER"}
    assert all(unit == "{probability}" for _, unit in probabilities.values())
    assert groups["Right lung"]["measurementAlgorithmIdentification"]["AlgorithmParameters"] == [
        "model_sha256=" + "ab" * 32
    ]
    for item in learned.seg.SegmentSequence:
        assert _family(item.SegmentationAlgorithmIdentificationSequence[0]) == ("123110", "DCM")
