"""Real inputs for the encoder tests: the real CT series, threshold masks, Findings measured on them.

No mocks: the volume is loaded by :mod:`triaged.volume` from the real series, the lungs are a plain
HU threshold inside the body split at the patient midline (LPS x), and a lesion blob is painted into
the right lung so that every output has something to show.
"""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from scipy import ndimage

from triaged.assembly import select_series
from triaged.config import SeriesSelectionConfig
from triaged.domain import CTGrade, Findings, LesionBox, LungMeasures, Masks, Volume
from triaged.volume import load_volume, read_headers


@dataclass(frozen=True)
class Case:
    """One study ready for the encoders."""

    volume: Volume
    source: list[Dataset]
    masks: Masks
    findings: Findings


def load_real_case(root: Path) -> Case:
    """The real series under ``root`` with threshold masks, a lesion blob and Findings measured on them."""
    rels = sorted(p.name for p in root.iterdir() if p.is_file())
    headers, problems = read_headers(root, rels)
    assert not problems, problems
    choice = select_series(headers, SeriesSelectionConfig())
    assert choice.series_uid is not None, choice.reason
    first = pydicom.dcmread(root / choice.instances[0].path, stop_before_pixels=True)
    volume = load_volume(root, choice, str(first.StudyInstanceUID))
    by_uid = {h.sop_instance_uid: h for h in choice.instances}
    source = [
        pydicom.dcmread(root / by_uid[u].path, stop_before_pixels=True) for u in volume.sop_instance_uids
    ]
    masks = threshold_masks(volume)
    return Case(volume, source, masks, findings_from_masks(volume, masks))


def threshold_masks(volume: Volume) -> Masks:
    """Lungs = air-like voxels (< -400 HU) not connected to the air around the patient, split at the
    midline (LPS x) with a 10 mm band left out so the trachea and main bronchi drop; a lesion blob."""
    hu = volume.hu
    air = ndimage.binary_opening(hu < -400, iterations=1)
    labels, n = ndimage.label(air)
    # Air reaching the in-plane border is outside the patient (lungs touch only the first/last slice).
    outside = np.unique(
        np.concatenate([labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]], axis=None)
    )
    sizes = ndimage.sum_labels(air, labels, range(1, n + 1))
    keep = [i + 1 for i, size in enumerate(sizes) if size > 20000 and (i + 1) not in set(outside.tolist())]
    lungs_bool = np.isin(labels, keep)
    # LPS x of each column: patient right is -x, so columns left of the midline are the right lung.
    cols = np.arange(hu.shape[2])
    x_mm = volume.affine[0, 0] * cols + volume.affine[0, 3]
    midline = float(np.median(x_mm[np.any(lungs_bool, axis=(0, 1))]))
    lungs = np.zeros(hu.shape, dtype=np.uint8)
    right_side = (x_mm < midline - 10.0)[None, None, :]
    left_side = (x_mm > midline + 10.0)[None, None, :]
    lungs[lungs_bool & right_side] = 1
    lungs[lungs_bool & left_side] = 2
    # A 40 mm lesion in the middle of the right lung, its core consolidated.
    zz, yy, xx = np.nonzero(lungs == 1)
    centre = np.array([np.median(zz), np.median(yy), np.median(xx)])
    grid = np.ogrid[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    sp = volume.spacing
    dist = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, sp, strict=True)))
    lesions = (dist < 25.0) & (lungs == 1)
    consolidation = (dist < 12.0) & lesions
    return Masks(lungs=lungs, lesions=lesions, consolidation=consolidation)


def findings_from_masks(volume: Volume, masks: Masks, **extra: object) -> Findings:
    """Findings measured on masks, with a lesion box on the slice of largest lesion area."""
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0

    def measures(label: int) -> LungMeasures:
        lung = masks.lungs == label
        return LungMeasures(
            lung_ml=float(lung.sum()) * voxel_ml,
            lesion_ml=float((masks.lesions & lung).sum()) * voxel_ml,
            consolidation_ml=float((masks.consolidation & lung).sum()) * voxel_ml,
        )

    right, left = measures(1), measures(2)
    per_slice = masks.lesions.sum(axis=(1, 2))
    key = tuple(int(z) for z in np.argsort(-per_slice, kind="stable")[:3] if per_slice[z] > 0)
    boxes: list[LesionBox] = []
    if key:
        z = key[0]
        rows, cols = np.nonzero(masks.lesions[z])
        boxes.append(
            LesionBox(
                z=z,
                sop_instance_uid=volume.sop_instance_uids[z],
                row_min=int(rows.min()),
                col_min=int(cols.min()),
                row_max=int(rows.max()),
                col_max=int(cols.max()),
                volume_ml=float(masks.lesions.sum()) * voxel_ml,
                side="right",
            )
        )
    severity = max(right.affected_pct, left.affected_pct)
    base = Findings(
        pipeline="threshold-test",
        pipeline_version="0.0.1",
        right=right,
        left=left,
        ct_grade=CTGrade.from_affected_pct(severity),
        key_slices=key,
        lesion_boxes=tuple(boxes),
        p_covid=0.87,
        class_probabilities=(("covid", 0.87), ("healthy", 0.05), ("bacterial", 0.06), ("other", 0.02)),
        model_sha256="ab" * 32,
    )
    return replace(base, **extra)  # type: ignore[arg-type]


def stretched_case(case: Case, slices: int) -> Case:
    """The case resampled to ``slices`` slices (1 mm-ish steps) with matching synthetic source headers.

    Used to time the SEG encoder at a realistic thin-slice size; the headers are real ones with new
    positions and UIDs, so highdicom sees a consistent series.
    """
    nz = case.volume.hu.shape[0]
    index = np.minimum((np.arange(slices) * nz / slices).astype(int), nz - 1)
    step = case.volume.spacing[0] * nz / slices
    series_uid = generate_uid()
    source: list[Dataset] = []
    uids: list[str] = []
    z0 = float(case.volume.affine[2, 3])
    for k in range(slices):
        ds = copy.deepcopy(case.source[0])
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        pos = list(ds.ImagePositionPatient)
        ds.ImagePositionPatient = [pos[0], pos[1], round(z0 + k * step, 4)]
        ds.SliceThickness = round(step, 4)
        source.append(ds)
        uids.append(str(ds.SOPInstanceUID))
    affine = case.volume.affine.copy()
    affine[2, 2] = step
    volume = replace(
        case.volume,
        hu=case.volume.hu[index],
        spacing=(step, case.volume.spacing[1], case.volume.spacing[2]),
        affine=affine,
        sop_instance_uids=tuple(uids),
        series_instance_uid=series_uid,
    )
    masks = Masks(
        lungs=case.masks.lungs[index],
        lesions=case.masks.lesions[index],
        consolidation=case.masks.consolidation[index],
    )
    return Case(volume, source, masks, findings_from_masks(volume, masks))


def round_trip(ds: Dataset) -> Dataset:
    """Write with dcmwrite (file meta, preamble) to bytes and read back."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def dciodvfy(ds: Dataset, path: Path) -> list[str]:
    """Write ``ds`` to ``path`` and return dciodvfy's output lines (errors and warnings)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy is not installed; `make test` installs it (apt: dicom3tools)")
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    proc = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def errors(lines: list[str]) -> list[str]:
    return [line for line in lines if "Error" in line]


def as_bool(a: npt.NDArray[np.generic]) -> npt.NDArray[np.bool_]:
    return np.asarray(a).astype(bool)
