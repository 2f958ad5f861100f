"""What a phantom study is asked to be (:class:`PhantomSpec`) and what it turned out to be
(:class:`GroundTruth`, :class:`Phantom`).

Vocabulary follows ``../shared/METHODS.md``: the affected fraction of a lung is lesion volume /
lung volume (lesion = ground-glass opacity + consolidation), the study severity is the maximum over the
two lungs (Goncharov et al., seed 004), the whole-lung ratio is also reported (Wu et al., seed 001), and
the CT0–CT4 grade is the Russian visual scale used by seed 004.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

import numpy as np
import numpy.typing as npt
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

Kind = Literal["healthy", "covid", "bacterial", "other"]
Vendor = Literal["siemens", "ge", "philips", "canon"]

#: Study classes, in the order :func:`dataset_specs` cycles through them.
KINDS: Final[tuple[Kind, ...]] = get_args(Kind)
#: Vendor-style header conventions :func:`~triaged.lab.phantom.to_datasets` can imitate.
VENDORS: Final[tuple[Vendor, ...]] = get_args(Vendor)

#: Transfer syntaxes the writer can produce (all lossless; pydicom 3 has encoders for these).
SUPPORTED_TRANSFER_SYNTAXES: Final[frozenset[str]] = frozenset(
    {
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
    }
)

#: Highest affected percentage a phantom can be asked for: vessels and airways (≈5–10 % of a lung)
#: are never lesion voxels, so 100 % is unreachable; 90 % is still well inside CT4 (≥ 75 %).
MAX_SEVERITY: Final[float] = 90.0

#: Geometry is quantised so that NIfTI's float32 header and DICOM DS strings hold it exactly.
PIXEL_QUANTUM_MM: Final[float] = 1.0 / 512.0
SLICE_QUANTUM_MM: Final[float] = 1.0 / 1024.0

#: Default cranio-caudal coverage (mm) when ``slices`` is not given: apices to upper abdomen.
DEFAULT_COVERAGE_MM: Final[float] = 320.0


def quantise(value: float, quantum: float) -> float:
    """Round ``value`` to a multiple of ``quantum`` (a power of two), never to zero."""
    return max(quantum, round(value / quantum) * quantum)


def ct_grade_of(affected_pct: float) -> int:
    """CT severity grade (0–4) of an affected-lung percentage (seed 004, Russian visual scale).

    CT0 no findings (0 %); CT1 ≤ 25 %; CT2 25–50 %; CT3 50–75 %; CT4 ≥ 75 %.

    Parameters
    ----------
    affected_pct : float
        Affected percentage of the worse lung (0–100).

    Returns
    -------
    int
        The grade number, 0 for CT0 … 4 for CT4.
    """
    if affected_pct <= 0.0:
        return 0
    if affected_pct <= 25.0:
        return 1
    if affected_pct <= 50.0:
        return 2
    if affected_pct < 75.0:
        return 3
    return 4


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that determines one synthetic chest CT study; equal specs give equal studies.

    Parameters
    ----------
    kind : {'healthy', 'covid', 'bacterial', 'other'}
        Study class. ``covid``: bilateral, peripheral, lower-lobe predominant ground glass, crazy
        paving, consolidation in later stages; ``bacterial``: lobar/segmental consolidation, usually
        unilateral, with air bronchograms; ``other``: nodules/masses, pleural effusion, atelectasis or
        emphysema and no pneumonia lesion; ``healthy``: none of these.
    severity : float or None
        Affected-lung percentage target (lesion / lung volume × 100). For ``covid`` it is the worse
        lung; the other lung gets 45–90 % of it (always > 0: bilateral). For ``bacterial`` it is the
        affected lung (the other is usually spared). None draws one from the seed. Must be None or 0
        for ``healthy`` and ``other``.
    seed : int
        Seed of every random choice (anatomy, findings, noise, UIDs).
    severity_right, severity_left : float or None
        Per-lung targets overriding ``severity`` (``covid``/``bacterial`` only).
    matrix : int
        Rows = columns of each axial image (512 for clinical CT; tests use 128–256).
    pixel_spacing : float or None
        In-plane spacing, mm. None draws a display field of view of 340–420 mm.
    slice_thickness : float
        Reconstructed slice thickness, mm (0.6–10); thicker slices average more anatomy (partial
        volume).
    slice_spacing : float or None
        Distance between slice centres, mm; None = ``slice_thickness`` (contiguous).
    slices : int or None
        Number of axial images; None covers ~320 mm (apices to upper abdomen).
    noise_hu : float or None
        Standard deviation of the image noise in HU (10–40); None draws 12–30.
    vendor : {'siemens', 'ge', 'philips', 'canon'}
        Header conventions to imitate (rescale intercept, signed storage, padding outside the
        reconstruction circle). Only ``to_datasets`` depends on it.
    feet_first : bool
        Feet-first supine (row direction −x) instead of head-first supine.
    reversed_order : bool
        Instance numbers run inferior→superior instead of the usual cranio-caudal order.
    with_localizer, with_dose_report : bool
        Add a localizer (topogram) series / a dose-screen secondary capture to the study.
    transfer_syntax : str or None
        Transfer syntax UID of the written instances; None = Explicit VR Little Endian.
    """

    kind: Kind = "healthy"
    severity: float | None = None
    seed: int = 0
    severity_right: float | None = None
    severity_left: float | None = None
    matrix: int = 512
    pixel_spacing: float | None = None
    slice_thickness: float = 1.0
    slice_spacing: float | None = None
    slices: int | None = None
    noise_hu: float | None = None
    vendor: Vendor = "siemens"
    feet_first: bool = False
    reversed_order: bool = False
    with_localizer: bool = False
    with_dose_report: bool = False
    transfer_syntax: str | None = None

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError("invalid PhantomSpec: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        out: list[str] = []
        if self.kind not in KINDS:
            out.append(f"kind {self.kind!r} is not one of {KINDS}")
        if self.vendor not in VENDORS:
            out.append(f"vendor {self.vendor!r} is not one of {VENDORS}")
        if not 32 <= self.matrix <= 1024:
            out.append(f"matrix {self.matrix} is outside 32–1024")
        if self.pixel_spacing is not None and not 0.2 <= self.pixel_spacing <= 8.0:
            out.append(f"pixel_spacing {self.pixel_spacing} mm is outside 0.2–8")
        if not 0.5 <= self.slice_thickness <= 10.0:
            out.append(f"slice_thickness {self.slice_thickness} mm is outside 0.5–10")
        if self.slice_spacing is not None and not 0.25 <= self.slice_spacing <= 20.0:
            out.append(f"slice_spacing {self.slice_spacing} mm is outside 0.25–20")
        if self.slices is not None and not 8 <= self.slices <= 2000:
            out.append(f"slices {self.slices} is outside 8–2000")
        if self.noise_hu is not None and not 0.0 <= self.noise_hu <= 100.0:
            out.append(f"noise_hu {self.noise_hu} is outside 0–100")
        if self.transfer_syntax is not None and self.transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
            out.append(f"transfer syntax {self.transfer_syntax} is not supported")
        targets = [self.severity, self.severity_right, self.severity_left]
        for name, value in zip(("severity", "severity_right", "severity_left"), targets, strict=True):
            if value is None:
                continue
            if not math.isfinite(value) or not 0.0 <= value <= MAX_SEVERITY:
                out.append(f"{name} {value} is outside 0–{MAX_SEVERITY:g} %")
            elif self.kind in ("healthy", "other") and value != 0.0:
                out.append(f"{name} must be None or 0 for kind {self.kind!r} (no pneumonia lesion)")
        if self.kind in ("covid", "bacterial"):
            if (self.severity_right is None) != (self.severity_left is None):
                out.append("give both severity_right and severity_left, or neither")
            elif self.severity_right == 0.0 and self.severity_left == 0.0:
                out.append(f"kind {self.kind!r} needs a lesion in at least one lung")
            if self.severity == 0.0 and self.severity_right is None:
                out.append(f"severity 0 contradicts kind {self.kind!r}")
        return out

    @property
    def spacing_between_slices(self) -> float:
        """Distance between slice centres, mm (quantised, see :data:`SLICE_QUANTUM_MM`)."""
        raw = self.slice_thickness if self.slice_spacing is None else self.slice_spacing
        return quantise(raw, SLICE_QUANTUM_MM)

    @property
    def thickness(self) -> float:
        """Slice thickness, mm (as asked: it is a header value and a blur width, not grid geometry)."""
        return float(self.slice_thickness)

    @property
    def n_slices(self) -> int:
        """Number of axial images."""
        if self.slices is not None:
            return self.slices
        return max(8, round(DEFAULT_COVERAGE_MM / self.spacing_between_slices))

    @property
    def name(self) -> str:
        """Short human label, e.g. ``COVID40`` (also the Patient's Name suffix)."""
        if self.kind in ("healthy", "other"):
            return self.kind.upper()
        if self.severity_right is not None and self.severity_left is not None:
            return f"{self.kind.upper()}{round(max(self.severity_right, self.severity_left))}"
        if self.severity is not None:
            return f"{self.kind.upper()}{round(self.severity)}"
        return self.kind.upper()


Mask = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class GroundTruth:
    """Reference masks and labels of one phantom, on the same (z, y, x) grid as its HU array.

    Attributes
    ----------
    label : str
        ``healthy``, ``covid``, ``bacterial`` or ``other``.
    lungs : ndarray of uint8
        0 outside, 1 right lung, 2 left lung. Intrapulmonary vessels, airways, nodules and atelectasis
        are inside the lungs; trachea, main bronchi, hilar vessels and pleural fluid are not.
    lobes : ndarray of uint8
        0 outside, 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL (fissures follow the oblique and horizontal
        fissure surfaces).
    lesions : ndarray of uint8
        1 where parenchyma is replaced by pneumonia (ground glass or consolidation). Vessel and airway
        voxels are never lesion voxels, so lesion HU stays in range (air bronchograms stay air).
    consolidation : ndarray of uint8
        1 for the consolidated subset of ``lesions`` (−100…+60 HU).
    vessels : ndarray of uint8
        1 vessel, 2 airway (lumen or wall), inside the lungs only.
    findings : ndarray of uint8
        Other pathology: 1 nodule/mass, 2 pleural effusion, 3 atelectasis, 4 emphysema.
    affected_pct_right, affected_pct_left : float
        Lesion / lung voxels × 100 per lung, measured on the masks.
    whole_lung_pct : float
        Lesion / lung voxels × 100 over both lungs (Wu et al.).
    consolidation_pct : float
        Consolidation / lung voxels × 100 over both lungs (Wu's consolidation score × 100).
    ct_grade : int
        0–4 for CT0–CT4, from the worse lung.
    spacing : tuple of float
        (z, y, x) voxel spacing, mm.
    affine : ndarray
        4 × 4, voxel index (column, row, slice, 1) → DICOM LPS mm.
    """

    label: Kind
    lungs: Mask
    lobes: Mask
    lesions: Mask
    consolidation: Mask
    vessels: Mask
    findings: Mask
    affected_pct_right: float
    affected_pct_left: float
    whole_lung_pct: float
    consolidation_pct: float
    ct_grade: int
    spacing: tuple[float, float, float]
    affine: npt.NDArray[np.float64] = field(repr=False)

    @property
    def affected_pct_max(self) -> float:
        """Study severity: the worse lung (seed 004)."""
        return max(self.affected_pct_right, self.affected_pct_left)


@dataclass(frozen=True)
class Phantom:
    """A synthetic chest CT: HU array (z, y, x; z increasing superior), its ground truth and spec.

    The array is always in the canonical head-first supine layout (columns right→left, rows
    anterior→posterior, slices inferior→superior); feet-first and instance order are writer
    conventions applied by :func:`~triaged.lab.phantom.to_datasets`.
    """

    hu: npt.NDArray[np.int16]
    truth: GroundTruth
    spec: PhantomSpec
    noise_hu: float
    reconstruction_diameter: float  # mm, the circular field of view
    patient_sex: str = "O"  # M / F, as drawn for the anatomy (women are drawn 5 % smaller)
    patient_age: int = 50

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(z, y, x) voxel spacing, mm."""
        return self.truth.spacing

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """4 × 4, voxel index (column, row, slice, 1) → LPS mm."""
        return self.truth.affine


def affected_percentages(
    lungs: Mask, lesions: Mask, consolidation: Mask
) -> tuple[float, float, float, float]:
    """Affected percentages measured on masks: (right, left, whole lung, consolidation of whole lung)."""
    right = int(np.count_nonzero(lungs == 1))
    left = int(np.count_nonzero(lungs == 2))
    les_r = int(np.count_nonzero(lesions[lungs == 1]))
    les_l = int(np.count_nonzero(lesions[lungs == 2]))
    cons = int(np.count_nonzero(consolidation[lungs > 0]))
    total = right + left

    def pct(n: int, d: int) -> float:
        return 100.0 * n / d if d else 0.0

    return pct(les_r, right), pct(les_l, left), pct(les_r + les_l, total), pct(cons, total)


def dataset_specs(
    n: int,
    seed: int,
    *,
    matrix: int = 512,
    thicknesses: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0),
) -> list[PhantomSpec]:
    """Specs of a labelled dataset: a balanced mix of kinds, severities and acquisitions.

    Kinds cycle covid, healthy, bacterial, other (equal shares); covid severities are stratified over
    CT1–CT4 (seed 004's grades) so every grade is represented; bacterial severities span 5–45 %.
    Slice thickness, pixel spacing, noise, vendor and orientation vary so that models trained on the
    set do not learn one scanner.

    Parameters
    ----------
    n : int
        Number of studies.
    seed : int
        Seed of the mix; each study gets its own derived seed.
    matrix : int
        Matrix size of every study (smaller matrices make quicker training sets).
    thicknesses : tuple of float
        Slice thicknesses to draw from (contiguous slices).

    Returns
    -------
    list of PhantomSpec
    """
    if n < 0:
        raise ValueError("n must be ≥ 0")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1A6ED]))
    cycle: tuple[Kind, ...] = ("covid", "healthy", "bacterial", "other")
    grade_bins = ((2.0, 25.0), (25.0, 50.0), (50.0, 75.0), (75.0, MAX_SEVERITY - 1.0))
    specs: list[PhantomSpec] = []
    covid_index = 0
    grade_order = rng.permutation(4)
    for i in range(n):
        kind = cycle[i % len(cycle)]
        severity: float | None = None
        if kind == "covid":
            lo, hi = grade_bins[int(grade_order[covid_index % 4])]
            covid_index += 1
            if covid_index % 4 == 0:
                grade_order = rng.permutation(4)
            severity = round(float(rng.uniform(lo, hi)), 1)
        elif kind == "bacterial":
            severity = round(float(rng.uniform(5.0, 45.0)), 1)
        fov = float(rng.uniform(330.0, 420.0))
        specs.append(
            PhantomSpec(
                kind=kind,
                severity=severity,
                seed=int(rng.integers(0, 2**31 - 1)),
                matrix=matrix,
                pixel_spacing=quantise(fov / matrix, PIXEL_QUANTUM_MM),
                slice_thickness=float(rng.choice(thicknesses)),
                noise_hu=round(float(rng.uniform(10.0, 40.0)), 1),
                vendor=VENDORS[int(rng.integers(len(VENDORS)))],
                feet_first=bool(rng.random() < 0.2),
                reversed_order=bool(rng.random() < 0.3),
            )
        )
    return specs
