"""Display-window estimation of 8-bit CT slices (triaged.analysis.window), on real CT.

Synthetic 8-bit slices are made from a real DICOM slice (LIDC-IDRI-0001, true HU) with known windows, so
the estimate can be checked against the truth; the real exported JPGs (MedSeg / Ma et al.) are checked
for what the landmarks do not fix by construction (lesion HU, consistency within a volume, the
difference between the two sources' windows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import REAL_DATA
from triaged.analysis.window import (
    DEFAULT_SLOPE,
    Landmarks,
    Window,
    estimate_window,
    find_landmarks,
    gray_to_hu,
    window_from_landmarks,
)

LIDC_FULL = REAL_DATA / "lidc-idri-0001-full"
SLICES = REAL_DATA / "medseg-covid-slices"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data {path} is absent (only on development machines)")
    return path


def _lidc_slice() -> npt.NDArray[np.float32]:
    """A mid-chest slice of LIDC-IDRI-0001 in HU (both lungs, mediastinum, air around the body)."""
    import pydicom

    files = sorted(_need(LIDC_FULL).glob("*.dcm"))
    ds = pydicom.dcmread(str(files[len(files) // 2]))
    raw = ds.pixel_array
    hu = raw.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.where(hu < -1500, -1024.0, hu).astype(np.float32)


def _to_8bit(hu: npt.NDArray[np.float32], lo: float, hi: float) -> npt.NDArray[np.uint8]:
    return np.clip(np.round((hu - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _gray(path: Path) -> npt.NDArray[np.uint8]:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), np.uint8)


def test_gray_to_hu_is_the_linear_window() -> None:
    w = Window(-1000.0, 275.0)
    np.testing.assert_allclose(gray_to_hu([0, 255, 51], w), [-1000.0, 275.0, -745.0], atol=1e-3)
    assert w.width == pytest.approx(1275.0) and w.level == pytest.approx(-362.5)


def test_saturated_soft_tissue_caps_the_slope() -> None:
    # lung at grey 85, soft tissue clipped at white: the window ends below +40 HU
    w = window_from_landmarks(Landmarks(lung=85.0, soft=None, air=None, soft_saturated=True))
    assert w.slope <= (40 + 850) / (250 - 85) + 1e-6
    assert w.hi_hu < 120 and gray_to_hu(85, w) == pytest.approx(-850.0, abs=1e-3)
    w2 = window_from_landmarks(Landmarks(lung=85.0, soft=None, air=None))
    assert w2.slope == pytest.approx(DEFAULT_SLOPE) and w2.method == "lung+default-slope"


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(-1350.0, 150.0), (-1000.0, 1700.0), (-1100.0, 250.0)],
    ids=["W1500/L-600", "coronacases-like", "medseg-like"],
)
@pytest.mark.parametrize("crop", [False, True], ids=["whole", "lung-crop"])
def test_window_recovered_from_a_real_dicom_slice(lo: float, hi: float, crop: bool) -> None:
    hu = _lidc_slice()
    if crop:  # the exported slices are lung crops that cut through the chest wall: no air around the body
        rows = np.nonzero(((hu > -950) & (hu < -500)).sum(axis=1) > 40)[0]
        cols = np.nonzero(((hu > -950) & (hu < -500)).sum(axis=0) > 40)[0]
        hu = hu[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    gray = _to_8bit(hu, lo, hi)
    w = estimate_window(gray)
    est = gray_to_hu(gray, w)
    inside = (gray > 0) & (gray < 255) & (hu > -950) & (hu < 100)
    err = np.abs(est[inside] - hu[inside])
    assert np.median(err) < 80.0, (w, np.median(err))
    lung = inside & (hu < -700)
    # aerated lung of normal adults lies within about ±70 HU of the assumed −850 HU
    assert abs(float(np.median(est[lung]) - np.median(hu[lung]))) < 90.0, w
    # the old fixed mapping (W1500/L-600) is far off for the wide window: the test can fail
    if hi > 1000:
        old = Window(-1350.0, 150.0)
        assert np.median(np.abs(gray_to_hu(gray, old)[inside] - hu[inside])) > 150.0


def test_real_jpg_lungs_near_minus_850_and_lesions_in_the_opacity_range() -> None:
    root = _need(SLICES)
    lung_medians, lesion_medians = [], []
    for stem in ("4", "10", "14", "24", "44", "46", "56"):
        gray = _gray(root / "doctor-label" / "images" / f"{stem}.jpg")
        mask = _gray(root / "doctor-label" / "infection" / f"{stem}.png") >= 128
        w = estimate_window(gray)
        hu = gray_to_hu(gray, w)
        dark = (hu < -600) & ~mask
        lung_medians.append(float(np.median(hu[dark])))
        lesion_medians.append(float(np.median(hu[mask])))
    assert all(-930 < v < -780 for v in lung_medians), lung_medians
    # infection (ground glass / consolidation) lies between aerated lung and soft tissue
    assert all(-750 < v < -100 for v in lesion_medians), lesion_medians


def test_coronacases_window_differs_from_medseg_and_is_consistent_within_a_volume() -> None:
    images = _need(SLICES) / "pseudo-label" / "images"
    paths = sorted(images.glob("Data-1_coronacases_org_001_*.jpg"))[::6]
    grays = [_gray(p) for p in paths]
    vol = estimate_window(grays)
    per = [estimate_window(g) for g in grays]
    assert vol.method == "lung+soft"
    assert np.percentile([abs(w.lo_hu - vol.lo_hu) for w in per], 80) < 60.0
    hu = np.concatenate([gray_to_hu(g, vol).ravel() for g in grays])
    gray_all = np.concatenate([g.ravel() for g in grays])
    lung = gray_all < 30
    assert -950 < float(np.median(hu[lung])) < -780
    # the soft tissue of these slices (grey ≈ 100) is soft tissue, not lung (-644 HU under W1500/L-600)
    assert -100 < float(gray_to_hu(find_landmarks(grays[len(grays) // 2]).soft or 0.0, vol)) < 150
    medseg = estimate_window(_gray(_need(SLICES) / "doctor-label" / "images" / "44.jpg"))
    assert vol.hi_hu > medseg.hi_hu + 700
