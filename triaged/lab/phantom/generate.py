"""Generate a phantom: geometry → anatomy → trees and findings → pass A (render) → thresholds → pass B.

* Pass 0 renders lung and lobe labels on a coarse 4 mm grid to place vascular trees, nodules and
  pneumonia foci.
* Pass A renders every sub-slice plane at full in-plane resolution: HU with parenchyma at a constant
  value, the parenchyma weight (what fraction of a voxel is lung parenchyma rather than chest wall,
  vessel or airway), the pneumonia propensity, and at slice centres the masks.
* Thresholds: per lung, the propensity level whose super-level set among parenchyma voxels holds the
  requested share of the lung (exact up to ties in 65 535 levels).
* Pass B swaps the constant parenchyma for textured lung or lesion, averages the sub-slices of each
  slice (a rectangular slice-sensitivity profile: partial volume across the slice thickness), adds
  correlated noise and blanks the outside of the reconstruction circle.

Masks are sampled at slice centres, HU is averaged over the slice thickness, so thick slices show
partial-volume blur at mask borders, as real reconstructions do.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from triaged.lab.phantom.anatomy import PARENCHYMA_HU, Anatomy, SliceRenderer
from triaged.lab.phantom.findings import (
    P_LEVELS,
    BacterialField,
    CoarseLungs,
    CovidField,
    LesionLook,
    LesionPainter,
    OtherFindings,
    coarse_depth,
    draw_other,
    resolve_targets,
    threshold_for_count,
)
from triaged.lab.phantom.spec import (
    PIXEL_QUANTUM_MM,
    SLICE_QUANTUM_MM,
    GroundTruth,
    Phantom,
    PhantomSpec,
    ct_grade_of,
    quantise,
)
from triaged.lab.phantom.tubes import TubeClass, TubeRaster, Tubes, bronchi_along, grow_tree, tree_tubes

F32 = npt.NDArray[np.float32]

#: HU written outside the reconstruction circle in the canonical array (vendors differ on disk).
OUTSIDE_FOV_HU = -1024
HU_MIN = -1024


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a study: canonical head-first supine LPS layout."""

    nz: int
    ny: int
    nx: int
    pixel: float
    dz: float
    thickness: float
    x0: float
    y0: float
    z0: float
    sub: int  # planes rendered per slice (odd: the centre one gives the masks)

    @staticmethod
    def of(spec: PhantomSpec, rng: np.random.Generator) -> Geometry:
        """Grid of ``spec``; the pixel spacing is drawn (340–420 mm field of view) when not given."""
        n = spec.matrix
        if spec.pixel_spacing is not None:
            pixel = quantise(spec.pixel_spacing, PIXEL_QUANTUM_MM)
        else:
            pixel = quantise(float(rng.uniform(340.0, 420.0)) / n, PIXEL_QUANTUM_MM)
        dz = spec.spacing_between_slices
        nz = spec.n_slices
        z_mid = -150.0 - float(rng.integers(0, 200))
        z0 = round((z_mid - 0.5 * (nz - 1) * dz) / SLICE_QUANTUM_MM) * SLICE_QUANTUM_MM
        thickness = spec.thickness
        sub = 2 * int(thickness / 2.5) + 1
        half = 0.5 * (n - 1) * pixel
        return Geometry(nz, n, n, pixel, dz, thickness, -half, -half, z0, sub)

    @property
    def xs(self) -> npt.NDArray[np.float64]:
        """LPS x of each column."""
        return np.asarray(self.x0 + np.arange(self.nx) * self.pixel, np.float64)

    @property
    def ys(self) -> npt.NDArray[np.float64]:
        """LPS y of each row."""
        return np.asarray(self.y0 + np.arange(self.ny) * self.pixel, np.float64)

    @property
    def zs(self) -> npt.NDArray[np.float64]:
        """LPS z of each slice centre."""
        return np.asarray(self.z0 + np.arange(self.nz) * self.dz, np.float64)

    @property
    def fov_radius(self) -> float:
        """Radius of the reconstruction circle (the matrix's inscribed circle), mm."""
        return 0.5 * self.nx * self.pixel

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """4 × 4: index (column, row, slice, 1) → LPS mm."""
        a = np.diag([self.pixel, self.pixel, self.dz, 1.0])
        a[:3, 3] = (self.x0, self.y0, self.z0)
        return a

    def fov_mask(self) -> npt.NDArray[np.bool_]:
        """(ny, nx) True inside the reconstruction circle."""
        return fov_mask(self.ny, self.nx, self.pixel, self.x0, self.y0)


def fov_mask(ny: int, nx: int, pixel: float, x0: float, y0: float) -> npt.NDArray[np.bool_]:
    """(ny, nx) True inside the circle inscribed in the matrix (scanner isocentre at x = y = 0)."""
    xs = x0 + np.arange(nx) * pixel
    ys = y0 + np.arange(ny) * pixel
    r = 0.5 * nx * pixel
    return np.asarray((xs[None, :] ** 2 + ys[:, None] ** 2) <= r * r)


def _coarse_lungs(anatomy: Anatomy) -> CoarseLungs:
    """Lung and lobe labels of the whole patient on a 4 mm grid (independent of the scan geometry, so
    that one patient scanned twice gets the same trees and findings)."""
    step = 4.0
    a = max(anatomy.cavity(t)[0] for t in np.linspace(0, 1, 11)) + 8.0
    b = max(max(anatomy.cavity(t)[1:]) for t in np.linspace(0, 1, 11)) + 8.0
    u = np.arange(-a, a + step, step, dtype=np.float32)
    v = np.arange(-b, b + step, step, dtype=np.float32)
    z = np.arange(anatomy.z_recess, max(anatomy.z_apex) + step, step, dtype=np.float32)
    renderer = SliceRenderer(anatomy, u, v, step)
    lungs = np.zeros((len(z), len(v), len(u)), np.uint8)
    lobes = np.zeros_like(lungs)
    for k, zk in enumerate(z):
        layers = renderer.render(float(zk))
        if layers.lungs is not None and layers.lobes is not None:
            lungs[k][layers.rows, layers.cols] = layers.lungs
            lobes[k][layers.rows, layers.cols] = layers.lobes
    return CoarseLungs(lungs, lobes, coarse_depth(lungs, step), u, v, z, step)


def _trees(rng: np.random.Generator, anatomy: Anatomy, coarse: CoarseLungs) -> Tubes:
    """Pulmonary arteries with their bronchi, and pulmonary veins, for both lungs."""
    s = anatomy.size
    roots = anatomy.roots()
    parts: list[Tubes] = []
    for side, tag in ((1, "r"), (2, "l")):
        where = (coarse.lungs == side) & (coarse.depth_mm >= 5.0)
        if not where.any():
            continue
        n = 2200 if side == 1 else 1900
        art = grow_tree(coarse.sample(rng, where, n), np.array(roots[f"artery_{tag}"]), 6.5 * s, rng)
        vein = grow_tree(coarse.sample(rng, where, n), np.array(roots[f"vein_{tag}"]), 6.5 * s, rng)
        parts.append(tree_tubes(art, TubeClass.VESSEL))
        parts.append(tree_tubes(vein, TubeClass.VESSEL))
        bronchi = bronchi_along(art, 1.6 * s)
        parts.append(bronchi)
        if len(bronchi):
            # join the main bronchus to the first lobar bronchus
            start = np.array(roots[f"bronchus_{tag}"])[None, :]
            end = bronchi.p0[:1]
            wall_r, lumen_r = bronchi.r0[0], bronchi.r0[len(bronchi) // 2]
            parts.append(
                Tubes(
                    np.repeat(start, 2, 0),
                    np.repeat(end, 2, 0),
                    np.array([wall_r, lumen_r]),
                    np.array([wall_r, lumen_r]),
                    np.array([TubeClass.AIRWAY_WALL, TubeClass.AIRWAY_LUMEN], np.int8),
                )
            )
    return Tubes.concat(parts)


def _noise_pool(rng: np.random.Generator, ny: int, nx: int, count: int, pad: int) -> F32:
    """Unit-variance noise with CT-like short-range correlation (binomial 3 × 3 smoothing)."""
    white = rng.standard_normal((count, ny + pad + 2, nx + pad + 2), dtype=np.float32)
    k = (0.25, 0.5, 0.25)
    rows = k[0] * white[:, :-2] + k[1] * white[:, 1:-1] + k[2] * white[:, 2:]
    sm = k[0] * rows[:, :, :-2] + k[1] * rows[:, :, 1:-1] + k[2] * rows[:, :, 2:]
    return (sm / np.float32(0.375)).astype(np.float32)


def _workers() -> int:
    try:
        return max(1, min(4, len(os.sched_getaffinity(0))))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, min(4, os.cpu_count() or 1))


def _run(fn: Callable[[int], None], n: int, workers: int) -> None:
    """Run fn(0..n-1), in threads when there is more than one core (numpy releases the GIL)."""
    if workers <= 1:
        for i in range(n):
            fn(i)
        return
    chunks = [range(w, n, workers) for w in range(workers)]

    def run_chunk(r: range) -> None:
        for i in r:
            fn(i)

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run_chunk, c) for c in chunks]:
            future.result()


def generate(spec: PhantomSpec, *, workers: int | None = None) -> Phantom:
    """Synthesise the chest CT described by ``spec`` with its ground truth.

    Parameters
    ----------
    spec : PhantomSpec
        What to generate; equal specs give bit-identical phantoms.
    workers : int or None
        Threads for the per-slice passes (None: the available cores, at most 4). The result does not
        depend on it.

    Returns
    -------
    Phantom
        HU array (z, y, x) int16 in the canonical head-first supine layout, with ground truth.
    """
    seq = np.random.SeedSequence([spec.seed, 0x7F1A])
    (s_geo, s_anat, s_find, s_tree, s_look, s_noise, s_fields) = seq.spawn(7)
    geo = Geometry.of(spec, np.random.default_rng(s_geo))
    zs = geo.zs
    anatomy = Anatomy.draw(
        np.random.default_rng(s_anat),
        geo.fov_radius,
        float(zs[0]) - geo.thickness / 2,
        float(zs[-1]) + geo.thickness / 2,
    )
    u = (geo.xs - anatomy.cx).astype(np.float32)
    v = (geo.ys - anatomy.cy).astype(np.float32)
    z_range = (float(zs[0]) - geo.thickness, float(zs[-1]) + geo.thickness)
    coarse = _coarse_lungs(anatomy)
    rng_find = np.random.default_rng(s_find)
    targets = resolve_targets(spec, rng_find)
    rng_fields = np.random.default_rng(s_fields)
    field: CovidField | BacterialField | None = None
    look: LesionLook | None = None
    if spec.kind == "covid":
        field = CovidField(rng_fields, (spec.seed, 1), u, v, z_range)
    elif spec.kind == "bacterial":
        field = BacterialField(
            rng_fields, (spec.seed, 1), u, v, z_range, coarse, (targets[0] > 0, targets[1] > 0)
        )
    if field is not None:
        look = LesionLook.draw(np.random.default_rng(s_look), spec.kind, max(targets))
    other = (
        draw_other(rng_find, anatomy, coarse)
        if spec.kind == "other"
        else OtherFindings(Tubes.empty(), (), ())
    )
    tubes = Tubes.concat([_trees(np.random.default_rng(s_tree), anatomy, coarse), other.tubes])
    raster = TubeRaster(tubes, u, v, geo.pixel)
    renderer = SliceRenderer(anatomy, u, v, geo.pixel, raster, other.effusions, field)
    painter = LesionPainter(rng_fields, spec.seed, anatomy, look, u, v, z_range)
    rng_noise = np.random.default_rng(s_noise)
    noise_hu = float(spec.noise_hu) if spec.noise_hu is not None else float(rng_noise.uniform(12.0, 30.0))
    n_workers = workers if workers is not None else _workers()

    # ---- pass A ---------------------------------------------------------------------------------------
    nz, ny, nx, k = geo.nz, geo.ny, geo.nx, geo.sub
    offsets = (np.arange(k) - k // 2) * (geo.thickness / k)
    fov = geo.fov_mask()
    base = np.empty((nz * k, ny, nx), np.int16)
    wpar = np.zeros((nz * k, ny, nx), np.uint8)
    pq = np.zeros((nz * k, ny, nx), np.uint16) if field is not None else None
    lungs = np.zeros((nz, ny, nx), np.uint8)
    lobes = np.zeros((nz, ny, nx), np.uint8)
    vessels = np.zeros((nz, ny, nx), np.uint8)
    findings = np.zeros((nz, ny, nx), np.uint8)
    lung_voxels = np.zeros(2, np.int64)
    hist = np.zeros((2, P_LEVELS + 2), np.int64)  # eligible propensity levels per lung (centre planes)
    lock = threading.Lock()

    def pass_a(i: int) -> None:
        for j in range(k):
            r = i * k + j
            layers = renderer.render(float(zs[i] + offsets[j]))
            np.rint(layers.hu, out=layers.hu)
            base[r] = layers.hu
            if layers.wpar is None:
                continue
            box = (layers.rows, layers.cols)
            wpar[r][box] = np.rint(layers.wpar * 255.0)
            if pq is not None and layers.propensity is not None:
                p = layers.propensity
                pq[r][box] = np.where(p > 0.0, 1.0 + np.rint(np.clip(p, 0.0, 1.0) * (P_LEVELS - 1)), 0.0)
            if j == k // 2:
                assert layers.lungs is not None and layers.lobes is not None
                assert layers.vessels is not None and layers.findings is not None
                # the patient is scaled so that the lungs lie inside the reconstruction circle
                lungs[i][box] = layers.lungs
                lobes[i][box] = layers.lobes
                vessels[i][box] = layers.vessels
                findings[i][box] = layers.findings
                counts = np.bincount(layers.lungs.ravel(), minlength=3)[1:3]
                h = None
                if pq is not None:
                    eligible = (layers.vessels == 0) & (layers.findings == 0)
                    levels = pq[r][box]
                    h = [
                        np.bincount(levels[eligible & (layers.lungs == side)], minlength=P_LEVELS + 2)
                        for side in (1, 2)
                    ]
                with lock:
                    lung_voxels[:] += counts
                    if h is not None:
                        hist[0] += h[0]
                        hist[1] += h[1]

    _run(pass_a, nz, n_workers)

    # ---- thresholds -------------------------------------------------------------------------------------
    right_cols = np.arange(nx) < renderer.split
    thr = np.full(2, P_LEVELS + 1, np.int64)  # lesion level per side (right, left)
    thr_c = np.full(2, P_LEVELS + 1, np.int64)  # consolidation level per side
    p_top = np.full(2, P_LEVELS, np.int64)
    if pq is not None:
        for side in (0, 1):
            n_lung = int(lung_voxels[side])
            thr[side] = threshold_for_count(hist[side], round(targets[side] / 100.0 * n_lung))
            levels = np.flatnonzero(hist[side])
            p_top[side] = int(levels[-1]) if len(levels) else P_LEVELS
            if look is not None and thr[side] <= P_LEVELS and look.consolidation_share > 0.0:
                n_les = int(hist[side][thr[side] :].sum())
                thr_c[side] = max(
                    threshold_for_count(hist[side], round(look.consolidation_share * n_les)), int(thr[side])
                )
    thr_cols = np.where(right_cols, thr[0], thr[1])
    thrc_cols = np.where(right_cols, thr_c[0], thr_c[1])
    top_cols = np.where(right_cols, np.minimum(thr_c[0], p_top[0] + 1), np.minimum(thr_c[1], p_top[1] + 1))

    # ---- pass B -------------------------------------------------------------------------------------------
    hu_out = base if k == 1 else np.empty((nz, ny, nx), np.int16)
    lesions = np.zeros((nz, ny, nx), np.uint8)
    consolidation = np.zeros((nz, ny, nx), np.uint8)
    lesion_voxels = np.zeros(3, np.int64)  # right, left, consolidation
    outside = ~fov
    pad = 64
    pool = np.rint(noise_hu * _noise_pool(rng_noise, ny, nx, 8, pad)).astype(np.int16)
    picks = rng_noise.integers(0, [8, pad + 1, pad + 1, 2, 2], size=(nz, 5))

    def parenchyma_delta(r: int, z: float, centre_of: int | None) -> tuple[tuple[slice, slice], F32] | None:
        """HU to add on the lung box of plane r: w_par · (parenchyma − constant used in pass A)."""
        rows, cols = renderer.lung_box(z)
        w = wpar[r, rows, cols]
        if not w.any():
            return None
        wf = w.astype(np.float32) * np.float32(1.0 / 255.0)
        _, ba, bp = anatomy.cavity(anatomy.t(z))
        vn = ((v[rows] + ba) / (ba + bp))[:, None]
        tex = painter.texture_box(z, rows, cols)
        paren = painter.normal(vn, tex)
        if pq is not None:
            p = pq[r, rows, cols]
            t_lo = thr_cols[cols]
            les = p >= t_lo
            if les.any():
                cons = p >= thrc_cols[cols]
                depth = np.clip(
                    (p.astype(np.float32) - t_lo) / np.maximum(top_cols[cols] - t_lo, 1), 0.0, 1.0
                )
                painter.apply_lesion(paren, z, rows, cols, u[cols], v[rows], les, depth, cons, tex)
                if centre_of is not None:
                    i = centre_of
                    eligible = (lungs[i, rows, cols] > 0) & (vessels[i, rows, cols] == 0)
                    eligible &= findings[i, rows, cols] == 0
                    les_c = les & eligible
                    cons_c = cons & eligible
                    lesions[i, rows, cols] = les_c
                    consolidation[i, rows, cols] = cons_c
                    split = min(max(renderer.split - cols.start, 0), les_c.shape[1])
                    counts = (
                        int(np.count_nonzero(les_c[:, :split])),
                        int(np.count_nonzero(les_c[:, split:])),
                        int(np.count_nonzero(cons_c)),
                    )
                    with lock:
                        lesion_voxels[:] += counts
        paren -= np.float32(PARENCHYMA_HU)
        paren *= wf
        return (rows, cols), paren

    def pass_b(i: int) -> None:
        src, oy, ox, flip_y, flip_x = picks[i]
        noise = pool[src, oy : oy + ny, ox : ox + nx]
        if flip_y:
            noise = noise[::-1]
        if flip_x:
            noise = noise[:, ::-1]
        if k == 1:
            plane = base[i]
            got = parenchyma_delta(i, float(zs[i]), i)
            if got is not None:
                box, delta = got
                plane[box] += np.rint(delta).astype(np.int16)
            plane += noise
        else:
            acc = np.zeros((ny, nx), np.float32)
            for j in range(k):
                r = i * k + j
                acc += base[r]
                got = parenchyma_delta(r, float(zs[i] + offsets[j]), i if j == k // 2 else None)
                if got is not None:
                    acc[got[0]] += got[1]
            acc *= np.float32(1.0 / k)
            acc += noise
            plane = hu_out[i]
            plane[...] = np.rint(acc)
        np.maximum(plane, np.int16(HU_MIN), out=plane)
        np.copyto(plane, np.int16(OUTSIDE_FOV_HU), where=outside)

    _run(pass_b, nz, n_workers)

    # ---- ground truth ---------------------------------------------------------------------------------
    n_r, n_l = (int(n) for n in lung_voxels)
    l_r, l_l, n_c = (int(n) for n in lesion_voxels)
    right_pct = 100.0 * l_r / n_r if n_r else 0.0
    left_pct = 100.0 * l_l / n_l if n_l else 0.0
    whole = 100.0 * (l_r + l_l) / (n_r + n_l) if n_r + n_l else 0.0
    cons_pct = 100.0 * n_c / (n_r + n_l) if n_r + n_l else 0.0
    truth = GroundTruth(
        label=spec.kind,
        lungs=lungs,
        lobes=lobes,
        lesions=lesions,
        consolidation=consolidation,
        vessels=vessels,
        findings=findings,
        affected_pct_right=right_pct,
        affected_pct_left=left_pct,
        whole_lung_pct=whole,
        consolidation_pct=cons_pct,
        ct_grade=ct_grade_of(max(right_pct, left_pct)),
        spacing=(geo.dz, geo.pixel, geo.pixel),
        affine=geo.affine,
    )
    return Phantom(
        hu=hu_out,
        truth=truth,
        spec=spec,
        noise_hu=noise_hu,
        reconstruction_diameter=2.0 * geo.fov_radius,
        patient_sex=anatomy.sex,
        patient_age=anatomy.age,
    )
