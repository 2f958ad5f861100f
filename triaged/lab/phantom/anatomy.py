"""Chest anatomy as signed distance functions, rendered one axial plane at a time.

Every structure is an approximate signed distance function (SDF, mm; negative inside) in
patient-centred coordinates ``u = x − cx`` (LPS x: toward the patient's left) and ``v = y − cy``
(toward the back), at absolute LPS height ``z``. Antialiased coverage ``clip(0.5 − sdf / pixel, 0, 1)``
gives in-plane partial volume, and tissues are composited front to back in anatomical order:

body (subcutaneous fat) → muscle → ribs, costal cartilage, scapulae → thoracic cavity (mediastinal
fat) → abdomen below the diaphragm domes (liver, spleen, stomach with gas) → heart → great vessels,
oesophagus, trachea and main bronchi → spine and sternum → pleural fluid → lungs (parenchyma with
vessels, bronchi, fissures and focal findings composited inside).

Shapes follow standard adult chest anatomy (Gray's Anatomy; Webb, Müller & Naidich, *High-Resolution
CT of the Lung*): the right lung is larger (the heart lies to the left), the right hemidiaphragm is
higher, the apices are rounded domes, the costophrenic recesses are deepest postero-laterally, the
ribs slope down anteriorly, the oblique fissures run from T4–T5 posteriorly to the anterior
diaphragm and the right horizontal fissure lies at the fourth costal cartilage. Heights are fractions
``t`` of the anatomy's cranio-caudal extent so that a scan range always runs from the upper abdomen
(t = 0) to the lower neck (t = 1).

The lung layer is linear in the parenchyma value, so a later pass can add texture and pneumonia by
``hu += w_par · (parenchyma − PARENCHYMA_HU)`` with the stored parenchyma weight ``w_par``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from triaged.lab.phantom.tubes import TUBE_HU, TubeClass, TubeRaster

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

AIR_HU = -1000.0
FAT_HU = -100.0
MEDIASTINAL_FAT_HU = -90.0
MUSCLE_HU = 45.0
BLOOD_HU = 40.0
LIVER_HU = 58.0
SPLEEN_HU = 45.0
FLUID_HU = 12.0
CARTILAGE_HU = 130.0
MARROW_HU = 230.0
CORTEX_HU = 650.0
DISC_HU = 85.0
CSF_HU = 20.0
TABLE_HU = 60.0
#: Parenchyma value composited in pass A; texture, gradient and lesions replace it later.
PARENCHYMA_HU = -850.0
#: HU of a fissure (two visceral pleural layers, thinner than a voxel: a faint line).
FISSURE_HU = 0.0

#: Lobe labels (GroundTruth.lobes).
RUL, RML, RLL, LUL, LLL = 1, 2, 3, 4, 5

#: Finding labels (GroundTruth.findings).
NODULE, EFFUSION, ATELECTASIS, EMPHYSEMA = 1, 2, 3, 4

_T_KNOTS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
# half-width, anterior and posterior half-depth of the thoracic cavity (inner rib surface), mm
_CAVITY_A = (125.0, 132.0, 135.0, 130.0, 118.0, 100.0)
_CAVITY_BA = (78.0, 84.0, 86.0, 80.0, 66.0, 54.0)
_CAVITY_BP = (82.0, 88.0, 90.0, 88.0, 80.0, 70.0)


def smoothstep(e0: float, e1: float, x: float) -> float:
    """Hermite step from 0 at ``e0`` to 1 at ``e1``."""
    s = min(max((x - e0) / (e1 - e0), 0.0), 1.0)
    return s * s * (3.0 - 2.0 * s)


def coverage(sdf: npt.NDArray[np.floating], pixel: float) -> F32:
    """Antialiased in-plane partial-volume fraction of the inside of ``sdf``: clip(0.5 − sdf/pixel, 0, 1)."""
    out = np.multiply(sdf, np.float32(-1.0 / pixel), dtype=np.float32)
    out += np.float32(0.5)
    np.maximum(out, np.float32(0.0), out=out)
    np.minimum(out, np.float32(1.0), out=out)
    return out


def paint(target: F32, alpha: npt.NDArray[np.floating], value: float | npt.NDArray[np.floating]) -> None:
    """Composite ``value`` with coverage ``alpha`` over ``target`` in place."""
    target += alpha * (value - target)


def ellipse_sdf(
    uu: npt.NDArray[np.floating], vv: npt.NDArray[np.floating], a: float, b_ant: float, b_post: float
) -> F32:
    """Approximate SDF of an ellipse with half-width ``a`` and different front/back half-depths.

    First-order distance ``f / |∇f|`` of the implicit function ``f = u²/a² + v²/b² − 1``: exact on the
    boundary, which is what antialiasing needs, and within ~15 % a few centimetres inside.
    """
    b = np.where(vv < 0.0, np.float32(b_ant), np.float32(b_post))
    ua = uu * np.float32(1.0 / (a * a))
    vb = vv / (b * b)
    q = uu * ua + vv * vb
    g = np.sqrt(ua * ua + vb * vb)
    g *= np.float32(2.0)
    g += np.float32(1e-6)
    q -= np.float32(1.0)
    q /= g
    return q.astype(np.float32, copy=False)


@dataclass(frozen=True)
class Capsule:
    """A straight tube of the mediastinum (great vessels, airways, oesophagus) in (u, v, z) mm."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    radius: float
    hu: float
    carve: float | None  # margin by which it pushes the lung away; None: does not shape the lung


@dataclass(frozen=True)
class Anatomy:
    """One patient's chest: every random anatomical parameter, drawn once from the seed.

    Lengths are mm in patient-centred coordinates; heights ``*_t`` are fractions of ``height`` above
    ``z_base``.
    """

    cx: float
    cy: float
    z_base: float
    height: float
    size: float
    width: float
    depth: float
    fat: float
    muscle: float
    muscle_post: float
    rib_thickness: float
    rib_pitch_t: float
    rib_drop_t: float
    rib_first_t: float
    vertebra_t: float
    recess_t: float
    dome_right_t: float
    dome_left_t: float
    apex_right_t: float
    apex_left_t: float
    carina_t: float
    arch_t: float
    heart_u: float
    heart_v: float
    heart_t: float
    heart_a: float
    heart_b: float
    heart_c_t: float
    heart_angle: float
    mediastinum_u: float
    oblique_right: tuple[float, float, float]
    horizontal_right: tuple[float, float]
    oblique_left: tuple[float, float, float]
    gradient_hu: float
    parenchyma_offset_hu: float
    sex: str
    age: int

    @staticmethod
    def draw(rng: np.random.Generator, fov_radius: float, z_lo: float, z_hi: float) -> Anatomy:
        """Draw a plausible adult for a scan from ``z_lo`` to ``z_hi`` inside a ``fov_radius`` circle.

        The anatomy spans the scan range when it is 270–360 mm (a chest CT from the upper abdomen to
        the lower neck); shorter ranges show the middle of the chest, longer ones more abdomen and
        neck. The patient is shrunk if the lungs would not fit the reconstruction circle (a targeted
        small field of view truncates the body wall, as on real scanners, but not the lungs).
        """
        coverage_mm = z_hi - z_lo
        height = float(np.clip(coverage_mm, 270.0, 360.0)) * float(rng.uniform(0.96, 1.0))
        z_base = 0.5 * (z_lo + z_hi) - 0.5 * height + float(rng.uniform(-4.0, 4.0))
        size = float(rng.uniform(0.9, 1.07))
        width = float(rng.uniform(0.94, 1.06))
        size = min(size, 0.93 * fov_radius / (max(_CAVITY_A) * width + 4.0))
        sex = "F" if rng.random() < 0.5 else "M"
        if sex == "F":
            size *= 0.95
        dome_right = float(rng.uniform(0.29, 0.34))
        return Anatomy(
            cx=float(rng.uniform(-8.0, 8.0)),
            cy=float(rng.uniform(-12.0, 6.0)),
            z_base=z_base,
            height=height,
            size=size,
            width=width,
            depth=float(rng.uniform(0.92, 1.08)),
            fat=float(rng.uniform(6.0, 26.0)) * size,
            muscle=float(rng.uniform(8.0, 14.0)) * size,
            muscle_post=float(rng.uniform(28.0, 40.0)) * size,
            rib_thickness=10.0 * size,
            rib_pitch_t=float(rng.uniform(0.076, 0.084)),
            rib_drop_t=float(rng.uniform(0.24, 0.30)),
            rib_first_t=float(rng.uniform(0.05, 0.08)),
            vertebra_t=0.088,
            recess_t=float(rng.uniform(0.04, 0.07)),
            dome_right_t=dome_right,
            dome_left_t=dome_right - float(rng.uniform(0.02, 0.05)),
            apex_right_t=float(rng.uniform(0.945, 0.965)),
            apex_left_t=float(rng.uniform(0.935, 0.955)),
            carina_t=float(rng.uniform(0.66, 0.70)),
            arch_t=float(rng.uniform(0.78, 0.81)),
            heart_u=float(rng.uniform(18.0, 28.0)) * size,
            heart_v=float(rng.uniform(-24.0, -16.0)) * size,
            heart_t=float(rng.uniform(0.38, 0.42)),
            heart_a=float(rng.uniform(58.0, 68.0)) * size,
            heart_b=float(rng.uniform(44.0, 50.0)) * size,
            heart_c_t=float(rng.uniform(0.14, 0.16)),
            heart_angle=float(np.deg2rad(rng.uniform(32.0, 48.0))),
            mediastinum_u=8.0 * size,
            oblique_right=(float(rng.uniform(0.20, 0.26)), float(rng.uniform(0.50, 0.58)), 0.06),
            horizontal_right=(float(rng.uniform(0.58, 0.63)), float(rng.uniform(-0.04, 0.04))),
            oblique_left=(float(rng.uniform(0.22, 0.28)), float(rng.uniform(0.50, 0.58)), 0.06),
            gradient_hu=float(rng.uniform(20.0, 50.0)),
            parenchyma_offset_hu=float(rng.uniform(-20.0, 20.0)),
            sex=sex,
            age=int(rng.integers(25, 85)),
        )

    # ---- landmarks -------------------------------------------------------------------------------
    def t(self, z: float) -> float:
        """Fractional height of ``z``."""
        return (z - self.z_base) / self.height

    def z_at(self, t: float) -> float:
        """LPS z of fractional height ``t``."""
        return self.z_base + t * self.height

    def cavity(self, t: float) -> tuple[float, float, float]:
        """(half-width, anterior, posterior half-depth) of the thoracic cavity at height ``t``."""
        s = self.size
        a = float(np.interp(t, _T_KNOTS, _CAVITY_A)) * s * self.width
        ba = float(np.interp(t, _T_KNOTS, _CAVITY_BA)) * s * self.depth
        bp = float(np.interp(t, _T_KNOTS, _CAVITY_BP)) * s * self.depth
        return a, ba, bp

    def layers(self, t: float) -> tuple[tuple[float, float, float], ...]:
        """Ellipses (a, b_ant, b_post) of: cavity, rib ring outside, muscle outside, skin."""
        a, ba, bp = self.cavity(t)
        rt = self.rib_thickness
        shoulder = 45.0 * self.size * smoothstep(0.82, 1.0, t)
        ring = (a + rt, ba + rt, bp + rt)
        muscle = (ring[0] + self.muscle + shoulder, ring[1] + self.muscle, ring[2] + self.muscle_post)
        skin = (muscle[0] + self.fat, muscle[1] + self.fat, muscle[2] + 0.5 * self.fat)
        return (a, ba, bp), ring, muscle, skin

    @property
    def z_recess(self) -> float:
        """Lowest lung point (posterior costophrenic recess)."""
        return self.z_at(self.recess_t)

    @property
    def z_apex(self) -> tuple[float, float]:
        """(right, left) apex heights."""
        return self.z_at(self.apex_right_t), self.z_at(self.apex_left_t)

    def vertebral_body(self, t: float) -> tuple[float, float, float]:
        """(v centre, half-width, half-depth) of the vertebral body."""
        _, _, bp = self.cavity(t)
        s = self.size
        return bp - 10.0 * s, 21.0 * s, 16.0 * s

    def capsules(self) -> tuple[Capsule, ...]:
        """Great vessels, oesophagus, trachea and main bronchi (non-contrast CT values)."""
        s = self.size
        z = self.z_at
        _, _, bp_mid = self.cavity(0.6)
        v_trachea = bp_mid - 58.0 * s
        v_desc = bp_mid - 32.0 * s
        car = z(self.carina_t)
        arch = z(self.arch_t)
        asc = (-6.0 * s, -28.0 * s)
        desc = (24.0 * s, v_desc)
        hilum_r = (-50.0 * s, 2.0 * s, z(0.60))
        hilum_l = (56.0 * s, 22.0 * s, z(0.60))
        bronchus_r = (-34.0 * s, v_trachea + 4.0 * s, car - 0.075 * self.height)
        bronchus_l = (46.0 * s, v_trachea + 8.0 * s, car - 0.085 * self.height)
        out = [
            Capsule((asc[0], asc[1], z(0.50)), (asc[0], asc[1], arch), 15.0 * s, BLOOD_HU, 3.0),
            Capsule((asc[0], asc[1], arch), (desc[0], desc[1], arch), 13.0 * s, BLOOD_HU, 3.0),
            Capsule((desc[0], desc[1], z(-0.2)), (desc[0], desc[1], arch), 12.0 * s, BLOOD_HU, 3.0),
            Capsule((20.0 * s, -40.0 * s, z(0.52)), (14.0 * s, -25.0 * s, z(0.62)), 13.0 * s, BLOOD_HU, 2.0),
            Capsule((10.0 * s, -22.0 * s, z(0.62)), hilum_r, 11.0 * s, BLOOD_HU, 2.0),
            Capsule((18.0 * s, -28.0 * s, z(0.62)), (50.0 * s, 8.0 * s, z(0.64)), 11.0 * s, BLOOD_HU, 2.0),
            Capsule((50.0 * s, 8.0 * s, z(0.64)), hilum_l, 10.0 * s, BLOOD_HU, 2.0),
            Capsule((-28.0 * s, -26.0 * s, z(0.55)), (-28.0 * s, -26.0 * s, z(0.9)), 10.0 * s, BLOOD_HU, 3.0),
            # pulmonary veins into the left atrium (posterior heart)
            Capsule((-38.0 * s, 14.0 * s, z(0.47)), (8.0 * s, 4.0 * s, z(0.45)), 7.0 * s, BLOOD_HU, 2.0),
            Capsule((48.0 * s, 20.0 * s, z(0.47)), (14.0 * s, 6.0 * s, z(0.45)), 7.0 * s, BLOOD_HU, 2.0),
            # oesophagus, collapsed, with a little air
            Capsule((4.0 * s, v_desc - 4.0, z(-0.2)), (4.0 * s, v_desc - 4.0, z(1.2)), 8.0 * s, 35.0, 2.0),
            Capsule((4.0 * s, v_desc - 4.0, z(-0.2)), (4.0 * s, v_desc - 4.0, z(1.2)), 1.5 * s, AIR_HU, None),
            # trachea and main bronchi: wall then lumen
            Capsule((0.0, v_trachea, car), (0.0, v_trachea, z(1.3)), 10.5 * s, 60.0, 3.0),
            Capsule((0.0, v_trachea, car), bronchus_r, 8.0 * s, 60.0, 2.0),
            Capsule((0.0, v_trachea, car), bronchus_l, 7.0 * s, 60.0, 2.0),
            Capsule((0.0, v_trachea, car), (0.0, v_trachea, z(1.3)), 8.5 * s, AIR_HU, None),
            Capsule((0.0, v_trachea, car), bronchus_r, 6.3 * s, AIR_HU, None),
            Capsule((0.0, v_trachea, car), bronchus_l, 5.4 * s, AIR_HU, None),
        ]
        return tuple(out)

    def roots(self) -> dict[str, tuple[float, float, float]]:
        """Where the intrapulmonary trees start (just lateral of the hilar structures)."""
        s = self.size
        z = self.z_at
        _, _, bp_mid = self.cavity(0.6)
        v_trachea = bp_mid - 58.0 * s
        car = z(self.carina_t)
        return {
            "artery_r": (-62.0 * s, 4.0 * s, z(0.60)),
            "artery_l": (66.0 * s, 24.0 * s, z(0.60)),
            "vein_r": (-50.0 * s, 16.0 * s, z(0.47)),
            "vein_l": (60.0 * s, 22.0 * s, z(0.47)),
            "bronchus_r": (-34.0 * s, v_trachea + 4.0 * s, car - 0.075 * self.height),
            "bronchus_l": (46.0 * s, v_trachea + 8.0 * s, car - 0.085 * self.height),
        }

    # ---- diaphragm --------------------------------------------------------------------------------
    def diaphragm(
        self, uu: npt.NDArray[np.floating], vv: npt.NDArray[np.floating], z: float, a: float
    ) -> F32:
        """Signed height above the diaphragm, mm: positive in the chest, negative in the abdomen.

        Each hemidiaphragm is a paraboloid dome falling from its peak to the costophrenic recess,
        steeper posteriorly (the posterior recess is the deepest); the surface is the upper envelope
        of the right (higher, over the liver) and left domes.
        """
        s = self.size
        z_rec = self.z_recess
        best: F32 | None = None
        for u_peak, v_peak, t_peak in (
            (-0.42 * a, -8.0 * s, self.dome_right_t),
            (0.45 * a, -4.0 * s, self.dome_left_t),
        ):
            zp = self.z_at(t_peak)
            drop = zp - z_rec
            reach = 0.72 * a
            du = uu - np.float32(u_peak)
            dv = vv - np.float32(v_peak)
            e = np.where(dv > 0, 1.2, 0.65).astype(np.float32)
            r2 = du * du + (e * dv) ** 2
            zd = zp - drop * r2 / (reach * reach)
            below_recess = zd < z_rec
            zd = np.maximum(zd, z_rec)
            g = (2.0 * drop / (reach * reach)) * np.sqrt(du * du + e**4 * dv * dv)
            g = np.where(below_recess, 0.0, g)
            sdf = ((z - zd) / np.sqrt(1.0 + g * g)).astype(np.float32)
            best = sdf if best is None else np.minimum(best, sdf)
        assert best is not None
        return best

    # ---- lobes --------------------------------------------------------------------------------------
    def lobes(
        self, uu: F32, vv: F32, z: float, right: bool, cav: tuple[float, float, float]
    ) -> tuple[U8, F32]:
        """Lobe label and distance to the nearest fissure for one lung's box.

        The oblique fissure rises from the anterior diaphragm to ~60 % of the lung height posteriorly
        and a little laterally; on the right, the horizontal fissure separates the upper from the
        middle lobe anterior to the oblique one.
        """
        a, ba, bp = cav
        z_rec = self.z_recess
        z_top = self.z_apex[0 if right else 1]
        h = z_top - z_rec
        a0, a1, curv = self.oblique_right if right else self.oblique_left
        vn = (vv + ba) / (ba + bp)
        lat = np.abs(uu) / a
        z_ob = z_rec + h * (a0 + a1 * vn + curv * (lat - 0.5) + 0.04 * (lat - 0.5) ** 2)
        slope = h * a1 / (ba + bp)
        d_ob = ((z - z_ob) / np.sqrt(1.0 + slope * slope)).astype(np.float32)
        lower = d_ob < 0
        if not right:
            return np.where(lower, LLL, LUL).astype(np.uint8), np.abs(d_ob)
        th, tilt = self.horizontal_right
        d_h = (z - (z_rec + h * (th + tilt * vn - 0.05 * lat * lat))).astype(np.float32)
        lab = np.where(lower, RLL, np.where(d_h < 0, RML, RUL)).astype(np.uint8)
        fis = np.where(lower, np.abs(d_ob), np.minimum(np.abs(d_ob), np.abs(d_h)))
        return lab, fis.astype(np.float32)

    @property
    def dome_top(self) -> float:
        """Height of the higher diaphragm dome."""
        return self.z_at(max(self.dome_right_t, self.dome_left_t))


class LesionField(Protocol):
    """Something that scores lung voxels for pneumonia (see :mod:`triaged.lab.phantom.findings`)."""

    def propensity(
        self, z: float, rows: slice, cols: slice, inside: npt.NDArray[np.bool_], ctx: LungContext
    ) -> F32: ...


@dataclass(frozen=True)
class LungContext:
    """Per-voxel anatomy of the lung voxels of one plane box that findings need."""

    u: F32  # (1, w)
    v: F32  # (h, 1)
    pleura_mm: F32  # distance to the costal and diaphragmatic pleura, (h, w)
    vn: F32  # 0 anterior … 1 posterior, (h, 1)
    height: F32  # 0 at the recess … 1 at the apex, scalar per side as (1, w)
    lobe: U8  # (h, w)


@dataclass(frozen=True)
class Effusion:
    """Pleural fluid layering posteriorly (supine) on one side: surface at ``v_level`` at the recess,
    receding to zero depth at ``z_top``."""

    right: bool
    depth: float
    z_top: float
    atelectasis_mm: float


@dataclass
class SliceLayers:
    """What pass A produces for one axial plane: the full HU plane, and on the lung box (``rows``,
    ``cols``) the parenchyma weight, pneumonia propensity and masks (None where there is no lung)."""

    hu: F32
    rows: slice
    cols: slice
    wpar: F32 | None = None
    propensity: F32 | None = None
    lungs: U8 | None = None
    lobes: U8 | None = None
    vessels: U8 | None = None
    findings: U8 | None = None


def _local(outer: tuple[slice, slice], inner: tuple[slice, slice]) -> tuple[slice, slice] | None:
    """``inner`` (absolute, clipped to ``outer``) in ``outer``'s coordinates, or None if disjoint."""
    r0 = max(inner[0].start, outer[0].start)
    r1 = min(inner[0].stop, outer[0].stop)
    c0 = max(inner[1].start, outer[1].start)
    c1 = min(inner[1].stop, outer[1].stop)
    if r1 <= r0 or c1 <= c0:
        return None
    return (
        slice(r0 - outer[0].start, r1 - outer[0].start),
        slice(c0 - outer[1].start, c1 - outer[1].start),
    )


class SliceRenderer:
    """Renders the anatomy on one in-plane grid, one axial plane at a time.

    Parameters
    ----------
    anatomy : Anatomy
        The patient.
    u, v : ndarray
        Column / row coordinates, patient-centred mm (ascending, spacing ``pixel``).
    pixel : float
        In-plane spacing, mm.
    tubes : TubeRaster or None
        Intrapulmonary vessels, airways and focal findings, or None (coarse masks only).
    effusions : tuple of Effusion
        Pleural effusions (``other`` studies).
    lesion_field : LesionField or None
        Pneumonia propensity scorer (``covid`` / ``bacterial``).
    """

    def __init__(
        self,
        anatomy: Anatomy,
        u: F32,
        v: F32,
        pixel: float,
        tubes: TubeRaster | None = None,
        effusions: tuple[Effusion, ...] = (),
        lesion_field: LesionField | None = None,
    ) -> None:
        self.a = anatomy
        self.u = u.astype(np.float32)
        self.v = v.astype(np.float32)
        self.pixel = float(pixel)
        self.tubes = tubes
        self.effusions = effusions
        self.lesion_field = lesion_field
        self.capsules = anatomy.capsules()
        self.split = int(np.searchsorted(self.u, anatomy.mediastinum_u))  # first left-lung column

    def _range(self, coords: F32, lo: float, hi: float) -> slice:
        i0 = int(np.searchsorted(coords, lo - 2 * self.pixel))
        i1 = int(np.searchsorted(coords, hi + 2 * self.pixel))
        return slice(i0, max(i0, i1))

    def box(self, u_lo: float, u_hi: float, v_lo: float, v_hi: float) -> tuple[slice, slice]:
        """(rows, cols) of the grid covering the given patient-centred rectangle (plus 2 pixels)."""
        return self._range(self.v, v_lo, v_hi), self._range(self.u, u_lo, u_hi)

    def lung_box(self, z: float) -> tuple[slice, slice]:
        """(rows, cols) that contain every lung voxel of the plane at ``z``."""
        a, ba, bp = self.a.cavity(self.a.t(z))
        return self.box(-a, a, -ba, bp)

    def _grid(self, b: tuple[slice, slice]) -> tuple[F32, F32]:
        return self.u[b[1]][None, :], self.v[b[0]][:, None]

    def render(self, z: float) -> SliceLayers:
        """Render the axial plane at LPS height ``z``."""
        an = self.a
        t = an.t(z)
        px = self.pixel
        hu = np.full((len(self.v), len(self.u)), AIR_HU, np.float32)
        cav, ring, mus, skin = an.layers(t)
        self._table(hu, skin)
        body = self.box(-skin[0], skin[0], -skin[1], skin[2])
        uu, vv = self._grid(body)
        view = hu[body]
        paint(view, coverage(ellipse_sdf(uu, vv, *skin), px), FAT_HU)
        paint(view, coverage(ellipse_sdf(uu, vv, *mus), px), MUSCLE_HU)
        sdf_ring = ellipse_sdf(uu, vv, *ring)
        sdf_cav = ellipse_sdf(uu, vv, *cav)
        self._ribs(view, uu, vv, z, sdf_ring, sdf_cav, cav)
        self._scapulae(hu, t, ring, cav)
        alpha_cav = coverage(sdf_cav, px)
        paint(view, alpha_cav, MEDIASTINAL_FAT_HU)

        # inside the cavity
        cbox_abs = self.lung_box(z)
        csub = _local(body, cbox_abs)
        assert csub is not None
        cbox = view[csub]
        cu, cv = self._grid(cbox_abs)
        c_sdf = sdf_cav[csub]
        sdf_dia: F32 | None = None
        alpha_abd: F32 | None = None
        if z < an.dome_top + 60.0:
            sdf_dia = an.diaphragm(cu, cv, z, cav[0])
            if z < an.dome_top + px:
                alpha_abd = coverage(sdf_dia, px) * alpha_cav[csub]
                paint(cbox, alpha_abd, self._abdomen_hu(cu, cv, z, cav))
        carve = np.abs(cu - np.float32(an.mediastinum_u)) - self._band_half_width(cv, t, cav)
        self._heart(hu, cbox_abs, carve, alpha_abd, z)
        self._capsules(cbox, cu, cv, z, carve)
        self._spine(hu, cbox_abs, carve, z, t)
        self._sternum(hu, t, cav, ring)
        sdf_eff = self._effusion_sdf(cu, cv, z, c_sdf, sdf_dia, carve)
        if sdf_eff is not None:
            paint(cbox, coverage(sdf_eff, px), FLUID_HU)
        out = SliceLayers(hu, cbox_abs[0], cbox_abs[1])
        z_r, z_l = an.z_apex
        if an.z_recess - px <= z <= max(z_r, z_l) + px:
            self._lungs(out, cbox, cu, cv, z, cav, c_sdf, sdf_dia, carve, sdf_eff)
        return out

    # ---- pieces -------------------------------------------------------------------------------------
    def _table(self, hu: F32, skin: tuple[float, float, float]) -> None:
        """The couch: a curved 8 mm carbon-fibre plate 4 mm behind the back."""
        v0 = skin[2] + 4.0
        b = self.box(-230.0, 230.0, v0 - 30.0, v0 + 10.0)
        if b[0].stop <= b[0].start:
            return
        uu, vv = self._grid(b)
        surface = v0 - uu * uu / 1800.0
        sdf = np.maximum(np.abs(vv - surface - 4.0) - 4.0, np.abs(uu) - 230.0)
        paint(hu[b], coverage(sdf, self.pixel), TABLE_HU)

    def _ribs(
        self,
        view: F32,
        uu: F32,
        vv: F32,
        z: float,
        sdf_ring: F32,
        sdf_cav: F32,
        cav: tuple[float, float, float],
    ) -> None:
        """Twelve pairs of ribs sloping down anteriorly, costal cartilages near the sternum."""
        an = self.a
        s = an.size
        bn = np.where(vv < 0, cav[1], cav[2]).astype(np.float32)
        vn = np.clip(vv / bn, -1.0, 1.0)  # (h, 1)
        pitch = an.rib_pitch_t * an.height
        zeta = z - an.z_at(an.rib_first_t) + an.rib_drop_t * an.height * (1.0 - vn) * 0.5
        k = zeta / pitch
        kr = np.round(k)
        band = np.abs(k - kr) * pitch * 0.85 - 5.5 * s  # (h, 1): the rib pattern depends on the row only
        valid = (kr >= 0) & (kr <= 11) & ~((kr <= 1) & (vn < -0.2))
        band = np.where(valid, band, 99.0).astype(np.float32)
        rows = np.flatnonzero(band[:, 0] < self.pixel)
        if len(rows) == 0:
            return
        r = slice(int(rows[0]), int(rows[-1]) + 1)
        radial = np.maximum(sdf_ring[r] + 0.8 * s, -sdf_cav[r] - 0.8 * s)
        midline = np.abs(uu) - np.where(vv[r] > 0, 22.0 * s, 16.0 * s)
        sdf = np.maximum(np.maximum(radial, band[r]), -midline)
        alpha = coverage(sdf, self.pixel)
        cartilage = (vn[r] < -0.7) & (np.abs(uu) < 45.0 * s)
        bone = MARROW_HU + (CORTEX_HU - MARROW_HU) * np.clip(1.0 + sdf / 1.5, 0.0, 1.0)
        paint(view[r], alpha, np.where(cartilage, CARTILAGE_HU, bone))

    def _scapulae(
        self, hu: F32, t: float, ring: tuple[float, float, float], cav: tuple[float, float, float]
    ) -> None:
        """Scapular blades on the upper posterior chest wall."""
        w = smoothstep(0.55, 0.65, t) * (1.0 - smoothstep(0.9, 0.97, t))
        if w <= 0.0:
            return
        s = self.a.size
        half = (60.0 + 50.0 * w) * s
        b = self.box(-half, half, 0.2 * cav[2], ring[2] + 12.0 * s)
        uu, vv = self._grid(b)
        au = np.abs(uu)
        sdf_ring = ellipse_sdf(uu, vv, *ring)
        sdf = np.maximum(np.abs(sdf_ring - 7.0 * s) - 2.5 * s, np.maximum(45.0 * s - au, au - half))
        sdf = np.maximum(sdf, 0.2 * cav[2] - vv)
        paint(
            hu[b],
            coverage(sdf, self.pixel),
            MARROW_HU + (CORTEX_HU - MARROW_HU) * np.clip(1.0 + sdf / 1.2, 0.0, 1.0),
        )

    def _band_half_width(self, cv: F32, t: float, cav: tuple[float, float, float]) -> F32:
        """Half-width of the mediastinal band separating the lungs (anterior junction line → spine)."""
        s = self.a.size
        mid = float(np.interp(t, (0.0, 0.3, 0.6, 0.75, 0.85, 1.0), (20.0, 22.0, 24.0, 30.0, 26.0, 22.0))) * s
        front = 5.0 * s
        x = np.clip((cv + cav[1]) / (35.0 * s), 0.0, 1.0)
        return (front + (mid - front) * x * x * (3.0 - 2.0 * x)).astype(np.float32)

    def _heart(
        self, hu: F32, cbox_abs: tuple[slice, slice], carve: F32, alpha_abd: F32 | None, z: float
    ) -> None:
        """Heart (blood and myocardium alike without contrast) rotated to point left-anterior-inferior;
        its lower surface rests on the diaphragm."""
        an = self.a
        zc = an.z_at(an.heart_t)
        c = an.heart_c_t * an.height
        if abs(z - zc) >= c:
            return
        scale = float(np.sqrt(1.0 - ((z - zc) / c) ** 2))
        a, b = max(an.heart_a * scale, 1.0), max(an.heart_b * scale, 1.0)
        m = a + 8.0 * an.size
        hb = self.box(an.heart_u - m, an.heart_u + m, an.heart_v - m, an.heart_v + m)
        loc = _local(cbox_abs, hb)
        if loc is None:
            return
        hb = (
            slice(cbox_abs[0].start + loc[0].start, cbox_abs[0].start + loc[0].stop),
            slice(cbox_abs[1].start + loc[1].start, cbox_abs[1].start + loc[1].stop),
        )
        uu, vv = self._grid(hb)
        ca, sa = np.float32(np.cos(an.heart_angle)), np.float32(np.sin(an.heart_angle))
        du = uu - np.float32(an.heart_u)
        dv = vv - np.float32(an.heart_v)
        sdf = ellipse_sdf(du * ca - dv * sa, du * sa + dv * ca, a, b, b)
        alpha = coverage(sdf, self.pixel)
        if alpha_abd is not None:
            alpha = alpha * (1.0 - alpha_abd[loc])
        paint(hu[hb], alpha, BLOOD_HU)
        sub = carve[loc]
        np.minimum(sub, sdf - 6.0 * an.size, out=sub)

    def _abdomen_hu(self, cu: F32, cv: F32, z: float, cav: tuple[float, float, float]) -> F32:
        """Liver on the right and across the midline, spleen postero-left, and the stomach antero-left:
        fluid with a gas cap that rises anteriorly (supine) under the left dome."""
        an = self.a
        s = an.size
        liver_edge = 30.0 * s - 0.25 * cv
        hu = np.where(cu < liver_edge, LIVER_HU, np.where(cv > 5.0 * s, SPLEEN_HU, 35.0)).astype(np.float32)
        z_top = an.z_at(an.dome_left_t) - 8.0 * s
        depth = z_top - z
        if 0.0 < depth < 120.0 * s:
            scale = float(np.sqrt(max(0.0, 1.0 - ((depth - 45.0 * s) / (75.0 * s)) ** 2)))
            su, sv = 0.45 * cav[0], -0.15 * cav[1]
            ru, rv = 42.0 * s * scale + 1e-3, 36.0 * s * scale + 1e-3
            q = ((cu - np.float32(su)) / ru) ** 2 + ((cv - np.float32(sv)) / rv) ** 2
            stomach = q < 1.0
            hu = np.where(stomach, FLUID_HU, hu).astype(np.float32)
            if depth < 60.0 * s:
                gas = stomach & (cv < np.float32(sv - 0.3 * rv))
                hu = np.where(gas, AIR_HU, hu).astype(np.float32)
        return hu

    def _capsules(self, cbox: F32, cu: F32, cv: F32, z: float, carve: F32) -> None:
        px = self.pixel
        u0, v0 = float(cu[0, 0]), float(cv[0, 0])
        h, w = cbox.shape
        for cap in self.capsules:
            p0 = np.array(cap.p0)
            p1 = np.array(cap.p1)
            r = cap.radius
            if not (min(p0[2], p1[2]) - r <= z <= max(p0[2], p1[2]) + r):
                continue
            d = p1 - p0
            if abs(d[2]) > 1e-6:
                ta, tb = sorted(((z - r - p0[2]) / d[2], (z + r - p0[2]) / d[2]))
                ta, tb = max(ta, 0.0), min(tb, 1.0)
            else:
                ta, tb = 0.0, 1.0
            ends = (p0 + ta * d, p0 + tb * d)
            lo_u = min(e[0] for e in ends) - r - 3.0
            hi_u = max(e[0] for e in ends) + r + 3.0
            lo_v = min(e[1] for e in ends) - r - 3.0
            hi_v = max(e[1] for e in ends) + r + 3.0
            r0 = max(int((lo_v - v0) / px), 0)
            r1 = min(int((hi_v - v0) / px) + 2, h)
            c0 = max(int((lo_u - u0) / px), 0)
            c1 = min(int((hi_u - u0) / px) + 2, w)
            if r1 <= r0 or c1 <= c0:
                continue
            pu = cu[:, c0:c1] - np.float32(p0[0])
            pv = cv[r0:r1] - np.float32(p0[1])
            pz = np.float32(z - p0[2])
            dd = float(d @ d) or 1e-9
            tt = np.clip((pu * d[0] + pv * d[1] + pz * d[2]) / dd, 0.0, 1.0)
            dist = np.sqrt((pu - tt * d[0]) ** 2 + (pv - tt * d[1]) ** 2 + (pz - tt * d[2]) ** 2)
            sdf = (dist - r).astype(np.float32)
            paint(cbox[r0:r1, c0:c1], coverage(sdf, px), cap.hu)
            if cap.carve is not None:
                sub = carve[r0:r1, c0:c1]
                np.minimum(sub, sdf - cap.carve, out=sub)

    def _spine(self, hu: F32, cbox_abs: tuple[slice, slice], carve: F32, z: float, t: float) -> None:
        """Vertebral body (cancellous bone in a cortical shell; intervertebral discs), spinal canal,
        posterior arch and spinous process."""
        an = self.a
        s = an.size
        px = self.pixel
        v_vb, a_vb, b_vb = an.vertebral_body(t)
        pitch = an.vertebra_t * an.height
        phase = ((z - an.z_base) / pitch) % 1.0
        disc = abs(phase - 0.5) * pitch > 0.5 * pitch - 3.0 * s
        vb_box = self.box(-a_vb, a_vb, v_vb - b_vb, v_vb + b_vb)
        uu, vv = self._grid(vb_box)
        sdf_vb = ellipse_sdf(uu, vv - np.float32(v_vb), a_vb, b_vb, b_vb)
        inner = DISC_HU if disc else MARROW_HU
        shell = 120.0 if disc else CORTEX_HU
        paint(
            hu[vb_box], coverage(sdf_vb, px), inner + (shell - inner) * np.clip(1.0 + sdf_vb / 1.5, 0.0, 1.0)
        )
        loc = _local(cbox_abs, vb_box)
        if loc is not None:
            in_c = _local(vb_box, cbox_abs)
            assert in_c is not None
            sub = carve[loc]
            np.minimum(sub, sdf_vb[in_c] - 3.0 * s, out=sub)
        v_canal = v_vb + b_vb + 9.0 * s
        pb = self.box(-14.0 * s, 14.0 * s, v_canal - 14.0 * s, v_canal + 40.0 * s)
        uu, vv = self._grid(pb)
        d_canal = np.sqrt(uu * uu + (vv - np.float32(v_canal)) ** 2)
        arch = np.maximum(np.abs(d_canal - 10.5 * s) - 2.5 * s, np.float32(v_canal - 3.0 * s) - vv)
        spinous = ellipse_sdf(uu, vv - np.float32(v_canal + 24.0 * s), 4.0 * s, 14.0 * s, 14.0 * s)
        bone = np.minimum(arch, spinous)
        view = hu[pb]
        paint(
            view,
            coverage(bone, px),
            MARROW_HU + (CORTEX_HU - MARROW_HU) * np.clip(1.0 + bone / 1.2, 0.0, 1.0),
        )
        paint(view, coverage(d_canal - 8.0 * s, px), CSF_HU)

    def _sternum(
        self, hu: F32, t: float, cav: tuple[float, float, float], ring: tuple[float, float, float]
    ) -> None:
        if not 0.30 <= t <= 0.87:
            return
        s = self.a.size
        a = (13.0 + 10.0 * smoothstep(0.76, 0.84, t)) * s
        vc = -(cav[1] + 0.5 * (ring[1] - cav[1]))
        b = self.box(-a, a, vc - 6.0 * s, vc + 6.0 * s)
        uu, vv = self._grid(b)
        sdf = ellipse_sdf(uu, vv - np.float32(vc), a, 6.0 * s, 6.0 * s)
        paint(
            hu[b],
            coverage(sdf, self.pixel),
            MARROW_HU + (CORTEX_HU - MARROW_HU) * np.clip(1.0 + sdf / 1.5, 0.0, 1.0),
        )

    def _effusion_sdf(
        self, cu: F32, cv: F32, z: float, c_sdf: F32, sdf_dia: F32 | None, carve: F32
    ) -> F32 | None:
        """Pleural fluid: the dependent (posterior, supine) part of the pleural space, deepest at the
        base; it fills the space the lung would occupy, never the mediastinum or the spine."""
        if not self.effusions:
            return None
        an = self.a
        _, _, bp = an.cavity(an.t(z))
        best: F32 | None = None
        chest = np.maximum(c_sdf if sdf_dia is None else np.maximum(c_sdf, -sdf_dia), -carve)
        for eff in self.effusions:
            if z >= eff.z_top:
                continue
            frac = (eff.z_top - z) / (eff.z_top - an.z_recess)
            depth = eff.depth * float(np.clip(frac, 0.0, 1.0)) ** 0.7
            side = (cu - np.float32(an.mediastinum_u)) if eff.right else (np.float32(an.mediastinum_u) - cu)
            sdf = np.maximum(np.maximum(chest, np.float32(bp - depth) - cv), side)
            best = sdf if best is None else np.minimum(best, sdf)
        return best

    def _lungs(
        self,
        out: SliceLayers,
        cbox: F32,
        cu: F32,
        cv: F32,
        z: float,
        cav: tuple[float, float, float],
        c_sdf: F32,
        sdf_dia: F32 | None,
        carve: F32,
        sdf_eff: F32 | None,
    ) -> None:
        an = self.a
        px = self.pixel
        s = an.size
        split = min(max(self.split - out.cols.start, 0), cbox.shape[1])
        sdf = np.maximum(c_sdf, -carve)
        if sdf_dia is not None:
            sdf = np.maximum(sdf, -sdf_dia)
        z_r, z_l = an.z_apex
        for part, z_top, u_apex in ((slice(0, split), z_r, -58.0 * s), (slice(split, None), z_l, 62.0 * s)):
            z_s = z_top - 0.21 * an.height
            if z <= z_s:
                continue
            rad = 95.0 * s * float(np.sqrt(max(0.0, 1.0 - ((z - z_s) / (z_top - z_s)) ** 2)))
            apex = np.sqrt((cu[:, part] - np.float32(u_apex)) ** 2 + (cv - np.float32(16.0 * s)) ** 2) - rad
            np.maximum(sdf[:, part], apex, out=sdf[:, part])
        if sdf_eff is not None:
            sdf = np.maximum(sdf, -sdf_eff)
        inside = sdf <= 0.0
        alpha = coverage(sdf, px)
        if not inside.any() and float(alpha.max(initial=0.0)) <= 0.0:
            return
        lobe = np.empty(cbox.shape, np.uint8)
        fis = np.empty(cbox.shape, np.float32)
        for part, right in ((slice(0, split), True), (slice(split, None), False)):
            if cu[:, part].size:
                lobe[:, part], fis[:, part] = an.lobes(cu[:, part], cv, z, right, cav)
        content = np.full(cbox.shape, PARENCHYMA_HU, np.float32)
        keep = np.ones(cbox.shape, np.float32)
        planes = self.tubes.coverage(z) if self.tubes is not None else {}
        vessel_flag = np.zeros(cbox.shape, np.uint8)
        finding = np.zeros(cbox.shape, np.uint8)
        for cls in TubeClass:
            plane = planes.get(int(cls))
            if plane is None:
                continue
            a_c = plane[out.rows, out.cols]
            paint(content, a_c, TUBE_HU[cls])
            keep *= 1.0 - a_c
            hit = a_c >= 0.5
            if cls == TubeClass.VESSEL:
                vessel_flag[hit] = 1
            elif cls in (TubeClass.AIRWAY_WALL, TubeClass.AIRWAY_LUMEN):
                vessel_flag[hit] = 2
            elif cls == TubeClass.NODULE:
                finding[hit] = NODULE
            elif cls == TubeClass.ATELECTASIS:
                finding[hit] = ATELECTASIS
            elif cls == TubeClass.EMPHYSEMA:
                finding[hit] = EMPHYSEMA
        a_f = np.float32(0.35 * min(1.0, 1.0 / px)) * np.clip(1.0 - fis / 0.7, 0.0, 1.0)
        paint(content, a_f, FISSURE_HU)
        keep *= 1.0 - a_f
        if sdf_eff is not None:
            # compressive atelectasis of the lung that rests on the fluid
            band = min(eff.atelectasis_mm for eff in self.effusions)
            a_at = coverage(sdf_eff - band, px)
            paint(content, a_at, TUBE_HU[TubeClass.ATELECTASIS])
            keep *= 1.0 - a_at
            finding[a_at >= 0.5] = ATELECTASIS
        paint(cbox, alpha, content)
        out.wpar = alpha * keep
        side_label = np.full(cbox.shape, 2, np.uint8)
        side_label[:, :split] = 1
        out.lungs = np.where(inside, side_label, 0).astype(np.uint8)
        out.lobes = np.where(inside, lobe, 0).astype(np.uint8)
        out.vessels = np.where(inside, vessel_flag, 0).astype(np.uint8)
        fnd = np.where(inside, finding, 0).astype(np.uint8)
        if sdf_eff is not None:
            fnd[sdf_eff <= 0.0] = EFFUSION
        out.findings = fnd
        if self.lesion_field is not None:
            pleura = -c_sdf if sdf_dia is None else np.minimum(-c_sdf, sdf_dia)
            height = np.empty((1, cbox.shape[1]), np.float32)
            height[:, :split] = (z - an.z_recess) / (z_r - an.z_recess)
            height[:, split:] = (z - an.z_recess) / (z_l - an.z_recess)
            ctx = LungContext(
                u=cu,
                v=cv,
                pleura_mm=np.maximum(pleura, 0.0).astype(np.float32),
                vn=((cv + cav[1]) / (cav[1] + cav[2])).astype(np.float32),
                height=height,
                lobe=lobe,
            )
            p = self.lesion_field.propensity(z, out.rows, out.cols, alpha > 0.0, ctx)
            out.propensity = np.where(alpha > 0.0, p, 0.0).astype(np.float32)
