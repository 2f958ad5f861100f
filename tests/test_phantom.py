"""The synthetic chest CT: anatomy, findings, requested severity, determinism and the DICOM study.

Most phantoms here are small (128–192 pixels, thick slices) so the file runs in seconds; one test
generates a full 512 × 512 × 300 study.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from tests.conftest import require_tool
from triaged.lab.phantom import (
    KINDS,
    Phantom,
    PhantomSpec,
    ct_grade_of,
    dataset_specs,
    generate,
    to_datasets,
    to_volume,
)
from triaged.lab.phantom.findings import resolve_targets
from triaged.lab.phantom.generate import fov_mask
from triaged.lab.phantom.spec import affected_percentages

SMALL = {"matrix": 128, "pixel_spacing": 3.0, "slice_thickness": 2.0, "slices": 150}
MEDIUM = {"matrix": 192, "pixel_spacing": 2.0, "slice_thickness": 2.0, "slices": 150}


WRITER_FIELDS = (
    "vendor",
    "feet_first",
    "reversed_order",
    "with_localizer",
    "with_dose_report",
    "transfer_syntax",
)


@cache
def _generated(**kwargs: object) -> Phantom:
    return generate(PhantomSpec(**kwargs))  # type: ignore[arg-type]


def phantom(**kwargs: object) -> Phantom:
    """Phantoms are pure functions of their spec, and the writer-only fields do not change the arrays:
    generate once per anatomy and swap the writer fields in."""
    writer = {k: kwargs.pop(k) for k in WRITER_FIELDS if k in kwargs}
    base = _generated(**kwargs)
    return replace(base, spec=replace(base.spec, **writer)) if writer else base  # type: ignore[arg-type]


def covid40() -> Phantom:
    return phantom(kind="covid", severity=40.0, seed=4, **MEDIUM)


# ---- requested severity -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "right", "left"),
    [
        ({"kind": "covid", "severity_right": 12.0, "severity_left": 55.0, "seed": 1}, 12.0, 55.0),
        ({"kind": "covid", "severity_right": 80.0, "severity_left": 3.0, "seed": 2}, 80.0, 3.0),
        ({"kind": "bacterial", "severity_right": 0.0, "severity_left": 22.0, "seed": 3}, 0.0, 22.0),
        ({"kind": "bacterial", "severity_right": 72.0, "severity_left": 0.0, "seed": 3}, 72.0, 0.0),
    ],
)
def test_requested_affected_percentage_per_lung_is_met_within_two_points(
    kwargs: dict[str, object], right: float, left: float
) -> None:
    ph = phantom(**kwargs, **SMALL)
    t = ph.truth
    assert abs(t.affected_pct_right - right) <= 2.0
    assert abs(t.affected_pct_left - left) <= 2.0
    # the reported numbers are what the masks say
    r, lf, whole, cons = affected_percentages(t.lungs, t.lesions, t.consolidation)
    assert (r, lf, whole, cons) == pytest.approx(
        (t.affected_pct_right, t.affected_pct_left, t.whole_lung_pct, t.consolidation_pct)
    )
    assert t.ct_grade == ct_grade_of(max(right, left))


def test_one_covid_severity_is_the_worse_lung_and_the_other_lung_is_lower_but_affected() -> None:
    t = covid40().truth
    assert abs(t.affected_pct_max - 40.0) <= 2.0
    assert 0.0 < min(t.affected_pct_right, t.affected_pct_left) < t.affected_pct_max
    assert t.ct_grade == 2
    assert t.label == "covid"
    assert min(t.affected_pct_right, t.affected_pct_left) < t.whole_lung_pct < t.affected_pct_max


def test_bacterial_pneumonia_is_usually_one_sided_and_mostly_consolidation() -> None:
    one_sided = [
        min(resolve_targets(PhantomSpec(kind="bacterial", severity=20.0, seed=s), np.random.default_rng(s)))
        == 0
        for s in range(200)
    ]
    assert 0.75 < np.mean(one_sided) < 0.95
    t = phantom(kind="bacterial", severity=20.0, seed=11, **SMALL).truth
    assert abs(t.affected_pct_max - 20.0) <= 2.0
    assert t.consolidation.sum() > 0.6 * t.lesions.sum()


def test_bacterial_consolidation_respects_the_fissures_of_its_lobe() -> None:
    t = phantom(kind="bacterial", severity_right=15.0, severity_left=0.0, seed=5, **SMALL).truth
    lobes_hit = np.bincount(t.lobes[t.lesions > 0], minlength=6)
    # a 15 % target fits in one lobe: all of it lies in a single right lobe
    assert np.count_nonzero(lobes_hit) == 1
    assert int(np.argmax(lobes_hit)) in (1, 2, 3)


@pytest.mark.parametrize("kind", ["healthy", "other"])
def test_healthy_and_other_studies_have_no_pneumonia_lesion(kind: str) -> None:
    t = phantom(kind=kind, seed=7, **SMALL).truth
    assert t.lesions.sum() == 0 and t.consolidation.sum() == 0
    assert t.affected_pct_max == 0.0 and t.ct_grade == 0


def test_other_studies_carry_at_least_one_other_finding() -> None:
    for seed in range(2):
        t = phantom(kind="other", seed=seed, **SMALL).truth
        labels = set(np.unique(t.findings).tolist()) - {0}
        assert labels and labels <= {1, 2, 3, 4}
        # effusion lies outside the lungs, every other finding inside
        assert np.all(t.lungs[(t.findings > 0) & (t.findings != 2)] > 0)
        assert np.all(t.lungs[t.findings == 2] == 0)


# ---- masks against HU ----------------------------------------------------------------------------------
def test_masks_are_nested_lesions_inside_lungs_and_never_on_vessels() -> None:
    t = covid40().truth
    assert np.all(t.lungs[t.lesions > 0] > 0)
    assert np.all(t.lesions[t.consolidation > 0] > 0)
    assert not np.any((t.lesions > 0) & (t.vessels > 0))
    assert np.array_equal(t.lobes > 0, t.lungs > 0)
    assert set(np.unique(t.lungs).tolist()) == {0, 1, 2}


def test_hu_inside_the_masks_matches_the_tissue_they_label() -> None:
    ph = covid40()
    hu, t = ph.hu, ph.truth
    ggo = (t.lesions > 0) & (t.consolidation == 0)
    parenchyma = (t.lungs > 0) & (t.lesions == 0) & (t.vessels == 0)
    assert -750 <= np.median(hu[ggo]) <= -300
    assert -950 <= np.median(hu[parenchyma]) <= -780
    assert np.median(hu[t.vessels == 1]) > -450
    if t.consolidation.any():
        assert -100 <= np.median(hu[t.consolidation > 0]) <= 60
    # lesion voxels are denser than the parenchyma of the same patient
    assert np.percentile(hu[ggo], 10) > np.percentile(hu[parenchyma], 50)


def test_lesions_are_peripheral_and_lower_lobe_predominant_in_covid() -> None:
    t = phantom(kind="covid", severity=15.0, seed=21, **MEDIUM).truth
    lower = np.isin(t.lobes, (3, 5))
    frac_lower_lesion = (t.lesions & lower).sum() / t.lesions.sum()
    frac_lower_lung = lower.sum() / (t.lungs > 0).sum()
    assert frac_lower_lesion > frac_lower_lung


def test_anatomy_right_lung_is_larger_and_the_left_lung_lies_at_larger_lps_x() -> None:
    ph = covid40()
    t = ph.truth
    right, left = (t.lungs == 1), (t.lungs == 2)
    assert right.sum() > left.sum()
    cols = np.arange(t.lungs.shape[2])
    x = ph.affine[0, 0] * cols + ph.affine[0, 3]
    assert x[np.nonzero(left)[2]].mean() > x[np.nonzero(right)[2]].mean()
    # apices are above the diaphragm domes, and bone, air and soft tissue all appear
    assert ph.hu.max() > 400 and ph.hu.min() <= -1000
    assert -200 < np.median(ph.hu[ph.hu > -300]) < 200


def test_lobes_have_plausible_shares_and_positions() -> None:
    t = covid40().truth
    counts = np.bincount(t.lobes.ravel(), minlength=6)[1:]
    share = counts / counts.sum()
    assert np.all(share > 0.04) and np.all(share < 0.4)
    assert share[1] == min(share[:3])  # the middle lobe is the smallest right lobe
    z = np.arange(t.lobes.shape[0])[:, None, None]
    zc = [float((z * (t.lobes == k)).sum() / (t.lobes == k).sum()) for k in range(1, 6)]
    assert zc[0] > zc[2] and zc[3] > zc[4]  # upper lobes above lower lobes


def test_thick_slices_average_anatomy_across_the_slice() -> None:
    thin = phantom(kind="healthy", seed=9, matrix=96, pixel_spacing=4.0, slice_thickness=1.0, slices=300)
    thick = phantom(kind="healthy", seed=9, matrix=96, pixel_spacing=4.0, slice_thickness=10.0, slices=30)
    assert thick.hu.shape[0] == 30 and thick.spacing[0] == 10.0
    # the same patient: a 10 mm slice is the average of the ten 1 mm slices it covers, not its centre
    body = thick.hu > -900
    mean_thin = thin.hu.reshape(30, 10, 96, 96).mean(axis=1)
    centre_thin = thin.hu[5::10]
    err_mean = np.abs(thick.hu - mean_thin)[body].mean()
    err_centre = np.abs(thick.hu - centre_thin)[body].mean()
    assert err_mean < 0.8 * err_centre
    assert err_mean < 2.0 * thick.noise_hu


# ---- determinism ------------------------------------------------------------------------------------------
def test_same_seed_gives_the_same_phantom_whatever_the_thread_count() -> None:
    spec = PhantomSpec(kind="covid", severity=30.0, seed=12, **SMALL)
    a = generate(spec, workers=1)
    b = generate(spec, workers=3)
    assert np.array_equal(a.hu, b.hu)
    for name in ("lungs", "lobes", "lesions", "consolidation", "vessels", "findings"):
        assert np.array_equal(getattr(a.truth, name), getattr(b.truth, name))
    c = phantom(kind="covid", severity=30.0, seed=4, **SMALL)
    assert not np.array_equal(a.hu, c.hu)


def test_spec_validation_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError, match="severity"):
        PhantomSpec(kind="healthy", severity=10.0)
    with pytest.raises(ValueError, match="severity"):
        PhantomSpec(kind="covid", severity=99.0)
    with pytest.raises(ValueError, match="slice_thickness"):
        PhantomSpec(slice_thickness=20.0)
    with pytest.raises(ValueError, match="kind"):
        PhantomSpec(kind="flu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="both"):
        PhantomSpec(kind="covid", severity_right=10.0)


def test_dataset_specs_balance_kinds_and_cover_every_covid_grade() -> None:
    specs = dataset_specs(32, seed=3, matrix=128)
    assert specs == dataset_specs(32, seed=3, matrix=128)
    kinds = [s.kind for s in specs]
    assert all(kinds.count(k) == 8 for k in KINDS)
    grades = {ct_grade_of(s.severity or 0.0) for s in specs if s.kind == "covid"}
    assert grades == {1, 2, 3, 4}
    assert len({s.seed for s in specs}) == 32
    assert len({s.vendor for s in specs}) > 1 and len({s.slice_thickness for s in specs}) > 1


def test_full_size_study_has_exact_geometry() -> None:
    # Generation time (target <= 10 s) is measured by `make bench` (bench/analysis.py), not asserted here.
    spec = PhantomSpec(kind="covid", severity=40.0, seed=1, slices=300, slice_thickness=1.0)
    ph = generate(spec)
    assert ph.hu.shape == (300, 512, 512) and ph.hu.dtype == np.int16
    assert abs(ph.truth.affected_pct_max - 40.0) <= 2.0
    assert ph.affine[0, 0] == ph.affine[1, 1] and 0.6 < ph.affine[0, 0] < 0.85


# ---- DICOM -----------------------------------------------------------------------------------------------------
def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _dciodvfy(path: Path) -> str:
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
    return out.stdout + out.stderr


@pytest.mark.parametrize("vendor", ["siemens", "ge"])
def test_ct_slice_localizer_and_dose_screen_pass_dciodvfy(tmp_path: Path, vendor: str) -> None:
    ph = phantom(
        kind="covid",
        severity=30.0,
        seed=4,
        vendor=vendor,
        with_localizer=True,
        with_dose_report=True,
        **SMALL,
    )
    dss = to_datasets(ph)
    assert "LOCALIZER" in dss[0].ImageType and dss[-1].SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    for name, ds in (("localizer", dss[0]), ("ct", dss[len(dss) // 2]), ("dose", dss[-1])):
        report = _dciodvfy(_write(ds, tmp_path / f"{name}.dcm"))
        errors = [line for line in report.splitlines() if "Error" in line]
        assert errors == [], f"{name}: {report}"


def test_every_instance_says_synthetic_and_research_only() -> None:
    ph = phantom(kind="covid", severity=30.0, seed=4, with_dose_report=True, **SMALL)
    for ds in to_datasets(ph):
        assert "SYNTHETIC" in ds.SeriesDescription and "RESEARCH" in ds.SeriesDescription
        assert "RESEARCH USE ONLY" in ds.ImageComments
    first = to_datasets(ph)[0]
    assert str(first.PatientName) == "PHANTOM^COVID30"


def test_uids_are_deterministic_unique_and_valid() -> None:
    ph = phantom(kind="healthy", seed=7, with_localizer=True, with_dose_report=True, **SMALL)
    a, b = to_datasets(ph), to_datasets(ph)
    uids = [ds.SOPInstanceUID for ds in a]
    assert uids == [ds.SOPInstanceUID for ds in b]
    assert len(set(uids)) == len(uids)
    assert len({ds.StudyInstanceUID for ds in a}) == 1
    assert len({ds.SeriesInstanceUID for ds in a}) == 3
    for uid in uids + [a[0].StudyInstanceUID, a[0].FrameOfReferenceUID]:
        assert uid.startswith("2.25.") and len(uid) <= 64
    vol = to_volume(ph)
    axial = sorted(a[1:-1], key=lambda d: float(d.ImagePositionPatient[2]))
    assert vol.sop_instance_uids == tuple(d.SOPInstanceUID for d in axial)


def _check_geometry(ph: Phantom, files: list[Path]) -> None:
    """Every axial pixel, placed in LPS by its own header, holds the phantom's HU at that point."""
    x0, y0, z0 = ph.affine[:3, 3]
    px, dz = ph.affine[0, 0], ph.affine[2, 2]
    fov = fov_mask(ph.hu.shape[1], ph.hu.shape[2], px, x0, y0)
    seen = set()
    for f in files:
        ds = dcmread(f)
        if "AXIAL" not in ds.ImageType:
            continue
        row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
        col_dir = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
        origin = np.array([float(v) for v in ds.ImagePositionPatient])
        d_row, d_col = (float(v) for v in ds.PixelSpacing)
        stored = ds.pixel_array.astype(np.int32)
        hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        rows, cols = np.mgrid[0 : ds.Rows, 0 : ds.Columns]
        world = origin + cols[..., None] * d_col * row_dir + rows[..., None] * d_row * col_dir
        ix = np.rint((world[..., 0] - x0) / px).astype(int)
        iy = np.rint((world[..., 1] - y0) / px).astype(int)
        iz = np.rint((world[..., 2] - z0) / dz).astype(int)
        assert np.all(iz == iz[0, 0])
        seen.add(int(iz[0, 0]))
        ref = ph.hu[iz, iy, ix].astype(np.int32)
        if ds.PixelRepresentation == 0:  # unsigned storage cannot go below the intercept
            ref = np.maximum(ref, int(ds.RescaleIntercept))
        inside = fov[iy, ix]
        assert np.array_equal(hu[inside], ref[inside])
        padding = ds.get("PixelPaddingValue")
        if padding is not None:
            assert np.all(stored[~inside] == padding)
        else:  # air outside the reconstruction circle
            assert np.all(hu[~inside] == max(-1024, float(ds.RescaleIntercept)))
    assert seen == set(range(ph.hu.shape[0]))


@pytest.mark.parametrize(
    ("vendor", "feet_first", "reversed_order"),
    [("siemens", False, False), ("ge", True, False), ("philips", False, True), ("canon", True, True)],
)
def test_both_orientations_and_every_vendor_load_back_with_the_right_geometry(
    tmp_path: Path, vendor: str, feet_first: bool, reversed_order: bool
) -> None:
    ph = phantom(
        kind="covid",
        severity=30.0,
        seed=4,
        vendor=vendor,
        feet_first=feet_first,
        reversed_order=reversed_order,
        **SMALL,
    )
    dss = to_datasets(ph)
    files = [_write(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate(dss)]
    _check_geometry(ph, files)
    first = dcmread(files[0])
    assert first.PatientPosition == ("FFS" if feet_first else "HFS")
    z_first = float(first.ImagePositionPatient[2])
    z_last = float(dcmread(files[-1]).ImagePositionPatient[2])
    # instance 1 is the top slice unless the order is reversed
    assert (z_first < z_last) == reversed_order
    if vendor == "philips":
        assert first.RescaleIntercept == -1000 and first.PixelRepresentation == 0
    if vendor == "canon":
        assert first.RescaleIntercept == 0 and first.PixelRepresentation == 1


@pytest.mark.parametrize(
    "syntax",
    [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian],
)
def test_compressed_and_other_transfer_syntaxes_round_trip_the_pixels(tmp_path: Path, syntax: str) -> None:
    ph = phantom(kind="covid", severity=30.0, seed=4, vendor="ge", transfer_syntax=syntax, **SMALL)
    dss = to_datasets(ph)
    files = [_write(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate(dss[::8])]
    assert dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    for f in files:
        ds = dcmread(f)
        iz = int(round((float(ds.ImagePositionPatient[2]) - ph.affine[2, 3]) / ph.affine[2, 2]))
        hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
        inside = ph.hu[iz] > -1024
        assert np.array_equal(hu[inside], ph.hu[iz][inside])
    if syntax != DeflatedExplicitVRLittleEndian:  # this dciodvfy build cannot inflate deflated files
        report = _dciodvfy(files[1])
        assert not [line for line in report.splitlines() if "Error" in line], report


def test_default_transfer_syntax_is_explicit_little_endian() -> None:
    ph = phantom(kind="healthy", seed=7, **SMALL)
    assert to_datasets(ph)[0].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
