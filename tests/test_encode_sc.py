"""Secondary Capture encoder: phantom and real series, round trip, dciodvfy, a picture like a CXR."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tests.encode_fixtures import Case, dciodvfy, errors, load_real_case, round_trip
from triaged.encode import OutputContext, build_sc
from triaged.encode.context import NOT_FOR_DIAGNOSTIC_USE, SC_SERIES_DESCRIPTION
from triaged.encode.sc import render_overview

CTX = OutputContext(
    software_version="0.1.0",
    priority_level="STAT",
    key_slice_images=2,
    content_datetime=datetime(2026, 1, 2, 3, 4, 5),
)
#: The colour the burned-in "NOT FOR DIAGNOSTIC USE" line is drawn in (sc._WARNING_RGB).
WARNING_RGB = (255, 70, 70)


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
def images(case: Case) -> list[hd.sc.SCImage]:
    return build_sc(case.findings, case.masks, case.volume, case.source, CTX)


def test_every_sc_round_trips_and_dciodvfy_reports_no_errors(
    images: list[hd.sc.SCImage], tmp_path: Path
) -> None:
    assert len(images) == 3  # overview + 2 key slices
    for i, sc in enumerate(images):
        lines = dciodvfy(round_trip(sc), tmp_path / f"sc{i}.dcm")
        assert errors(lines) == [], "\n".join(lines)


def test_the_sc_joins_the_study_in_its_own_series_and_says_not_for_diagnosis(
    images: list[hd.sc.SCImage], case: Case
) -> None:
    series = {sc.SeriesInstanceUID for sc in images}
    assert len(series) == 1 and case.volume.series_instance_uid not in series
    assert len({sc.SOPInstanceUID for sc in images}) == len(images)
    for sc in map(round_trip, images):
        assert sc.StudyInstanceUID == case.volume.study_instance_uid
        assert sc.PatientID == case.source[0].PatientID
        assert sc.SeriesDescription == SC_SERIES_DESCRIPTION
        assert sc.BurnedInAnnotation == "YES"
        assert NOT_FOR_DIAGNOSTIC_USE in sc.ImageComments
        assert sc.BodyPartExamined == "CHEST"
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    overview = round_trip(images[0])
    assert list(overview.PatientOrientation) == ["L", "F"]  # PA convention: patient's right on the left
    assert overview.PixelSpacing[0] == overview.PixelSpacing[1]  # square pixels: the aspect is right
    key = round_trip(images[1])
    assert (
        key.SourceImageSequence[0].ReferencedSOPInstanceUID
        == case.volume.sop_instance_uids[case.findings.key_slices[0]]
    )


def test_the_warning_text_is_burned_into_every_image(images: list[hd.sc.SCImage]) -> None:
    for sc in images:
        pixels = round_trip(sc).pixel_array
        warning = np.all(pixels == WARNING_RGB, axis=-1)
        rows = np.nonzero(warning.any(axis=1))[0]
        # Anti-aliased glyphs have at least a few hundred pixels of the exact colour; all in the text band.
        assert warning.sum() > 150
        assert rows.min() > pixels.shape[0] * 0.6


def test_the_overview_reads_like_a_chest_radiograph(case: Case, tmp_path: Path) -> None:
    rgb, pixel_mm = render_overview(case.findings, case.masks, case.volume, CTX)
    Image.fromarray(rgb).save(tmp_path / "overview.png")
    grey = rgb.astype(np.float32).mean(axis=-1)
    # The lung projections, resampled like the image: (superior->inferior, right->left).
    lungs = case.masks.lungs[::-1]  # volume z runs inferior->superior here
    height = int(round(lungs.shape[0] * case.volume.spacing[0] / pixel_mm))
    right = ndimage.zoom(
        (lungs == 1).any(axis=1).astype(np.uint8),
        (height / lungs.shape[0], rgb.shape[1] / lungs.shape[2]),
        order=0,
    )
    left = ndimage.zoom(
        (lungs == 2).any(axis=1).astype(np.uint8),
        (height / lungs.shape[0], rgb.shape[1] / lungs.shape[2]),
        order=0,
    )
    image = grey[: right.shape[0]]
    right, left = right[: image.shape[0]].astype(bool), left[: image.shape[0]].astype(bool)
    # Patient's right on the viewer's left.
    assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean()
    # Lungs dark, mediastinum and spine (between the lungs) bright, air around the patient black.
    between = np.zeros_like(right)
    r_edge, l_edge = int(np.nonzero(right)[1].max()), int(np.nonzero(left)[1].min())
    rows = np.nonzero(right.any(axis=1) & left.any(axis=1))[0]
    between[rows[len(rows) // 4 : 3 * len(rows) // 4], r_edge - 10 : l_edge + 10] = True
    between &= ~(right | left)
    lung_mean = np.median(image[(right | left) & ~_heat(rgb[: image.shape[0]])])
    assert np.median(image[between]) > lung_mean + 60
    assert image[:, :5].mean() < lung_mean or image[-5:, :].mean() < 200
    # Lesions highlighted: the heat colour (red over green and blue) sits inside the right lung.
    heat = _heat(rgb[: image.shape[0]])
    assert heat.sum() > 500
    assert (heat & right).sum() > 0.8 * heat.sum()


def test_the_overview_without_findings_still_renders(case: Case) -> None:
    from dataclasses import replace

    empty = replace(
        case.masks,
        lesions=np.zeros_like(case.masks.lesions),
        consolidation=np.zeros_like(case.masks.consolidation),
    )
    findings = replace(case.findings, p_covid=None, key_slices=(), lesion_boxes=())
    rgb, pixel_mm = render_overview(findings, empty, case.volume, OutputContext(software_version="0.1.0"))
    height = int(round(case.volume.hu.shape[0] * case.volume.spacing[0] / pixel_mm))
    assert not _heat(rgb[:height]).any()  # below is the text band, whose warning line is red
    images = build_sc(findings, empty, case.volume, case.source, OutputContext(software_version="0.1.0"))
    assert len(images) == 1


def _heat(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the lesion colour map (yellow to red to purple over grey: red well above blue)."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return (r > b + 60) & (r >= g)


@pytest.mark.parametrize(
    ("p_covid", "line"),
    [(None, "P(COVID-19): not assessed   Priority STAT"), (0.87, "P(COVID-19) 0.87   Priority STAT")],
)
def test_the_burned_in_text_states_p_covid_on_a_line_no_image_cuts(
    case: Case, p_covid: float | None, line: str
) -> None:
    from dataclasses import replace

    from PIL import ImageDraw

    from triaged.encode import sc

    findings = replace(case.findings, p_covid=p_covid)
    lines = [text for text, _ in sc._summary_lines(findings, CTX)]
    assert lines[0] == f"{NOT_FOR_DIAGNOSTIC_USE} - research use only"
    assert line in lines
    if p_covid is None:
        assert not any("P(COVID-19) 0" in text for text in lines)
    # Drawn whole (not shortened with an ellipsis) on the narrowest image the SC makes: a key slice.
    images = sc.build_sc(findings, case.masks, case.volume, case.source, CTX)
    width = min(int(round_trip(im).Columns) for im in images)
    size = max(13, width // 40)
    draw = ImageDraw.Draw(Image.new("RGB", (width, 40)))
    assert sc._fit(draw, line, sc._font(size), width - 2 * (size // 2)) == line


def test_the_burned_in_severity_of_a_ct0_study_below_1_percent_does_not_read_1_percent(case: Case) -> None:
    from dataclasses import replace

    from triaged.domain import CTGrade, LungMeasures
    from triaged.encode import sc

    # A real no-pneumonia chest (CMB-CRC, classical): worse lung 0.95 %, CT0. ".1f" printed "1.0 %   CT0".
    left = LungMeasures(2000.0, 19.1, 0.0)
    findings = replace(case.findings, left=left, right=LungMeasures(2100.0, 2.0, 0.0), ct_grade=CTGrade.CT0)
    lines = [text for text, _ in sc._summary_lines(findings, CTX)]
    assert "Severity 0.96 % (worse lung)   CT0" in lines
    assert any(text.startswith("Right 0.1 %   Left 0.96 %   Both 0.5 %") for text in lines)


@pytest.mark.parametrize(
    "columns",
    [
        ((1, 0, 0), (0, 1, 0), (0, 0, -1)),  # an axial series stored head first
        ((1, 0, 0), (0, 1, 0), (0, 0, 1)),  # feet first
        ((0, 1, 0), (0, 0, -1), (1, 0, 0)),  # a sagittal-like storage order: every axis moves
        ((-1, 0, 0), (0, -1, 0), (0, 0, -1)),  # rows and columns flipped
    ],
)
def test_the_overview_projection_by_slabs_equals_the_whole_volume_pass(
    columns: tuple[tuple[int, int, int], ...],
) -> None:
    """Projecting slab by slab (bounded memory) gives bit-identical sums to one float32 pass over the volume."""
    from triaged.domain import Masks, Volume
    from triaged.encode import sc

    rng = np.random.default_rng(3)
    shape = (37, 29, 41)  # not a multiple of the slab height
    hu = rng.integers(-1024, 1500, size=shape).astype(np.int16)
    lungs = rng.integers(0, 3, size=shape).astype(np.uint8)
    lesions = rng.random(shape) < 0.2
    affine = np.eye(4)
    for i, (col, spacing) in enumerate(zip(columns, (0.7, 0.8, 2.5), strict=True)):
        affine[:3, i] = np.asarray(col, float) * spacing
    volume = Volume(
        hu=hu,
        spacing=(2.5, 0.8, 0.7),
        affine=affine,
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        sop_instance_uids=tuple(f"1.2.3.{k}" for k in range(shape[0])),
    )
    masks = Masks(lungs=lungs, lesions=lesions, consolidation=np.zeros(shape, bool))
    got = sc._project(volume, masks)

    whole, spacing = sc._reorient(volume.hu.astype(np.float32), volume)
    mu = sc.MU_WATER_PER_MM * (
        1.0 + np.minimum(whole, 0.0) / 1000.0 + sc.BONE_WEIGHT * np.maximum(whole, 0.0) / 1000.0
    )
    np.maximum(mu, 0.0, out=mu)
    lab, _ = sc._reorient(lungs, volume)
    les, _ = sc._reorient(lesions, volume)
    assert got.spacing == spacing and got.shape == whole.shape
    np.testing.assert_array_equal(got.mu_sum, mu.sum(axis=1))
    np.testing.assert_array_equal(got.lungs_any, (lab > 0).any(axis=1))
    np.testing.assert_array_equal(got.right_any, (lab == 1).any(axis=1))
    np.testing.assert_array_equal(got.left_any, (lab == 2).any(axis=1))
    np.testing.assert_array_equal(got.lung_sum, (lab > 0).sum(axis=1, dtype=np.float32))
    np.testing.assert_array_equal(got.lesion_sum, les.sum(axis=1, dtype=np.float32))


def test_the_colour_shows_the_lesion_fraction_along_each_ray_not_its_presence() -> None:
    """A lesion filling 20 % of the lung depth along every ray is drawn in the colour of 20 % on the
    colour bar everywhere, and the area-weighted mean fraction is the voxel fraction; the old heat map
    painted every ray that touched a lesion at least 28 % opaque."""
    from triaged.domain import CTGrade, Findings, LungMeasures, Masks, Volume
    from triaged.encode import sc

    shape = (60, 50, 80)  # (z, y = anterior-posterior, x = right-left), 2 mm voxels
    hu = np.full(shape, -800, np.int16)
    lungs = np.zeros(shape, np.uint8)
    lungs[10:50, 10:40, 10:38] = 1
    lungs[10:50, 10:40, 42:70] = 2
    lesions = np.zeros(shape, bool)
    lesions[10:50, 10:16, 10:38] = True  # 6 of the 30 voxels of lung depth: 20 %, right lung only
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[2, 2] = -2.0  # slices run head to feet
    volume = Volume(
        hu=hu,
        spacing=(2.0, 2.0, 2.0),
        affine=affine,
        sop_instance_uids=tuple("1.2.3." + str(k) for k in range(shape[0])),
        series_instance_uid="1.2.3",
        study_instance_uid="1.2",
    )
    masks = Masks(lungs=lungs, lesions=lesions, consolidation=np.zeros(shape, bool))
    p = sc._project(volume, masks)
    fraction = sc.lesion_fraction(p.lesion_sum, p.lung_sum)
    in_lung = p.lung_sum > 0
    voxel_fraction = lesions.sum() / (lungs > 0).sum()
    weighted = (fraction * p.lung_sum)[in_lung].sum() / p.lung_sum[in_lung].sum()
    assert weighted == pytest.approx(voxel_fraction)
    assert np.allclose(fraction[p.right_any], 0.2) and not fraction[p.left_any].any()

    measures = LungMeasures(lung_ml=100.0, lesion_ml=20.0, consolidation_ml=0.0)
    clear = LungMeasures(lung_ml=100.0, lesion_ml=0.0, consolidation_ml=0.0)
    findings = Findings("t", "1", measures, clear, CTGrade.CT1)
    rgb, _ = sc.render_overview(findings, masks, volume, OutputContext(software_version="0.1.0"))
    height = p.shape[0] * 2 * rgb.shape[1] // (p.shape[2] * 2)
    image = rgb[:height].astype(np.int32)
    film = np.full(3, image[height // 2, rgb.shape[1] * 3 // 4])  # left lung: no lesion, plain film
    lo, hi = sc.FRACTION_ALPHA
    alpha = lo + (hi - lo) * 0.2
    expected = (1 - alpha) * film[0] + alpha * sc.fraction_colour(np.array([0.2], np.float32))[0]
    centre = image[height // 2, rgb.shape[1] // 4]  # middle of the right lung
    assert np.abs(centre - expected).max() <= 6
    # Nothing is drawn where the fraction is below FRACTION_MIN.
    flat = np.zeros((4, 4, 3), np.uint8)
    assert (sc._blend_fraction(flat, np.full((4, 4), sc.FRACTION_MIN / 2, np.float32)) == 0).all()


def test_key_slices_name_the_ct_instance_number_and_mark_the_patient_sides(case: Case) -> None:
    """The key slice says which CT image it is by its Instance Number (not the volume index) and has
    side markers that follow the slice's column direction."""
    from dataclasses import replace

    from triaged.encode import sc

    z = case.findings.key_slices[0]
    source = [ds.copy() for ds in case.source]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source}
    target = by_uid[case.volume.sop_instance_uids[z]]
    target.InstanceNumber = 4321
    images = build_sc(case.findings, case.masks, case.volume, source, replace(CTX, key_slice_images=1))
    key = round_trip(images[1])
    assert "CT image 4321" in key.ImageComments and "index" not in key.ImageComments
    labelled = sc.render_key_slice(
        case.findings, case.masks, case.volume, CTX, z, image_label="CT image 4321"
    )
    other = sc.render_key_slice(case.findings, case.masks, case.volume, CTX, z, image_label="CT image 1")
    assert labelled.shape == other.shape and (labelled != other).any()
    assert sc._row_side_letters(case.volume) == ("R", "L")  # columns run towards the patient's left
    flipped = replace(case.volume, affine=case.volume.affine * np.array([[-1.0], [1.0], [1.0], [1.0]]))
    assert sc._row_side_letters(flipped) == ("L", "R")
    # White marker glyphs half-way down the left and right edges of the slice.
    rows = case.volume.hu.shape[1]
    band = labelled[rows // 2 - 30 : rows // 2 + 30]
    white = np.all(band >= 230, axis=-1)
    assert white[:, :40].sum() > 20 and white[:, -40:].sum() > 20
