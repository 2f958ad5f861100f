"""Tubes: capsules with tapering radii, grown into vascular and airway trees and rasterised per slice.

Pulmonary arteries and veins are grown by recursive space partitioning of attraction points sampled
in each lung (a constrained-constructive scheme in the spirit of Schreiner & Buxbaum's CCO and Kitaoka's
airway model): a branch runs from its parent toward the centroid of the points it supplies, the point
set is split along its principal axis, and radii follow Murray's law (r³ of a parent = Σ r³ of its
children, flow ∝ supplied volume), so the tree tapers toward the periphery. Bronchi accompany the
arteries (broncho-arterial pairs) down to ~3 mm diameter.

Rasterisation is batched per axial slice: every capsule that crosses the slice contributes the pixels
of its bounding box, distances to all of them are computed in one vectorised pass, and the coverage
(an antialiased partial-volume fraction) is max-combined per tube class.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


class TubeClass(enum.IntEnum):
    """What a tube is; the order is the compositing order inside the lung."""

    EMPHYSEMA = 0
    VESSEL = 1
    AIRWAY_WALL = 2
    AIRWAY_LUMEN = 3
    ATELECTASIS = 4
    NODULE = 5


#: HU of each tube class (non-contrast CT): blood ≈ 40, bronchial wall ≈ soft tissue, air, collapsed
#: lung ≈ 25, solid nodule ≈ 35, emphysematous space ≈ −990.
TUBE_HU: tuple[float, ...] = (-990.0, 40.0, 20.0, -1000.0, 25.0, 35.0)


@dataclass(frozen=True)
class Tubes:
    """A set of capsules: segment p0→p1 (patient-centred u, v and LPS z, mm), radius r0→r1."""

    p0: F64
    p1: F64
    r0: F64
    r1: F64
    cls: npt.NDArray[np.int8]

    @staticmethod
    def empty() -> Tubes:
        """No tubes."""
        z3 = np.zeros((0, 3))
        z1 = np.zeros(0)
        return Tubes(z3, z3, z1, z1, np.zeros(0, np.int8))

    @staticmethod
    def concat(parts: list[Tubes]) -> Tubes:
        """All tubes of ``parts``."""
        parts = [p for p in parts if len(p.r0)]
        if not parts:
            return Tubes.empty()
        return Tubes(
            np.concatenate([p.p0 for p in parts]),
            np.concatenate([p.p1 for p in parts]),
            np.concatenate([p.r0 for p in parts]),
            np.concatenate([p.r1 for p in parts]),
            np.concatenate([p.cls for p in parts]),
        )

    def __len__(self) -> int:
        return len(self.r0)


@dataclass(frozen=True)
class Tree:
    """Segments of a grown tree; ``parent[i]`` is the segment whose end is segment i's start (−1: root)."""

    start: F64
    end: F64
    radius: F64
    parent: npt.NDArray[np.int64]


def grow_tree(
    points: F64,
    root: F64,
    root_radius: float,
    rng: np.random.Generator,
    *,
    reach: tuple[float, float] = (0.45, 0.7),
) -> Tree:
    """Grow a branching tree from ``root`` that supplies every attraction point.

    Every node owns a set of points: its segment runs from the parent's end a random fraction
    ``reach`` of the way toward their centroid (to the point itself for a single point), then the
    set is split across its principal axis at a random 35–65 % quantile and each half becomes a child.
    All nodes of a generation are processed together (vectorised PCA and splits).

    Parameters
    ----------
    points : ndarray, shape (N, 3)
        Attraction points inside the organ (mm).
    root : ndarray, shape (3,)
        Where the tree enters (the hilum).
    root_radius : float
        Radius of the first segment, mm; a segment supplying n points has radius
        ``root_radius * (n / N) ** (1/3)`` (Murray's law with flow ∝ supplied volume).
    rng : numpy.random.Generator
        Source of the branch lengths and split ratios.
    reach : tuple of float
        Fraction of the way toward its points' centroid that a branch runs before it splits.

    Returns
    -------
    Tree
    """
    n_total = len(points)
    if n_total == 0:
        return Tree(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int64))
    starts: list[F64] = []
    ends: list[F64] = []
    radii: list[F64] = []
    parents: list[npt.NDArray[np.int64]] = []
    active = np.arange(n_total)  # points still owned by a splitting node
    labels = np.zeros(n_total, np.int64)  # node (of this generation) owning each active point
    node_start = np.asarray(root, np.float64)[None, :]
    node_parent = np.array([-1], np.int64)
    emitted = 0
    while len(node_start):
        m = len(node_start)
        pts = points[active]
        counts = np.bincount(labels, minlength=m).astype(np.float64)
        sums = [np.bincount(labels, pts[:, d], minlength=m).astype(np.float64) for d in range(3)]
        centroid = np.stack(sums, axis=1) / counts[:, None]
        f = rng.uniform(reach[0], reach[1], m)[:, None]
        end = np.where(counts[:, None] == 1, centroid, node_start + f * (centroid - node_start))
        starts.append(node_start)
        ends.append(end)
        radii.append(root_radius * (counts / n_total) ** (1.0 / 3.0))
        parents.append(node_parent)
        ids = emitted + np.arange(m)
        emitted += m
        split = counts > 1
        if not split.any():
            break
        keep = split[labels]
        active, labels, pts = active[keep], labels[keep], pts[keep]
        centred = pts - centroid[labels]
        cov = np.zeros((m, 3, 3))
        for d in range(3):
            for e in range(d, 3):
                cov[:, d, e] = cov[:, e, d] = np.bincount(labels, centred[:, d] * centred[:, e], minlength=m)
        cov[~split] = np.eye(3)
        _, vecs = np.linalg.eigh(cov)
        proj = (centred * vecs[labels, :, -1]).sum(axis=1)
        order = np.lexsort((proj, labels))
        sorted_labels = labels[order]
        first = np.searchsorted(sorted_labels, np.arange(m))
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order)) - first[sorted_labels]
        k = np.clip(np.rint(counts * rng.uniform(0.35, 0.65, m)), 1, np.maximum(counts - 1, 1))
        new_index = np.cumsum(split) - 1  # position of each splitting node among them
        labels = 2 * new_index[labels] + (rank >= k[labels])
        node_start = np.repeat(end[split], 2, axis=0)
        node_parent = np.repeat(ids[split], 2)
    return Tree(np.concatenate(starts), np.concatenate(ends), np.concatenate(radii), np.concatenate(parents))


def tree_tubes(tree: Tree, cls: TubeClass, min_radius: float = 0.0) -> Tubes:
    """Tubes of a tree's segments (tapering 10 % along each), dropping those thinner than ``min_radius``."""
    keep = tree.radius >= min_radius
    keep &= np.linalg.norm(tree.end - tree.start, axis=1) > 1e-3
    r = tree.radius[keep]
    return Tubes(tree.start[keep], tree.end[keep], r, 0.9 * r, np.full(len(r), cls, np.int8))


def bronchi_along(tree: Tree, min_artery_radius: float) -> Tubes:
    """Bronchi paired with the arteries of ``tree`` that are at least ``min_artery_radius`` thick.

    The bronchus runs beside its artery (lumen ≈ 0.75 × the artery radius, wall ≈ 20 % of the lumen
    + 0.4 mm), offset perpendicular to the artery; offsets are defined per node so that consecutive
    bronchial segments join.
    """
    keep = np.flatnonzero(tree.radius >= min_artery_radius)
    if len(keep) == 0:
        return Tubes.empty()
    lumen = 0.75 * tree.radius
    outer = lumen * 1.2 + 0.4
    direction = tree.end - tree.start
    norm = np.linalg.norm(direction, axis=1, keepdims=True)
    direction = direction / np.maximum(norm, 1e-6)
    ref = np.where(np.abs(direction[:, 2:3]) > 0.9, [[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]])
    perp = np.cross(direction, ref)
    perp /= np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-6)
    off_end = perp * (tree.radius + outer + 0.5)[:, None]
    off_start = np.where(tree.parent[:, None] >= 0, off_end[np.maximum(tree.parent, 0)], off_end)
    p0 = tree.start[keep] + off_start[keep]
    p1 = tree.end[keep] + off_end[keep]
    n = len(keep)
    wall = Tubes(p0, p1, outer[keep], 0.9 * outer[keep], np.full(n, TubeClass.AIRWAY_WALL, np.int8))
    lum = Tubes(p0, p1, lumen[keep], 0.9 * lumen[keep], np.full(n, TubeClass.AIRWAY_LUMEN, np.int8))
    return Tubes.concat([wall, lum])


def spheres(centres: F64, radii: F64, cls: TubeClass) -> Tubes:
    """Balls as zero-length capsules."""
    return Tubes(centres, centres.copy(), radii, radii.copy(), np.full(len(radii), cls, np.int8))


class TubeRaster:
    """Per-slice rasteriser of a fixed tube set on a fixed in-plane grid.

    Parameters
    ----------
    tubes : Tubes
        Capsules in patient-centred coordinates.
    u, v : ndarray
        Column and row coordinates (patient-centred mm, ascending, uniform spacing ``pixel``).
    pixel : float
        In-plane spacing, mm.
    """

    def __init__(self, tubes: Tubes, u: F32, v: F32, pixel: float) -> None:
        self.tubes = tubes
        self.u = u
        self.v = v
        self.pixel = pixel
        rmax = np.maximum(tubes.r0, tubes.r1)
        self.rmax = rmax
        self.zlo = np.minimum(tubes.p0[:, 2], tubes.p1[:, 2]) - rmax
        self.zhi = np.maximum(tubes.p0[:, 2], tubes.p1[:, 2]) + rmax
        self.d = tubes.p1 - tubes.p0
        self.dd = np.maximum((self.d**2).sum(axis=1), 1e-9)

    def coverage(self, z: float) -> dict[int, F32]:
        """Partial-volume coverage (0–1) of each tube class present in the axial plane at ``z``."""
        t = self.tubes
        cand = np.flatnonzero((self.zlo <= z) & (self.zhi >= z))
        if len(cand) == 0:
            return {}
        p0 = t.p0[cand]
        d = self.d[cand]
        rmax = self.rmax[cand]
        # parameter range of the segment whose points lie within rmax of the plane
        dz = d[:, 2]
        flat = np.abs(dz) < 1e-6
        safe = np.where(flat, 1.0, dz)
        ta = np.where(flat, 0.0, (z - rmax - p0[:, 2]) / safe)
        tb = np.where(flat, 1.0, (z + rmax - p0[:, 2]) / safe)
        t_lo = np.clip(np.minimum(ta, tb), 0.0, 1.0)
        t_hi = np.clip(np.maximum(ta, tb), 0.0, 1.0)
        ua = p0[:, 0] + t_lo * d[:, 0]
        ub = p0[:, 0] + t_hi * d[:, 0]
        va = p0[:, 1] + t_lo * d[:, 1]
        vb = p0[:, 1] + t_hi * d[:, 1]
        px = self.pixel
        nx = len(self.u)
        ny = len(self.v)
        c0 = np.clip(np.floor((np.minimum(ua, ub) - rmax - self.u[0]) / px) - 1, 0, nx).astype(np.int64)
        c1 = np.clip(np.ceil((np.maximum(ua, ub) + rmax - self.u[0]) / px) + 2, 0, nx).astype(np.int64)
        r0 = np.clip(np.floor((np.minimum(va, vb) - rmax - self.v[0]) / px) - 1, 0, ny).astype(np.int64)
        r1 = np.clip(np.ceil((np.maximum(va, vb) + rmax - self.v[0]) / px) + 2, 0, ny).astype(np.int64)
        nc = np.maximum(c1 - c0, 0)
        nr = np.maximum(r1 - r0, 0)
        sizes = nc * nr
        total = int(sizes.sum())
        if total == 0:
            return {}
        owner = np.repeat(np.arange(len(cand)), sizes)
        offsets = np.cumsum(sizes) - sizes
        local = np.arange(total) - offsets[owner]
        ncol = nc[owner]
        rows = r0[owner] + local // ncol
        cols = c0[owner] + local % ncol
        pu = self.u[cols].astype(np.float64) - p0[owner, 0]
        pv = self.v[rows].astype(np.float64) - p0[owner, 1]
        pz = z - p0[owner, 2]
        do = d[owner]
        tt = np.clip((pu * do[:, 0] + pv * do[:, 1] + pz * do[:, 2]) / self.dd[cand][owner], 0.0, 1.0)
        dist = np.sqrt((pu - tt * do[:, 0]) ** 2 + (pv - tt * do[:, 1]) ** 2 + (pz - tt * do[:, 2]) ** 2)
        tr0 = t.r0[cand][owner]
        radius = tr0 + tt * (t.r1[cand][owner] - tr0)
        # antialiased coverage; tubes thinner than a pixel keep their cross-section area
        alpha = np.clip(0.5 - (dist - radius) / px, 0.0, 1.0) * np.minimum(1.0, 2.0 * radius / px)
        hit = alpha > 0.0
        flat_idx = (rows * nx + cols)[hit]
        alpha = alpha[hit].astype(np.float32)
        cls = t.cls[cand][owner][hit]
        out: dict[int, F32] = {}
        for c in np.unique(cls):
            sel = cls == c
            plane = np.zeros(ny * nx, np.float32)
            np.maximum.at(plane, flat_idx[sel], alpha[sel])
            out[int(c)] = plane.reshape(ny, nx)
        return out
