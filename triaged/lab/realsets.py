"""Real labelled evaluation sets: slice sets and volume manifests (in the lab, beside
:mod:`triaged.lab.datasets`, which reads the phantom datasets).

``triaged eval PATH`` accepts three kinds of labelled data (:func:`detect_kind`):

``phantoms``
    a folder with ``labels.csv`` (:func:`triaged.lab.datasets.read_dataset`).
``slices``
    a folder with ``images/*.jpg`` and ``infection/*.png`` (0/255, threshold 128) or ``labels/*.png``
    (0 background, 1 ground glass, 2 consolidation), one mask per image with the same stem — e.g.
    ``medseg-covid-slices/doctor-label``, ``…/multiclass`` and ``…/pseudo-label``.  Each slice's display
    window is estimated from its landmarks (:mod:`triaged.analysis.window`); slices named
    ``<source>_<index>`` (the pseudo-label volumes) share one window per source.  A set whose slices
    mostly show the lungs above and below each other is transposed (and its masks transposed back).
    Each slice is analysed as a one-slice volume (:func:`triaged.analysis.realslice.slice_volume`) and
    scored pixel-wise on its own grid (:func:`triaged.lab.metrics.slice_score`).
``volumes``
    a ``.csv`` manifest (:func:`read_manifest`) of DICOM series folders with a diagnosis.

Manifest format
---------------
One row per case after a header row; lines starting with ``#`` and blank lines are ignored:

==============  ========================================================================================
case_id         unique name of the case
folder          DICOM folder, relative to the data root (the series is chosen as the node does)
diagnosis       ``covid``, ``cap`` (other, community-acquired pneumonia) or ``normal`` (no pneumonia)
lesion_mask     optional: NIfTI lesion mask on the chosen series' grid (as ``triaged analyze`` writes
                masks), relative to the data root
note            optional free text
==============  ========================================================================================

The data root is ``--root``, else ``$TRIAGED_REAL_DATA``, else ``../shared/data/real`` next to the checkout
(:func:`default_data_root`).  Reading never copies data.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from triaged.analysis.pipeline import Pipeline
from triaged.analysis.realslice import (
    DOCTOR_VALIDATION,
    PSEUDO_VALIDATION,
    assumed_pixel_mm,
    lungs_stacked_vertically,
    slice_volume,
)
from triaged.analysis.window import Window, estimate_window, gray_to_hu
from triaged.domain import Volume
from triaged.errors import TriagedError
from triaged.lab.metrics import (
    DIAGNOSES,
    PaperCase,
    SliceScore,
    VolumeCaseScore,
    VolumeSeverity,
    paper_case,
    slice_score,
    volume_case_score,
    volume_severity,
)
from triaged.lab.paths import DATA_ENV, real_data_root

U8 = npt.NDArray[np.uint8]
B = npt.NDArray[np.bool_]

#: Columns of a volume manifest; the first three are required.
MANIFEST_COLUMNS: Final[tuple[str, ...]] = ("case_id", "folder", "diagnosis", "lesion_mask", "note")
REQUIRED_COLUMNS: Final[tuple[str, ...]] = MANIFEST_COLUMNS[:3]
#: Slice sets whose file stems are the doctor-labelled MedSeg slices (the validation split applies).
DOCTOR_SETS: Final[tuple[str, ...]] = ("doctor-label", "multiclass")
#: Slice sets of pseudo-labelled volumes (``<source>_<index>`` stems; the split holds out whole volumes).
PSEUDO_SETS: Final[tuple[str, ...]] = ("pseudo-label",)

Kind = Literal["phantoms", "slices", "volumes"]
Split = Literal["all", "validation", "training"]
#: ``progress(message)``, called once per pipeline run.
Progress = Callable[[str], None]


class RealSetError(TriagedError):
    """A real labelled set cannot be read; the message names the path (and line)."""


def default_data_root(root: Path | str | None = None) -> Path:
    """``root`` if given, else :func:`triaged.lab.paths.real_data_root` (``$TRIAGED_REAL_DATA``, else
    ``../shared/data/real`` next to the checkout)."""
    return Path(root) if root else real_data_root()


def detect_kind(path: Path) -> Kind:
    """What ``triaged eval PATH`` reads at ``path`` (module docstring).

    Raises
    ------
    RealSetError
        ``path`` does not exist or is none of the three kinds.
    """
    path = Path(path)
    if not path.exists():
        raise RealSetError(f"{path} does not exist")
    if path.is_file():
        if path.name == "labels.csv":
            return "phantoms"
        if path.suffix.lower() == ".csv":
            return "volumes"
        raise RealSetError(f"{path} is a file but not a .csv manifest")
    if (path / "labels.csv").is_file():
        return "phantoms"
    if (path / "images").is_dir() and ((path / "infection").is_dir() or (path / "labels").is_dir()):
        return "slices"
    raise RealSetError(
        f"{path} is none of: a phantom dataset (labels.csv), a slice set (images/ with infection/ or "
        f"labels/), a volume manifest (.csv file)"
    )


# ---- slice sets ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelledSlice:
    """One real slice: 8-bit grey levels and its reference masks (same shape)."""

    name: str
    source: str
    grey: U8
    lesion: B
    consolidation: B | None = None


@dataclass(frozen=True)
class SliceRef:
    """Where one slice and its mask are; :meth:`load` reads them."""

    name: str
    source: str
    image: Path
    mask: Path
    multiclass: bool

    def load(self) -> LabelledSlice:
        """Read the image (as 8-bit grey) and the mask (``infection``: ≥ 128; ``labels``: > 0, and 2 =
        consolidation).

        Raises
        ------
        RealSetError
            The image and mask shapes differ.
        """
        from PIL import Image

        with Image.open(self.image) as im:
            grey = np.asarray(im.convert("L"), np.uint8)
        with Image.open(self.mask) as im:
            # palette PNGs keep their indices (0/1/2); greyscale ones their grey values
            labels = np.asarray(im if im.mode == "P" else im.convert("L"), np.uint8)
        if labels.shape != grey.shape:
            raise RealSetError(f"{self.mask}: mask {labels.shape} does not match image {grey.shape}")
        if self.multiclass:
            return LabelledSlice(self.name, self.source, grey, labels > 0, labels == 2)
        return LabelledSlice(self.name, self.source, grey, labels >= 128)


@dataclass(frozen=True)
class SliceSet:
    """A slice set as read by :func:`read_slice_set`."""

    root: Path
    split: Split
    multiclass: bool
    refs: tuple[SliceRef, ...]

    def describe(self) -> str:
        masks = "labels/ (1 ground glass, 2 consolidation)" if self.multiclass else "infection/ (≥ 128)"
        split = "" if self.split == "all" else f", {self.split} split"
        return f"slice set {self.root}: {len(self.refs)} image(s){split}, masks {masks}"


_STEM_SOURCE = re.compile(r"^(?P<source>.+)_(?P<index>\d+)$")


def _stem_key(stem: str) -> tuple[str, int, str]:
    m = _STEM_SOURCE.match(stem)
    if m:
        return m["source"], int(m["index"]), stem
    return ("", int(stem), stem) if stem.isdigit() else ("", 1 << 30, stem)


def read_slice_set(path: Path, *, split: Split = "all", limit: int = 0) -> SliceSet:
    """The slices of a slice set, sorted by source and index (numeric stems numerically).

    Parameters
    ----------
    path : Path
        Folder with ``images/`` and ``infection/`` or ``labels/``.
    split : {"all", "validation", "training"}
        ``validation``: only the held-out doctor-labelled stems
        (:data:`~triaged.analysis.realslice.DOCTOR_VALIDATION`) of the ``doctor-label`` and ``multiclass``
        sets, or the slices of the held-out volumes
        (:data:`~triaged.analysis.realslice.PSEUDO_VALIDATION`) of the ``pseudo-label`` set;
        ``training``: all others. Not defined for other sets.
    limit : int
        Keep the first ``limit`` slices (0 = all).

    Raises
    ------
    RealSetError
        Missing folders or masks, no image, or a split asked of a set that has none.
    """
    root = Path(path)
    images = root / "images"
    multiclass = not (root / "infection").is_dir() and (root / "labels").is_dir()
    masks = root / ("labels" if multiclass else "infection")
    if not images.is_dir() or not masks.is_dir():
        raise RealSetError(f"{root}: a slice set needs images/ and infection/ or labels/")
    if split != "all" and root.name not in DOCTOR_SETS + PSEUDO_SETS:
        raise RealSetError(
            f"{root}: no {split} split is defined for this set (only for "
            f"{', '.join(DOCTOR_SETS + PSEUDO_SETS)}; the held-out doctor stems are "
            f"{' '.join(DOCTOR_VALIDATION)}, the held-out pseudo-labelled volumes {' '.join(PSEUDO_VALIDATION)})"
        )
    stems = sorted(
        (p.stem for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")), key=_stem_key
    )
    if split != "all":
        pseudo = root.name in PSEUDO_SETS
        held = set(PSEUDO_VALIDATION if pseudo else DOCTOR_VALIDATION)
        stems = [s for s in stems if ((_stem_key(s)[0] if pseudo else s) in held) == (split == "validation")]
    if limit:
        stems = stems[:limit]
    if not stems:
        raise RealSetError(f"{images}: no image found")
    refs = []
    for stem in stems:
        image = _image_of(images, stem)
        mask = masks / f"{stem}.png"
        if not mask.is_file():
            raise RealSetError(f"{mask} is missing (the mask of {image})")
        m = _STEM_SOURCE.match(stem)
        source = m["source"] if m else stem
        refs.append(SliceRef(f"{root.name}/{stem}", source, image, mask, multiclass))
    return SliceSet(root, split, multiclass, tuple(refs))


def _image_of(images: Path, stem: str) -> Path:
    for ext in (".jpg", ".jpeg", ".png", ".JPG", ".PNG"):
        p = images / f"{stem}{ext}"
        if p.is_file():
            return p
    raise RealSetError(f"{images}: no image for {stem}")


@dataclass
class SliceEvaluation:
    """Per-slice scores of every pipeline and the window used for each slice."""

    slice_set: SliceSet
    scores: dict[str, list[SliceScore]] = field(default_factory=dict)
    windows: dict[str, Window] = field(default_factory=dict)
    #: Slices showing their lungs above and below each other, and whether the set was transposed for it.
    stacked: int = 0
    transposed: bool = False

    def volume_severities(self) -> dict[str, list[VolumeSeverity]]:
        """Per pipeline, the affected % of each source with more than one slice (the pseudo-labelled
        volumes; :func:`~triaged.lab.metrics.volume_severity`), in the set's order; empty when no source
        has several slices."""
        by_source: dict[str, list[str]] = {}
        for ref in self.slice_set.refs:
            by_source.setdefault(ref.source, []).append(ref.name)
        volumes = {source: set(names) for source, names in by_source.items() if len(names) > 1}
        return (
            {
                pipeline: [
                    volume_severity(source, [s for s in scores if s.name in names])
                    for source, names in volumes.items()
                ]
                for pipeline, scores in self.scores.items()
            }
            if volumes
            else {}
        )

    def describe_orientation(self) -> str:
        n = len(self.slice_set.refs)
        verdict = "transposed for the analysis" if self.transposed else "analysed as stored"
        return f"{self.stacked} of {n} slice(s) show the lungs above and below each other: {verdict}"

    def to_json(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 3)

        volumes = self.volume_severities()
        return {
            "orientation": self.describe_orientation(),
            "volumes": [
                {
                    "source": v.source,
                    "slices": v.n_slices,
                    **{
                        name: {
                            "affected_pct": r(results[i].affected_pct),
                            "reference_pct": r(results[i].reference_pct),
                        }
                        for name, results in volumes.items()
                    },
                }
                for i, v in enumerate(next(iter(volumes.values()), []))
            ],
            "slices": [
                {
                    "name": ref.name,
                    "source": ref.source,
                    "window_hu": [
                        round(self.windows[ref.name].lo_hu, 1),
                        round(self.windows[ref.name].hi_hu, 1),
                    ],
                    "window_method": self.windows[ref.name].method,
                    **{
                        name: _slice_json(next(s for s in scores if s.name == ref.name))
                        for name, scores in self.scores.items()
                    },
                }
                for ref in self.slice_set.refs
                if ref.name in self.windows
            ],
        }


def _grey(path: Path) -> U8:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), np.uint8)


def _slice_json(s: SliceScore) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 4)

    out: dict[str, Any] = {
        "dice": r(s.dice),
        "sensitivity": r(s.sensitivity),
        "specificity": r(s.specificity),
        "lesion_in_lungs": r(s.lesion_in_lungs),
        "affected_pct": r(s.affected_pct),
        "reference_pct": r(s.reference_pct),
    }
    if s.consolidation_dice is not None:
        out["consolidation_dice"] = r(s.consolidation_dice)
    if s.failed:
        out["error"] = s.error
    return out


def evaluate_slice_set(
    slice_set: SliceSet, pipelines: Mapping[str, Pipeline], *, progress: Progress | None = None
) -> SliceEvaluation:
    """Run every pipeline on every slice (module docstring) and score it pixel-wise on the slice grid.

    A pipeline that raises a :class:`~triaged.errors.TriagedError` on a slice (e.g. no lungs found)
    scores it with an empty prediction and the error recorded; other exceptions propagate.
    """
    result = SliceEvaluation(slice_set, {name: [] for name in pipelines})
    result.stacked = sum(lungs_stacked_vertically(_grey(ref.image)) for ref in slice_set.refs)
    result.transposed = transpose = 2 * result.stacked > len(slice_set.refs)
    by_source: dict[str, list[SliceRef]] = {}
    for ref in slice_set.refs:
        by_source.setdefault(ref.source, []).append(ref)
    uid = 0
    for refs in by_source.values():
        loaded = [ref.load() for ref in refs]
        window = (
            estimate_window(loaded[0].grey) if len(loaded) == 1 else estimate_window([s.grey for s in loaded])
        )
        for s in loaded:
            result.windows[s.name] = window
            uid += 1
            hu = gray_to_hu(s.grey.T if transpose else s.grey, window)
            volume, crop = slice_volume(hu, assumed_pixel_mm(hu.shape), uid_suffix=uid)
            for name, pipeline in pipelines.items():
                if progress is not None:
                    progress(f"{name} {s.name}")
                try:
                    masks = pipeline.run(volume).masks
                except TriagedError as exc:
                    empty = np.zeros_like(s.lesion)
                    result.scores[name].append(
                        slice_score(
                            s.name,
                            empty,
                            s.lesion,
                            consolidation=empty,
                            true_consolidation=s.consolidation,
                            error=str(exc) or type(exc).__name__,
                        )
                    )
                    continue
                lesions = masks.lesions[0][crop]
                cons = masks.consolidation[0][crop]
                lungs = masks.lungs[0][crop]
                if transpose:
                    lesions, cons, lungs = lesions.T, cons.T, lungs.T
                result.scores[name].append(
                    slice_score(
                        s.name,
                        lesions,
                        s.lesion,
                        consolidation=cons,
                        true_consolidation=s.consolidation,
                        lungs=lungs,
                    )
                )
    return result


# ---- volume manifests ---------------------------------------------------------------------------------
class ManifestError(RealSetError):
    """A volume manifest is malformed or names missing data (the message gives path and line)."""


@dataclass(frozen=True)
class ManifestEntry:
    """One case of a volume manifest, its paths resolved against the data root."""

    case_id: str
    folder: Path
    diagnosis: str
    lesion_mask: Path | None
    note: str
    line: int


def read_manifest(path: Path, root: Path) -> list[ManifestEntry]:
    """Read and check a volume manifest (module docstring).

    Raises
    ------
    ManifestError
        A missing required column, an unknown diagnosis, an empty or duplicate case id, or a folder or
        mask that does not exist under ``root``; the message names the file, the line and the path.
    RealSetError
        The manifest or the data root does not exist.
    """
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise RealSetError(f"manifest {path} does not exist")
    if not root.is_dir():
        raise RealSetError(f"data root {root} does not exist (give --root or set ${DATA_ENV})")
    lines = [
        (i, text)
        for i, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if text.strip() and not text.lstrip().startswith("#")
    ]
    if not lines:
        raise ManifestError(f"{path}: empty manifest (no header row)")
    header_line, header_text = lines[0]
    header = [h.strip() for h in next(csv.reader([header_text]))]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(
            f"{path}:{header_line}: header lacks column(s) {', '.join(missing)} "
            f"(columns: {', '.join(MANIFEST_COLUMNS)})"
        )
    unknown = [c for c in header if c not in MANIFEST_COLUMNS]
    if unknown:
        raise ManifestError(
            f"{path}:{header_line}: unknown column(s) {', '.join(unknown)} "
            f"(columns: {', '.join(MANIFEST_COLUMNS)})"
        )
    entries: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    for line, text in lines[1:]:
        values = [v.strip() for v in next(csv.reader([text]))]
        if len(values) > len(header):
            raise ManifestError(f"{path}:{line}: {len(values)} fields but the header has {len(header)}")
        row = dict(zip(header, values + [""] * (len(header) - len(values)), strict=True))
        case_id, folder, diagnosis = row["case_id"], row["folder"], row["diagnosis"]
        if not case_id:
            raise ManifestError(f"{path}:{line}: empty case_id")
        if case_id in seen:
            raise ManifestError(f"{path}:{line}: case_id {case_id!r} already on line {seen[case_id]}")
        seen[case_id] = line
        if diagnosis not in DIAGNOSES:
            raise ManifestError(
                f"{path}:{line}: diagnosis {diagnosis!r} of {case_id} is not one of {', '.join(DIAGNOSES)}"
            )
        if not folder:
            raise ManifestError(f"{path}:{line}: empty folder for {case_id}")
        if Path(folder).is_absolute():
            raise ManifestError(f"{path}:{line}: folder {folder} must be relative to the data root")
        full = root / folder
        if not full.is_dir():
            raise ManifestError(
                f"{path}:{line}: folder {full} of {case_id} does not exist (data root {root})"
            )
        mask = None
        if row.get("lesion_mask"):
            mask = root / row["lesion_mask"]
            if not mask.is_file():
                raise ManifestError(f"{path}:{line}: lesion mask {mask} of {case_id} does not exist")
        entries.append(ManifestEntry(case_id, full, diagnosis, mask, row.get("note", ""), line))
    if not entries:
        raise ManifestError(f"{path}: no case listed")
    return entries


@dataclass
class VolumeEvaluation:
    """Per-case results of every pipeline on a volume manifest, and the series chosen for each case."""

    entries: list[ManifestEntry]
    results: dict[str, list[VolumeCaseScore]] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)
    #: The papers' classifier outputs per pipeline and case (:func:`triaged.lab.metrics.paper_row`);
    #: no reference severity on real series, box hits only where the manifest gives a lesion mask.
    papers: dict[str, list[PaperCase]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 4)

        cases = []
        for e in self.entries:
            item: dict[str, Any] = {
                "case_id": e.case_id,
                "folder": e.folder.as_posix(),
                "diagnosis": e.diagnosis,
                "note": e.note,
                "series": self.series.get(e.case_id, ""),
            }
            for name, scores in self.results.items():
                c = next(s for s in scores if s.case_id == e.case_id)
                item[name] = (
                    {"error": c.error}
                    if c.failed
                    else {
                        "right_pct": r(c.right_pct),
                        "left_pct": r(c.left_pct),
                        "whole_pct": r(c.whole_pct),
                        "severity_pct": r(c.severity_pct),
                        "ct_grade": c.ct_grade,
                        "p_covid": r(c.p_covid),
                        "lesion_dice": r(c.lesion_dice),
                    }
                )
            cases.append(item)
        return {"cases": cases}


def evaluate_volume_set(
    entries: Sequence[ManifestEntry],
    pipelines: Mapping[str, Pipeline],
    load_series: Callable[[Path], tuple[Volume, str]],
    *,
    load_mask: Callable[[Path], npt.NDArray[Any]] | None = None,
    progress: Progress | None = None,
) -> VolumeEvaluation:
    """Run every pipeline on every case of a manifest.

    Parameters
    ----------
    entries : sequence of ManifestEntry
    pipelines : mapping of name to Pipeline
    load_series : callable
        Folder → (volume, reason the series was chosen); the CLI passes the node's series choice
        (:func:`triaged.volume.load_series_folder`).  A :class:`~triaged.errors.TriagedError` fails the
        case for every pipeline (recorded, not raised).
    load_mask : callable, optional
        NIfTI path → array on the volume's (z, y, x) grid; needed when an entry has a lesion mask.
    progress : callable, optional
        Called with a message before each pipeline run.
    """
    out = VolumeEvaluation(
        list(entries), {name: [] for name in pipelines}, papers={name: [] for name in pipelines}
    )
    for e in entries:
        try:
            volume, reason = load_series(e.folder)
        except TriagedError as exc:
            for name in pipelines:
                out.results[name].append(
                    VolumeCaseScore(e.case_id, e.diagnosis, note=e.note, error=f"series: {exc}")
                )
            out.series[e.case_id] = f"not loaded: {exc}"
            continue
        out.series[e.case_id] = reason
        truth = None
        if e.lesion_mask is not None:
            if load_mask is None:
                raise RealSetError(f"{e.lesion_mask}: no mask reader given")
            truth = np.asarray(load_mask(e.lesion_mask)) > 0
            if truth.shape != volume.hu.shape:
                raise ManifestError(
                    f"line {e.line}: lesion mask {e.lesion_mask} has shape {truth.shape}, the "
                    f"series {volume.hu.shape}"
                )
        for name, pipeline in pipelines.items():
            if progress is not None:
                progress(f"{name} {e.case_id}")
            try:
                res = pipeline.run(volume)
            except TriagedError as exc:
                out.results[name].append(
                    VolumeCaseScore(e.case_id, e.diagnosis, note=e.note, error=str(exc) or type(exc).__name__)
                )
                continue
            out.results[name].append(
                volume_case_score(
                    e.case_id,
                    e.diagnosis,
                    res.findings,
                    lesions=res.masks.lesions if truth is not None else None,
                    true_lesions=truth,
                    note=e.note,
                )
            )
            out.papers[name].append(paper_case(e.case_id, e.diagnosis, res.findings, true_lesions=truth))
    return out


__all__ = [
    "DATA_ENV",
    "MANIFEST_COLUMNS",
    "REQUIRED_COLUMNS",
    "LabelledSlice",
    "ManifestEntry",
    "ManifestError",
    "RealSetError",
    "SliceEvaluation",
    "SliceRef",
    "SliceSet",
    "VolumeEvaluation",
    "default_data_root",
    "detect_kind",
    "evaluate_slice_set",
    "evaluate_volume_set",
    "read_manifest",
    "read_slice_set",
]
