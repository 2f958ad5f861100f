"""Real 8-bit CT slices as one-slice volumes the pipelines can analyse (pure logic, no file I/O).

The labelled real slices (MedSeg / Ma et al. JPGs, ``../shared/data/real/medseg-covid-slices``) are
exported crops: no Hounsfield units, no pixel spacing, and the crop usually cuts through the chest wall,
so there is no air around the body. To run a pipeline on one:

1. grey → HU with the display window estimated from the slice's (or its source's) landmarks
   (:mod:`triaged.analysis.window`);
2. pixel spacing assumed so that the longer side spans :data:`ASSUMED_FIELD_MM` (the learned models'
   training grid: :data:`REAL_LONG_SIDE` pixels at :data:`TARGET_MM`, ``triaged.lab.data``);
3. the slice is embedded in a synthetic body outline — :data:`WALL_MM` of soft tissue
   (:data:`WALL_HU`) then :data:`AIR_MM` of air — so the non-learned lung segmentation finds a body with
   air outside it; the pipeline's masks are cropped back to the slice before scoring;
4. it becomes a one-slice :class:`~triaged.domain.Volume` with an assumed slice thickness
   :data:`SLICE_MM` (the images are mostly 5 mm Radiopaedia/MedSeg slices).

Orientation: the lung segmentation looks for the two lungs on either side of the body's midline (image
columns), but the MedSeg/Inf-Net and Ma et al. slices are stored transposed (lungs above and below each
other; measured: 49 of 50 doctor-labelled and 1,598 of 1,600 pseudo-labelled slices by
:func:`lungs_stacked_vertically`, and the rest are dome slices that read the same way by eye). Without a
transpose the non-learned front end keeps one lung per slice and misses the other lung's lesions. The
evaluation therefore transposes a whole set when most of its slices show stacked lungs, and transposes
the masks back. Left and right of such a volume still mean nothing (mirroring is not known); only the
union of the lesion masks is scored.

The fixed validation splits of the doctor-labelled slices (:data:`DOCTOR_VALIDATION`) and of the
pseudo-labelled volumes (:data:`PSEUDO_VALIDATION`) live here so that both the training code
(``triaged.lab``) and the evaluation (``triaged.lab.realsets``) can import them.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from triaged.domain import Volume

#: In-plane target grid of the pipelines, mm (seed 004).
TARGET_MM: Final[float] = 2.0
#: Longer side of a real slice on the learned models' training grid, pixels (``triaged.lab.data``).
REAL_LONG_SIDE: Final[int] = 160
#: Assumed extent of a slice's longer side, mm (REAL_LONG_SIDE pixels of TARGET_MM).
ASSUMED_FIELD_MM: Final[float] = REAL_LONG_SIDE * TARGET_MM
#: Assumed slice thickness of a real slice, mm.
SLICE_MM: Final[float] = 5.0
#: Synthetic body outline around an embedded slice: soft-tissue band and air beyond it.
WALL_MM: Final[float] = 10.0
WALL_HU: Final[int] = 40
AIR_MM: Final[float] = 20.0
AIR_HU: Final[int] = -1000

#: Doctor-labelled slices (file stems) held out from every training run; the same stems in the
#: ``multiclass`` subset; ``triaged.lab.data`` imports it from here, so training and eval hold out the same slices.
DOCTOR_VALIDATION: Final[tuple[str, ...]] = (
    "44",
    "45",
    "46",
    "47",
    "49",
    "50",
    "51",
    "52",
    "53",
    "54",
    "55",
    "56",
    "57",
    "58",
    "67",
)

#: Pseudo-labelled volumes (``<source>`` of the ``<source>_<index>`` stems) held out from every training
#: run, whole volumes; ``triaged.lab.data`` imports it from here, so training and eval hold out the same.
PSEUDO_VALIDATION: Final[tuple[str, ...]] = (
    "Data-1_coronacases_org_003",
    "Data-1_coronacases_org_009",
    "Data-1_radiopaedia_org_covid-19-pneumonia-14_85914_0-dcm",
    "Data-1_radiopaedia_org_covid-19-pneumonia-36_86526_0-dcm",
)


def lungs_stacked_vertically(grey: npt.ArrayLike) -> bool:
    """Whether a slice shows its lungs above and below each other (a transposed or rotated export).

    The dark pixels (below the midpoint of the 10th and 90th grey percentiles) are counted in the central
    fifth of the rows and of the columns: in an axial slice shown the usual way the mediastinum makes the
    central *columns* bright, so a darker column band than row band means the lungs sit left and right.
    Unreliable on dome slices (liver/heart filling the middle): decide per set (majority), not per slice.
    """
    g = np.asarray(grey, np.float32)
    if g.ndim != 2 or min(g.shape) < 10:
        raise ValueError(f"expected one 2D slice, got shape {g.shape}")
    lo, hi = np.percentile(g, [10, 90])
    dark = g < (lo + hi) / 2.0
    h, w = g.shape
    rows = dark[int(0.4 * h) : int(0.6 * h), int(0.1 * w) : int(0.9 * w)].mean()
    cols = dark[int(0.1 * h) : int(0.9 * h), int(0.4 * w) : int(0.6 * w)].mean()
    return bool(rows < cols)


def assumed_pixel_mm(shape: tuple[int, ...]) -> float:
    """Pixel spacing assumed for a slice of ``shape`` (H, W): :data:`ASSUMED_FIELD_MM` / longer side."""
    return ASSUMED_FIELD_MM / float(max(shape[0], shape[1]))


def slice_volume(
    hu: npt.ArrayLike, pixel_mm: float, *, slice_mm: float = SLICE_MM, uid_suffix: int = 1
) -> tuple[Volume, tuple[slice, slice]]:
    """Embed one HU slice (H, W) in a synthetic body outline and wrap it as a one-slice volume.

    Parameters
    ----------
    hu : array_like (H, W)
        The slice in HU.
    pixel_mm : float
        Assumed in-plane spacing (:func:`assumed_pixel_mm`).
    slice_mm : float
        Assumed slice thickness.
    uid_suffix : int
        Makes the synthetic UIDs (``2.25.<n>``) differ between slices.

    Returns
    -------
    volume : Volume
        (1, H + 2p, W + 2p) int16 HU, identity orientation, ``pixel_mm`` spacing.
    crop : tuple of slice
        Rows and columns of the original slice inside the volume's plane.
    """
    img = np.asarray(hu, np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected one 2D slice, got shape {img.shape}")
    if not pixel_mm > 0:
        raise ValueError(f"pixel spacing must be positive, got {pixel_mm}")
    wall = max(1, round(WALL_MM / pixel_mm))
    air = max(1, round(AIR_MM / pixel_mm))
    out = np.pad(np.round(np.clip(img, -1024, 3071)).astype(np.int16), wall, constant_values=WALL_HU)
    out = np.pad(out, air, constant_values=AIR_HU)
    pad = wall + air
    affine = np.diag([pixel_mm, pixel_mm, slice_mm, 1.0])
    n = int(uid_suffix)
    volume = Volume(
        hu=out[None],
        spacing=(float(slice_mm), float(pixel_mm), float(pixel_mm)),
        affine=affine,
        sop_instance_uids=(f"2.25.{3 * n}",),
        series_instance_uid=f"2.25.{3 * n + 1}",
        study_instance_uid=f"2.25.{3 * n + 2}",
    )
    return volume, (slice(pad, pad + img.shape[0]), slice(pad, pad + img.shape[1]))


__all__ = [
    "AIR_HU",
    "AIR_MM",
    "ASSUMED_FIELD_MM",
    "DOCTOR_VALIDATION",
    "PSEUDO_VALIDATION",
    "REAL_LONG_SIDE",
    "SLICE_MM",
    "TARGET_MM",
    "WALL_HU",
    "WALL_MM",
    "assumed_pixel_mm",
    "lungs_stacked_vertically",
    "slice_volume",
]
