"""Inference-time array helpers shared by the learned pipelines and the lab's training code (pure numpy).

The learned models work on the lungs' bounding box of the ≈ 2 mm working grid (:func:`lung_box`, with the
margins :data:`CROP_MARGIN_PX` / :data:`CROP_MARGIN_SLICES`) and, for the 3D model, on thick z slabs
(:func:`resample_z` and back with :func:`upsample_z`).  Training (:mod:`triaged.lab.data`,
:mod:`triaged.lab.train`) crops and resamples with the same functions, so both see the same geometry;
this module never imports the lab.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

B = npt.NDArray[np.bool_]
F32 = npt.NDArray[np.float32]

#: Margin around the lungs' bounding box kept by the crop, working pixels (in-plane) and slices.
CROP_MARGIN_PX: Final[int] = 4
CROP_MARGIN_SLICES: Final[int] = 2


# ------------------------------------------------------------------------------------------ lung box
def lung_box(
    lung: B, margin_px: int = CROP_MARGIN_PX, margin_slices: int = CROP_MARGIN_SLICES
) -> tuple[slice, slice, slice]:
    """Bounding box of ``lung`` (z, y, x) grown by the margins and clipped to the array."""
    if not lung.any():
        return slice(0, lung.shape[0]), slice(0, lung.shape[1]), slice(0, lung.shape[2])
    out = []
    for axis, margin in zip(range(3), (margin_slices, margin_px, margin_px), strict=True):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.nonzero(lung.any(axis=other))[0]
        out.append(slice(max(0, int(idx[0]) - margin), min(lung.shape[axis], int(idx[-1]) + margin + 1)))
    return out[0], out[1], out[2]


# -------------------------------------------------------------------------------------- z resampling
def resample_z(volume: F32, dz: float, target_mm: float) -> F32:
    """Thick-slab resampling along z to ≈ ``target_mm`` spacing (seed 001: slices thinner than 4 mm become
    5 mm slabs).  The stack's extent is divided into ``round(extent / target_mm)`` equal slabs and each
    output slice is the mean of the input slices weighted by their overlap with its slab."""
    nz = volume.shape[0]
    length = nz * dz
    n_out = max(1, int(round(length / target_mm)))
    edges = np.linspace(0.0, length, n_out + 1)
    lo_in = np.arange(nz) * dz
    overlap = np.clip(
        np.minimum(edges[1:, None], lo_in[None, :] + dz) - np.maximum(edges[:-1, None], lo_in[None, :]),
        0.0,
        None,
    )
    weights = (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)
    out = np.tensordot(weights, np.asarray(volume, np.float32), axes=(1, 0))
    return np.asarray(out, np.float32)


def upsample_z(volume: F32, n_out: int) -> F32:
    """Inverse of :func:`resample_z`: linear interpolation back to ``n_out`` slices."""
    n_in = volume.shape[0]
    positions = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    return _interp_z(volume, positions)


def _interp_z(volume: F32, positions: npt.NDArray[np.float64]) -> F32:
    n = volume.shape[0]
    p = np.clip(positions, 0.0, n - 1.0)
    lo = np.floor(p).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    w = (p - lo).astype(np.float32)[:, None, None]
    return np.asarray(volume[lo] * (1.0 - w) + volume[hi] * w, np.float32)


__all__ = ["CROP_MARGIN_PX", "CROP_MARGIN_SLICES", "lung_box", "resample_z", "upsample_z"]
