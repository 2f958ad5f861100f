"""Consolidation under the pleura that reads in the fat range stays in the lung (issue 11, item 2).

Partly aerated consolidation reads −160…−60 HU, the range of extrapleural fat, which the pleural-pocket
step of :mod:`triaged.analysis.lungs` (step 8) never adds. A pocket bordered by ground glass or
consolidation (a *lesional* pocket, ``pocket_lesion_hu``) takes those voxels too.

A small synthetic chest: two ellipsoidal lungs (−850 HU) in a soft-tissue body. A costal dent of the
left lung holds partly aerated consolidation (−100 HU) with a ground-glass halo (−450 HU) in the lung
around it; the mirror dent of the right lung holds the same density against normal lung (extrapleural
fat bulging into the lung). The consolidation must join the left lung, the fat must stay out. With
lungs v1.3 (classical/threshold 1.3) none of the consolidation was in the mask.

On real slices: the mean share of the radiologists' infection inside the lung mask on the 50 MedSeg
doctor-labelled COVID-19 slices, read as ``triaged eval`` reads them (window estimated per slice,
synthetic body outline): 84.5 % with v1.3.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import REAL_DATA
from tests.synthetic_chest import SPACING, add_noise, ellipsoid, two_lungs
from triaged.analysis.grid import WorkGrid
from triaged.analysis.lungs import LEFT, RIGHT, segment_lungs_coarse, upsample_labels
from triaged.analysis.realslice import assumed_pixel_mm, slice_volume
from triaged.analysis.window import estimate_window, gray_to_hu
from triaged.lab.realsets import read_slice_set

SHAPE = (40, 100, 120)


def _chest() -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.bool_]]]:
    hu, right, left = two_lungs(SHAPE, lung_z=20, lung_half_height=30)
    # a costal dent of each lung: consolidation in the left one, fat in the right one
    consolidation = ellipsoid(SHAPE, (20, 48, 104), (14, 9, 9)) & left
    halo = ellipsoid(SHAPE, (20, 48, 104), (16, 14, 14)) & left & ~consolidation
    fat = ellipsoid(SHAPE, (20, 48, 16), (14, 9, 9)) & right
    hu[halo] = -450.0
    hu[consolidation | fat] = -100.0
    add_noise(hu, seed=11)
    return hu, {"consolidation": consolidation, "fat": fat}


def test_partly_aerated_consolidation_in_a_costal_dent_joins_the_lung_but_fat_does_not() -> None:
    hu, truth = _chest()
    grid = WorkGrid.for_volume(SHAPE, SPACING, target_mm=2.0)
    affine = np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])
    labels = segment_lungs_coarse(hu, grid, affine).labels
    consolidation = truth["consolidation"]
    inside = np.count_nonzero(labels[consolidation] == LEFT) / np.count_nonzero(consolidation)
    # lungs v1.3: 0 %
    assert inside >= 0.85, f"{100 * inside:.1f} % of the consolidation in the left lung"
    fat = np.count_nonzero(labels[truth["fat"]] == RIGHT) / np.count_nonzero(truth["fat"])
    assert fat <= 0.05, f"{100 * fat:.1f} % of the fat next to normal lung in the right lung"


DOCTOR = REAL_DATA / "medseg-covid-slices" / "doctor-label"


def test_more_of_the_radiologists_infection_lies_inside_the_lungs_on_the_medseg_slices() -> None:
    if not DOCTOR.is_dir():
        pytest.skip(f"real data folder {DOCTOR} is absent (only on development machines)")
    shares = []
    for k, ref in enumerate(read_slice_set(DOCTOR).refs):
        s = ref.load()
        if not s.lesion.any():
            continue
        # 49 of the 50 slices show the lungs above and below each other: transposed, as `triaged eval` does
        grey, lesion = s.grey.T, s.lesion.T
        hu = gray_to_hu(grey, estimate_window(s.grey))
        volume, crop = slice_volume(hu, assumed_pixel_mm(hu.shape), uid_suffix=k + 1)
        grid = WorkGrid.for_volume(volume.hu.shape, volume.spacing)  # type: ignore[arg-type]
        coarse = segment_lungs_coarse(grid.downsample(volume.hu), grid, volume.affine).labels
        lungs = upsample_labels(coarse, grid)[0][crop] > 0
        shares.append(np.count_nonzero(lesion & lungs) / np.count_nonzero(lesion))
    mean = float(np.mean(shares))
    # lungs v1.3: 84.5 %; v1.4: 87.6 %
    assert mean >= 0.87, f"{100 * mean:.1f} % of the infection inside the lung mask (mean per slice)"
