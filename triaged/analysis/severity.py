"""Masks → :class:`~triaged.domain.Findings`: per-lung volumes, CT grade, key slices and lesion boxes.

Seed 004 (Goncharov et al. 2021, Section 2.1) ranks studies by the affected fraction of the worse lung:
lesion volume / lung volume for each lung, the maximum of the two. The CT0–CT4 grade follows from it
(:meth:`~triaged.domain.CTGrade.from_affected_pct`), with an explicit CT0: a study is CT0 ("no
findings") unless its worse lung is at least :data:`~triaged.domain.CT1_MIN_PCT` % affected and its
lesions total at least :data:`~triaged.domain.CT1_MIN_ML` mL; the provenance records why
(``grade.reason``). Seed 001 (Wu et al. 2020) reports the whole-lung
ratio and a consolidation score (consolidation / lung volume), both available from the
:class:`~triaged.domain.Findings` properties. Volumes are voxel counts times the voxel volume
(``Volume.spacing``).

The CT severity score (CT-SS; Chung et al., Radiology 2020; Pan et al., Radiology 2020) scores each of
the five lobes 0–5 by its affected percentage (:func:`ctss_lobe_score`, bands
:data:`~triaged.domain.CTSS_BANDS`) and sums them (0–25) when the masks carry lobes. A study graded
CT0 ("no findings") scores 0 in every lobe, so the two scales never disagree about whether there is
pneumonia.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from triaged.analysis.arrays import component_sizes, label_compact, slab_slices
from triaged.domain import CTSS_BANDS, CTGrade, Findings, LesionBox, LobeMeasures, LungMeasures, Masks, Volume

B = npt.NDArray[np.bool_]
U8 = npt.NDArray[np.uint8]

#: Lesion boxes kept per study (the largest ones): enough for a reader, few enough for an SR.
MAX_LESION_BOXES = 10
#: Key slices reported per study.
KEY_SLICES = 3


def voxel_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in mL from (z, y, x) spacing in mm."""
    return float(spacing[0]) * float(spacing[1]) * float(spacing[2]) / 1000.0


def lung_measures(
    lungs: U8, lesions: B, consolidation: B, spacing: Sequence[float]
) -> tuple[LungMeasures, LungMeasures]:
    """(right, left) lung, lesion and consolidation volumes in mL.

    Lesion and consolidation voxels count for the lung that holds them; voxels outside both lungs do
    not count (the affected fraction is defined inside the lungs, seed 004 Section 2.1).

    Parameters
    ----------
    lungs : ndarray of uint8
        0 background, 1 right, 2 left.
    lesions, consolidation : ndarray of bool
    spacing : sequence of float
        (z, y, x) mm.

    Returns
    -------
    tuple of LungMeasures
    """
    ml = voxel_ml(spacing)
    # one pass over the volume, in slabs: code = lung label + 3·lesion + 6·consolidation (a slab of
    # about a million voxels: np.bincount counts through an intp copy, 8 bytes per voxel)
    counts = np.zeros(12, np.int64)
    step = slab_slices(lungs.shape).step
    for z0 in range(0, lungs.shape[0], step):
        zs = slice(z0, z0 + step)
        code = lungs[zs].astype(np.uint8, copy=True)
        code += 3 * lesions[zs].view(np.uint8)
        code += 6 * consolidation[zs].view(np.uint8)
        counts += np.bincount(code.ravel(), minlength=12)[:12]
    lung_n = [0, 0, 0]
    lesion_n = [0, 0, 0]
    cons_n = [0, 0, 0]
    for code_value, n in enumerate(counts.tolist()):
        side, flags = code_value % 3, code_value // 3
        lung_n[side] += n
        if flags & 1:
            lesion_n[side] += n
        if flags & 2:
            cons_n[side] += n
    right = LungMeasures(float(lung_n[1]) * ml, float(lesion_n[1]) * ml, float(cons_n[1]) * ml)
    left = LungMeasures(float(lung_n[2]) * ml, float(lesion_n[2]) * ml, float(cons_n[2]) * ml)
    return right, left


def ctss_lobe_score(affected_pct: float) -> int:
    """CT severity score of one lobe from its affected percentage.

    0 when nothing is affected, 1 below 5 %, 2 for 5–25 %, 3 for more than 25 up to 50 %, 4 for more
    than 50 up to 75 %, 5 above 75 % (:data:`~triaged.domain.CTSS_BANDS`; a value on a boundary takes
    the lower score, except 5 % which is the first value of score 2).
    """
    if not affected_pct > 0:  # also NaN
        return 0
    if affected_pct < CTSS_BANDS[0]:
        return 1
    for score, upper in enumerate(CTSS_BANDS[1:], start=2):
        if affected_pct <= upper:
            return score
    return 5


def lobe_measures(
    lobes: U8, lesions: B, spacing: Sequence[float], *, no_findings: bool = False
) -> tuple[LobeMeasures, ...]:
    """Volume, lesion volume and CT-SS score of each lobe present (labels 1–5), counted slab by slab.

    Parameters
    ----------
    lobes : ndarray of uint8
        0 background, 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL.
    lesions : ndarray of bool
    spacing : sequence of float
        (z, y, x) mm.
    no_findings : bool
        The study is CT0: every lobe scores 0 whatever its lesion voxels.

    Returns
    -------
    tuple of LobeMeasures
        Lobes without voxels are left out.
    """
    ml = voxel_ml(spacing)
    counts = np.zeros(12, np.int64)
    step = slab_slices(lobes.shape).step
    for z0 in range(0, lobes.shape[0], step):
        zs = slice(z0, z0 + step)
        code = np.minimum(lobes[zs], 5).astype(np.uint8, copy=True)
        code += 6 * lesions[zs].view(np.uint8)
        counts += np.bincount(code.ravel(), minlength=12)[:12]
    out = []
    for label in range(1, 6):
        total = int(counts[label] + counts[label + 6])
        if total == 0:
            continue
        lesion = int(counts[label + 6])
        pct = 100.0 * lesion / total
        out.append(LobeMeasures(label, total * ml, lesion * ml, 0 if no_findings else ctss_lobe_score(pct)))
    return tuple(out)


def key_slices(lesions: B, count: int = KEY_SLICES) -> tuple[int, ...]:
    """The z indices with the largest lesion area, largest first (ties: lower z first).

    Slices without lesion are never key slices, so a study without lesions has none.
    """
    area = lesions.sum(axis=(1, 2))
    order = np.lexsort((np.arange(len(area)), -area))
    return tuple(int(z) for z in order[:count] if area[z] > 0)


def lesion_boxes(
    volume: Volume, lungs: U8, lesions: B, limit: int = MAX_LESION_BOXES
) -> tuple[LesionBox, ...]:
    """Bounding boxes of the largest 3D lesion components, each on the slice where it is largest.

    Components are 26-connected. For each of the ``limit`` largest: the slice of largest area, the
    component's 2D bounding box on it (pixel rows and columns of that image, inclusive), the SOP
    Instance UID (and frame number for multi-frame sources) of that slice, its volume, and the side
    of the lung holding most of it.

    Parameters
    ----------
    volume : Volume
    lungs : ndarray of uint8
    lesions : ndarray of bool
    limit : int

    Returns
    -------
    tuple of LesionBox
        Largest first.
    """
    if not lesions.any():
        return ()
    # label only inside the lesions' bounding box: the volume is mostly empty
    zz = np.nonzero(lesions.any(axis=(1, 2)))[0]
    yy = np.nonzero(lesions[zz[0] : zz[-1] + 1].any(axis=(0, 2)))[0]
    xx = np.nonzero(lesions[zz[0] : zz[-1] + 1].any(axis=(0, 1)))[0]
    origin = (int(zz[0]), int(yy[0]), int(xx[0]))
    box = lesions[zz[0] : zz[-1] + 1, yy[0] : yy[-1] + 1, xx[0] : xx[-1] + 1]
    # uint16 labels and slab-wise counts: int32 labels and np.bincount's intp copy of them would be
    # 12 bytes per voxel of the box (triaged.analysis.arrays)
    labels, n = label_compact(box, np.ones((3, 3, 3), bool))
    lungs = lungs[zz[0] : zz[-1] + 1, yy[0] : yy[-1] + 1, xx[0] : xx[-1] + 1]
    sizes = component_sizes(labels, n)
    sizes[0] = 0
    order = np.argsort(sizes)[::-1][: min(limit, n)]
    objects = ndimage.find_objects(labels)
    ml = voxel_ml(volume.spacing)
    boxes: list[LesionBox] = []
    for lab_id in order:
        if sizes[lab_id] == 0:
            break
        sl = objects[lab_id - 1]
        if sl is None:
            continue
        comp = labels[sl] == lab_id
        areas = comp.sum(axis=(1, 2))
        k = int(np.argmax(areas))
        rows = np.nonzero(comp[k].any(axis=1))[0]
        cols = np.nonzero(comp[k].any(axis=0))[0]
        z = origin[0] + sl[0].start + k
        sides = np.bincount(lungs[sl][comp], minlength=3)
        side = "left" if sides[2] > sides[1] else "right"
        boxes.append(
            LesionBox(
                z=int(z),
                sop_instance_uid=volume.sop_instance_uids[z] if z < len(volume.sop_instance_uids) else "",
                row_min=int(origin[1] + sl[1].start + rows[0]),
                col_min=int(origin[2] + sl[2].start + cols[0]),
                row_max=int(origin[1] + sl[1].start + rows[-1]),
                col_max=int(origin[2] + sl[2].start + cols[-1]),
                volume_ml=float(sizes[lab_id]) * ml,
                side=side,
                frame_number=int(volume.frame_numbers[z]) if z < len(volume.frame_numbers) else None,
            )
        )
    return tuple(boxes)


def findings_from_masks(
    volume: Volume,
    masks: Masks,
    *,
    pipeline: str,
    version: str,
    provenance: Sequence[tuple[str, str]] = (),
    warnings: Sequence[str] = (),
    p_covid: float | None = None,
) -> Findings:
    """Everything a pipeline reports, measured from its masks (seed 004 Section 2.1; seed 001).

    Parameters
    ----------
    volume : Volume
        The analysed volume (spacing, SOP Instance UIDs, frame numbers).
    masks : Masks
        Lungs, lesions and consolidation on the volume's grid.
    pipeline, version : str
        Name and version of the pipeline.
    provenance : sequence of (str, str)
        Thresholds, timings and method choices, recorded as given.
    warnings : sequence of str
        Appended after the volume's own warnings.
    p_covid : float or None
        Identification probability, for pipelines that estimate one.

    Returns
    -------
    Findings
    """
    right, left = lung_measures(masks.lungs, masks.lesions, masks.consolidation, volume.spacing)
    worse = max(right.affected_pct, left.affected_pct)
    lesion_ml = right.lesion_ml + left.lesion_ml
    all_warnings = list(volume.warnings) + list(warnings)
    if right.lung_ml == 0 or left.lung_ml == 0:
        all_warnings.append("one lung has no volume: its affected fraction is reported as 0 %")
    grade = CTGrade.from_affected_pct(worse, lesion_ml)
    lobes = (
        lobe_measures(masks.lobes, masks.lesions, volume.spacing, no_findings=grade == CTGrade.CT0)
        if masks.lobes is not None
        else ()
    )
    return Findings(
        pipeline=pipeline,
        pipeline_version=version,
        right=right,
        left=left,
        ct_grade=grade,
        key_slices=key_slices(masks.lesions),
        lesion_boxes=lesion_boxes(volume, masks.lungs, masks.lesions),
        p_covid=p_covid,
        provenance=(*provenance, ("grade.reason", CTGrade.reason(worse, lesion_ml))),
        warnings=tuple(all_warnings),
        lobes=lobes,
    )
