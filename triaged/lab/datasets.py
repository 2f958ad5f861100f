"""Files of synthetic studies: DICOM study folders and the labelled NIfTI dataset (lab, file I/O).

The phantom package builds arrays and Datasets; this module is the only one that writes them. Real
labelled sets (MedSeg slice sets, manifests of real DICOM series) are read by :mod:`triaged.lab.realsets`;
``triaged eval`` tells the kinds apart by what its path holds.

Labelled dataset format (training and evaluation)
-------------------------------------------------
::

    <root>/
      labels.csv
      <case_id>/
        image.nii.gz           int16, Hounsfield units (no scaling)
        lungs.nii.gz           uint8, 0 background, 1 right lung, 2 left lung
        lobes.nii.gz           uint8, 0, 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL
        lesions.nii.gz         uint8, 1 = pneumonia lesion (ground glass or consolidation)
        consolidation.nii.gz   uint8, 1 = consolidated part of the lesion
        findings.nii.gz        uint8, other pathology: 1 nodule/mass, 2 pleural effusion,
                               3 atelectasis, 4 emphysema

All six files share one grid. NIfTI-1 stores the data with i = image column, j = image row, k = slice,
and its qform and sform (both code 1, scanner) map (i, j, k) to RAS millimetres; they are the DICOM
LPS affine with x and y negated, so viewers show the anatomy the right way round. Geometry written by
the phantom is a multiple of 2⁻¹⁰ mm and therefore survives NIfTI's float32 header exactly.
:meth:`Case.hu` and :meth:`Case.mask` return arrays in the (z, y, x) order the rest of triaged uses
(z increasing superior) and :meth:`Case.geometry` the LPS affine.

``labels.csv`` has one row per case, in this column order:

=====================  ======================================================================
case_id                folder name of the case
label                  healthy, covid, bacterial or other
affected_pct_left      lesion / lung voxels × 100, left lung
affected_pct_right     same, right lung
affected_pct_max       the worse lung (study severity of seed 004)
whole_lung_pct         lesion / lung voxels × 100 over both lungs (Wu et al.)
consolidation_pct      consolidation / lung voxels × 100 over both lungs
ct_grade               0–4 for CT0–CT4
seed                   phantom seed
spec                   the full PhantomSpec as JSON (regenerates the case exactly)
=====================  ======================================================================
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nibabel as nib
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from triaged.domain import Volume
from triaged.lab.phantom import GroundTruth, Phantom, PhantomSpec, generate, study_uid, to_datasets

LABEL_COLUMNS: Final[tuple[str, ...]] = (
    "case_id",
    "label",
    "affected_pct_left",
    "affected_pct_right",
    "affected_pct_max",
    "whole_lung_pct",
    "consolidation_pct",
    "ct_grade",
    "seed",
    "spec",
)
MASKS: Final[tuple[str, ...]] = ("lungs", "lobes", "lesions", "consolidation", "findings")
IMAGE_FILE: Final[str] = "image.nii.gz"
LABELS_FILE: Final[str] = "labels.csv"


def _flip_xy(affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """LPS ↔ RAS: negate the x and y rows of a 4 × 4 affine (its own inverse)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, np.float64)


# ---- DICOM --------------------------------------------------------------------------------------------
def write_dicom_study(datasets: Iterable[Dataset], out_dir: Path) -> list[Path]:
    """Write instances as ``<out_dir>/S<series number>/I<instance number>.dcm`` (DICOM Part 10 files).

    Parameters
    ----------
    datasets : iterable of pydicom.Dataset
        Instances with ``file_meta`` (as :func:`triaged.lab.phantom.to_datasets` returns them).
    out_dir : Path
        Folder of the study; created if needed.

    Returns
    -------
    list of Path
        The files written, in the order given.
    """
    paths: list[Path] = []
    for ds in datasets:
        folder = Path(out_dir) / f"S{int(ds.SeriesNumber):03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"I{int(ds.InstanceNumber):05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---- NIfTI --------------------------------------------------------------------------------------------
def _save_nifti(array: npt.NDArray[np.generic], affine_lps: npt.NDArray[np.float64], path: Path) -> None:
    affine_ras = _flip_xy(affine_lps)
    img = nib.Nifti1Image(array.transpose(2, 1, 0), affine_ras)
    img.set_qform(affine_ras, code=1)
    img.set_sform(affine_ras, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(array.dtype)
    img.header["descrip"] = b"triaged synthetic phantom, research only"
    nib.save(img, str(path))


def _load_nifti(path: Path) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    img = nib.load(str(path))
    assert isinstance(img, nib.Nifti1Image)
    data = np.asarray(img.dataobj.get_unscaled())  # type: ignore[attr-defined]
    slope, inter = img.header.get_slope_inter()
    if slope not in (None, 1.0) or inter not in (None, 0.0):
        data = data * (slope or 1.0) + (inter or 0.0)
    affine_lps = _flip_xy(img.affine)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), affine_lps


def label_row(case_id: str, truth: GroundTruth, spec: PhantomSpec) -> dict[str, str]:
    """The ``labels.csv`` row of one case."""
    return {
        "case_id": case_id,
        "label": truth.label,
        "affected_pct_left": f"{truth.affected_pct_left:.4f}",
        "affected_pct_right": f"{truth.affected_pct_right:.4f}",
        "affected_pct_max": f"{truth.affected_pct_max:.4f}",
        "whole_lung_pct": f"{truth.whole_lung_pct:.4f}",
        "consolidation_pct": f"{truth.consolidation_pct:.4f}",
        "ct_grade": str(truth.ct_grade),
        "seed": str(spec.seed),
        "spec": json.dumps(dataclasses.asdict(spec), sort_keys=True),
    }


def write_case(phantom: Phantom, out_dir: Path, case_id: str) -> Path:
    """Write one case's image and masks as ``<out_dir>/<case_id>/*.nii.gz`` (format in the module doc).

    Returns
    -------
    Path
        The case folder. ``labels.csv`` is not touched (see :func:`append_label`).
    """
    folder = Path(out_dir) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    affine = phantom.affine
    jobs = [(phantom.hu, folder / IMAGE_FILE)]
    jobs += [(getattr(phantom.truth, name), folder / f"{name}.nii.gz") for name in MASKS]
    # gzip releases the GIL: compress the six files side by side
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        for future in [pool.submit(_save_nifti, array, affine, path) for array, path in jobs]:
            future.result()
    return folder


def append_label(out_dir: Path, row: dict[str, str]) -> None:
    """Append a row to ``<out_dir>/labels.csv``, writing the header first if the file is new."""
    path = Path(out_dir) / LABELS_FILE
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(LABEL_COLUMNS))
        if new:
            writer.writeheader()
        writer.writerow(row)


def case_id_of(spec: PhantomSpec, index: int | None = None) -> str:
    """Folder name of a case, e.g. ``case-0007-covid`` or ``covid40-seed12``."""
    if index is not None:
        return f"case-{index:04d}-{spec.kind}"
    return f"{spec.name.lower()}-seed{spec.seed}"


def write_dataset(specs: Sequence[PhantomSpec], out_dir: Path, progress: bool = True) -> list[Path]:
    """Generate and write a labelled dataset (format in the module docstring).

    Rows are appended to ``labels.csv`` as cases finish, so an interrupted run keeps what it wrote.

    Parameters
    ----------
    specs : sequence of PhantomSpec
        One per case (see :func:`triaged.lab.phantom.dataset_specs`).
    out_dir : Path
        Root folder; created if needed. An existing ``labels.csv`` there is replaced.
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    list of Path
        The case folders.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / LABELS_FILE).unlink(missing_ok=True)
    folders: list[Path] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc="phantoms", unit="case", file=sys.stderr)
    for i, spec in enumerate(specs):
        case_id = case_id_of(spec, i)
        phantom = generate(spec)
        folders.append(write_case(phantom, root, case_id))
        append_label(root, label_row(case_id, phantom.truth, spec))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return folders


@dataclass(frozen=True)
class DemoStudy:
    """What :func:`write_demo_study` wrote."""

    dicom_dir: Path
    dicom_files: list[Path]
    truth_dir: Path
    case: Path


def write_demo_study(spec: PhantomSpec, out_dir: Path) -> DemoStudy:
    """Write a phantom study for the demo: ``<out_dir>/dicom/`` (the study, ready to C-STORE) and
    ``<out_dir>/truth/`` (its ground truth as a one-case labelled dataset)."""
    root = Path(out_dir)
    phantom = generate(spec)
    files = write_dicom_study(to_datasets(phantom), root / "dicom")
    truth_dir = root / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    (truth_dir / LABELS_FILE).unlink(missing_ok=True)
    case_id = case_id_of(spec)
    case = write_case(phantom, truth_dir, case_id)
    append_label(truth_dir, label_row(case_id, phantom.truth, spec))
    return DemoStudy(root / "dicom", files, truth_dir, case)


# ---- reading ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One labelled case; arrays are read from disk only when asked for."""

    case_id: str
    directory: Path
    label: str
    affected_pct_left: float
    affected_pct_right: float
    affected_pct_max: float
    whole_lung_pct: float
    consolidation_pct: float
    ct_grade: int
    seed: int
    spec: PhantomSpec | None

    def hu(self) -> npt.NDArray[np.int16]:
        """The image, (z, y, x) int16 HU."""
        data, _ = _load_nifti(self.directory / IMAGE_FILE)
        return data.astype(np.int16, copy=False)

    def mask(self, name: str) -> npt.NDArray[np.uint8]:
        """One mask (``lungs``, ``lobes``, ``lesions``, ``consolidation``, ``findings``), (z, y, x)."""
        if name not in MASKS:
            raise ValueError(f"unknown mask {name!r}; one of {MASKS}")
        data, _ = _load_nifti(self.directory / f"{name}.nii.gz")
        return data.astype(np.uint8, copy=False)

    def geometry(self) -> tuple[tuple[float, float, float], npt.NDArray[np.float64]]:
        """((z, y, x) spacing mm, 4 × 4 affine index (column, row, slice) → LPS mm), from the header."""
        img = nib.load(str(self.directory / IMAGE_FILE))
        affine = _flip_xy(img.affine)  # type: ignore[attr-defined]
        sx, sy, sz = (float(np.linalg.norm(affine[:3, i])) for i in range(3))
        return (sz, sy, sx), affine

    def volume(self) -> Volume:
        """The image as a :class:`~triaged.domain.Volume` (synthetic UIDs from the spec if known)."""
        data, affine = _load_nifti(self.directory / IMAGE_FILE)
        sx, sy, sz = (float(np.linalg.norm(affine[:3, i])) for i in range(3))
        if self.spec is not None:
            # reuse the phantom's UIDs so results can be matched with the DICOM version
            nz = data.shape[0]
            sops = tuple(study_uid(self.spec, "sop-axial", i) for i in range(nz))
            series, study = study_uid(self.spec, "series-axial"), study_uid(self.spec)
        else:
            sops = tuple(f"2.25.{i + 1}" for i in range(data.shape[0]))
            series, study = "2.25.1", "2.25.2"
        return Volume(
            hu=data.astype(np.int16, copy=False),
            spacing=(sz, sy, sx),
            affine=affine,
            sop_instance_uids=sops,
            series_instance_uid=series,
            study_instance_uid=study,
        )

    def truth(self) -> GroundTruth:
        """All masks and labels as a :class:`~triaged.lab.phantom.GroundTruth` (vessels are not stored:
        that mask comes back empty)."""
        spacing, affine = self.geometry()
        masks = {name: self.mask(name) for name in MASKS}
        label = self.label
        assert label in ("healthy", "covid", "bacterial", "other")
        return GroundTruth(
            label=label,  # type: ignore[arg-type]
            lungs=masks["lungs"],
            lobes=masks["lobes"],
            lesions=masks["lesions"],
            consolidation=masks["consolidation"],
            vessels=np.zeros_like(masks["lungs"]),
            findings=masks["findings"],
            affected_pct_right=self.affected_pct_right,
            affected_pct_left=self.affected_pct_left,
            whole_lung_pct=self.whole_lung_pct,
            consolidation_pct=self.consolidation_pct,
            ct_grade=self.ct_grade,
            spacing=spacing,
            affine=affine,
        )


def _spec_from_json(text: str) -> PhantomSpec | None:
    if not text:
        return None
    fields = json.loads(text)
    known = {f.name for f in dataclasses.fields(PhantomSpec)}
    return PhantomSpec(**{k: v for k, v in fields.items() if k in known})


def read_dataset(root: Path) -> list[Case]:
    """The cases listed in ``<root>/labels.csv`` (arrays are loaded lazily by each :class:`Case`).

    Raises
    ------
    FileNotFoundError
        If there is no ``labels.csv`` or a listed case has no image.
    ValueError
        If ``labels.csv`` lacks a required column.
    """
    root = Path(root)
    with (root / LABELS_FILE).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in LABEL_COLUMNS[:-1] if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{root / LABELS_FILE}: missing columns {missing}")
        rows = list(reader)
    cases: list[Case] = []
    for row in rows:
        folder = root / row["case_id"]
        if not (folder / IMAGE_FILE).is_file():
            raise FileNotFoundError(f"{folder / IMAGE_FILE} listed in {root / LABELS_FILE} is missing")
        cases.append(
            Case(
                case_id=row["case_id"],
                directory=folder,
                label=row["label"],
                affected_pct_left=float(row["affected_pct_left"]),
                affected_pct_right=float(row["affected_pct_right"]),
                affected_pct_max=float(row["affected_pct_max"]),
                whole_lung_pct=float(row["whole_lung_pct"]),
                consolidation_pct=float(row["consolidation_pct"]),
                ct_grade=int(row["ct_grade"]),
                seed=int(row["seed"]),
                spec=_spec_from_json(row.get("spec") or ""),
            )
        )
    return cases


def regenerate(case: Case) -> Phantom:
    """The phantom of a case, regenerated from its spec (bit-identical to what was written)."""
    if case.spec is None:
        raise ValueError(f"case {case.case_id} has no spec to regenerate from")
    return generate(case.spec)


__all__ = [
    "IMAGE_FILE",
    "LABELS_FILE",
    "LABEL_COLUMNS",
    "MASKS",
    "Case",
    "DemoStudy",
    "append_label",
    "case_id_of",
    "label_row",
    "read_dataset",
    "regenerate",
    "write_case",
    "write_dataset",
    "write_demo_study",
    "write_dicom_study",
]
