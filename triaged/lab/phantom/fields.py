"""Smooth random fields on a coarse grid, interpolated on demand onto boxes of the fine image grid.

Texture, lesion patchiness and crazy-paving warps vary over millimetres to centimetres, so they are
drawn on a coarse grid (a few mm), smoothed with a Gaussian, and interpolated (trilinear) only where a
slice needs them; this keeps a 512 × 512 × 300 study within its time budget.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

F32 = npt.NDArray[np.float32]


def interpolation_weights(
    fine: npt.NDArray[np.floating], coarse0: float, step: float, n: int
) -> tuple[npt.NDArray[np.int64], F32]:
    """Lower coarse index and weight of the upper neighbour for linear interpolation at ``fine``."""
    pos = np.clip((np.asarray(fine, np.float64) - coarse0) / step, 0.0, n - 1.000001)
    k = np.floor(pos).astype(np.int64)
    return k, (pos - k).astype(np.float32)


#: Half-extent (mm, patient-centred) of the in-plane coarse grid; the patient always fits inside.
FIELD_HALF_EXTENT = 270.0


class SmoothField:
    """A unit-variance Gaussian random field with correlation length ``sigma_mm``, anchored to the patient.

    The coarse grid is fixed in patient coordinates (±270 mm in-plane, absolute multiples of ``step``
    in z) and each coarse plane's white noise is seeded by its absolute index, so the same patient
    scanned with another slice thickness, range or pixel size gets the same field.

    Parameters
    ----------
    entropy : tuple of int
        Seed of the field (the phantom seed and a field number).
    u, v : ndarray
        Fine column / row coordinates (patient-centred mm) the field will be sampled on.
    z_range : tuple of float
        (lowest, highest) z the field will be sampled at, mm.
    step : float
        Coarse grid spacing, mm.
    sigma_mm : float
        Standard deviation of the smoothing Gaussian, mm.
    """

    def __init__(
        self,
        entropy: tuple[int, ...],
        u: F32,
        v: F32,
        z_range: tuple[float, float],
        step: float,
        sigma_mm: float,
    ) -> None:
        margin = 4.0 * sigma_mm + 2.0 * step
        k0 = int(np.floor((z_range[0] - margin) / step))
        k1 = int(np.ceil((z_range[1] + margin) / step))
        n = int(np.ceil(2.0 * FIELD_HALF_EXTENT / step)) + 1
        self.step = step
        self.z0 = k0 * step
        self.u0 = self.v0 = -FIELD_HALF_EXTENT
        white = np.empty((k1 - k0 + 1, n, n), np.float32)
        for i, k in enumerate(range(k0, k1 + 1)):
            plane_rng = np.random.default_rng([*entropy, k + 2**31])
            white[i] = plane_rng.standard_normal((n, n), dtype=np.float32)
        field = ndimage.gaussian_filter(white, sigma_mm / step, mode="reflect", truncate=3.0)
        # the variance of filtered white noise is known: normalise without looking at the sample
        sig = sigma_mm / step
        field *= np.float32((2.0 * np.sqrt(np.pi) * sig) ** 1.5)
        self.values = field.astype(np.float32)
        self.ku, self.wu = interpolation_weights(u, self.u0, step, n)
        self.kv, self.wv = interpolation_weights(v, self.v0, step, n)

    def plane(self, z: float) -> F32:
        """Coarse-grid plane linearly interpolated at ``z``."""
        nz = self.values.shape[0]
        pos = float(np.clip((z - self.z0) / self.step, 0.0, nz - 1.000001))
        k = int(pos)
        w = pos - k
        return (1.0 - w) * self.values[k] + w * self.values[min(k + 1, nz - 1)]

    def box(self, z: float, rows: slice, cols: slice) -> F32:
        """The field at ``z`` on the fine-grid box ``[rows, cols]`` (separable linear interpolation)."""
        plane = self.plane(z)
        kv, wv = self.kv[rows], self.wv[rows][:, None]
        ku, wu = self.ku[cols], self.wu[cols][None, :]
        lo, hi = int(kv[0]) if len(kv) else 0, int(kv[-1]) + 2 if len(kv) else 0
        part = plane[lo:hi]
        across = part[:, ku] * (1.0 - wu) + part[:, ku + 1] * wu
        kr = kv - lo
        return (across[kr] * (1.0 - wv) + across[kr + 1] * wv).astype(np.float32, copy=False)
