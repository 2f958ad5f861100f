"""Bounded-memory helpers for whole-volume masks: compact component labels and slab-wise counting.

A 512 × 512 × 1,200 mask is 315 MB of bool; its ``int32`` labels would be 1.26 GB and ``np.bincount`` of
them another 2.5 GB (it counts through an ``intp`` copy).  The helpers here give the same numbers with
the smallest label type that holds the components and counts taken one slab of slices at a time.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import ndimage

#: Voxels counted at once by the slab-wise passes (8 MB of ``intp`` per ``np.bincount``).
SLAB_VOXELS: Final[int] = 1 << 20

Labels = npt.NDArray[np.uint16] | npt.NDArray[np.int32]


def slab_slices(shape: tuple[int, ...], voxels: int = SLAB_VOXELS) -> range:
    """Slices (along axis 0) per slab so that one slab holds about ``voxels`` voxels (at least one)."""
    per_slice = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return range(0, int(shape[0]), max(1, voxels // max(1, per_slice)))


def label_compact(
    mask: npt.NDArray[np.bool_], structure: npt.NDArray[np.bool_] | None = None
) -> tuple[Labels, int]:
    """``scipy.ndimage.label`` into ``uint16`` when the components fit, else ``int32`` (same labels)."""
    try:
        labels16 = np.empty(mask.shape, np.uint16)
        n = int(ndimage.label(mask, structure=structure, output=labels16))
        return labels16, n
    except RuntimeError:  # more than 65,535 components: scipy refuses the narrow type
        del labels16
        labels32, n32 = ndimage.label(mask, structure=structure)
        return labels32, int(n32)


def component_sizes(labels: Labels, n: int) -> npt.NDArray[np.intp]:
    """Voxel count of each label ``0 … n`` (``np.bincount(labels.ravel())`` without the full copy)."""
    sizes = np.zeros(n + 1, np.intp)
    step = slab_slices(labels.shape).step
    for z0 in range(0, labels.shape[0], step):
        sizes += np.bincount(labels[z0 : z0 + step].ravel(), minlength=n + 1)[: n + 1]
    return sizes
