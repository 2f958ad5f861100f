"""Training and evaluation data for the learned pipelines: phantom volumes and real 8-bit slices.

Two sources, both brought to the grid every learned model works on — axial slices at ≈ 2 mm in-plane
(seed 004, Section 4.1), z untouched — and kept in Hounsfield units:

* **Phantom datasets** in the labelled NIfTI format of :mod:`triaged.lab.datasets` (``labels.csv`` and one
  folder per case).  :func:`read_phantom_dataset` reads that documented format itself (labels.csv +
  nibabel) rather than through the phantom generator's code.  Each case is block-averaged to ≈ 2 mm
  (:class:`triaged.analysis.grid.WorkGrid`) and cropped to its lungs' bounding box.
* **Real COVID-19 slices** (``medseg-covid-slices`` under the real data root): 8-bit JPGs that were
  windowed before export, so they carry no HU, and with *different* windows per source (the Ma et al.
  ``coronacases`` volumes ≈ [−1000, +1700] HU, MedSeg/Radiopaedia ≈ [−1100, +250]).  The window is
  estimated from anatomical landmarks (aerated lung ≈ −850 HU, soft tissue ≈ +40 HU, outside air ≈ −1000
  HU; :mod:`triaged.analysis.window`): per *volume* for the pseudo-labelled slices (the landmarks' medians
  over the volume's slices), per slice for the doctor-labelled ones, falling back to the doctor set's
  median window when a slice's own estimate is implausible (far from the set's median: a slice whose
  lungs are mostly opaque has no aerated-lung mode).  The slices are lung/body crops without pixel
  spacing; we resize each so that its longer side is :data:`REAL_LONG_SIDE` pixels (≈ 2 mm for a
  300–350 mm wide crop) and augment the scale.
* **Real no-pneumonia volumes** (:data:`NEGATIVE_VOLUMES`, DICOM in HU): their lung slices, block-averaged
  to ≈ 2 mm and cropped to the lungs' bounding box as at inference, with empty lesion masks.

Splits of the real data (fixed; nothing here is random):

* ``doctor-label`` (50 slices, radiologist masks, MedSeg via the Inf-Net split) and ``multiclass`` (the
  *same* 50 slices with 1 = ground glass, 2 = consolidation): the 15 slices of
  :data:`DOCTOR_VALIDATION` are held out for :func:`triaged.lab.train.evaluate_real_slices` and never
  trained on; the other 35 may be.
* ``pseudo-label`` (1,600 slices of 20 volumes, model-made masks, CC BY-NC 4.0): the whole volumes of
  :data:`PSEUDO_VALIDATION` are held out (neighbouring slices of one case never straddle the split); the
  other volumes may be trained on.
* real volumes: :data:`NEGATIVE_VOLUMES` may be trained on; :data:`VALIDATION_VOLUMES` never (LIDC-IDRI-0001
  of ``lidc-idri-small`` is the same patient as ``lidc-idri-0001-full`` and is not used either).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from triaged.analysis.grid import WorkGrid
from triaged.analysis.realslice import DOCTOR_VALIDATION, PSEUDO_VALIDATION, REAL_LONG_SIDE, TARGET_MM
from triaged.analysis.window import Window, estimate_window, gray_to_hu
from triaged.lab.paths import real_data_root

# The crop and the z resampling are shared with inference and live in triaged.nets.preprocess; the z
# helpers are re-exported so the lab's callers find every data helper here.
from triaged.nets.preprocess import lung_box
from triaged.nets.preprocess import resample_z as resample_z
from triaged.nets.preprocess import upsample_z as upsample_z

I16 = npt.NDArray[np.int16]
U8 = npt.NDArray[np.uint8]
B = npt.NDArray[np.bool_]
F32 = npt.NDArray[np.float32]


def default_real_slices(root: Path | None = None) -> Path:
    """The real slices folder: ``root`` if given, else ``medseg-covid-slices`` under the real data root
    (:func:`triaged.lab.paths.real_data_root`), resolved at call time."""
    return Path(root) if root is not None else real_data_root() / "medseg-covid-slices"


#: Assumed display window of the 8-bit real slices (lung window): width and level, HU.
REAL_WINDOW_WIDTH: Final[float] = 1500.0
REAL_WINDOW_LEVEL: Final[float] = -600.0
# REAL_LONG_SIDE, TARGET_MM and the hold-outs DOCTOR_VALIDATION and PSEUDO_VALIDATION are owned by
# triaged.analysis.realslice (shared with `triaged eval`); they are re-exported here.


#: Real no-pneumonia volumes used as training negatives (folders under the real data root).
NEGATIVE_VOLUMES: Final[tuple[str, ...]] = (
    "lidc-idri-small/LIDC-IDRI-0002",
    "lidc-idri-small/LIDC-IDRI-0003",
    "chest-ct-lung-pet-ct-dx",
)
#: Real volumes that training never sees (validation of affected % / CT grade); lidc-idri-small/LIDC-IDRI-0001
#: is the same patient as lidc-idri-0001-full and is not used for training either.
VALIDATION_VOLUMES: Final[tuple[str, ...]] = (
    "lidc-idri-0001-full",
    "cmb-crc-01068-chest",
    "ricord-1a-covid-001012",
)

#: Doctor-slice windows further than this from the set's median (HU at grey 0 / grey 255) fall back to it.
WINDOW_FALLBACK_HU: Final[tuple[float, float]] = (150.0, 300.0)


# ---------------------------------------------------------------------------------------- real slices
def hu_from_8bit(values: npt.NDArray[np.generic]) -> F32:
    """Map 8-bit grey levels to HU under the fixed lung window W 1500 / L −600 (the mapping before windows
    were estimated; kept for comparisons — the loaders use :mod:`triaged.analysis.window`)."""
    lo = REAL_WINDOW_LEVEL - REAL_WINDOW_WIDTH / 2.0
    return (lo + REAL_WINDOW_WIDTH * np.asarray(values, np.float32) / 255.0).astype(np.float32)


@dataclass(frozen=True)
class RealSlice:
    """One real slice on the ≈ 2 mm grid.

    Attributes
    ----------
    name : str
        ``<subset>/<file stem>``.
    case : str
        Volume the slice comes from (pseudo-label) or the stem itself (doctor-label).
    index : int
        Slice number within ``case`` (pseudo-label; 0 otherwise).
    hu : ndarray of int16
        HU under the estimated display window (module docstring), (H, W).
    lesion : ndarray of bool
        Infection mask (ground glass + consolidation).
    consolidation : ndarray of bool or None
        Consolidation mask when the slice has a two-class label (multiclass subset).
    """

    name: str
    case: str
    index: int
    hu: I16
    lesion: B
    consolidation: B | None = None
    window: Window | None = None


def _resize(img: F32, shape: tuple[int, int], order: int) -> F32:
    zoom = (shape[0] / img.shape[0], shape[1] / img.shape[1])
    out = ndimage.zoom(img, zoom, order=order, mode="nearest", grid_mode=True)
    return np.asarray(out[: shape[0], : shape[1]], np.float32)


def _target_shape(h: int, w: int, long_side: int = REAL_LONG_SIDE) -> tuple[int, int]:
    s = long_side / max(h, w)
    return max(8, round(h * s)), max(8, round(w * s))


def _read_gray(path: Path) -> npt.NDArray[np.uint8]:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), np.uint8)


def _read_label(path: Path) -> npt.NDArray[np.uint8]:
    from PIL import Image

    with Image.open(path) as im:
        # palette PNGs keep their indices (multiclass 0/1/2); greyscale ones their grey values
        return np.asarray(im if im.mode == "P" else im.convert("L"), np.uint8)


def load_real_slice(
    image: Path,
    mask: Path,
    *,
    name: str,
    case: str,
    index: int = 0,
    multiclass: Path | None = None,
    window: Window | None = None,
) -> RealSlice:
    """Read one JPG slice and its PNG mask(s) onto the ≈ 2 mm grid (module docstring); ``window`` None
    estimates the slice's own display window."""
    grey = _read_gray(image)
    window = window or estimate_window(grey)
    shape = _target_shape(*grey.shape)
    hu = _resize(gray_to_hu(grey, window), shape, order=1)
    lesion = _resize((_read_label(mask) >= 128).astype(np.float32), shape, order=1) >= 0.5
    cons = None
    if multiclass is not None:
        labels = _read_label(multiclass)
        cons = _resize((labels == 2).astype(np.float32), shape, order=1) >= 0.5
    return RealSlice(name, case, index, np.round(hu).astype(np.int16), lesion, cons, window)


def _stem_key(stem: str) -> tuple[int, str]:
    return (int(stem), stem) if stem.isdigit() else (1 << 30, stem)


def load_doctor_slices(root: Path | None = None, *, validation: bool) -> list[RealSlice]:
    """The doctor-labelled slices of the validation split (``validation=True``) or of the training split.

    Consolidation masks come from the ``multiclass`` subset (the same slices) when it is present;
    ``root`` None reads :func:`default_real_slices`.
    """
    root = default_real_slices(root)
    images = root / "doctor-label" / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"{images} is absent (real slices live only on development machines)")
    stems = sorted((p.stem for p in images.glob("*.jpg")), key=_stem_key)
    windows = doctor_windows(root)
    held = set(DOCTOR_VALIDATION)
    chosen = [s for s in stems if (s in held) == validation]
    out: list[RealSlice] = []
    for stem in chosen:
        mc = root / "multiclass" / "labels" / f"{stem}.png"
        out.append(
            load_real_slice(
                images / f"{stem}.jpg",
                root / "doctor-label" / "infection" / f"{stem}.png",
                name=f"doctor-label/{stem}",
                case=f"doctor-{stem}",
                multiclass=mc if mc.is_file() else None,
                window=windows[stem],
            )
        )
    return out


def doctor_windows(root: Path | None = None) -> dict[str, Window]:
    """Display window of every doctor-labelled slice (file stem → window): the slice's own estimate, or
    the set's median window where the estimate is implausible (module docstring).  Images only, no labels;
    ``root`` None reads :func:`default_real_slices`."""
    images = default_real_slices(root) / "doctor-label" / "images"
    own = {p.stem: estimate_window(_read_gray(p)) for p in sorted(images.glob("*.jpg"))}
    if not own:
        return {}
    lo = float(np.median([w.lo_hu for w in own.values()]))
    hi = float(np.median([w.hi_hu for w in own.values()]))
    median = Window(lo, hi, "median of the doctor-labelled set")
    tol_lo, tol_hi = WINDOW_FALLBACK_HU
    return {
        stem: w if abs(w.lo_hu - lo) <= tol_lo and abs(w.hi_hu - hi) <= tol_hi else median
        for stem, w in own.items()
    }


def pseudo_entries(
    root: Path | None = None, *, validation: bool | None = None
) -> list[tuple[str, int, Path]]:
    """``(case, slice index, image path)`` of the pseudo-labelled slices, sorted; ``validation`` as in
    :func:`load_pseudo_slices`; ``root`` None reads :func:`default_real_slices`."""
    images = default_real_slices(root) / "pseudo-label" / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"{images} is absent")
    entries: list[tuple[str, int, Path]] = []
    for p in images.glob("*.jpg"):
        case, _, idx = p.stem.rpartition("_")
        entries.append((case, int(idx), p))
    entries.sort(key=lambda e: (e[0], e[1]))
    if validation is not None:
        held = set(PSEUDO_VALIDATION)
        entries = [e for e in entries if (e[0] in held) == validation]
    return entries


def load_pseudo_slices(
    root: Path | None = None, limit: int | None = None, *, validation: bool | None = None
) -> list[RealSlice]:
    """The pseudo-labelled slices (``<case>_<index>.jpg``), sorted by case and index, each volume under its
    own estimated window; ``validation`` True/False keeps only the held-out / training volumes
    (:data:`PSEUDO_VALIDATION`), None all; ``root`` None reads :func:`default_real_slices`."""
    root = default_real_slices(root)
    entries = pseudo_entries(root, validation=validation)
    if limit is not None:
        entries = entries[:limit]
    masks = root / "pseudo-label" / "infection"
    windows: dict[str, Window] = {}
    for case in dict.fromkeys(e[0] for e in entries):
        paths = [p for c, _, p in entries if c == case]
        windows[case] = estimate_window([_read_gray(p) for p in paths[:: max(1, len(paths) // 24)]])
    return [
        load_real_slice(
            p,
            masks / f"{p.stem}.png",
            name=f"pseudo-label/{p.stem}",
            case=case,
            index=idx,
            window=windows[case],
        )
        for case, idx, p in entries
    ]


def read_dicom_hu(folder: Path) -> tuple[I16, tuple[float, float, float]]:
    """A single-series DICOM folder as (z, y, x) HU (sorted along the slice normal) and its spacing, mm.

    Uncompressed or pylibjpeg-decodable files; padding values become −1024 HU.
    """
    import pydicom

    files = [pydicom.dcmread(str(p)) for p in sorted(Path(folder).rglob("*.dcm"))]
    files = [d for d in files if "PixelData" in d and getattr(d, "Modality", "CT") == "CT"]
    if not files:
        raise FileNotFoundError(f"{folder}: no CT DICOM files")
    iop = np.asarray(files[0].ImageOrientationPatient, np.float64)
    normal = np.cross(iop[:3], iop[3:])
    files.sort(key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, np.float64))))
    pos = [float(np.dot(normal, np.asarray(d.ImagePositionPatient, np.float64))) for d in files]
    dz = float(np.median(np.diff(pos))) if len(pos) > 1 else float(getattr(files[0], "SliceThickness", 1.0))
    out = np.empty((len(files), int(files[0].Rows), int(files[0].Columns)), np.int16)
    for k, d in enumerate(files):
        raw = d.pixel_array
        pad = getattr(d, "PixelPaddingValue", None)
        hu = raw.astype(np.float32) * float(getattr(d, "RescaleSlope", 1.0)) + float(
            getattr(d, "RescaleIntercept", 0.0)
        )
        hu = np.where(hu < -1500.0, -1024.0, hu)
        if pad is not None:
            hu = np.where(raw == pad, -1024.0, hu)
        out[k] = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    px = [float(v) for v in files[0].PixelSpacing]
    return out, (abs(dz), px[0], px[1])


def load_volume_slices(folder: Path, name: str) -> list[RealSlice]:
    """The lung slices of a real no-pneumonia volume on the ≈ 2 mm grid, cropped to the lungs' bounding
    box (as the learned pipelines crop at inference), with empty lesion masks."""
    from triaged.analysis.lungs import segment_lungs_coarse

    hu, spacing = read_dicom_hu(folder)
    grid = WorkGrid.for_volume(hu.shape, spacing, TARGET_MM)  # type: ignore[arg-type]
    chu = grid.downsample(hu)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    lungs = segment_lungs_coarse(chu, grid, affine).labels > 0
    zs, ys, xs = lung_box(lungs, margin_slices=0)
    out = []
    for z in range(zs.start, zs.stop):
        if np.count_nonzero(lungs[z]) < 50:
            continue
        img = np.round(chu[z, ys, xs]).astype(np.int16)
        out.append(RealSlice(f"{name}/{z}", name, z, img, np.zeros(img.shape, bool)))
    return out


def load_negative_slices(root: Path | None = None) -> list[RealSlice]:
    """The lung slices of every :data:`NEGATIVE_VOLUMES` folder present under the real data root."""
    base = Path(root) if root is not None else real_data_root()
    out: list[RealSlice] = []
    for rel in NEGATIVE_VOLUMES:
        if (base / rel).is_dir():
            out += load_volume_slices(base / rel, rel)
    return out


def neighbour_stack(slices: Sequence[RealSlice], i: int, n: int, stride: int = 1) -> I16:
    """``n`` adjacent slices centred on ``slices[i]`` (same case, clamped at the ends), each resized to
    the centre's shape: the 2.5D input of seed 001.  A slice without neighbours is repeated.

    With ``stride`` s > 1 the stack holds slabs instead: the k-th is the mean of the s slices around
    ``i + k·s``, as the node's pipeline averages thin slices into 5 mm slabs (a context s times as long)."""
    centre = slices[i]
    half = n // 2
    out = np.empty((n, *centre.hu.shape), np.int16)

    def image(j: int) -> F32:
        img = slices[j].hu.astype(np.float32)
        if img.shape != centre.hu.shape:
            img = _resize(img, centre.hu.shape, order=1)
        return img

    for k in range(-half, half + 1):
        if stride == 1:
            out[k + half] = np.round(image(_clamp_same_case(slices, i, k)))
            continue
        offsets = [k * stride + d for d in range(-(stride // 2), stride - stride // 2)]
        out[k + half] = np.round(np.mean([image(_clamp_same_case(slices, i, o)) for o in offsets], axis=0))
    return out


def _clamp_same_case(slices: Sequence[RealSlice], i: int, k: int) -> int:
    step = 1 if k > 0 else -1
    j = i
    for _ in range(abs(k)):
        nxt = j + step
        if 0 <= nxt < len(slices) and slices[nxt].case == slices[i].case:
            j = nxt
        else:
            break
    return j


# ------------------------------------------------------------------------------------- phantom volumes
@dataclass(frozen=True)
class _LabelledCase:
    """The arrays of one labelled phantom, shared by :class:`VolumeCase` and :class:`FullCase`.

    ``hu`` int16 (z, y, x); ``lungs`` 0/1/2; ``lesions`` and ``consolidation`` bool; ``label`` one of
    healthy, covid, bacterial, other; ``spacing`` (z, y, x) mm of the grid the arrays are on.
    """

    case_id: str
    label: str
    hu: I16
    lungs: U8
    lesions: B
    consolidation: B
    spacing: tuple[float, float, float]


@dataclass(frozen=True)
class VolumeCase(_LabelledCase):
    """One labelled phantom on the ≈ 2 mm working grid, cropped to its lungs (``spacing``: the working grid's)."""

    affected_pct_max: float = 0.0
    whole_lung_pct: float = 0.0


def _load_nifti_zyx(path: Path) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)  # type: ignore[attr-defined]
    return np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(img.affine, np.float64)  # type: ignore[attr-defined]


def read_labels(root: Path) -> list[dict[str, str]]:
    """Rows of ``<root>/labels.csv`` (the :mod:`triaged.lab.datasets` format)."""
    path = Path(root) / "labels.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: not a labelled phantom dataset (see triaged.lab.datasets)"
        )
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def prepare_case(
    hu: npt.NDArray[np.generic],
    masks: dict[str, npt.NDArray[np.generic]],
    spacing: tuple[float, float, float],
    *,
    case_id: str,
    label: str,
    affected_pct_max: float = 0.0,
    whole_lung_pct: float = 0.0,
) -> VolumeCase:
    """Block-average a full-resolution case to ≈ 2 mm in-plane and crop it to its lungs (+ margin)."""
    grid = WorkGrid.for_volume(hu.shape, spacing, TARGET_MM)  # type: ignore[arg-type]
    chu = grid.downsample(np.asarray(hu, np.int16))
    lungs_full = np.asarray(masks["lungs"])
    right = grid.downsample((lungs_full == 1).astype(np.float32)) > 0.5
    left = grid.downsample((lungs_full == 2).astype(np.float32)) > 0.5
    lungs = np.where(left, 2, np.where(right, 1, 0)).astype(np.uint8)
    lesions = grid.downsample(np.asarray(masks["lesions"], np.float32)) >= 0.5
    cons = grid.downsample(np.asarray(masks["consolidation"], np.float32)) >= 0.5
    box = lung_box(lungs > 0)
    return VolumeCase(
        case_id,
        label,
        np.round(chu[box]).astype(np.int16),
        lungs[box],
        lesions[box] & (lungs[box] > 0),
        cons[box] & (lungs[box] > 0),
        grid.coarse_spacing,
        affected_pct_max,
        whole_lung_pct,
    )


def read_phantom_dataset(
    root: Path, cache_dir: Path | None = None, progress: bool = False
) -> list[VolumeCase]:
    """Every case of a labelled phantom dataset, prepared by :func:`prepare_case`.

    With ``cache_dir`` the prepared arrays are kept in one ``.npz`` keyed by the dataset's labels.csv
    and file sizes, so a resumed run does not decode the NIfTI files again.
    """
    root = Path(root)
    rows = read_labels(root)
    key = hashlib.sha256()
    key.update((root / "labels.csv").read_bytes())
    for row in rows:
        for name in ("image", "lungs", "lesions", "consolidation"):
            p = root / row["case_id"] / f"{name}.nii.gz"
            key.update(f"{p.name}:{p.stat().st_size}".encode())
    cache = None if cache_dir is None else Path(cache_dir) / f"phantoms-{key.hexdigest()[:16]}.npz"
    if cache is not None and cache.is_file():
        return _load_cache(cache)
    iterator = rows
    if progress:
        from tqdm import tqdm

        iterator = tqdm(rows, desc="prepare phantoms", unit="case")
    cases: list[VolumeCase] = []
    for row in iterator:
        folder = root / row["case_id"]
        hu, affine_ras = _load_nifti_zyx(folder / "image.nii.gz")
        masks = {
            name: _load_nifti_zyx(folder / f"{name}.nii.gz")[0]
            for name in ("lungs", "lesions", "consolidation")
        }
        sx, sy, sz = (float(np.linalg.norm(affine_ras[:3, i])) for i in range(3))
        cases.append(
            prepare_case(
                hu,
                masks,
                (sz, sy, sx),
                case_id=row["case_id"],
                label=row["label"],
                affected_pct_max=float(row.get("affected_pct_max") or 0.0),
                whole_lung_pct=float(row.get("whole_lung_pct") or 0.0),
            )
        )
    if cache is not None:
        _save_cache(cache, cases)
    return cases


def _save_cache(path: Path, cases: Sequence[VolumeCase]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    meta = []
    for i, c in enumerate(cases):
        arrays[f"hu{i}"], arrays[f"lungs{i}"] = c.hu, c.lungs
        arrays[f"lesions{i}"], arrays[f"cons{i}"] = c.lesions, c.consolidation
        meta.append(
            {
                "case_id": c.case_id,
                "label": c.label,
                "spacing": list(c.spacing),
                "affected_pct_max": c.affected_pct_max,
                "whole_lung_pct": c.whole_lung_pct,
            }
        )
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]
    tmp.replace(path)


def _load_cache(path: Path) -> list[VolumeCase]:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return [
            VolumeCase(
                m["case_id"],
                m["label"],
                z[f"hu{i}"],
                z[f"lungs{i}"],
                z[f"lesions{i}"],
                z[f"cons{i}"],
                tuple(m["spacing"]),
                m["affected_pct_max"],
                m["whole_lung_pct"],
            )  # type: ignore[arg-type]
            for i, m in enumerate(meta)
        ]


# ------------------------------------------------------------------------------- full-resolution cases
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class FullCase(_LabelledCase):
    """One labelled phantom at full resolution, for evaluating a pipeline end to end."""

    affine_lps: npt.NDArray[np.float64]
    affected_pct_max: float
    whole_lung_pct: float


def read_full_case(root: Path, row: dict[str, str]) -> FullCase:
    """Read one case of a labelled dataset (NIfTI, RAS qform) into (z, y, x) arrays and an LPS affine."""
    folder = Path(root) / row["case_id"]
    hu, affine_ras = _load_nifti_zyx(folder / "image.nii.gz")
    masks = {
        name: _load_nifti_zyx(folder / f"{name}.nii.gz")[0] for name in ("lungs", "lesions", "consolidation")
    }
    affine = _LPS_FROM_RAS @ affine_ras
    sx, sy, sz = (float(np.linalg.norm(affine[:3, i])) for i in range(3))
    return FullCase(
        row["case_id"],
        row["label"],
        np.asarray(hu, np.int16),
        np.asarray(masks["lungs"], np.uint8),
        np.asarray(masks["lesions"]) > 0,
        np.asarray(masks["consolidation"]) > 0,
        (sz, sy, sx),
        affine,
        float(row.get("affected_pct_max") or 0.0),
        float(row.get("whole_lung_pct") or 0.0),
    )
