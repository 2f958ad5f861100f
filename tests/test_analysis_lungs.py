"""Non-learned lungs (triaged.analysis.lungs) on phantoms of every acquisition style and on real CT.

Phantoms are small (192–256 pixels, few slices) so the file runs in well under a minute. Volumes
written as DICOM go through the same read path as the node (``read_headers`` → ``select_series`` →
``load_volume``), so feet-first and reversed-order series arrive with their own index layout; masks
are mapped back to the phantom's canonical grid through the two affines before comparing.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage

from tests.conftest import LIDC, PET_CT_DX
from triaged.analysis.grid import WorkGrid
from triaged.analysis.lungs import (
    LungParams,
    NoLungsError,
    assign_sides,
    kmeans_split,
    segment_lungs,
    segment_lungs_coarse,
)
from triaged.assembly import select_series
from triaged.config import SeriesSelectionConfig
from triaged.domain import Volume
from triaged.lab.metrics import dice
from triaged.lab.phantom import Phantom, PhantomSpec, generate, to_datasets, to_volume
from triaged.volume import load_volume, read_headers

RELAXED = SeriesSelectionConfig(min_slices=10, min_coverage_mm=10)


@cache
def _phantom(**kwargs: object) -> Phantom:
    return generate(PhantomSpec(**kwargs))  # type: ignore[arg-type]


def load_series(folder: Path) -> Volume:
    """Read a folder of DICOM files the way the node does (relaxed series choice for short stacks)."""
    rels = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.dcm"))
    headers, _ = read_headers(folder, rels)
    choice = select_series(headers, RELAXED)
    assert choice.series_uid is not None, choice.reason
    return load_volume(folder, choice, "1.2.826.0.1.3680043.8.498.1")


def via_dicom(ph: Phantom, folder: Path) -> Volume:
    """Write the phantom's axial series as files and read it back as the node would."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(to_datasets(ph)):
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
    return load_series(folder)


def to_canonical(arr: npt.NDArray[np.uint8], affine: npt.NDArray[np.float64], canonical: Phantom) -> npt.NDArray[np.uint8]:
    """Resample an index-aligned array of a volume onto the phantom's grid (flips only)."""
    m = np.linalg.inv(canonical.affine) @ affine
    rot = np.round(m[:3, :3]).astype(int)
    assert np.array_equal(np.abs(rot), np.eye(3, dtype=int)), "axes must only be flipped"
    out = arr
    for axis_ijk, axis_zyx in ((0, 2), (1, 1), (2, 0)):
        if rot[axis_ijk, axis_ijk] < 0:
            out = np.flip(out, axis=axis_zyx)
    return np.ascontiguousarray(out)


def lps_centroid_x(labels: npt.NDArray[np.uint8], affine: npt.NDArray[np.float64], side: int) -> float:
    z, y, x = np.nonzero(labels == side)
    ijk = np.array([x.mean(), y.mean(), z.mean(), 1.0])
    return float((affine @ ijk)[0])


def body_of(hu: npt.NDArray[np.int16]) -> npt.NDArray[np.bool_]:
    """An independent body mask: > −500 HU, largest 3D component, holes filled slice by slice."""
    lab, _ = ndimage.label(hu > -500)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == int(np.argmax(sizes))
    for z in range(body.shape[0]):
        body[z] = ndimage.binary_fill_holes(body[z])
    return body


# ---- phantoms of every acquisition style -------------------------------------------------------------
STYLES = {
    "thin 1 mm, Siemens": {"slice_thickness": 1.0, "slices": 120, "vendor": "siemens", "matrix": 192},
    "2.5 mm, GE": {"slice_thickness": 2.5, "vendor": "ge", "matrix": 192},
    "5 mm, Philips, reversed order": {"slice_thickness": 5.0, "vendor": "philips", "reversed_order": True},
    "10 mm, Canon": {"slice_thickness": 10.0, "vendor": "canon"},
    "3 mm, GE, feet first": {"slice_thickness": 3.0, "vendor": "ge", "feet_first": True, "matrix": 192},
    "0.6 mm partial stack, Siemens, feet first": {
        "slice_thickness": 0.625, "slices": 48, "vendor": "siemens", "feet_first": True,
    },
}


@pytest.mark.parametrize("style", list(STYLES))
def test_lungs_match_the_phantom_with_dice_of_at_least_0_95_and_the_right_sides(style: str, tmp_path: Path) -> None:
    kwargs = {"matrix": 256, **STYLES[style]}
    ph = _phantom(kind="covid", severity=10.0, seed=7, **kwargs)
    volume = via_dicom(ph, tmp_path / "dicom")
    lungs = to_canonical(segment_lungs(volume), volume.affine, ph)
    truth = ph.truth.lungs
    for side in (1, 2):
        d = dice(lungs == side, truth == side)
        assert d >= 0.95, f"{style}: {'right' if side == 1 else 'left'} lung Dice {d:.3f}"
    # left is left in patient coordinates, whatever the column and slice order of the files
    raw = segment_lungs(volume)
    assert lps_centroid_x(raw, volume.affine, 2) > lps_centroid_x(raw, volume.affine, 1)


def test_healthy_phantom_lungs_hold_vessels_but_not_trachea_or_organs() -> None:
    ph = _phantom(kind="healthy", seed=3, matrix=192, slice_thickness=2.5)
    lungs = segment_lungs(to_volume(ph))
    vessels = ph.truth.vessels == 1
    assert np.count_nonzero(lungs[vessels] > 0) >= 0.9 * np.count_nonzero(vessels)
    # nothing outside the phantom's lungs beyond a partial-volume rim
    outside = (lungs > 0) & (ph.truth.lungs == 0)
    assert np.count_nonzero(outside) <= 0.04 * np.count_nonzero(ph.truth.lungs)


def test_merged_lungs_are_split_and_sides_come_from_lps_x() -> None:
    ph = _phantom(kind="healthy", seed=3, matrix=192, slice_thickness=2.5)
    hu = ph.hu.copy()
    truth = ph.truth.lungs
    # an air bridge across the anterior mediastinum over the mid chest: one air component
    zs = np.nonzero((truth == 1).any(axis=(1, 2)) & (truth == 2).any(axis=(1, 2)))[0]
    mid = zs[len(zs) // 3 : 2 * len(zs) // 3]
    for z in mid:
        rows = np.nonzero((truth[z] > 0).any(axis=1))[0]
        r = rows[0] + 6
        cols = np.nonzero(truth[z, r] > 0)[0]
        right_edge = cols[truth[z, r, cols] == 1].max()
        left_edge = cols[truth[z, r, cols] == 2].min()
        hu[z, r - 2 : r + 3, right_edge : left_edge + 1] = -850
    volume = Volume(hu, ph.spacing, ph.affine, tuple(str(i) for i in range(hu.shape[0])), "1", "2")
    grid = WorkGrid.for_volume(hu.shape, ph.spacing)  # type: ignore[arg-type]
    seg = segment_lungs_coarse(grid.downsample(hu), grid, volume.affine)
    assert seg.split in ("erosion", "kmeans")
    lungs = segment_lungs(volume)
    for side in (1, 2):
        assert dice(lungs == side, truth == side) >= 0.9


def test_kmeans_split_follows_seed_004_and_names_sides_by_lps_x() -> None:
    # two boxes; the one at higher column index is at larger LPS x with an identity-like affine
    mask = np.zeros((10, 40, 60), bool)
    mask[:, 5:35, 5:25] = True
    mask[:, 5:35, 35:55] = True
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    labels = kmeans_split(mask, affine, stride=30, seed=42)
    assert set(np.unique(labels[mask])) == {1, 2}
    assert np.all(labels[:, :, 35:55][mask[:, :, 35:55]] == 2)
    # columns running toward the patient's right (feet first): the same voxels are now the right lung
    flipped = affine.copy()
    flipped[0, 0] = -1.0
    labels = kmeans_split(mask, flipped, stride=30, seed=42)
    assert np.all(labels[:, :, 35:55][mask[:, :, 35:55]] == 1)


def test_assign_sides_swaps_labels_when_label_two_lies_at_smaller_lps_x() -> None:
    labels = np.zeros((2, 4, 10), np.uint8)
    labels[:, :, :4] = 2
    labels[:, :, 6:] = 1
    out = assign_sides(labels, np.eye(4))
    assert np.all(out[:, :, :4] == 1) and np.all(out[:, :, 6:] == 2)


def test_a_volume_without_air_inside_a_body_has_no_lungs() -> None:
    hu = np.full((12, 64, 64), -1000, np.int16)
    yy, xx = np.mgrid[:64, :64]
    hu[:, (yy - 32) ** 2 + (xx - 32) ** 2 < 25**2] = 40  # a water cylinder: a body without lungs
    volume = Volume(hu, (5.0, 2.0, 2.0), np.diag([2.0, 2.0, 5.0, 1.0]), tuple("a" * 12), "1", "2")
    with pytest.raises(NoLungsError):
        segment_lungs(volume)


def test_the_kmeans_option_gives_the_same_sides_as_the_default_on_a_phantom() -> None:
    ph = _phantom(kind="healthy", seed=3, matrix=192, slice_thickness=2.5)
    volume = to_volume(ph)
    default = segment_lungs(volume)
    forced = segment_lungs(volume, LungParams(split="kmeans"))
    # k-means is only used when the lungs touch; here they do not, so the result is the same
    assert np.array_equal(default, forced)


# ---- real CT -------------------------------------------------------------------------------------------
REAL = {
    "Lung-PET-CT-Dx 30 x 8 mm": PET_CT_DX,
    "LIDC-IDRI-0001": LIDC / "LIDC-IDRI-0001",
    "LIDC-IDRI-0002": LIDC / "LIDC-IDRI-0002",
    "LIDC-IDRI-0003": LIDC / "LIDC-IDRI-0003",
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_series_lungs_are_plausible_inside_the_body_and_left_is_left(name: str) -> None:
    folder = REAL[name]
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent (only on development machines)")
    volume = load_series(folder)
    lungs = segment_lungs(volume)
    ml = float(np.prod(volume.spacing)) / 1000.0
    coverage_cm = volume.hu.shape[0] * volume.spacing[0] / 10.0
    right_ml = np.count_nonzero(lungs == 1) * ml
    left_ml = np.count_nonzero(lungs == 2) * ml
    if coverage_cm >= 20:  # the whole thorax: an adult lung is 1-4 L
        assert 1000 <= right_ml <= 4000 and 1000 <= left_ml <= 4000, (right_ml, left_ml)
    else:  # a short stack: a plausible mean cross-section per lung, 40-300 cm²
        for v in (right_ml, left_ml):
            assert 40 <= v / coverage_cm <= 300, (name, right_ml, left_ml, coverage_cm)
    assert lps_centroid_x(lungs, volume.affine, 2) > lps_centroid_x(lungs, volume.affine, 1)
    assert not np.any((lungs > 0) & ~body_of(volume.hu))
