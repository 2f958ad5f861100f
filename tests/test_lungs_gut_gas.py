"""Gut gas under a lung base and hyperlucent lung (issue 11), on a small synthetic chest.

Two ellipsoidal lungs (−850 HU) in a soft-tissue body; a stomach bubble (−1000 HU) bulges into the left
base, wrapped in a one-voxel partial-volume shell (−500 HU): a diaphragm and gut wall thinner than a
working pixel, which joins the gas to the lung as on a real scan (RICORD 1a-001012). Under the costal
pleura of the left lower lobe lies a hyperlucent pocket (−990 HU) with lung around it (CMB-CRC 01068's
anterior lung on a LUNG kernel). The shell must leave the lung with the gas, the pocket must stay in.
Before issue 11: 2.9 mL of the shell and 1.6 mL of the gas stayed in, and the pocket was cut out.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from tests.synthetic_chest import SPACING, add_noise, ellipsoid, two_lungs
from triaged.analysis.grid import WorkGrid
from triaged.analysis.lungs import LEFT, RIGHT, segment_lungs_coarse

SHAPE = (60, 100, 120)


def _chest() -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.bool_]]]:
    hu, right, left = two_lungs(SHAPE, lung_z=36, lung_half_height=24)
    gas = ellipsoid(SHAPE, (8, 48, 87), (6, 12, 14))
    shell = ndimage.binary_dilation(gas, ndimage.generate_binary_structure(3, 1)) & ~gas
    hu[shell] = -500.0  # the partial volume of a diaphragm thinner than a voxel, and of the stomach wall
    hu[gas] = -1000.0
    pocket = ellipsoid(SHAPE, (20, 32, 87), (4, 7, 7)) & left
    hu[pocket] = -990.0
    add_noise(hu, seed=11)
    left &= ~(gas | shell)
    return hu, {"right": right, "left": left, "gas": gas, "shell": shell, "pocket": pocket}


def test_the_rim_of_stomach_gas_leaves_the_lung_and_a_hyperlucent_pocket_stays() -> None:
    hu, truth = _chest()
    grid = WorkGrid.for_volume(SHAPE, SPACING, target_mm=2.0)
    affine = np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])
    labels = segment_lungs_coarse(hu, grid, affine).labels
    voxel_ml = float(np.prod(SPACING)) / 1000.0
    assert grid.coarse_spacing == SPACING
    # the gas and its wall are not lung
    in_shell = float(np.count_nonzero(truth["shell"] & (labels > 0))) * voxel_ml
    assert in_shell <= 0.2, f"{in_shell:.2f} mL of the stomach wall in the lung mask"
    assert not np.any(truth["gas"] & (labels > 0))
    # hyperlucent lung with lung around it stays
    assert np.count_nonzero(labels[truth["pocket"]] == LEFT) >= 0.95 * np.count_nonzero(truth["pocket"])
    # and the lungs themselves are whole
    for side, lab in (("right", RIGHT), ("left", LEFT)):
        share = np.count_nonzero(labels[truth[side]] == lab) / np.count_nonzero(truth[side])
        assert share >= 0.97, f"{side}: {100 * share:.1f} % of the lung in the mask"
