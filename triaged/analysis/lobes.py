"""Non-learned, fissure-aware lobe segmentation on the lung masks of the working grid.

Each lung is split by its fissures, modelled as height maps over the axial plane (a fissure is never
vertical, so every cranio-caudal column of the lung crosses it once):

1. **Anatomical prior.** With the lung's height normalised from its lowest point (the posterior
   costophrenic recess, 0) to its apex (1) and its antero-posterior position from front (0) to back (1),
   the oblique fissure runs from the anterior diaphragm (height :attr:`LobeParams.oblique_front`) up to
   the level of T4–T5 at the back (:attr:`LobeParams.oblique_back`), postero-superior to antero-inferior;
   the right horizontal fissure is about axial at the hilum, at the fourth costal cartilage
   (:attr:`LobeParams.horizontal`).  The lower lobes lie below the oblique fissure, the right middle lobe
   below the horizontal one and in front of the oblique one.
2. **Fissure evidence.** A Hessian plate filter of the working-grid HU (Gaussian smoothing, second
   differences, eigenvalues in closed form) marks bright sheets whose normal points the way the prior
   fissure's normal does; it is evaluated only in a band around the prior surface, column by column.
3. **Surface.** In every column the strongest plate response within the band (weighted by the distance
   to the prior) is taken when it clears :attr:`LobeParams.min_plate`; the offsets from the prior are
   smoothed by normalised convolution, so where fissures are invisible (thick slices, disease) the
   surface falls back to the geometric prior.  A second, narrower pass refines the surface.

The lobes are then labelled on the full grid slab by slab from the upsampled height maps, so every lung
voxel gets a lobe of its own side.  Scans that do not cover both lungs from base to apex get no lobes
(normalised heights would be meaningless): :func:`segment_lobes` returns None with a warning.

Labels as :class:`triaged.domain.Masks` ``lobes``: 0 background, 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from triaged.analysis.arrays import for_each_slice
from triaged.analysis.grid import WorkGrid

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
B = npt.NDArray[np.bool_]

RIGHT, LEFT = 1, 2
RUL, RML, RLL, LUL, LLL = 1, 2, 3, 4, 5
LOBE_NAMES: dict[int, str] = {RUL: "RUL", RML: "RML", RLL: "RLL", LUL: "LUL", LLL: "LLL"}


@dataclass(frozen=True)
class LobeParams:
    """Parameters of :func:`segment_lobes` (heights are fractions of the lung's height, 0 at its base).

    Attributes
    ----------
    oblique_front, oblique_back : float
        Normalised height of the oblique fissure at the front and at the back of the lung.
    horizontal : float
        Normalised height of the right horizontal fissure.
    band_mm : float
        Half-width of the first search band around the prior surface.
    refine_band_mm : float
        Half-width of the second search band around the first surface.
    prior_sigma_mm : float
        Width of the Gaussian weight that favours responses near the prior surface.
    smooth_mm : tuple of float
        Smoothing of the offsets (normalised convolution), first and second pass.
    plate_sigma_mm : float
        Smoothing before the Hessian.
    min_plate : float
        Weakest plate response (HU/mm², orientation-weighted) taken as fissure evidence.
    min_cos : float
        Smallest |cos| between a plate's normal and the prior fissure's normal.
    max_slice_mm : float
        Slices thicker than this give no fissure evidence (the prior alone is used).
    end_fraction : float
        A lung whose area on the first or last slice exceeds this fraction of its largest area is not
        covered from base to apex.
    """

    oblique_front: float = 0.22
    oblique_back: float = 0.76
    horizontal: float = 0.60
    band_mm: float = 24.0
    refine_band_mm: float = 8.0
    prior_sigma_mm: float = 14.0
    smooth_mm: tuple[float, float] = (12.0, 6.0)
    plate_sigma_mm: float = 1.5
    min_plate: float = 4.0
    min_cos: float = 0.6
    max_slice_mm: float = 3.0
    end_fraction: float = 0.25


@dataclass
class LobeSurfaces:
    """The fissures of both lungs as height maps on the working grid's axial plane.

    Each map holds, per (row, column) of the working grid, the z index (float) where the fissure
    crosses that column; ``up`` is +1 when the z index grows towards the head.
    """

    grid: WorkGrid
    up: int
    oblique: dict[int, F32] = field(default_factory=dict)  # side -> (cy, cx)
    horizontal: F32 | None = None  # right lung only
    evidence: dict[str, float] = field(default_factory=dict)  # fissure -> share of columns with evidence

    def label_slab(self, lungs: U8, z0: int, oblique: dict[int, F32], horizontal: F32 | None) -> U8:
        """Lobe labels of the lung labels ``lungs`` (slices ``z0 ...``) given full-plane height maps."""
        z = np.arange(z0, z0 + lungs.shape[0], dtype=np.float32)[:, None, None]
        out = np.zeros(lungs.shape, np.uint8)
        for side, (upper_lab, lower_lab) in ((RIGHT, (RUL, RLL)), (LEFT, (LUL, LLL))):
            inside = lungs == side
            if side not in oblique or not inside.any():
                continue
            below = (z - oblique[side][None]) * self.up < 0
            out[inside & below] = lower_lab
            upper = inside & ~below
            if side == RIGHT and horizontal is not None:
                middle = upper & ((z - horizontal[None]) * self.up < 0)
                out[middle] = RML
                upper &= ~middle
            out[upper] = upper_lab
        return out

    def to_full(self, lungs: U8) -> U8:
        """Lobe labels on the full grid for the full-grid lung labels ``lungs`` (chunked)."""
        g = self.grid
        full_obl = {s: _upsample_plane(g, m) for s, m in self.oblique.items()}
        full_hor = _upsample_plane(g, self.horizontal) if self.horizontal is not None else None
        out = np.zeros(lungs.shape, np.uint8)
        chunks = list(g.chunks())

        def one(i: int) -> None:  # writes out[chunks[i]] only (numpy's element-wise loops release the GIL)
            zs = chunks[i]
            out[zs] = self.label_slab(np.asarray(lungs[zs]), zs.start, full_obl, full_hor)

        for_each_slice(one, range(len(chunks)))
        return out

    def to_coarse(self, lungs_c: U8) -> U8:
        """Lobe labels on the working grid for its lung labels ``lungs_c``."""
        return self.label_slab(lungs_c, 0, self.oblique, self.horizontal)


@dataclass(frozen=True)
class LobeResult:
    """Lobes on the full grid and what the provenance says about them."""

    lobes: U8
    provenance: tuple[tuple[str, str], ...]


def _upsample_plane(grid: WorkGrid, plane: F32) -> F32:
    """A working-grid (cy, cx) map linearly upsampled to the full in-plane grid."""
    return grid.upsample_chunk(plane[None].astype(np.float32), slice(0, 1))[0]


def _axis_signs(affine: F64) -> tuple[int, int]:
    """(up, posterior): +1 when the z index grows to the head (LPS +z), row index to the back (LPS +y)."""
    up = 1 if float(affine[2, 2]) >= 0.0 else -1
    post = 1 if float(affine[1, 1]) >= 0.0 else -1
    return up, post


def covered_base_to_apex(lungs_c: U8, params: LobeParams = LobeParams()) -> bool:
    """Whether both lungs start and end inside the stack (small areas on the end slices)."""
    for side in (RIGHT, LEFT):
        area = np.count_nonzero(lungs_c == side, axis=(1, 2))
        peak = int(area.max()) if area.size else 0
        if peak == 0:
            return False
        if area[0] > params.end_fraction * peak or area[-1] > params.end_fraction * peak:
            return False
    return True


def _eig_plate(h: list[F32], axes_sign: tuple[int, int], normal: F64) -> F32:
    """Orientation-weighted bright-plate response from Hessian components ``h``.

    ``h`` = (hzz, hyy, hxx, hzy, hzx, hyx) in HU/mm² at N points; ``normal`` the expected plate normal
    in (up, posterior, x) coordinates.  Response = −λ₃ · exp(−(λ₂/λ₃)² / 0.5) · cos², zero unless λ₃ < 0
    and |cos| of the normal (eigenvector of λ₃) with ``normal`` >= 0.6 (applied by the caller's
    threshold through cos²).
    """
    a, b, c, d, e, f = (x.astype(np.float64) for x in h)
    # closed-form eigenvalues of the symmetric 3x3 [[a d e], [d b f], [e f c]]
    q = (a + b + c) / 3.0
    p1 = d * d + e * e + f * f
    p2 = (a - q) ** 2 + (b - q) ** 2 + (c - q) ** 2 + 2.0 * p1
    p = np.sqrt(np.maximum(p2 / 6.0, 1e-12))
    bz, by, bx = (a - q) / p, (b - q) / p, (c - q) / p
    bd, be, bf = d / p, e / p, f / p
    detb = bz * (by * bx - bf * bf) - bd * (bd * bx - bf * be) + be * (bd * bf - by * be)
    phi = np.arccos(np.clip(detb / 2.0, -1.0, 1.0)) / 3.0
    l_hi = q + 2.0 * p * np.cos(phi)
    l_lo = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    l_mid = 3.0 * q - l_hi - l_lo
    # λ3: the most negative eigenvalue (a bright sheet curves down across it); λ2: the larger of the
    # other two in magnitude
    l3 = l_lo
    l2 = np.maximum(np.abs(l_mid), np.abs(l_hi))
    # eigenvector of λ3: the largest cross product of two rows of (H − λ3 I)
    r0 = np.stack([a - l3, d, e], axis=-1)
    r1 = np.stack([d, b - l3, f], axis=-1)
    r2 = np.stack([e, f, c - l3], axis=-1)
    cands = [np.cross(r0, r1), np.cross(r0, r2), np.cross(r1, r2)]
    norms = np.stack([np.einsum("ij,ij->i", v, v) for v in cands], axis=0)
    pick = np.argmax(norms, axis=0)
    vec = np.choose(pick[:, None], cands)
    vec /= np.sqrt(np.maximum(norms.max(axis=0), 1e-24))[:, None]
    up, post = axes_sign
    cos = vec[:, 0] * up * normal[0] + vec[:, 1] * post * normal[1] + vec[:, 2] * normal[2]
    ratio = l2 / np.maximum(-l3, 1e-9)
    resp = np.where(l3 < 0, -l3 * np.exp(-(ratio**2) / 0.5) * cos * cos, 0.0)
    return resp.astype(np.float32)


class _Lung:
    """Geometry of one lung on the working grid: extent, normalised coordinates, the smoothed HU."""

    def __init__(self, mask: B, grid: WorkGrid, up: int, post: int) -> None:
        dz, dy, _ = grid.coarse_spacing
        zz = np.nonzero(mask.any(axis=(1, 2)))[0]
        yy = np.nonzero(mask.any(axis=(0, 2)))[0]
        self.z_lo, self.z_hi = int(zz[0]), int(zz[-1])
        self.y_lo, self.y_hi = int(yy[0]), int(yy[-1])
        self.dz, self.dy, self.up, self.post = dz, dy, up, post
        # base (lowest) and apex slice index
        self.base = self.z_lo if up > 0 else self.z_hi
        self.height_mm = max((self.z_hi - self.z_lo) * dz, dz)
        self.depth_mm = max((self.y_hi - self.y_lo) * dy, dy)

    def vn(self, rows: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """0 at the front of the lung, 1 at its back (may leave [0, 1] outside the lung's rows)."""
        front = self.y_lo if self.post > 0 else self.y_hi
        return np.asarray((rows - front) * self.post / max(self.y_hi - self.y_lo, 1), dtype=np.float64)

    def z_of(self, h: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """z index (float) of normalised height ``h``."""
        return np.asarray(self.base + self.up * h * self.height_mm / self.dz, dtype=np.float64)


def segment_lobes(
    hu_c: F32,
    lungs_c: U8,
    grid: WorkGrid,
    affine: F64,
    params: LobeParams = LobeParams(),
) -> tuple[LobeSurfaces | None, list[tuple[str, str]], list[str]]:
    """The fissure surfaces of both lungs (module docstring) on the working grid.

    Parameters
    ----------
    hu_c : ndarray of float32
        HU on the working grid, (z, y, x).
    lungs_c : ndarray of uint8
        Working-grid lung labels: 0 background, 1 right, 2 left.
    grid : WorkGrid
    affine : ndarray
        The full grid's affine (index (col, row, slice) → LPS mm): gives the head and back directions.
    params : LobeParams

    Returns
    -------
    surfaces : LobeSurfaces or None
        None when the lungs are not covered from base to apex.
    provenance : list of (str, str)
    warnings : list of str
    """
    if not covered_base_to_apex(lungs_c, params):
        return (
            None,
            [("lobes.method", "not assessed: the stack does not cover both lungs from base to apex")],
            ["lobes not assessed: the series does not cover both lungs from base to apex"],
        )
    up, post = _axis_signs(affine)
    surfaces = LobeSurfaces(grid=grid, up=up)
    dz, dy, dx = grid.coarse_spacing
    use_evidence = dz <= params.max_slice_mm
    smoothed: F32 | None = None
    if use_evidence:
        z0, z1 = np.nonzero(lungs_c.any(axis=(1, 2)))[0][[0, -1]]
        sig = [max(params.plate_sigma_mm / s, 0.5) for s in (dz, dy, dx)]
        smoothed = np.zeros(hu_c.shape, np.float32)
        zs = slice(max(int(z0) - 3, 0), min(int(z1) + 4, hu_c.shape[0]))
        smoothed[zs] = ndimage.gaussian_filter(np.clip(hu_c[zs], -1000.0, 200.0), sig, mode="nearest")
    _, cy, cx = grid.coarse_shape
    rows = np.arange(cy, dtype=np.float64)[:, None] * np.ones((1, cx))
    for side in (RIGHT, LEFT):
        mask = lungs_c == side
        lung = _Lung(mask, grid, up, post)
        vn = lung.vn(rows)
        slope = params.oblique_back - params.oblique_front
        prior = lung.z_of(params.oblique_front + slope * vn)
        # the oblique fissure's normal in (up, posterior, x) mm: height = a + s·depth → (1, −s, 0)
        s_mm = slope * lung.height_mm / lung.depth_mm
        normal = np.array([1.0, -s_mm, 0.0]) / np.hypot(1.0, s_mm)
        surface, share = _fit_surface(prior, mask, smoothed, grid, lung, normal, params)
        surfaces.oblique[side] = surface
        surfaces.evidence["oblique_" + ("right" if side == RIGHT else "left")] = share
        if side == RIGHT:
            prior_h = lung.z_of(np.full((cy, cx), params.horizontal))
            # only the part of the lung in front of the oblique fissure holds the horizontal one
            front = mask & ((np.arange(mask.shape[0])[:, None, None] - surface[None]) * up > 0)
            h_surface, h_share = _fit_surface(
                prior_h, front, smoothed, grid, lung, np.array([1.0, 0.0, 0.0]), params
            )
            surfaces.horizontal = h_surface
            surfaces.evidence["horizontal_right"] = h_share
    prov = [
        ("lobes.method", "fissure-aware height surfaces (Hessian plate filter + anatomical prior)"),
        (
            "lobes.prior",
            f"oblique {params.oblique_front:g}->{params.oblique_back:g} of lung height front->back; "
            f"horizontal {params.horizontal:g}",
        ),
        (
            "lobes.fissure_evidence",
            ", ".join(f"{k} {100 * v:.0f} %" for k, v in surfaces.evidence.items())
            if use_evidence
            else f"none (slices {dz:g} mm > {params.max_slice_mm:g} mm: prior only)",
        ),
    ]
    return surfaces, prov, []


def _fit_surface(
    prior: F64,
    mask: B,
    smoothed: F32 | None,
    grid: WorkGrid,
    lung: _Lung,
    normal: F64,
    params: LobeParams,
) -> tuple[F32, float]:
    """Height map (z index per column) of one fissure, and the share of columns with evidence."""
    if smoothed is None:
        return prior.astype(np.float32), 0.0
    dz, dy, dx = grid.coarse_spacing
    columns: B = np.asarray(mask.any(axis=0), dtype=bool)
    if not columns.any():
        return prior.astype(np.float32), 0.0
    surface = prior.copy()
    share = 0.0
    for band_mm, smooth_mm, centre_sigma in (
        (params.band_mm, params.smooth_mm[0], params.prior_sigma_mm),
        (params.refine_band_mm, params.smooth_mm[1], params.refine_band_mm),
    ):
        found, weight = _search(
            surface, mask, columns, smoothed, grid, lung, normal, band_mm, centre_sigma, params
        )
        offset = np.where(weight > 0, found - surface, 0.0)
        sig = (smooth_mm / dy, smooth_mm / dx)
        num = ndimage.gaussian_filter(offset * weight, sig, mode="constant")
        den = ndimage.gaussian_filter(weight, sig, mode="constant")
        # the prior counts as a weak observation of offset 0 everywhere
        prior_w = 0.05 * float(weight[weight > 0].mean()) if (weight > 0).any() else 1.0
        surface = surface + num / (den + prior_w)
        share = float(np.count_nonzero(weight[columns] > 0)) / float(np.count_nonzero(columns))
    return surface.astype(np.float32), share


def _search(
    centre: F64,
    mask: B,
    columns: B,
    smoothed: F32,
    grid: WorkGrid,
    lung: _Lung,
    normal: F64,
    band_mm: float,
    centre_sigma_mm: float,
    params: LobeParams,
) -> tuple[F64, F64]:
    """Per column: z of the strongest plate response within ``band_mm`` of ``centre``, and its weight."""
    dz, dy, dx = grid.coarse_spacing
    nz, cy, cx = smoothed.shape
    yy, xx = np.nonzero(columns)
    # stay off the plane edges (second differences need a neighbour on each side)
    keep = (yy > 0) & (yy < cy - 1) & (xx > 0) & (xx < cx - 1)
    yy, xx = yy[keep], xx[keep]
    half = max(1, int(round(band_mm / dz)))
    offs = np.arange(-half, half + 1)
    zc = np.rint(centre[yy, xx]).astype(np.int64)
    zz = zc[:, None] + offs[None, :]
    valid = (zz >= 1) & (zz <= nz - 2)
    zz = np.clip(zz, 1, nz - 2)
    y2 = np.broadcast_to(yy[:, None], zz.shape)
    x2 = np.broadcast_to(xx[:, None], zz.shape)
    valid &= mask[zz, y2, x2]
    found = np.zeros((cy, cx))
    weight = np.zeros((cy, cx))
    if not valid.any():
        return found, weight
    z, y, x = zz[valid], y2[valid], x2[valid]
    s = smoothed
    c0 = s[z, y, x]
    h = [
        (s[z + 1, y, x] - 2 * c0 + s[z - 1, y, x]) / (dz * dz),
        (s[z, y + 1, x] - 2 * c0 + s[z, y - 1, x]) / (dy * dy),
        (s[z, y, x + 1] - 2 * c0 + s[z, y, x - 1]) / (dx * dx),
        (s[z + 1, y + 1, x] - s[z + 1, y - 1, x] - s[z - 1, y + 1, x] + s[z - 1, y - 1, x]) / (4 * dz * dy),
        (s[z + 1, y, x + 1] - s[z + 1, y, x - 1] - s[z - 1, y, x + 1] + s[z - 1, y, x - 1]) / (4 * dz * dx),
        (s[z, y + 1, x + 1] - s[z, y + 1, x - 1] - s[z, y - 1, x + 1] + s[z, y - 1, x - 1]) / (4 * dy * dx),
    ]
    resp = _eig_plate(h, (lung.up, lung.post), normal)
    resp[resp < params.min_plate * params.min_cos**2] = 0.0
    score = np.zeros(zz.shape, np.float32)
    dist_mm = (zz - centre[yy, xx][:, None]) * dz
    score[valid] = resp * np.exp(-0.5 * (dist_mm[valid] / centre_sigma_mm) ** 2)
    best = np.argmax(score, axis=1)
    top = score[np.arange(len(best)), best]
    hit = top >= params.min_plate * params.min_cos**2
    found[yy[hit], xx[hit]] = zz[np.arange(len(best)), best][hit]
    weight[yy[hit], xx[hit]] = top[hit]
    return found, weight


def lobes_for(
    hu_c: F32,
    lungs_c: U8,
    lungs_full: U8,
    grid: WorkGrid,
    affine: F64,
    params: LobeParams = LobeParams(),
) -> tuple[U8 | None, list[tuple[str, str]], list[str]]:
    """Full-grid lobe labels for a pipeline's lungs (None when not assessed), provenance, warnings.

    The one call a pipeline makes after its lung step (working-grid HU and lungs, full-grid lungs).
    """
    surfaces, prov, warnings = segment_lobes(hu_c, lungs_c, grid, affine, params)
    if surfaces is None:
        return None, prov, warnings
    return surfaces.to_full(lungs_full), prov, warnings
