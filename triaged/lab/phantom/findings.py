"""Findings: pneumonia lesion fields, their HU appearance, and the other pathologies.

Pneumonia is placed by a *propensity* field P ∈ [0, 1] over the lung voxels; a lung's lesion is the set
of its parenchyma voxels with P above a threshold chosen so that the lesion covers exactly the
requested fraction of that lung (see :func:`threshold_for_count`). The field encodes the radiology:

* COVID-19 (Pan et al., Radiology 2020; Bernheim et al., Radiology 2020; Chung et al., Radiology
  2020): bilateral, peripheral/subpleural, posterior and lower-lobe predominant ground-glass
  opacities in multifocal patches; crazy paving (interlobular septal thickening over ground glass)
  and consolidation appear in the progressive and peak stages.
* Bacterial (community-acquired) pneumonia (Franquet, Eur Respir J 2001): lobar or segmental
  consolidation, usually unilateral, bounded by fissures, spreading from one focus, with air
  bronchograms (airway lumens are never lesion voxels, so they stay air inside the consolidation) and
  a thin ground-glass rim.

Higher P inside a lesion means a denser lesion: ground glass runs from −720 HU at the lesion edge
toward −340 HU, and the densest share of the lesion is consolidation (≈ +25 HU, within −100…+60).

Other pathologies (nodules and masses, pleural effusion with compressive atelectasis, plate
atelectasis, centrilobular and paraseptal emphysema) are geometric objects placed in the lungs; they
are not pneumonia lesions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from triaged.lab.phantom.anatomy import (
    LLL,
    LUL,
    RLL,
    RML,
    RUL,
    Anatomy,
    Effusion,
    LungContext,
)
from triaged.lab.phantom.fields import SmoothField
from triaged.lab.phantom.spec import PhantomSpec
from triaged.lab.phantom.tubes import TubeClass, Tubes, spheres

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: Quantisation of the propensity stored between passes (0 = not lung).
P_LEVELS = 65535


@dataclass(frozen=True)
class CoarseLungs:
    """Lung and lobe labels on a coarse grid (pass 0), used to place trees and findings."""

    lungs: npt.NDArray[np.uint8]  # (z, v, u)
    lobes: npt.NDArray[np.uint8]
    depth_mm: F32  # distance to the lung boundary, mm
    u: F32
    v: F32
    z: F32
    step: float

    def sample(self, rng: np.random.Generator, where: npt.NDArray[np.bool_], n: int) -> F64:
        """``n`` random points (u, v, z) inside the coarse voxels selected by ``where`` (jittered)."""
        idx = np.argwhere(where)
        if len(idx) == 0:
            return np.zeros((0, 3))
        pick = idx[rng.integers(0, len(idx), n)]
        jitter = rng.uniform(-0.5, 0.5, (n, 3)) * self.step
        pts = np.stack([self.u[pick[:, 2]], self.v[pick[:, 1]], self.z[pick[:, 0]]], axis=1).astype(
            np.float64
        )
        return pts + jitter


def coarse_depth(lungs: npt.NDArray[np.uint8], step: float) -> F32:
    """Distance (mm) from each lung voxel to the nearest non-lung voxel of the same side."""
    out = np.zeros(lungs.shape, np.float32)
    for side in (1, 2):
        m = lungs == side
        if m.any():
            out = np.where(m, ndimage.distance_transform_edt(m, sampling=step), out).astype(np.float32)
    return out


def resolve_targets(spec: PhantomSpec, rng: np.random.Generator) -> tuple[float, float]:
    """(right, left) affected-percentage targets of a spec.

    COVID-19 is bilateral: one number is the worse lung and the other lung gets 45–90 % of it.
    Bacterial pneumonia is unilateral in 85 % of cases; otherwise the second lung gets 15–40 %.
    """
    if spec.kind in ("healthy", "other"):
        return 0.0, 0.0
    if spec.severity_right is not None and spec.severity_left is not None:
        return float(spec.severity_right), float(spec.severity_left)
    if spec.severity is not None:
        worst = float(spec.severity)
    elif spec.kind == "covid":
        worst = float(rng.uniform(5.0, 70.0))
    else:
        worst = float(rng.uniform(5.0, 35.0))
    if spec.kind == "covid":
        other = worst * float(rng.uniform(0.45, 0.9))
    else:
        other = worst * float(rng.uniform(0.15, 0.4)) if rng.random() < 0.15 else 0.0
    if rng.random() < 0.5:
        return worst, other
    return other, worst


class CovidField:
    """Propensity of COVID-19 lesions: subpleural, posterior, basal, lower-lobe, in patches.

    ``P = Σ wᵢ fᵢ / Σ wᵢ`` with f = exp(−d_pleura / λ), 1 − relative height, posterior position, a
    lower-lobe indicator and a smooth random field (patch size ~2–4 cm) that makes the opacities
    multifocal at low severity.
    """

    def __init__(
        self, rng: np.random.Generator, entropy: tuple[int, ...], u: F32, v: F32, z_range: tuple[float, float]
    ) -> None:
        self.patches = SmoothField(entropy, u, v, z_range, step=6.0, sigma_mm=float(rng.uniform(9.0, 14.0)))
        self.lam = float(rng.uniform(12.0, 22.0))
        self.w = np.array(
            [
                rng.uniform(0.9, 1.3),
                rng.uniform(0.3, 0.6),
                rng.uniform(0.2, 0.45),
                rng.uniform(0.15, 0.3),
                rng.uniform(1.0, 1.4),
            ],
            np.float32,
        )
        lobe_weight = np.zeros(8, np.float32)
        lobe_weight[[RLL, LLL]] = 1.0
        lobe_weight[RML] = 0.5
        self.lobe_weight = lobe_weight

    def propensity(
        self, z: float, rows: slice, cols: slice, inside: npt.NDArray[np.bool_], ctx: LungContext
    ) -> F32:
        """P for every voxel of the box (callers keep the lung voxels)."""
        w = self.w
        patch = 0.5 + 0.5 * np.tanh(0.9 * self.patches.box(z, rows, cols))
        p = (
            w[0] * np.exp(-ctx.pleura_mm / self.lam)
            + w[1] * (1.0 - np.clip(ctx.height, 0.0, 1.0))
            + w[2] * np.clip(ctx.vn, 0.0, 1.0)
            + w[3] * self.lobe_weight[ctx.lobe]
            + w[4] * patch
        )
        return (p / float(w.sum())).astype(np.float32)


class BacterialField:
    """Propensity of lobar/segmental pneumonia: lobes ranked (P bands), a focus inside the first.

    Lobe ``k`` in the spread order gets the band ``[0.8 − 0.2 k, 1.0 − 0.2 k)``, so a threshold fills
    the primary lobe (from its focus outward) before it crosses a fissure into the next lobe.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        entropy: tuple[int, ...],
        u: F32,
        v: F32,
        z_range: tuple[float, float],
        coarse: CoarseLungs,
        sides: tuple[bool, bool],
    ) -> None:
        self.patches = SmoothField(entropy, u, v, z_range, step=6.0, sigma_mm=10.0)
        self.base = np.zeros(8, np.float32)
        self.focus = np.zeros((8, 3), np.float32)
        self.reach = float(rng.uniform(80.0, 110.0))
        for right, affected in zip((True, False), sides, strict=True):
            if not affected:
                continue
            lobes = [RLL, RML, RUL] if right else [LLL, LUL]
            weights = np.array([0.55, 0.2, 0.25] if right else [0.65, 0.35])
            first = int(rng.choice(lobes, p=weights / weights.sum()))
            order = [first] + [lb for lb in self._neighbours(first) if lb in lobes]
            where = (coarse.lobes == first) & (coarse.depth_mm >= 4.0)
            pts = coarse.sample(rng, where, 1)
            focus = pts[0] if len(pts) else np.zeros(3)
            for rank, lobe in enumerate(order):
                self.base[lobe] = 0.8 - 0.2 * rank
                self.focus[lobe] = focus

    @staticmethod
    def _neighbours(lobe: int) -> list[int]:
        return {RLL: [RML, RUL], RML: [RLL, RUL], RUL: [RML, RLL], LLL: [LUL], LUL: [LLL]}[lobe]

    def propensity(
        self, z: float, rows: slice, cols: slice, inside: npt.NDArray[np.bool_], ctx: LungContext
    ) -> F32:
        """P for every voxel of the box (0 in unaffected lobes)."""
        base = self.base[ctx.lobe]
        f = self.focus[ctx.lobe]
        dist = np.sqrt((ctx.u - f[..., 0]) ** 2 + (ctx.v - f[..., 1]) ** 2 + (z - f[..., 2]) ** 2)
        # strictly monotone in distance (no plateaus: a plateau is a tie the threshold cannot split)
        within = np.clip(
            1.0 - dist / (4.0 * self.reach) + 0.06 * self.patches.box(z, rows, cols), 0.001, 0.999
        )
        return np.where(base > 0.0, base + 0.199 * within, 0.0).astype(np.float32)


@dataclass(frozen=True)
class LesionLook:
    """How pneumonia voxels look (HU), drawn per study."""

    ggo_edge_hu: float
    ggo_core_hu: float
    consolidation_hu: float
    consolidation_share: float
    paving: bool
    paving_cell_mm: float

    @staticmethod
    def draw(rng: np.random.Generator, kind: str, worst_pct: float) -> LesionLook:
        """Stage-dependent appearance: early COVID is ground glass only; consolidation and crazy
        paving become likelier and larger as the disease extends (Pan et al., 2020)."""
        if kind == "bacterial":
            share = float(rng.uniform(0.7, 0.9))
            paving = False
        else:
            p_none = 0.6 if worst_pct < 20.0 else 0.25
            share = (
                0.0 if rng.random() < p_none else float(rng.uniform(0.05, 0.12 + 0.35 * worst_pct / 100.0))
            )
            paving = bool(rng.random() < 0.2 + 0.5 * min(worst_pct, 60.0) / 60.0)
        return LesionLook(
            ggo_edge_hu=float(rng.uniform(-720.0, -690.0)),
            ggo_core_hu=float(rng.uniform(-480.0, -340.0)),
            consolidation_hu=float(rng.uniform(10.0, 35.0)),
            consolidation_share=share,
            paving=paving,
            paving_cell_mm=float(rng.uniform(8.0, 14.0)),
        )


class LesionPainter:
    """Pass B: parenchyma HU (normal lung texture or lesion) for one plane box."""

    def __init__(
        self,
        rng: np.random.Generator,
        seed: int,
        anatomy: Anatomy,
        look: LesionLook | None,
        u: F32,
        v: F32,
        z_range: tuple[float, float],
    ) -> None:
        self.anatomy = anatomy
        self.look = look
        self.texture = SmoothField((seed, 2), u, v, z_range, step=3.0, sigma_mm=2.5)
        self.texture_hu = float(rng.uniform(8.0, 16.0))
        self.warp: tuple[SmoothField, SmoothField] | None = None
        if look is not None and look.paving:
            self.warp = (
                SmoothField((seed, 3), u, v, z_range, step=5.0, sigma_mm=8.0),
                SmoothField((seed, 4), u, v, z_range, step=5.0, sigma_mm=8.0),
            )

    def texture_box(self, z: float, rows: slice, cols: slice) -> F32:
        """Unit-variance parenchymal texture on a plane box."""
        return self.texture.box(z, rows, cols)

    def normal(self, vn: F32, tex: F32) -> F32:
        """Healthy parenchyma: −870 HU ± patient offset, dependent-lung gradient, fine texture."""
        an = self.anatomy
        return (
            np.float32(-870.0 + an.parenchyma_offset_hu)
            + np.float32(an.gradient_hu) * np.clip(vn, 0.0, 1.0) ** 2
            + np.float32(self.texture_hu) * tex
        ).astype(np.float32)

    def apply_lesion(
        self,
        paren: F32,
        z: float,
        rows: slice,
        cols: slice,
        u: F32,
        v: F32,
        lesion: npt.NDArray[np.bool_],
        depth: F32,
        consolidated: npt.NDArray[np.bool_],
        tex: F32,
    ) -> None:
        """Replace ``paren`` by lesion HU where ``lesion``; ``depth`` runs 0 at the lesion edge to 1 at
        consolidation. Ground glass gets denser toward the core and, with crazy paving, a reticular
        network of thickened interlobular septa (polygonal cells of 1–1.5 cm)."""
        look = self.look
        assert look is not None
        idx = np.flatnonzero(lesion)
        w = paren.shape[1]
        rr, cc = np.divmod(idx, w)
        d = depth.ravel()[idx]
        t = tex.ravel()[idx]
        ggo = look.ggo_edge_hu + (look.ggo_core_hu - look.ggo_edge_hu) * d**0.8 + 25.0 * t
        if self.warp is not None:
            cell = look.paving_cell_mm
            wu = u[cc] + 6.0 * self.warp[0].box(z, rows, cols).ravel()[idx]
            wv = v[rr] + 6.0 * self.warp[1].box(z, rows, cols).ravel()[idx]
            d1 = np.abs(wu / cell - np.round(wu / cell)) * cell
            d2 = np.abs(wv / cell - np.round(wv / cell)) * cell
            dd = (wu + wv) * np.float32(0.7071) / cell
            d3 = np.abs(dd - np.round(dd)) * cell * 1.3
            line = np.exp(-((np.minimum(np.minimum(d1, d2), d3) / 0.8) ** 2))
            ggo = ggo + 160.0 * line * np.clip(d * 3.0, 0.0, 1.0)
        ggo = np.clip(ggo, -745.0, -305.0)
        cons = np.clip(look.consolidation_hu + 12.0 * t, -60.0, 55.0)
        paren.ravel()[idx] = np.where(consolidated.ravel()[idx], cons, ggo)


def threshold_for_count(hist: npt.NDArray[np.int64], target: int) -> int:
    """Smallest-error level b such that #(P ≥ b) ≈ ``target`` for a histogram of quantised P.

    Parameters
    ----------
    hist : ndarray
        Counts per quantised level 0…P_LEVELS (level 0 = not eligible, ignored).
    target : int
        Wanted number of voxels with P ≥ b.

    Returns
    -------
    int
        The level b (P_LEVELS + 1 when ``target`` is 0: nothing selected).
    """
    if target <= 0:
        return P_LEVELS + 1
    h = hist.copy()
    h[0] = 0
    at_least = np.cumsum(h[::-1])[::-1]  # at_least[b] = #(P >= b)
    # at_least is non-increasing; candidates: last b with at_least >= target, and the next one
    b = int(np.searchsorted(-at_least, -target, side="right")) - 1
    b = max(b, 1)
    best = b
    if b + 1 < len(at_least) and abs(int(at_least[b + 1]) - target) < abs(int(at_least[b]) - target):
        best = b + 1
    return best


# ---- other pathologies ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class OtherFindings:
    """Geometric findings of an ``other`` study."""

    tubes: Tubes
    effusions: tuple[Effusion, ...]
    names: tuple[str, ...]


def draw_other(rng: np.random.Generator, anatomy: Anatomy, coarse: CoarseLungs) -> OtherFindings:
    """Pick 1–3 of: nodules/mass, pleural effusion (+ compressive atelectasis), plate atelectasis,
    emphysema, and place them in the lungs."""
    kinds = ["nodules", "effusion", "atelectasis", "emphysema"]
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    chosen = sorted(rng.choice(len(kinds), size=count, replace=False).tolist())
    names = tuple(kinds[i] for i in chosen)
    parts: list[Tubes] = []
    effusions: list[Effusion] = []
    lung = coarse.lungs > 0
    if "nodules" in names:
        n = int(rng.integers(1, 5))
        for _ in range(n):
            mass = rng.random() < 0.25
            radius = float(rng.uniform(15.0, 28.0) if mass else rng.uniform(3.0, 11.0))
            where = lung & (coarse.depth_mm >= min(radius * 0.8, 20.0))
            c = coarse.sample(rng, where, 1)
            if len(c) == 0:
                continue
            lobes_n = int(rng.integers(1, 6 if mass else 3))
            offs = rng.normal(0.0, radius * 0.35, (lobes_n, 3))
            offs[0] = 0.0
            radii = radius * rng.uniform(0.55, 0.8, lobes_n)
            radii[0] = radius * 0.8
            parts.append(spheres(c[0] + offs, radii, TubeClass.NODULE))
    if "effusion" in names:
        both = rng.random() < 0.35
        first_right = bool(rng.random() < 0.55)
        for right in [True, False] if both else [first_right]:
            zr, zl = anatomy.z_apex
            top = anatomy.z_recess + float(rng.uniform(0.25, 0.55)) * (
                (zr if right else zl) - anatomy.z_recess
            )
            effusions.append(
                Effusion(
                    right=right,
                    depth=float(rng.uniform(15.0, 45.0)) * anatomy.size,
                    z_top=top,
                    atelectasis_mm=float(rng.uniform(3.0, 8.0)),
                )
            )
    if "atelectasis" in names:
        n = int(rng.integers(1, 4))
        for _ in range(n):
            where = np.isin(coarse.lobes, (RLL, LLL, RML)) & (coarse.depth_mm >= 10.0)
            c = coarse.sample(rng, where, 1)
            if len(c) == 0:
                continue
            length = float(rng.uniform(25.0, 60.0))
            angle = float(rng.uniform(0, np.pi))
            tilt = float(rng.uniform(-0.3, 0.3))
            d = np.array([np.cos(angle), np.sin(angle), tilt])
            d /= np.linalg.norm(d)
            thick = float(rng.uniform(2.0, 4.0))
            perp = np.array([-np.sin(angle), np.cos(angle), 0.0])
            k = int(rng.integers(2, 5))
            offsets = (np.arange(k) - (k - 1) / 2) * 1.6 * thick
            p0 = c[0] - 0.5 * length * d + offsets[:, None] * perp
            p1 = c[0] + 0.5 * length * d + offsets[:, None] * perp
            r = np.full(k, thick)
            parts.append(Tubes(p0, p1, r, r.copy(), np.full(k, TubeClass.ATELECTASIS, np.int8)))
    if "emphysema" in names:
        upper = np.isin(coarse.lobes, (RUL, LUL))
        density = float(rng.uniform(0.3, 1.0))
        n_small = int(density * upper.sum() * coarse.step**3 / 400.0)
        c = coarse.sample(rng, upper & (coarse.depth_mm >= 3.0), n_small)
        parts.append(spheres(c, rng.uniform(1.5, 4.5, len(c)), TubeClass.EMPHYSEMA))
        n_bullae = int(rng.integers(0, 6))
        rim = upper & (coarse.depth_mm < 8.0)
        c = coarse.sample(rng, rim, n_bullae)
        parts.append(spheres(c, rng.uniform(6.0, 16.0, len(c)), TubeClass.EMPHYSEMA))
    return OtherFindings(Tubes.concat(parts), tuple(effusions), names)
