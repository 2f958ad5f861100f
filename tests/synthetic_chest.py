"""A small synthetic chest for the lung-segmentation tests, already on the working grid.

Air (−1000 HU), a soft-tissue body (40 HU) centred in the volume and two ellipsoidal lungs (−850 HU). A test
draws what it guards into the lungs (gas, pockets, consolidation ...) and then adds the scanner noise with
:func:`add_noise`, last, so its own structures get the same noise as the lungs.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

SPACING = (2.5, 2.0, 2.0)  # z, y, x mm: already the working grid


def ellipsoid(
    shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, float, float]
) -> npt.NDArray[np.bool_]:
    """The voxels of a volume of ``shape`` inside the axis-aligned ellipsoid (voxel units, z, y, x)."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    q = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radii, strict=True))
    return np.asarray(q <= 1.0)


def two_lungs(
    shape: tuple[int, int, int], *, lung_z: float, lung_half_height: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """``(hu, right, left)``: the body and the two lungs, centred at slice ``lung_z`` and ``lung_half_height``
    slices high each way (the right one at column 33, the left one at column 87), without noise."""
    hu = np.full(shape, -1000.0, np.float32)
    hu[ellipsoid(shape, (shape[0] / 2, 50, 60), (400, 42, 56))] = 40.0
    right = ellipsoid(shape, (lung_z, 48, 33), (lung_half_height, 26, 19))
    left = ellipsoid(shape, (lung_z, 48, 87), (lung_half_height, 26, 19))
    hu[right | left] = -850.0
    return hu, right, left


def add_noise(hu: npt.NDArray[np.float32], seed: int = 11) -> None:
    """Add Gaussian noise (σ 15 HU) to ``hu`` in place."""
    hu += np.random.default_rng(seed).normal(0.0, 15.0, hu.shape).astype(np.float32)
