"""The reduced working grid of the non-learned pipelines: in-plane block averaging and linear upsampling.

Seed 004 (Goncharov et al. 2021, Section 4.1) rescales every axial slice to 2 × 2 mm and leaves z
untouched before any segmentation. We do the same with an *integer* in-plane block size ``f``
(``round(2 mm / pixel spacing)``, at least 1): a coarse pixel is the mean of an ``f × f`` block, which is
exact area averaging (no interpolation kernel to choose), costs one pass over the int16 volume, and
makes the way back a separable linear interpolation whose coarse-pixel centres sit at fine coordinate
``i·f + (f − 1)/2``. For the usual 0.6–0.8 mm pixels the coarse pixel is 1.9–2.5 mm.

Everything runs in z chunks so that no full-resolution float32 copy of the volume ever exists: a
512 × 512 × 300 volume is 157 MB of int16 and would be 315 MB per float32 temporary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

#: Slices processed at once by the chunked full-resolution passes (bounds the temporaries).
CHUNK_SLICES = 16


@dataclass(frozen=True)
class WorkGrid:
    """A volume's full grid and the reduced in-plane grid the non-learned analysis runs on.

    Parameters
    ----------
    shape : tuple of int
        Full (z, y, x) shape.
    spacing : tuple of float
        Full (z, y, x) spacing, mm.
    factor : int
        In-plane block size; 1 keeps the full grid.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    factor: int

    @staticmethod
    def for_volume(
        shape: tuple[int, int, int], spacing: tuple[float, float, float], target_mm: float = 2.0
    ) -> WorkGrid:
        """The grid whose in-plane pixel is closest to ``target_mm`` (seed 004's 2 × 2 mm)."""
        pixel = max(min(spacing[1], spacing[2]), 1e-3)
        factor = max(1, int(round(target_mm / pixel)))
        return WorkGrid((int(shape[0]), int(shape[1]), int(shape[2])), spacing, factor)

    @property
    def coarse_shape(self) -> tuple[int, int, int]:
        """(z, y, x) shape of the working grid (partial blocks at the far edges count as whole)."""
        f = self.factor
        return self.shape[0], -(-self.shape[1] // f), -(-self.shape[2] // f)

    @property
    def coarse_spacing(self) -> tuple[float, float, float]:
        """(z, y, x) spacing of the working grid, mm."""
        f = self.factor
        return self.spacing[0], self.spacing[1] * f, self.spacing[2] * f

    @property
    def coarse_voxel_ml(self) -> float:
        """Volume of one working-grid voxel, mL."""
        dz, dy, dx = self.coarse_spacing
        return dz * dy * dx / 1000.0

    def coarse_affine(self, affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Map (column, row, slice, 1) of the working grid to LPS mm, given the full grid's affine.

        A coarse pixel's centre is the centre of its block: fine index ``i·f + (f − 1)/2``.
        """
        f = self.factor
        scale = np.diag([float(f), float(f), 1.0, 1.0])
        scale[0, 3] = scale[1, 3] = (f - 1) / 2.0
        return np.asarray(affine, dtype=np.float64) @ scale

    def chunks(self) -> Iterator[slice]:
        """Slices of z covering the volume in steps of :data:`CHUNK_SLICES`."""
        for z0 in range(0, self.shape[0], CHUNK_SLICES):
            yield slice(z0, min(z0 + CHUNK_SLICES, self.shape[0]))

    def downsample(self, hu: npt.NDArray[np.integer] | npt.NDArray[np.floating]) -> F32:
        """Block-mean of ``hu`` onto the working grid (float32).

        Partial blocks at the bottom/right edges are padded by repeating the edge, so they average
        only real pixels' values.
        """
        f = self.factor
        if f == 1:
            return np.asarray(hu, dtype=np.float32)
        nz, ny, nx = self.shape
        _, cy, cx = self.coarse_shape
        out = np.empty(self.coarse_shape, np.float32)
        for zs in self.chunks():
            block = np.asarray(hu[zs])
            if cy * f != ny or cx * f != nx:
                block = np.pad(block, ((0, 0), (0, cy * f - ny), (0, cx * f - nx)), mode="edge")
            n = block.shape[0]
            # float32 holds int16 sums of up to 512 pixels exactly (|sum| < 2**24)
            acc = block.astype(np.float32).reshape(n, cy, f, cx * f).sum(axis=2)
            out[zs] = acc.reshape(n, cy, cx, f).sum(axis=3) * np.float32(1.0 / (f * f))
        return out

    def upsample_chunk(self, coarse: F32, zs: slice) -> F32:
        """Linear in-plane upsampling of ``coarse[zs]`` to the full grid (float32, z unchanged).

        Separable: for each of the ``f`` sub-pixel phases the fine value is a two-tap blend of the
        neighbouring coarse pixels, with edge values repeated beyond the border.
        """
        f = self.factor
        block = np.asarray(coarse[zs], dtype=np.float32)
        if f == 1:
            return block.copy()
        _, ny, nx = self.shape
        return _linear_axis(_linear_axis(block, f, 1, ny), f, 2, nx)

    def upsample_above(
        self,
        coarse: F32 | npt.NDArray[np.bool_],
        level: float = 0.5,
        *,
        within: npt.NDArray[np.bool_] | npt.NDArray[np.integer] | None = None,
    ) -> npt.NDArray[np.bool_]:
        """Full-grid mask ``upsample(coarse) > level`` (linear interpolation, chunked).

        Only the in-plane bounding box of the coarse pixels above ``level`` (plus one pixel) is
        interpolated: outside it every interpolated value is a blend of values at or below ``level``.
        ``within`` (a full-grid mask or label array) is applied chunk by chunk: the result is
        ``upsample_above(coarse, level) & (within > 0)`` without a second full-grid temporary.
        """
        out = np.zeros(self.shape, dtype=bool)
        for index, above in self.iter_above(coarse, level):
            out[index] = above
        if within is not None:
            for zs in self.chunks():
                out[zs] &= np.asarray(within[zs]) > 0
        return out

    def iter_above(
        self, coarse: F32 | npt.NDArray[np.bool_], level: float = 0.5
    ) -> Iterator[tuple[tuple[slice, slice, slice], npt.NDArray[np.bool_]]]:
        """``upsample(coarse) > level`` chunk by chunk: ``((z chunk, rows, cols), mask of that box)``.

        Chunks without a coarse pixel above ``level`` are skipped; outside the box the mask is False
        (see :meth:`upsample_above`).
        """
        f = self.factor
        _, ny, nx = self.shape
        for zs in self.chunks():
            src = coarse[zs]
            src = np.asarray(src, dtype=np.float32) if src.dtype == np.bool_ else src
            above = src > level
            if not above.any():
                continue
            rows = np.nonzero(above.any(axis=(0, 2)))[0]
            cols = np.nonzero(above.any(axis=(0, 1)))[0]
            r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, src.shape[1])
            c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, src.shape[2])
            block = np.asarray(src[:, r0:r1, c0:c1], dtype=np.float32)
            fr0, fr1 = r0 * f, min(r1 * f, ny)
            fc0, fc1 = c0 * f, min(c1 * f, nx)
            if f > 1:
                block = _linear_axis(_linear_axis(block, f, 1, fr1 - fr0), f, 2, fc1 - fc0)
            yield (zs, slice(fr0, fr1), slice(fc0, fc1)), block > level


def _linear_axis(a: F32, f: int, axis: int, n_out: int) -> F32:
    """Upsample ``a`` by the integer ``f`` along ``axis`` (block-centre aligned), crop to ``n_out``."""
    n_in = a.shape[axis]
    a = np.moveaxis(a, axis, -1)
    padded = np.concatenate([a[..., :1], a, a[..., -1:]], axis=-1)  # edge repeat: index i -> i + 1
    out = np.empty((*a.shape[:-1], n_in * f), dtype=np.float32)
    for k in range(f):
        d = (k + 0.5) / f - 0.5  # offset of fine pixel k from its block's centre, in coarse pixels
        if d >= 0:
            lo, hi, w = padded[..., 1 : n_in + 1], padded[..., 2 : n_in + 2], d
        else:
            lo, hi, w = padded[..., 0:n_in], padded[..., 1 : n_in + 1], 1.0 + d
        out[..., k::f] = lo + np.float32(w) * (hi - lo)
    return np.moveaxis(out[..., :n_out], -1, axis)
