"""Bags of lung-cropped slices: the input of the three slice-bag networks (seeds 000, 002 and 003).

He et al. (seed 000), Chikontwe et al. (seed 002) and Hu et al. (seed 003) all classify a CT from a set of
2D slices around the lungs.  :func:`make_bag` turns a volume and its lung labels into that set, the same way
at inference (the pipelines, on ``classical``'s lungs) and in training (:mod:`triaged.lab.bagcache`):

1. one square in-plane box around both lungs over the whole stack, grown by :data:`MARGIN_MM` (the same
   box for every slice, so left/right and the lungs' shape survive; parts of the box outside the image
   are padded with air);
2. slices that contain at least :data:`MIN_LUNG_SHARE` of the largest lung cross-section, one every
   ≈ :data:`Z_STEP_MM` (slice thickness 0.6–10 mm gives comparable bags), at most :data:`MAX_SLICES`
   spread evenly over the lungs;
3. each slice's box resized to :data:`BAG_SIZE`² (bilinear with anti-aliasing) and its HU mapped by
   :func:`normalise_hu` to [0, 1] (window [−1150, +350] HU: air to dense consolidation).

:meth:`Bag.to_volume` maps bag pixel coordinates back to the volume's pixels (for boxes found on the bag)
and :func:`crop_labels` crops any label volume the same way (nearest neighbour).  Pure numpy + torch; no
lab imports.  Research use only - not for diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

#: In-plane size of a bag image, pixels.
BAG_SIZE: Final[int] = 128
#: Approximate distance between the slices of a bag, mm.
Z_STEP_MM: Final[float] = 5.0
#: At most this many slices per bag (spread evenly over the lungs).
MAX_SLICES: Final[int] = 64
#: In-plane margin around the lungs' box, mm.
MARGIN_MM: Final[float] = 10.0
#: A slice joins the bag when its lung area is at least this share of the largest one.
MIN_LUNG_SHARE: Final[float] = 0.02
#: HU window mapped to [0, 1].
HU_RANGE: Final[tuple[float, float]] = (-1150.0, 350.0)
#: HU of the padding outside the image.
PAD_HU: Final[float] = -1024.0


def normalise_hu(hu: npt.ArrayLike) -> F32:
    """HU clipped to :data:`HU_RANGE` and scaled to [0, 1]."""
    lo, hi = HU_RANGE
    return np.asarray((np.clip(np.asarray(hu, np.float32), lo, hi) - lo) / (hi - lo), np.float32)


@dataclass(frozen=True)
class Bag:
    """A study's lung-cropped slices.

    ``images`` (n, 1, S, S) float32 in [0, 1]; ``z`` (n,) the volume slice of each image; ``box``
    ``(row0, row1, col0, col1)`` the square crop on the volume grid, half-open (it may reach beyond the
    image: those pixels are padding); ``lung`` (n, S, S) the lung labels (0, 1 right, 2 left) cropped the
    same way.
    """

    images: F32
    z: I64
    box: tuple[int, int, int, int]
    lung: U8

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def to_volume(self, rows: npt.ArrayLike, cols: npt.ArrayLike) -> tuple[I64, I64]:
        """Volume pixel (row, column) of bag pixel coordinates (pixel centres map to pixel centres; not
        clipped to the image)."""
        row0, row1, col0, col1 = self.box
        s = self.size
        r = row0 + (np.asarray(rows, np.float64) + 0.5) * (row1 - row0) / s - 0.5
        c = col0 + (np.asarray(cols, np.float64) + 0.5) * (col1 - col0) / s - 0.5
        return np.rint(r).astype(np.int64), np.rint(c).astype(np.int64)


def square_box(lungs: npt.NDArray[np.generic], spacing_yx: tuple[float, float]) -> tuple[int, int, int, int]:
    """The square box (row0, row1, col0, col1) around all lung voxels of a (z, y, x) label volume, grown by
    :data:`MARGIN_MM`; the whole image when there are none."""
    ny, nx = lungs.shape[1:]
    any_z = np.asarray(np.asarray(lungs).astype(bool).any(axis=0), dtype=bool)
    if not any_z.any():
        side = max(ny, nx)
        return (ny - side) // 2, (ny - side) // 2 + side, (nx - side) // 2, (nx - side) // 2 + side
    rows = np.nonzero(any_z.any(axis=1))[0]
    cols = np.nonzero(any_z.any(axis=0))[0]
    mr = int(np.ceil(MARGIN_MM / max(spacing_yx[0], 1e-3)))
    mc = int(np.ceil(MARGIN_MM / max(spacing_yx[1], 1e-3)))
    r0, r1 = int(rows[0]) - mr, int(rows[-1]) + 1 + mr
    c0, c1 = int(cols[0]) - mc, int(cols[-1]) + 1 + mc
    side = max(r1 - r0, c1 - c0)
    r0 -= (side - (r1 - r0)) // 2
    c0 -= (side - (c1 - c0)) // 2
    return r0, r0 + side, c0, c0 + side


def select_slices(
    lungs: npt.NDArray[np.generic], dz_mm: float, z_step_mm: float = Z_STEP_MM, max_slices: int = MAX_SLICES
) -> I64:
    """The z indices of a bag (module docstring, step 2); empty when there are no lungs."""
    area = np.asarray(lungs).reshape(lungs.shape[0], -1).astype(bool).sum(axis=1)
    if area.max(initial=0) == 0:
        return np.zeros(0, np.int64)
    kept = np.nonzero(area >= max(1.0, MIN_LUNG_SHARE * float(area.max())))[0]
    step = max(1, int(round(z_step_mm / max(dz_mm, 1e-3))))
    chosen = kept[(kept - kept[0]) % step == 0] if len(kept) else kept
    if len(chosen) > max_slices:
        chosen = chosen[np.unique(np.rint(np.linspace(0, len(chosen) - 1, max_slices)).astype(np.int64))]
    return np.asarray(chosen, np.int64)


def _padded(
    plane: npt.NDArray[np.generic], box: tuple[int, int, int, int], fill: float
) -> npt.NDArray[np.generic]:
    """``plane[row0:row1, col0:col1]`` with the part outside the image filled with ``fill``."""
    row0, row1, col0, col1 = box
    ny, nx = plane.shape[-2:]
    out = np.full(plane.shape[:-2] + (row1 - row0, col1 - col0), fill, dtype=plane.dtype)
    sr0, sr1, sc0, sc1 = max(row0, 0), min(row1, ny), max(col0, 0), min(col1, nx)
    if sr0 < sr1 and sc0 < sc1:
        out[..., sr0 - row0 : sr1 - row0, sc0 - col0 : sc1 - col0] = plane[..., sr0:sr1, sc0:sc1]
    return out


def _nearest_index(lo: int, hi: int, size: int) -> I64:
    return np.asarray(lo + np.floor((np.arange(size) + 0.5) * (hi - lo) / size), np.int64)


def crop_labels(labels: npt.NDArray[np.generic], bag: Bag) -> U8:
    """Crop a (z, y, x) label volume to the bag's slices and box, nearest neighbour → (n, S, S) uint8
    (0 outside the image)."""
    row0, row1, col0, col1 = bag.box
    s = bag.size
    sub = np.asarray(labels)[bag.z]
    ri = _nearest_index(row0, row1, s)
    ci = _nearest_index(col0, col1, s)
    ny, nx = sub.shape[1:]
    rv = (ri >= 0) & (ri < ny)
    cv = (ci >= 0) & (ci < nx)
    out = np.zeros((len(bag.z), s, s), np.uint8)
    block = sub[:, np.clip(ri, 0, ny - 1)][:, :, np.clip(ci, 0, nx - 1)].astype(np.uint8)
    out[:] = block * (rv[:, None] & cv[None, :])[None]
    return out


def make_bag(
    hu: npt.NDArray[np.generic],
    lungs: npt.NDArray[np.generic],
    spacing_zyx: Sequence[float],
    *,
    size: int = BAG_SIZE,
    z_step_mm: float = Z_STEP_MM,
    max_slices: int = MAX_SLICES,
) -> Bag:
    """The bag of a volume (module docstring).

    Parameters
    ----------
    hu : ndarray (z, y, x)
        HU of the whole volume.
    lungs : ndarray (z, y, x)
        Lung labels on the same grid (non-zero = lung; 1 right, 2 left as :class:`~triaged.domain.Masks`).
    spacing_zyx : (dz, dy, dx) mm

    Raises
    ------
    ValueError
        The lung mask is empty or does not match ``hu``.
    """
    if np.shape(hu) != np.shape(lungs):
        raise ValueError(f"hu {np.shape(hu)} and lungs {np.shape(lungs)} differ in shape")
    z = select_slices(lungs, float(spacing_zyx[0]), z_step_mm, max_slices)
    if len(z) == 0:
        raise ValueError("no lung voxels: no bag")
    box = square_box(lungs, (float(spacing_zyx[1]), float(spacing_zyx[2])))
    crop = _padded(np.asarray(hu)[z].astype(np.float32), box, PAD_HU)
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(crop))[:, None]
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    images = normalise_hu(t.numpy())
    partial = Bag(images=images, z=z, box=box, lung=np.zeros((len(z), size, size), np.uint8))
    return Bag(images=images, z=z, box=box, lung=crop_labels(lungs, partial))


__all__ = [
    "BAG_SIZE",
    "HU_RANGE",
    "MARGIN_MM",
    "MAX_SLICES",
    "MIN_LUNG_SHARE",
    "PAD_HU",
    "Z_STEP_MM",
    "Bag",
    "crop_labels",
    "make_bag",
    "normalise_hu",
    "select_slices",
    "square_box",
]
