"""Network lesions on slices thicker than the network's slab: drop the vessel haze (issue 11).

``consolidation-em`` (seed 001) sees 5 mm slabs: thinner slices are averaged into them
(:func:`triaged.nets.pipelines.wu_infer`); thicker ones reach the network as they are. UNet-1 marks
part of the lower-lobe bronchovascular bundle at the hilum, and the more so the thicker the slices,
which average its vessels and bronchial walls with the aerated lung between them into a
ground-glass-like blob:

* Lung-PET-CT-Dx (8 mm, Siemens B40f, no pneumonia): the left lower-lobe bundle, 23 mL, 1.4 % of the
  left lung, CT1 (23.6 mL when the 8 mm slices are interpolated to 5 mm for the network);
* the left lower-lobe bundle of the no-pneumonia CMB-CRC-01068: 1.2 mL on its 2.5 mm slices, 2.9, 3.2
  and 4.6 mL (and the right one 4.0 mL) when they are averaged into 6, 8 and 10 mm slabs;
  LIDC-IDRI-0001 averaged into 8 mm slabs, 0.6 mL.

Two densities of each network lesion component (26-connected, inside the lungs as the network's lesions
extend them) tell such a blob from an opacity, both measured with the classical pipeline's vessel
suppression (a grey-level opening by a 6 mm disk of the lung's values,
:func:`triaged.analysis.lesions.classical_lesions`):

* *contrast*: its median suppressed density minus that of the lung within ``contrast_ring_mm`` around it
  (the classical "faint" measure): the bundles 24–62 HU (Lung-PET-CT-Dx 62 HU; one CMB-CRC 8 mm bundle
  97 HU), the COVID-19 opacities of RICORD 1a-001012 averaged into 6, 8 and 10 mm slabs 93–203 HU;
* *narrow*: its median HU minus its median suppressed density, the density that structures narrower
  than the disk (vessels, bronchial walls) give it: the bundles 249–473 HU, whereas ground glass is
  wide — the faint phantom COVID-19 lesions inside diffuse ground glass on 8 mm slices 21–54 HU
  (contrast 29–69 HU, since their ring is diseased lung as well).

On a volume whose slices are thicker than :data:`THICK_SLICE_MM` a component is dropped when its
contrast is below ``min_contrast_hu`` (the classical pipeline's 70 HU) *and* its narrow part at least
``min_narrow_hu`` (150 HU).  Slices up to :data:`THICK_SLICE_MM` are left alone: there the network works
on the slab it was trained on, and a contrast rule would cost real lesions (the MedSeg doctor-labelled
COVID-19 slices, analysed as 5 mm slices, hold true network lesions at 60 HU and less).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from triaged.analysis.arrays import Labels, label_compact
from triaged.analysis.grid import WorkGrid
from triaged.analysis.lesions import ClassicalParams, classical_lesions

F32 = npt.NDArray[np.float32]
B = npt.NDArray[np.bool_]
U8 = npt.NDArray[np.uint8]

#: The network's slab (seed 001, Section III-B: 5 mm); slices thicker than this reach it unaveraged.
THICK_SLICE_MM = 5.0


@dataclass(frozen=True)
class ThickSliceRule:
    """Parameters of :func:`faint_thick_slice_lesions` (module docstring).

    Attributes
    ----------
    thick_slice_mm : float
        The rule applies to volumes whose slice spacing exceeds this.
    min_contrast_hu : float
        A component whose median vessel-suppressed density exceeds the lung around it by less ...
    min_narrow_hu : float
        ... and whose median HU exceeds its median vessel-suppressed density by at least this is dropped.
    contrast_ring_mm : float
        In-plane width of the ring of lung around a component that gives its background.
    """

    thick_slice_mm: float = THICK_SLICE_MM
    min_contrast_hu: float = ClassicalParams().min_contrast_hu
    min_narrow_hu: float = 150.0
    contrast_ring_mm: float = ClassicalParams().contrast_ring_mm


@dataclass(frozen=True)
class ComponentDensity:
    """How dense a lesion component is, HU.

    Attributes
    ----------
    contrast : float
        Median vessel-suppressed density of the component minus that of the lung within the ring around it.
    narrow : float
        Median HU of the component minus its median vessel-suppressed density: the part of its density
        made by structures narrower than the opening disk (vessels, bronchial walls).
    """

    contrast: float
    narrow: float


@dataclass(frozen=True)
class ThickSliceResult:
    """What :func:`faint_thick_slice_lesions` found.

    Attributes
    ----------
    applied : bool
        Whether the volume's slices are thick enough for the rule.
    dropped : ndarray of bool
        Working-grid voxels of the dropped components (all False when nothing was dropped).
    components : tuple of ComponentDensity
        The densities of every component judged, in label order.
    dropped_components : tuple of ComponentDensity
        Those of the dropped components.
    """

    applied: bool
    dropped: B
    components: tuple[ComponentDensity, ...] = ()
    dropped_components: tuple[ComponentDensity, ...] = ()


def component_densities(
    labels: Labels, hu: F32, density: F32, lung: B, grid: WorkGrid, ring_mm: float
) -> list[ComponentDensity]:
    """:class:`ComponentDensity` of each labelled component (label order); the ring is the lung within
    ``ring_mm`` in-plane around the component and outside every component (background −1000 HU when
    none is left)."""
    _, dy, dx = grid.coarse_spacing
    ry, rx = max(1, int(np.ceil(ring_mm / dy))), max(1, int(np.ceil(ring_mm / dx)))
    yy, xx = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    ring = ((yy * dy) ** 2 + (xx * dx) ** 2 <= ring_mm**2)[None]
    inside = labels > 0
    out: list[ComponentDensity] = []
    for index, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None:
            out.append(ComponentDensity(float("nan"), float("nan")))
            continue
        box = tuple(
            slice(max(s.start - pad, 0), min(s.stop + pad, dim))
            for s, pad, dim in zip(sl, (0, ry, rx), labels.shape, strict=True)
        )
        comp = labels[box] == index + 1
        around = ndimage.binary_dilation(comp, structure=ring) & lung[box] & ~inside[box]
        background = float(np.median(density[box][around])) if around.any() else -1000.0
        opened = float(np.median(density[box][comp]))
        out.append(ComponentDensity(opened - background, float(np.median(hu[box][comp])) - opened))
    return out


def faint_thick_slice_lesions(
    lesions: B, hu: F32, lungs: U8, grid: WorkGrid, rule: ThickSliceRule = ThickSliceRule()
) -> ThickSliceResult:
    """The network lesion components of a thick-slice volume that are vessel haze (module docstring).

    Parameters
    ----------
    lesions : ndarray of bool
        The network's lesions on the working grid (probability above its threshold, inside ``lungs``).
    hu : ndarray of float32
        Working-grid HU.
    lungs : ndarray of uint8
        Working-grid lung labels (the lungs as extended over the network's lesions).
    grid : WorkGrid
    rule : ThickSliceRule

    Returns
    -------
    ThickSliceResult
        ``applied`` False (nothing judged) when the slices are not thicker than ``rule.thick_slice_mm``.
    """
    none = np.zeros(lesions.shape, bool)
    if grid.coarse_spacing[0] <= rule.thick_slice_mm:
        return ThickSliceResult(False, none)
    lung = lungs > 0
    mask = lesions & lung
    if not mask.any():
        return ThickSliceResult(True, none)
    labels, _ = label_compact(mask, np.ones((3, 3, 3), bool))
    density = classical_lesions(hu, lungs, grid, ClassicalParams()).density
    assert density is not None  # classical_lesions always returns it
    found = component_densities(labels, hu, density, lung, grid, rule.contrast_ring_mm)
    haze = [
        i + 1
        for i, c in enumerate(found)
        if c.contrast < rule.min_contrast_hu and c.narrow >= rule.min_narrow_hu
    ]
    dropped: B = np.isin(labels, haze) if haze else none
    return ThickSliceResult(True, dropped, tuple(found), tuple(found[i - 1] for i in haze))


__all__ = [
    "THICK_SLICE_MM",
    "ComponentDensity",
    "ThickSliceResult",
    "ThickSliceRule",
    "component_densities",
    "faint_thick_slice_lesions",
]
