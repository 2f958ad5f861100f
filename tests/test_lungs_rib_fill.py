"""Consolidation that fills the back of a lobe stays in the lung; the chest wall beyond the ribs does not
(issue 11, item 2; step 9 of :mod:`triaged.analysis.lungs`).

A posterior consolidation touches the pleura with no aerated lung beyond it, so it makes no dent in the
aerated outline for the pleural-pocket step to close. A small synthetic chest on the working grid: two
ellipsoidal lungs (−850 HU) in a soft-tissue body, ribs behind them on every sixth slice (15 mm apart,
the slices between them are intercostal spaces) and a scapula behind the left ribs. The back of the left lung is consolidated (+30 HU) under
a band of ground glass (−450 HU); the right lung is normal. The consolidation must join the left lung,
nothing may join the normal right lung, and nothing beyond the ribs may join either.

On real CT (``tests/test_real_lungs.py``): RICORD 1a-001012 gains the dense posterior right lower-lobe
consolidation (100 mL), the no-pneumonia series at most 2.0 mL.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt

from tests.synthetic_chest import SPACING, add_noise, two_lungs
from triaged.analysis.grid import WorkGrid
from triaged.analysis.lungs import LEFT, RIGHT, LungParams, segment_lungs_coarse

SHAPE = (40, 100, 120)


def _chest() -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.bool_]]]:
    hu, right, left = two_lungs(SHAPE, lung_z=20, lung_half_height=30)
    rows = np.arange(SHAPE[1])[None, :, None]
    consolidation = left & (rows >= 68)
    ground_glass = left & (rows >= 60) & ~consolidation
    hu[consolidation] = 30.0
    hu[ground_glass] = -450.0
    cols = np.arange(SHAPE[2])[None, None, :]
    ribs = np.zeros(SHAPE, bool)
    ribs[::6, 76:78] = True  # 2-4 mm behind the lungs' backs (row 74)
    ribs &= ((cols >= 12) & (cols < 54)) | ((cols >= 66) & (cols < 108))
    ribs[:, 86:88, 72:104] = True  # a scapula behind the left ribs, on every slice
    hu[ribs] = 700.0
    wall = (rows >= 79) & (hu > 0) & (hu < 100)  # the chest wall beyond the ribs (and the scapula)
    add_noise(hu, seed=12)
    return hu, {"consolidation": consolidation, "right": right, "wall": np.broadcast_to(wall, SHAPE)}


def _labels(
    params: LungParams | None = None,
) -> tuple[npt.NDArray[np.uint8], dict[str, npt.NDArray[np.bool_]]]:
    hu, truth = _chest()
    grid = WorkGrid.for_volume(SHAPE, SPACING, target_mm=2.0)
    affine = np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])
    return segment_lungs_coarse(hu, grid, affine, params or LungParams()).labels, truth


def test_a_posterior_consolidation_joins_its_lung_up_to_the_ribs_and_no_further() -> None:
    labels, truth = _labels()
    cons = truth["consolidation"]
    inside = np.count_nonzero(labels[cons] == LEFT) / np.count_nonzero(cons)
    assert inside >= 0.9, f"{100 * inside:.1f} % of the consolidation in the left lung"
    assert not labels[truth["wall"]].any(), "chest wall beyond the ribs in the lungs"
    rows = np.arange(SHAPE[1])[None, :, None]
    right_side = np.arange(SHAPE[2])[None, None, :] < 60
    behind_right = (labels == RIGHT) & ~truth["right"] & right_side & (rows > 70)
    assert not behind_right.any(), f"{np.count_nonzero(behind_right)} voxels behind the normal right lung"


def test_without_step_10_the_consolidation_stays_out() -> None:
    labels, truth = _labels(replace(LungParams(), rib_fill=False))
    cons = truth["consolidation"]
    assert np.count_nonzero(labels[cons] == LEFT) <= 0.2 * np.count_nonzero(cons)


def test_a_skin_marker_is_not_a_rib() -> None:
    """Ground glass against the lateral pleura, no rib beside it, an ECG electrode on the skin (+700 HU at
    the body's edge): the chest wall between lung and skin must not join the lung (CMB-CRC 01068 had a
    29 mm line of lateral chest wall joined this way before bone at the skin stopped counting)."""
    hu, truth = _chest()
    cols = np.arange(SHAPE[2])[None, None, :]
    rows = np.arange(SHAPE[1])[None, :, None]
    lateral_gg = (
        np.broadcast_to((cols >= 100) & (rows >= 35) & (rows < 60), SHAPE) & (hu < -700) & (hu > -920)
    )
    hu[lateral_gg] = -450.0  # ground glass along the left lung's lateral pleura (col 106)
    hu[16:24, 46:51, 114:116] = 700.0  # the electrode, at the skin (the body ends at col 116)
    grid = WorkGrid.for_volume(SHAPE, SPACING, target_mm=2.0)
    affine = np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])
    wall = np.broadcast_to((cols >= 108) & (cols < 114) & (rows >= 44) & (rows < 53), SHAPE)
    labels = segment_lungs_coarse(hu, grid, affine).labels
    assert not labels[wall].any(), (
        f"{np.count_nonzero(labels[wall])} voxels of lateral chest wall in the lungs"
    )
    at_skin = segment_lungs_coarse(hu, grid, affine, replace(LungParams(), rib_min_depth_mm=0.1)).labels
    assert labels[wall].sum() < at_skin[wall].sum()  # the electrode counted as a rib would let the wall in
