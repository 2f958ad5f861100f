"""Series choice from synthetic headers: one table row per situation a study can bring."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from triaged.assembly import (
    FramedInstanceHeader,
    assess_spacing,
    group_positions,
    select_series,
    slice_normal,
)
from triaged.config import SeriesSelectionConfig
from triaged.domain import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, InstanceHeader, SeriesChoice
from triaged.volume import load_series_folder, read_headers

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
ORIGINAL = ("ORIGINAL", "PRIMARY", "AXIAL")


def tilted(degrees: float) -> tuple[float, ...]:
    """Axial orientation rotated about the patient x axis (a gantry tilt)."""
    r = math.radians(degrees)
    return (1.0, 0.0, 0.0, 0.0, math.cos(r), math.sin(r))


def stack(
    series: int,
    n: int,
    step: float,
    *,
    description: str = "Chest",
    kernel: str = "B30f",
    orientation: tuple[float, ...] = AXIAL,
    image_type: tuple[str, ...] = ORIGINAL,
    rows: int = 512,
    columns: int = 512,
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    thickness: float | None = None,
    modality: str = "CT",
    sop_class: str = CT_IMAGE_STORAGE,
    z0: float = -300.0,
    uid: str | None = None,
    skip: frozenset[int] = frozenset(),
) -> list[InstanceHeader]:
    """``n`` slices ``step`` mm apart along the orientation's normal."""
    series_uid = uid or f"1.2.3.{series}"
    normal = slice_normal(orientation)
    out = []
    for k in range(n):
        if k in skip:
            continue
        d = z0 + k * step
        out.append(
            InstanceHeader(
                path=f"{series}/{k}.dcm",
                sop_instance_uid=f"{series_uid}.{k}.{rows}",
                sop_class_uid=sop_class,
                series_instance_uid=series_uid,
                modality=modality,
                image_type=image_type,
                series_description=description,
                series_number=series,
                image_orientation=orientation,
                image_position=(float(d * normal[0]), float(d * normal[1]), float(d * normal[2])),
                pixel_spacing=pixel_spacing,
                rows=rows,
                columns=columns,
                slice_thickness=step if thickness is None else thickness,
                convolution_kernel=kernel,
            )
        )
    return out


def localizer(series: int) -> list[InstanceHeader]:
    return stack(
        series,
        1,
        1.0,
        description="Topogram",
        orientation=CORONAL,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )


def dose_report(series: int) -> list[InstanceHeader]:
    return stack(
        series,
        1,
        1.0,
        description="Dose Report",
        sop_class=SECONDARY_CAPTURE,
        image_type=("DERIVED", "SECONDARY", "OTHER"),
    )


def enhanced(series: int, frames: int, step: float, *, with_positions: bool = True) -> list[InstanceHeader]:
    positions = tuple((0.0, 0.0, -300.0 + k * step) for k in range(frames))
    return [
        FramedInstanceHeader(
            path=f"{series}/mf.dcm",
            sop_instance_uid=f"1.2.3.{series}.1",
            sop_class_uid=ENHANCED_CT_IMAGE_STORAGE,
            series_instance_uid=f"1.2.3.{series}",
            modality="CT",
            image_type=("ORIGINAL", "PRIMARY", "VOLUME", "NONE"),
            series_description="Enhanced lung",
            series_number=series,
            image_orientation=AXIAL,
            image_position=positions[0],
            pixel_spacing=(0.7, 0.7),
            rows=512,
            columns=512,
            slice_thickness=step,
            convolution_kernel="LUNG",
            number_of_frames=frames,
            frame_positions=positions if with_positions else (),
        )
    ]


@dataclass
class Case:
    headers: Callable[[], list[InstanceHeader]]
    chosen: str | None  # expected series UID, None for a refusal
    reason: list[str]  # substrings of the reason
    candidates: list[str] = field(default_factory=list)  # substrings of the joined candidate lines
    rules: SeriesSelectionConfig = field(default_factory=SeriesSelectionConfig)


CASES: dict[str, Case] = {
    "a localizer and a dose report are skipped for the axial stack": Case(
        lambda: localizer(1) + dose_report(99) + stack(2, 200, 1.0),
        "1.2.3.2",
        ["series 2 'Chest': 200 axial slices × 1.0 mm", "200 mm coverage", "kernel B30f"],
        [
            "series 1 'Topogram'",
            "-> refused: localizer",
            "series 99 'Dose Report'",
            "-> refused: dose report",
        ],
    ),
    "a refusal lists localizers and dose reports as counts and too-short series with their numbers": Case(
        lambda: localizer(1) + localizer(2) + dose_report(99) + stack(4, 16, 2.5),
        None,
        [
            "no axial CT series with ≥ 20 slices and ≥ 150 mm coverage; found: ",
            "localizer ×2",
            "dose report ×1",
            "series 4 'Chest' 16 axial slices × 2.5 mm",
            "too few slices: 16 < 20",
            "too short: 40 mm coverage < 150 mm",
        ],
    ),
    "a single coronal image without LOCALIZER in its Image Type is a scout": Case(
        lambda: stack(1, 1, 1.0, orientation=CORONAL, description="Scout"),
        None,
        ["found: localizer ×1"],
    ),
    "a single axial image is too few slices, not a localizer": Case(
        lambda: stack(1, 1, 1.0),
        None,
        ["series 1 'Chest' 1 axial slices", "too few slices: 1 < 20"],
    ),
    "a dose structured report is recognised by its SOP class": Case(
        lambda: stack(5, 1, 1.0, modality="SR", sop_class=XRAY_DOSE_SR, description="") + stack(6, 10, 1.0),
        None,
        ["dose report ×1", "series 6 'Chest' 10 axial slices"],
    ),
    "a low-dose screening CT is not a dose report": Case(
        lambda: stack(3, 240, 1.25, description="Low Dose Lung 1.25"),
        "1.2.3.3",
        ["series 3 'Low Dose Lung 1.25': 240 axial slices × 1.25 mm"],
    ),
    "a derived MPR reformat is refused even with full coverage": Case(
        lambda: stack(7, 300, 1.0, image_type=("DERIVED", "SECONDARY", "MPR")),
        None,
        ["derived reformat ×1"],
    ),
    "an axial MIP labelled ORIGINAL is still a reformat": Case(
        lambda: stack(7, 300, 1.0, image_type=("ORIGINAL", "PRIMARY", "MIP")),
        None,
        ["derived reformat ×1"],
    ),
    "an ORIGINAL SECONDARY retrospective reconstruction is accepted": Case(
        lambda: stack(8, 200, 1.0, image_type=("ORIGINAL", "SECONDARY", "AXIAL")),
        "1.2.3.8",
        ["series 8 'Chest': 200 axial slices"],
    ),
    "an MR series is not CT": Case(lambda: stack(9, 100, 3.0, modality="MR"), None, ["non-CT (MR) ×1"]),
    "a series tilted 20 degrees is not axial": Case(
        lambda: stack(10, 200, 1.0, orientation=tilted(20.0)),
        None,
        [
            "series 10 'Chest' 200 oblique slices",
            "not axial: slice normal 20.0° from the patient z axis (> 10°)",
        ],
    ),
    "a gantry tilt of 5 degrees is still axial": Case(
        lambda: stack(11, 200, 1.0, orientation=tilted(5.0)), "1.2.3.11", ["200 axial slices"]
    ),
    "a coronal reformat stack is named as such": Case(
        lambda: stack(12, 300, 1.0, orientation=CORONAL), None, ["300 coronal slices", "not axial"]
    ),
    "many thin slices that cover too little are refused": Case(
        lambda: stack(13, 100, 0.5), None, ["100 axial slices × 0.5 mm", "too short: 50 mm coverage < 150 mm"]
    ),
    "a gap in the slice positions refuses the series": Case(
        lambda: stack(14, 200, 1.0, skip=frozenset({50, 51, 52})),
        None,
        ["gap of 4.0 mm between -251.0 and -247.0 mm", "3 slice(s) missing"],
    ),
    "a series with two matrices is reduced to its analysable stack": Case(
        lambda: stack(15, 200, 1.0) + stack(15, 30, 1.0, rows=256, columns=256, pixel_spacing=(1.4, 1.4)),
        "1.2.3.15",
        [
            "200 axial slices",
            "mixed geometry in one series: 2 stacks (512×512 0.7 mm axial ×200; 256×256 1.4 mm axial ×30)",
        ],
    ),
    "a series of two small stacks of different matrices is refused": Case(
        lambda: stack(16, 15, 5.0) + stack(16, 15, 5.0, z0=-225.0, rows=256, columns=256),
        None,
        ["mixed geometry in one series: 2 stacks", "none analysable on its own", "too few slices: 15 < 20"],
    ),
    "the thin lung-kernel series wins over a thick soft one": Case(
        lambda: (
            stack(2, 60, 5.0, kernel="B30f", description="Chest 5.0")
            + stack(3, 300, 1.0, kernel="B70f", description="Lung 1.0 B70f")
        ),
        "1.2.3.3",
        [
            "series 3 'Lung 1.0 B70f': 300 axial slices × 1.0 mm",
            "kernel B70f",
            "preferred over 1 other eligible series",
        ],
        ["-> chosen", "-> eligible, ranked 2 of 2"],
    ),
    "among thin series the lung kernel beats a thinner soft kernel": Case(
        lambda: stack(2, 400, 0.75, kernel="B30f") + stack(3, 240, 1.25, kernel="B60f"),
        "1.2.3.3",
        ["kernel B60f"],
    ),
    "a thin soft series beats a thick lung series": Case(
        lambda: stack(2, 300, 1.0, kernel="B30f") + stack(3, 60, 5.0, kernel="B70f"),
        "1.2.3.2",
        ["kernel B30f"],
    ),
    "the kernel may be named in the description only": Case(
        lambda: (
            stack(2, 300, 1.0, kernel="", description="Chest")
            + stack(3, 300, 1.0, kernel="", description="Lung")
        ),
        "1.2.3.3",
        ["series 3 'Lung'", "kernel unknown"],
    ),
    "with equal thickness and kernel more slices win": Case(
        lambda: stack(2, 200, 1.0) + stack(3, 300, 1.0), "1.2.3.3", ["300 axial slices"]
    ),
    "the preferred kernel order comes from the rules": Case(
        lambda: stack(2, 300, 1.0, kernel="FC52") + stack(3, 300, 1.0, kernel="FC86"),
        "1.2.3.2",
        ["kernel FC52"],
        rules=SeriesSelectionConfig(preferred_kernels=["FC5", "FC8"]),
    ),
    "duplicate positions count once": Case(
        lambda: stack(2, 19, 10.0) + stack(2, 19, 10.0, kernel="B30f", uid="1.2.3.2", rows=512)[:5],
        None,
        ["19 axial slices", "too few slices: 19 < 20"],
        ["5 duplicate slice position(s)"],
    ),
    "an Enhanced CT instance counts its frames as slices": Case(
        lambda: enhanced(20, 200, 1.0), "1.2.3.20", ["series 20 'Enhanced lung': 200 axial slices × 1.0 mm"]
    ),
    "an Enhanced CT instance without per-frame positions is not guessed": Case(
        lambda: enhanced(21, 200, 1.0, with_positions=False), None, ["1 axial slices", "too few slices"]
    ),
    "lower thresholds accept a short stack": Case(
        lambda: stack(4, 16, 2.5),
        "1.2.3.4",
        ["series 4 'Chest': 16 axial slices × 2.5 mm, 40 mm coverage"],
        rules=SeriesSelectionConfig(min_slices=10, min_coverage_mm=10),
    ),
    "an empty study says so": Case(lambda: [], None, ["found: no instances"]),
    "an image without geometry is refused with the attribute names": Case(
        lambda: [
            InstanceHeader(
                path="x.dcm",
                sop_instance_uid="1.9.1",
                sop_class_uid=CT_IMAGE_STORAGE,
                series_instance_uid="1.9",
                modality="CT",
            )
        ],
        None,
        ["no usable Image Plane geometry (ImageOrientationPatient/ImagePositionPatient/PixelSpacing)"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_series_choice(name: str) -> None:
    case = CASES[name]
    choice = select_series(case.headers(), case.rules)
    assert choice.series_uid == case.chosen, choice.reason
    for text in case.reason:
        assert text in choice.reason, f"{text!r} not in {choice.reason!r}"
    joined = "\n".join(choice.candidates)
    for text in case.candidates:
        assert text in joined, f"{text!r} not in {joined!r}"
    if case.chosen is None:
        assert choice.instances == ()
    else:
        assert choice.instances and all(h.series_instance_uid == case.chosen for h in choice.instances)


def test_every_series_gets_one_candidate_line() -> None:
    choice = select_series(
        localizer(1) + dose_report(99) + stack(2, 200, 1.0) + stack(3, 10, 1.0), SeriesSelectionConfig()
    )
    assert len(choice.candidates) == 4
    assert [line.split(" ")[1] for line in choice.candidates] == ["1", "2", "3", "99"]


def test_the_chosen_mixed_series_keeps_only_its_consistent_stack() -> None:
    headers = stack(15, 200, 1.0) + stack(15, 30, 1.0, rows=256, columns=256, pixel_spacing=(1.4, 1.4))
    choice = select_series(headers, SeriesSelectionConfig())
    assert len(choice.instances) == 200
    assert {h.rows for h in choice.instances} == {512}


def test_spacing_report_flags_irregular_steps_and_gaps() -> None:
    report = assess_spacing([0.0, 1.0, 2.0, 3.2, 4.2, 7.2, 8.2])
    assert report.median_step_mm == pytest.approx(1.0)
    assert len(report.gaps) == 1 and "gap of 3.0 mm between 4.2 and 7.2 mm" in report.gaps[0]
    assert any("step 1.2 mm between 2.0 and 3.2 mm" in m for m in report.irregular)
    assert assess_spacing([5.0]).median_step_mm is None


def test_positions_within_a_hundredth_of_a_millimetre_are_one_position() -> None:
    assert group_positions([2.0, 0.0, 1.0, 1.005, 0.004]) == [[1, 4], [2, 3], [0]]


def test_a_degenerate_orientation_is_rejected() -> None:
    with pytest.raises(ValueError, match="parallel or zero"):
        slice_normal((1.0, 0.0, 0.0, 1.0, 0.0, 0.0))


# --- Image Type on real-format headers: DERIVED\PRIMARY\AXIAL is read, true reformats are not ------------
#
# Header-only DICOM files (no pixel data) written with pydicom and read back through the node's own
# header reader, so the Image Type values travel the same path as in a real export.


def write_headers(
    root: Path,
    series: int,
    image_type: tuple[str, ...],
    *,
    n: int = 60,
    step: float = 2.5,
    description: str = "Chest",
    sop_class: str = CT_IMAGE_STORAGE,
    modality: str = "CT",
    orientation: tuple[float, ...] = AXIAL,
) -> list[str]:
    """``n`` header-only instances of one series in ``root/<series>/``; returns their relative paths."""
    folder = root / str(series)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = f"1.2.826.0.1.3680043.8.498.{series}"
    normal = slice_normal(orientation)
    rels = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1", series_uid
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription = modality, series, description
        ds.ImageType = list(image_type)
        d = -300.0 + k * step
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [float(d * normal[0]), float(d * normal[1]), float(d * normal[2])]
        ds.PixelSpacing, ds.Rows, ds.Columns = [0.7, 0.7], 512, 512
        ds.SliceThickness, ds.ConvolutionKernel = step, "LUNG"
        rel = f"{series}/{k:03d}.dcm"
        ds.save_as(root / rel, enforce_file_format=True)
        rels.append(rel)
    return rels


def choose_from_files(root: Path, rels: list[str]) -> SeriesChoice:
    headers, problems = read_headers(root, rels)
    assert problems == []
    return select_series(headers, SeriesSelectionConfig())


@pytest.mark.parametrize(
    "image_type",
    [
        ("DERIVED", "PRIMARY", "AXIAL"),  # PET/CT attenuation-correction CT (GE, Philips)
        ("DERIVED", "PRIMARY", "AXIAL", "CT_SOM5 SPI"),  # Siemens Biograph CT
        ("DERIVED", "PRIMARY", "AXIAL", "HELIX"),  # a vendor reconstruction
    ],
)
def test_a_derived_primary_axial_ct_is_accepted(tmp_path: Path, image_type: tuple[str, ...]) -> None:
    choice = choose_from_files(tmp_path, write_headers(tmp_path, 3, image_type, description="CT AC 2.5"))
    assert choice.series_uid == "1.2.826.0.1.3680043.8.498.3", choice.reason
    assert "series 3 'CT AC 2.5': 60 axial slices × 2.5 mm" in choice.reason
    assert "DERIVED\\PRIMARY\\AXIAL image type: accepted, ranked below ORIGINAL series" in choice.reason


@pytest.mark.parametrize(
    ("image_type", "category"),
    [
        (("DERIVED", "SECONDARY", "MPR"), "derived reformat"),
        (("DERIVED", "PRIMARY", "REFORMATTED"), "derived reformat"),
        (("DERIVED", "PRIMARY", "AXIAL", "MPR"), "derived reformat"),
        (("DERIVED", "SECONDARY", "AXIAL", "CSA MPR"), "derived reformat"),
        (("ORIGINAL", "PRIMARY", "MIP"), "derived reformat"),
        (("DERIVED", "PRIMARY", "AXIAL", "MIP_THICK"), "derived reformat"),
        (("DERIVED", "PRIMARY", "MINIP"), "derived reformat"),
        (("DERIVED", "PRIMARY", "PROJECTION IMAGE"), "derived reformat"),
        (("DERIVED", "SECONDARY", "CURVED"), "derived reformat"),
        (("DERIVED", "SECONDARY", "3D"), "derived reformat"),
        (("DERIVED", "SECONDARY", "VOLUME RENDERING"), "derived reformat"),
        (("DERIVED", "SECONDARY", "AXIAL"), "derived secondary image"),
        (("ORIGINAL", "PRIMARY", "LOCALIZER"), "localizer"),
    ],
)
def test_reformats_projections_renderings_and_localizers_are_refused(
    tmp_path: Path, image_type: tuple[str, ...], category: str
) -> None:
    choice = choose_from_files(tmp_path, write_headers(tmp_path, 4, image_type))
    assert choice.series_uid is None
    assert f"found: {category} ×1" in choice.reason


def test_a_dose_report_is_refused_whatever_its_image_type(tmp_path: Path) -> None:
    rels = write_headers(
        tmp_path, 99, ("DERIVED", "PRIMARY", "AXIAL"), n=1, description="Dose Report", sop_class=SECONDARY_CAPTURE
    )
    choice = choose_from_files(tmp_path, rels)
    assert choice.series_uid is None and "dose report ×1" in choice.reason


def test_original_beats_derived_at_equal_geometry_and_the_reason_says_why(tmp_path: Path) -> None:
    rels = write_headers(tmp_path, 2, ("DERIVED", "PRIMARY", "AXIAL"), description="CT AC")
    rels += write_headers(tmp_path, 5, ("ORIGINAL", "PRIMARY", "AXIAL"), description="Chest")
    choice = choose_from_files(tmp_path, rels)
    assert choice.series_uid == "1.2.826.0.1.3680043.8.498.5", choice.reason
    assert choice.reason == (
        "series 5 'Chest': 60 axial slices × 2.5 mm, 150 mm coverage, kernel LUNG; preferred over 1 other "
        "eligible series (next: series 2 'CT AC', ranked lower by image type (ORIGINAL before DERIVED))"
    )
    joined = "\n".join(choice.candidates)
    assert "series 2 'CT AC'" in joined and "-> eligible, ranked 2 of 2" in joined


def test_a_derived_series_ranks_below_an_original_one_even_when_thinner(tmp_path: Path) -> None:
    rels = write_headers(tmp_path, 2, ("DERIVED", "PRIMARY", "AXIAL"), n=250, step=1.0, description="CT AC thin")
    rels += write_headers(tmp_path, 5, ("ORIGINAL", "PRIMARY", "AXIAL"), n=60, step=2.5, description="Chest")
    choice = choose_from_files(tmp_path, rels)
    assert choice.series_uid == "1.2.826.0.1.3680043.8.498.5", choice.reason


def test_between_two_derived_series_the_usual_ranking_decides(tmp_path: Path) -> None:
    rels = write_headers(tmp_path, 2, ("DERIVED", "PRIMARY", "AXIAL"), n=60, step=5.0, description="CT AC 5")
    rels += write_headers(tmp_path, 3, ("DERIVED", "PRIMARY", "AXIAL"), n=250, step=1.0, description="CT AC 1")
    choice = choose_from_files(tmp_path, rels)
    assert choice.series_uid == "1.2.826.0.1.3680043.8.498.3", choice.reason
    assert "ranked lower by slice thickness class" in choice.reason


@pytest.mark.parametrize("fixture", ["phantom_ct_series", "pet_ct_dx"], ids=["phantom", "real"])
def test_a_pet_ct_attenuation_ct_loads(tmp_path: Path, request: pytest.FixtureRequest, fixture: str) -> None:
    """A thorax series labelled DERIVED\\PRIMARY\\AXIAL as a PET/CT's CT would be: the phantom series, and
    the real Lung-PET-CT-Dx thorax (30 x 512 x 512) where it is present."""
    files = sorted(request.getfixturevalue(fixture).glob("*.dcm"))
    for path in files:
        ds = dcmread(path)
        ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL", "CT_SOM5 SPI"]
        ds.save_as(tmp_path / path.name)
    volume, choice = load_series_folder(tmp_path, SeriesSelectionConfig())
    assert "DERIVED\\PRIMARY\\AXIAL image type: accepted" in choice.reason
    assert volume.hu.shape == (len(files), int(ds.Rows), int(ds.Columns))
