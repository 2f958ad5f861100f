"""SEG encoder: phantom and real series, round trip, dciodvfy; highdicom and dcmqi read it back voxelwise."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from tests.encode_fixtures import Case, dciodvfy, errors, load_real_case, round_trip, stretched_case
from triaged.domain import Masks
from triaged.encode import OutputContext, build_seg, codes, segmentation_reference
from triaged.encode.context import SEG_SERIES_DESCRIPTION
from triaged.encode.seg import COVID_OPACITY_LABEL, OPACITY_LABEL

CTX = OutputContext(software_version="0.1.0", content_datetime=datetime(2026, 1, 2, 3, 4, 5))


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
def seg(case: Case) -> hd.seg.Segmentation:
    built = build_seg(case.findings, case.masks, case.volume, case.source, CTX)
    assert built is not None
    return built


def _expected(case: Case) -> dict[str, np.ndarray]:
    m = case.masks
    return {
        "Right lung": m.lungs == 1,
        "Left lung": m.lungs == 2,
        COVID_OPACITY_LABEL: m.lesions.astype(bool),
        "Consolidation": m.consolidation.astype(bool),
    }


def test_the_seg_round_trips_and_dciodvfy_reports_no_errors(seg: hd.seg.Segmentation, tmp_path: Path) -> None:
    lines = dciodvfy(round_trip(seg), tmp_path / "seg.dcm")
    assert errors(lines) == [], "\n".join(lines)


def test_segments_have_codes_algorithm_and_the_source_series(seg: hd.seg.Segmentation, case: Case) -> None:
    ds = round_trip(seg)
    assert ds.StudyInstanceUID == case.volume.study_instance_uid
    assert ds.SeriesInstanceUID != case.volume.series_instance_uid
    assert ds.SeriesDescription == SEG_SERIES_DESCRIPTION
    assert ds.SegmentationType == "BINARY"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == case.volume.series_instance_uid
    read = hd.seg.Segmentation.from_dataset(ds)
    expected = [
        ("Right lung", codes.ANATOMICAL_STRUCTURE, codes.RIGHT_LUNG),
        ("Left lung", codes.ANATOMICAL_STRUCTURE, codes.LEFT_LUNG),
        (COVID_OPACITY_LABEL, codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE, codes.OPACITY),
        ("Consolidation", codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE, codes.LUNG_CONSOLIDATION),
    ]
    for number, (label, category, prop) in enumerate(expected, start=1):
        desc = read.get_segment_description(number)
        assert desc.segment_label == label
        assert desc.segmented_property_category == hd.sr.CodedConcept.from_code(category)
        assert desc.segmented_property_type == hd.sr.CodedConcept.from_code(prop)
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algo = desc.algorithm_identification[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("threshold-test", "0.0.1")
        assert algo.AlgorithmParameters == "model_sha256=" + "ab" * 32
    ref = segmentation_reference(ds)
    assert ref.number("lesions") == 3 and ref.number("lobe_1") is None


def test_highdicom_reads_back_the_masks_and_empty_frames_are_omitted(
    seg: hd.seg.Segmentation, case: Case
) -> None:
    read = hd.seg.Segmentation.from_dataset(round_trip(seg))
    expected = _expected(case)
    non_empty = sum(int(mask.any(axis=(1, 2)).sum()) for mask in expected.values())
    assert int(read.NumberOfFrames) == non_empty < len(case.source) * len(expected)
    array = read.get_pixels_by_source_instance(
        source_sop_instance_uids=list(case.volume.sop_instance_uids),
        combine_segments=False,
        ignore_spatial_locations=True,
    )
    for number, mask in enumerate(expected.values(), start=1):
        assert np.array_equal(array[..., number - 1].astype(bool), mask)


def test_dcmqi_converts_the_seg_back_to_the_masks(
    seg: hd.seg.Segmentation, case: Case, tmp_path: Path
) -> None:
    tool = shutil.which("segimage2itkimage") or _venv_tool("segimage2itkimage")
    if tool is None:
        pytest.skip("dcmqi's segimage2itkimage is not installed (pip install dcmqi)")
    path = tmp_path / "seg.dcm"
    round_trip(seg).save_as(path, enforce_file_format=True)
    out = tmp_path / "dcmqi"
    out.mkdir()
    proc = subprocess.run(
        [tool, "--inputDICOM", str(path), "--outputDirectory", str(out), "-t", "nrrd"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    affine = case.volume.affine
    for number, mask in enumerate(_expected(case).values(), start=1):
        image = sitk.ReadImage(str(out / f"{number}.nrrd"))
        # dcmqi writes the source grid: same origin and spacing (LPS, x/y/z), so voxels compare 1:1.
        assert np.allclose(image.GetOrigin(), affine[:3, 3], atol=1e-3)
        assert np.allclose(image.GetSpacing(), np.linalg.norm(affine[:3, :3], axis=0), atol=1e-4)
        assert np.array_equal(sitk.GetArrayFromImage(image) != 0, mask)


def test_lobes_become_five_more_segments_with_lobe_codes(case: Case) -> None:
    z = np.arange(case.masks.lungs.shape[0])[:, None, None]
    third = case.masks.lungs.shape[0] // 3
    lungs = case.masks.lungs
    right_lobe = np.where(z < third, 3, np.where(z < 2 * third, 2, 1))
    left_lobe = np.where(z < 2 * third, 5, 4)
    lobes = np.where(lungs == 1, right_lobe, np.where(lungs == 2, left_lobe, 0)).astype(np.uint8)
    seg = build_seg(case.findings, replace(case.masks, lobes=lobes), case.volume, case.source, CTX)
    assert seg is not None
    read = hd.seg.Segmentation.from_dataset(round_trip(seg))
    types = [read.get_segment_description(n).segmented_property_type.value for n in range(5, 10)]
    assert types == [code.value for _, code in codes.LOBES]


def test_all_empty_masks_give_no_seg(case: Case) -> None:
    empty = Masks(
        lungs=np.zeros_like(case.masks.lungs),
        lesions=np.zeros_like(case.masks.lesions),
        consolidation=np.zeros_like(case.masks.consolidation),
    )
    assert build_seg(case.findings, empty, case.volume, case.source, CTX) is None


def test_an_empty_lesion_mask_leaves_the_lesion_segments_out(case: Case, tmp_path: Path) -> None:
    healthy = replace(
        case.masks,
        lesions=np.zeros_like(case.masks.lesions),
        consolidation=np.zeros_like(case.masks.consolidation),
    )
    seg = build_seg(case.findings, healthy, case.volume, case.source, CTX)
    assert seg is not None
    ds = round_trip(seg)
    assert [item.SegmentLabel for item in ds.SegmentSequence] == ["Right lung", "Left lung"]
    assert errors(dciodvfy(ds, tmp_path / "seg.dcm")) == []


def test_a_300_slice_seg_encodes_every_non_empty_frame(case: Case) -> None:
    # Its time is measured by `make bench` (bench/analysis.py), not asserted here.
    big = stretched_case(case, 300)
    seg = build_seg(big.findings, big.masks, big.volume, big.source, CTX)
    assert seg is not None and int(seg.NumberOfFrames) > 300


def _venv_tool(name: str) -> str | None:
    import sys

    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def test_the_frame_by_frame_stack_gives_the_seg_of_the_whole_stack_byte_for_byte(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    # issue 13 item 3: the frames are cut from the masks when highdicom asks for them; the object must be
    # the one a materialised (frames, rows, columns, segments) stack gives, pixels and every attribute
    from pydicom.filebase import DicomBytesIO

    import triaged.encode.seg as seg_module

    lobes = np.zeros_like(case.masks.lungs)
    lobes[case.masks.lungs == 1] = 1
    lobes[case.masks.lungs == 2] = 4
    cases = [case.masks, replace(case.masks, lobes=lobes)]
    lazy_stack = seg_module._frame_stack

    def materialised(images, shape, cuts):  # type: ignore[no-untyped-def]
        lazy = lazy_stack(images, shape, cuts)
        frames = np.stack([lazy[i] for i in range(len(lazy))])
        assert frames.shape == lazy.shape
        assert [bool(f.any()) for f in lazy] == [bool(f.any()) for f in frames]
        n = frames.shape[-1]
        whole = any(
            np.logical_and(frames[..., i], frames[..., j]).any() for i in range(n) for j in range(i + 1, n)
        )
        assert lazy.overlap() == whole
        return frames

    def encoded(masks: Masks) -> tuple[bytes, bytes]:
        built = build_seg(case.findings, masks, case.volume, case.source, CTX)
        assert built is not None
        buffer = DicomBytesIO()
        built.save_as(buffer, enforce_file_format=True)
        return bytes(built.PixelData), buffer.getvalue()

    lazy = [encoded(m) for m in cases]
    monkeypatch.setattr(seg_module, "_frame_stack", materialised)
    assert [encoded(m) for m in cases] == lazy


def _family(seg_ds: object, number: int) -> tuple[str, str]:
    read = hd.seg.Segmentation.from_dataset(round_trip(seg_ds))  # type: ignore[arg-type]
    item = read.get_segment_description(number).algorithm_identification[0].AlgorithmFamilyCodeSequence[0]
    return str(item.CodeValue), str(item.CodingSchemeDesignator)


@pytest.mark.parametrize(
    ("pipeline", "sha", "family"),
    [
        ("threshold", None, codes.HISTOGRAM_ANALYSIS),
        ("classical", None, codes.MORPHOLOGICAL_OPERATIONS),
        ("multitask", "cd" * 32, codes.ARTIFICIAL_INTELLIGENCE),
    ],
)
def test_the_algorithm_family_follows_the_pipeline(
    phantom_ct_series: Path, pipeline: str, sha: str | None, family: object
) -> None:
    """Non-learned pipelines get their PS3.16 CID 7162 family, learned ones Artificial Intelligence."""
    case = load_real_case(phantom_ct_series)
    findings = replace(case.findings, pipeline=pipeline, model_sha256=sha, p_covid=None)
    built = build_seg(findings, case.masks, case.volume, case.source, CTX)
    assert built is not None
    code = family  # a pydicom Code
    assert _family(built, 1) == (code.value, code.scheme_designator)  # type: ignore[attr-defined]


def test_the_opacity_segment_is_neutral_and_every_segment_is_described(phantom_ct_series: Path) -> None:
    """Without a validated classifier the lesion segment names no cause; every segment has a Segment
    Description, the anatomic region Lung with its laterality, and Tracking ID = Segment Label."""
    case = load_real_case(phantom_ct_series)
    findings = replace(case.findings, p_covid=None, class_probabilities=())
    built = build_seg(findings, case.masks, case.volume, case.source, CTX)
    assert built is not None
    ds = round_trip(built)
    sides = {"Right lung": "24028007", "Left lung": "7771000", OPACITY_LABEL: "24028007"}
    labels = []
    for item in ds.SegmentSequence:
        labels.append(item.SegmentLabel)
        assert "research use only" in item.SegmentDescription.lower()
        assert item.TrackingID == item.SegmentLabel
        region = item.AnatomicRegionSequence[0]
        assert (region.CodeValue, region.CodingSchemeDesignator) == ("39607008", "SCT")
        if item.SegmentLabel in sides:
            assert region.AnatomicRegionModifierSequence[0].CodeValue == sides[item.SegmentLabel]
    assert OPACITY_LABEL in labels and not any("COVID" in label for label in labels)
    lesion = next(i for i in ds.SegmentSequence if i.SegmentLabel == OPACITY_LABEL)
    prop = lesion.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == (codes.OPACITY.value, "DCM")
    assert segmentation_reference(ds).number("lesions") == 3
