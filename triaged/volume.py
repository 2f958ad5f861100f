"""Read instance headers and chosen series from the spool into :class:`~triaged.domain.Volume`.

Adapter: the only module that decodes pixel data.  Headers are read with ``stop_before_pixels`` and
only the attributes series choice needs, or whole where they also feed routing or the encoding context
(:func:`read_dataset`), once per file: a header already read is passed on, not read again.  Pixels are
decoded one file at a time into a preallocated int16 array, so no more than one pixel-bearing pydicom
Dataset is alive at once.  Every transfer syntax pydicom can
decode with the installed plugins works (native, deflate, JPEG baseline/extended/lossless, JPEG-LS,
JPEG 2000, RLE).

The slice ordering, duplicate and gap rules come from :mod:`triaged.assembly`, so the series choice and
the volume load agree on what a usable stack is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import iter_pixels

from triaged.assembly import (
    FramedInstanceHeader,
    assess_spacing,
    group_positions,
    instance_positions,
    slice_normal,
)
from triaged.config import SeriesSelectionConfig
from triaged.domain import ENHANCED_CT_IMAGE_STORAGE, InstanceHeader, SeriesChoice, Volume, validate_uid
from triaged.errors import AssemblyError, InvalidDatasetError, StorageError, TriagedError


class InstanceUIDError(InvalidDatasetError):
    """A DICOM file whose SOPInstanceUID or SeriesInstanceUID is missing, empty or not a valid UID."""


class UnusableUIDsError(AssemblyError):
    """No series can be assembled from a folder because its DICOM files lack valid instance UIDs.

    ``count`` is the number of such files (``triaged analyze`` says so and exits 2).
    """

    def __init__(self, message: str, count: int) -> None:
        super().__init__(message)
        self.count = count

#: Attributes read for series choice (everything else, pixel data above all, is skipped).
_HEADER_TAGS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "SeriesDescription",
    "SeriesNumber",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "SliceThickness",
    "ConvolutionKernel",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)

HU_AIR = -1024
_INT16_MAX = int(np.iinfo(np.int16).max)
_ORIENTATION_TOLERANCE = 1e-3
_SPACING_TOLERANCE_MM = 1e-3
#: At most this many positions are listed in one warning; the rest are counted.
_MAX_LISTED = 8
# Third-party pixel decoders raise many exception types; each of them means "this file cannot be
# decoded" and becomes an AssemblyError naming the file and its transfer syntax.
_DECODE_ERRORS = (
    ValueError,
    RuntimeError,
    NotImplementedError,
    AttributeError,
    TypeError,
    KeyError,
    IndexError,
    EOFError,
)


@dataclass(frozen=True)
class _SliceRef:
    """One slice of the volume to be: a single-frame instance or one frame of a multi-frame one."""

    path: str
    sop_instance_uid: str
    frame: int  # 0-based frame index (0 for single-frame instances)
    position: tuple[float, float, float]
    offset: float  # along the slice normal, mm
    multi_frame: bool = False


@dataclass(frozen=True)
class _Rescale:
    """PS3.3 C.11.1 Modality LUT (Rescale Slope/Intercept) and C.7.5.1.1.2 Pixel Padding of one frame."""

    slope: float
    intercept: float
    padding: int | None
    padding_limit: int | None


# --- headers -------------------------------------------------------------------------------------


def read_dataset(root: Path, rel_path: str, *, whole: bool = False) -> Dataset:
    """Read the header of one stored instance, without its pixel data.

    The read is forced: files without the 128-byte preamble and ``DICM`` prefix are still DICOM, and
    garbage fails the UID checks of :func:`header_from_dataset`.  Whether the preamble was there is
    kept: the dataset's ``preamble`` is None when it was not.

    Parameters
    ----------
    root
        Spool root; ``rel_path`` is relative to it.
    rel_path
        Path of the instance file.
    whole
        Read every attribute before the pixel data (for routing and the encoding context), not only
        those series choice needs.

    Raises
    ------
    InvalidDatasetError
        The file is absent or is not DICOM.
    StorageError
        The file cannot be read (retryable: a disk or mount problem).
    """
    path = root / rel_path
    try:
        if whole:
            return dcmread(path, stop_before_pixels=True, force=True)
        return dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS), force=True)
    except FileNotFoundError as exc:
        raise InvalidDatasetError(f"{rel_path}: file not found") from exc
    except OSError as exc:
        raise StorageError(f"{rel_path}: cannot read: {exc.strerror or exc}") from exc
    except (InvalidDicomError, *_DECODE_ERRORS) as exc:
        raise InvalidDatasetError(f"{rel_path}: not a readable DICOM file: {exc}") from exc


def header_from_dataset(ds: Dataset, rel_path: str) -> InstanceHeader:
    """The attributes series choice needs, from a header read by :func:`read_dataset`.

    Single-frame CT takes the Image Plane module (PS3.3 C.7.6.2) and CT Image module (C.8.2.1).
    Enhanced CT (C.8.15) takes orientation, pixel spacing, slice thickness and kernel from the
    Shared or Per-frame Functional Groups (C.7.6.16: Plane Orientation, Pixel Measures, CT
    Reconstruction) and returns a :class:`~triaged.assembly.FramedInstanceHeader` with the Plane
    Position of every frame.

    Parameters
    ----------
    ds
        The header, read whole or only its series-choice attributes.
    rel_path
        Path of its file, stored in the header as given.

    Raises
    ------
    InvalidDatasetError
        The dataset is not DICOM; :class:`InstanceUIDError` when it is but its SOP Instance UID or Series
        Instance UID is missing, empty or not a valid UID (PS3.5 9.1).
    """
    sop_uid = _text(ds, "SOPInstanceUID")
    series_uid = _text(ds, "SeriesInstanceUID")
    if not sop_uid or not series_uid:
        missing = [k for k, v in (("SOPInstanceUID", sop_uid), ("SeriesInstanceUID", series_uid)) if not v]
        looks_dicom = getattr(ds, "preamble", None) is not None or bool(_text(ds, "SOPClassUID"))
        if not looks_dicom and not sop_uid:
            raise InvalidDatasetError(f"{rel_path}: not a DICOM file (no 'DICM' prefix, no SOPInstanceUID)")
        raise InstanceUIDError(f"{rel_path}: not a usable DICOM instance: no {' or '.join(missing)}")
    try:
        sop_uid = validate_uid(sop_uid, "SOPInstanceUID")
        series_uid = validate_uid(series_uid, "SeriesInstanceUID")
    except InvalidDatasetError as exc:
        raise InstanceUIDError(f"{rel_path}: not a usable DICOM instance: {exc}") from exc
    sop_class = _text(ds, "SOPClassUID") or str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
    frames = _int(ds.get("NumberOfFrames")) or 1

    common: dict[str, Any] = {
        "path": rel_path,
        "sop_instance_uid": sop_uid,
        "sop_class_uid": sop_class,
        "series_instance_uid": series_uid,
        "modality": _text(ds, "Modality").upper(),
        "image_type": tuple(s.upper() for s in _strings(ds.get("ImageType"))),
        "series_description": _text(ds, "SeriesDescription"),
        "series_number": _int(ds.get("SeriesNumber")),
        "rows": _int(ds.get("Rows")),
        "columns": _int(ds.get("Columns")),
        "number_of_frames": frames,
    }
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return _multi_frame_header(ds, frames, common)
    position = _floats(ds.get("ImagePositionPatient"), 3)
    return InstanceHeader(
        **common,
        image_orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        image_position=(position[0], position[1], position[2]) if position else None,
        pixel_spacing=_pair(_floats(ds.get("PixelSpacing"), 2)),
        slice_thickness=_float(ds.get("SliceThickness")),
        convolution_kernel="\\".join(_strings(ds.get("ConvolutionKernel"))),
    )


def read_header(root: Path, rel_path: str) -> InstanceHeader:
    """Read the attributes series choice needs from one stored instance, without its pixel data.

    One read (:func:`read_dataset`, only the series-choice attributes), then :func:`header_from_dataset`.

    Parameters
    ----------
    root
        Spool root; ``rel_path`` is relative to it and is stored in the header as given.
    rel_path
        Path of the instance file.

    Raises
    ------
    InvalidDatasetError
        The file is not DICOM; :class:`InstanceUIDError` when it is but its SOP Instance UID or Series
        Instance UID is missing, empty or not a valid UID (PS3.5 9.1).
    StorageError
        The file cannot be read (retryable: a disk or mount problem).
    """
    return header_from_dataset(read_dataset(root, rel_path), rel_path)


def read_headers(
    root: Path,
    rel_paths: Iterable[str],
    *,
    datasets: dict[str, Dataset] | None = None,
    whole: bool = False,
) -> tuple[list[InstanceHeader], list[str]]:
    """Read the headers of many instances; one unreadable file never stops the others.

    Each file is opened at most once: a file whose header is in ``datasets`` is not opened at all.

    Parameters
    ----------
    root
        Spool root.
    rel_paths
        Instance files relative to ``root``.
    datasets
        Headers already read by :func:`read_dataset`, by path: their instance headers are derived from
        them.  Every header read here is added, so the caller can reuse them (the encoding context,
        :func:`load_volume`).
    whole
        Read whole headers (every attribute before the pixel data), not only the series-choice
        attributes.  A file whose whole header cannot be read is read again for those attributes only
        (nothing is added to ``datasets`` then), so exactly the files :func:`read_header` reads are used.

    Returns
    -------
    tuple[list[InstanceHeader], list[str]]
        The headers read, in input order, and one problem line per file that could not be read
        (``"<path>: <why>"``).
    """
    headers: list[InstanceHeader] = []
    problems: list[str] = []
    for rel in rel_paths:
        try:
            headers.append(_header(root, rel, datasets, whole))
        except TriagedError as exc:
            problems.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a malformed file sent by a peer must not stop the study
            problems.append(f"{rel}: unreadable header ({type(exc).__name__}: {exc})")
    return headers, problems


def _header(root: Path, rel: str, datasets: dict[str, Dataset] | None, whole: bool) -> InstanceHeader:
    """One instance's header for :func:`read_headers`, from ``datasets`` or from one read of its file."""
    ds = datasets.get(rel) if datasets is not None else None
    if ds is None:
        try:
            ds = read_dataset(root, rel, whole=whole)
        except Exception:
            if not whole:
                raise
            # A whole header can fail to parse (a malformed sequence) where the series-choice
            # attributes alone do not: read those as read_header always did.
            return read_header(root, rel)
        if datasets is not None:
            datasets[rel] = ds
    return header_from_dataset(ds, rel)


def _multi_frame_header(ds: Dataset, frames: int, common: dict[str, Any]) -> InstanceHeader:
    """Header of an Enhanced CT instance from its functional groups (PS3.3 C.7.6.16)."""
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    items: list[Dataset | None] = [per_frame[i] if i < len(per_frame) else None for i in range(frames)]

    positions: list[tuple[float, float, float]] = []
    orientations: list[tuple[float, ...]] = []
    spacings: list[tuple[float, ...]] = []
    thicknesses: list[float] = []
    for item in items:
        pos = _floats(_functional(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
        ori = _floats(_functional(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        ps = _floats(_functional(item, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
        thk = _float(_functional(item, shared, "PixelMeasuresSequence", "SliceThickness"))
        if pos is not None:
            positions.append((pos[0], pos[1], pos[2]))
        if ori is not None:
            orientations.append(ori)
        if ps is not None:
            spacings.append(ps)
        if thk is not None:
            thicknesses.append(thk)
    kernel = _functional(
        per_frame[0] if per_frame else None, shared, "CTReconstructionSequence", "ConvolutionKernel"
    )
    complete = len(positions) == frames
    return FramedInstanceHeader(
        **common,
        # Frames of one instance disagreeing on orientation or spacing are not one stack: no geometry.
        image_orientation=_agreed(orientations, frames, _ORIENTATION_TOLERANCE),
        image_position=positions[0] if complete else None,
        pixel_spacing=_pair(_agreed(spacings, frames, _SPACING_TOLERANCE_MM)),
        slice_thickness=float(np.median(thicknesses)) if thicknesses else None,
        convolution_kernel="\\".join(_strings(kernel)),
        frame_positions=tuple(positions) if complete else (),
    )


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None or keyword not in ds:
        return None
    seq = ds[keyword].value
    return seq[0] if seq else None


def _functional(item: Dataset | None, shared: Dataset | None, macro: str, keyword: str) -> Any:
    """An attribute of a functional group macro: per-frame first, then shared (PS3.3 C.7.6.16)."""
    for group in (item, shared):
        inner = _first_item(group, macro)
        if inner is not None and keyword in inner:
            return inner[keyword].value
    return None


def _agreed(values: list[tuple[float, ...]], frames: int, tol: float) -> tuple[float, ...] | None:
    if len(values) != frames or not values:
        return None
    first = values[0]
    if all(all(abs(a - b) <= tol for a, b in zip(v, first, strict=True)) for v in values):
        return first
    return None


# --- value helpers (header values from peers are not always valid) ----------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except _DECODE_ERRORS:
        return ""
    return str(value).strip() if value is not None else ""


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        value = [value]
    return [str(v).strip() for v in value if str(v).strip()]


def _float(value: Any) -> float | None:
    try:
        f = float(value[0] if _is_multi(value) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return f if math.isfinite(f) else None


def _int(value: Any) -> int | None:
    f = _float(value)
    return int(f) if f is not None and f == int(f) else None


def _is_multi(value: Any) -> bool:
    return not isinstance(value, str | bytes) and hasattr(value, "__len__") and hasattr(value, "__getitem__")


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None or not _is_multi(value) or len(value) != n:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _pair(values: tuple[float, ...] | None) -> tuple[float, float] | None:
    if values is None or len(values) != 2 or min(values) <= 0:
        return None
    return (values[0], values[1])


# --- volume ---------------------------------------------------------------------------------------


def load_volume(
    root: Path, choice: SeriesChoice, study_uid: str, datasets: Mapping[str, Dataset] | None = None
) -> Volume:
    """Decode the chosen series into a Hounsfield-unit volume with its LPS geometry.

    * Geometry (PS3.3 C.7.6.2.1.1): slices are sorted by ``dot(ImagePositionPatient, n)`` with
      ``n = row_dir × col_dir``, so z increases along +n.  ``spacing`` is (median slice step along n,
      PixelSpacing row spacing, PixelSpacing column spacing).  ``affine`` maps (column, row, slice, 1)
      to LPS mm: columns ``row_dir·dx``, rows ``col_dir·dy``, slices ``n·dz``, translation the position
      of the first sorted slice.  When slice positions are sheared against n (a gantry tilt written
      with axial orientation) the slice column is the measured step between positions instead, so
      ``affine @ (0, 0, k, 1)`` still lands on slice k; a warning says so.
    * Values (PS3.3 C.11.1 Modality LUT, C.7.5.1.1.2 Pixel Padding): per slice, HU = stored × Rescale
      Slope + Rescale Intercept, from the CT Image module or, for Enhanced CT, the Pixel Value
      Transformation functional group.  Stored values equal to Pixel Padding Value (or within the
      Pixel Padding Range Limit) and every value below −1024 after rescale (vendor padding such as
      −2000, −2048, −3024 outside the reconstruction circle) become −1024; values above 32767 are
      clipped.
    * Duplicates: instances (or frames) at the same position (within 0.01 mm along n) whose HU pixels
      are identical are one slice: the one with the lowest SOP Instance UID (then frame) is kept and a
      warning lists the others.  Different pixels at one position mean two acquisitions in one series;
      no single volume is right, so :class:`AssemblyError` is raised.
    * Gaps: a step between positions larger than 2× the median step means missing slices and raises
      :class:`AssemblyError` naming the positions; a step more than 10 % off the median is a warning.
    * Enhanced CT: every frame is a slice; ``frame_numbers`` holds the 1-based frame per z index (and
      1 for single-frame instances mixed in) whenever a source is multi-frame.

    Parameters
    ----------
    root
        Spool root the header paths are relative to.
    choice
        The series chosen by :func:`triaged.assembly.select_series`.
    study_uid
        Study Instance UID recorded in the volume.
    datasets
        Headers already read from the series' files (by :func:`read_headers`), by path: a multi-frame
        header without per-frame positions is derived again from these instead of its file.

    Raises
    ------
    AssemblyError
        No series was chosen, the instances disagree on geometry, a file cannot be decoded, or the
        duplicate / gap rules above refuse the stack.
    StorageError
        A file cannot be read for a reason other than its absence.
    """
    if choice.series_uid is None or not choice.instances:
        raise AssemblyError(f"no series to load: {choice.reason}")
    series_uid = choice.series_uid
    headers = [_with_frame_positions(root, h, datasets or {}) for h in choice.instances]
    first = headers[0]
    orientation, rows, columns, (dy, dx) = _common_geometry(series_uid, headers)
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    n = slice_normal(orientation)
    multi_frame = any(h.number_of_frames > 1 or h.sop_class_uid == ENHANCED_CT_IMAGE_STORAGE for h in headers)

    refs: list[_SliceRef] = []
    for h in headers:
        for frame, pos in enumerate(instance_positions(h)):
            refs.append(
                _SliceRef(
                    h.path, h.sop_instance_uid, frame, pos, float(np.dot(pos, n)), h.number_of_frames > 1
                )
            )
    if not refs:
        raise AssemblyError(f"series {series_uid}: no slice has an ImagePositionPatient")

    groups = group_positions([r.offset for r in refs])
    # Deterministic keeper: the lowest (SOP Instance UID, frame) of each position.
    groups = [sorted(g, key=lambda i: (refs[i].sop_instance_uid, refs[i].frame)) for g in groups]
    slices = [refs[g[0]] for g in groups]
    offsets = [s.offset for s in slices]

    warnings: list[str] = []
    spacing_report = assess_spacing(offsets)
    if spacing_report.gaps:
        raise AssemblyError(f"series {series_uid} has missing slices: " + "; ".join(spacing_report.gaps))
    if spacing_report.irregular:
        warnings.append(
            "irregular slice spacing (> 10 % off the median): " + _listed(spacing_report.irregular)
        )
    if spacing_report.median_step_mm is not None:
        dz = spacing_report.median_step_mm
    else:
        dz = first.slice_thickness or 1.0
        warnings.append(f"single slice: z spacing taken from SliceThickness ({dz:g} mm)")

    hu = np.empty((len(slices), rows, columns), dtype=np.int16)
    wanted = {(s.path, s.frame): z for z, s in enumerate(slices)}
    for path, frames in _by_file(wanted):
        for frame, pixels in _decode_file(root, path, frames, rows, columns, warnings):
            hu[wanted[(path, frame)]] = pixels

    duplicates = {(refs[i].path, refs[i].frame): z for z, g in enumerate(groups) for i in g[1:]}
    mismatched: list[str] = []
    for path, frames in _by_file(duplicates):
        for frame, pixels in _decode_file(root, path, frames, rows, columns, warnings):
            z = duplicates[(path, frame)]
            kept = slices[z]
            dup = next(r for r in refs if (r.path, r.frame) == (path, frame))
            if np.array_equal(pixels, hu[z]):
                warnings.append(
                    f"duplicate slice at {offsets[z]:.2f} mm along the normal: {_name(dup)} has the same "
                    f"pixels as {_name(kept)}; kept {_name(kept)}"
                )
            else:
                diff = int(np.max(np.abs(pixels.astype(np.int32) - hu[z].astype(np.int32))))
                mismatched.append(f"{_name(dup)} and {_name(kept)} at {offsets[z]:.2f} mm (max |ΔHU| {diff})")
    if mismatched:
        raise AssemblyError(
            f"series {series_uid} holds different images at the same position (two acquisitions in one "
            f"series?): " + _listed(mismatched)
        )

    origin = np.asarray(slices[0].position, dtype=np.float64)
    slice_col = n * dz
    if len(slices) > 1:
        positions = np.asarray([s.position for s in slices], dtype=np.float64)
        along = np.outer(np.asarray(offsets) - offsets[0], n)
        shear = float(np.max(np.linalg.norm(positions - origin - along, axis=1)))
        if shear > 0.1 * min(dx, dy):
            slice_col = (positions[-1] - origin) / (offsets[-1] - offsets[0]) * dz
            warnings.append(
                f"slice positions are sheared up to {shear:.2f} mm against the slice normal (gantry tilt?); "
                "the affine's slice axis follows the positions"
            )
    affine = np.eye(4, dtype=np.float64)
    affine[:3, 0] = row_dir * dx
    affine[:3, 1] = col_dir * dy
    affine[:3, 2] = slice_col
    affine[:3, 3] = origin

    return Volume(
        hu=hu,
        spacing=(float(dz), float(dy), float(dx)),
        affine=affine,
        sop_instance_uids=tuple(s.sop_instance_uid for s in slices),
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        warnings=tuple(warnings),
        frame_numbers=tuple(s.frame + 1 for s in slices) if multi_frame else (),
    )


def _with_frame_positions(root: Path, h: InstanceHeader, datasets: Mapping[str, Dataset]) -> InstanceHeader:
    """A multi-frame header without per-frame positions is derived again from its header (read if not held)."""
    if h.number_of_frames > 1 and not (isinstance(h, FramedInstanceHeader) and h.frame_positions):
        try:
            ds = datasets.get(h.path)
            return header_from_dataset(ds, h.path) if ds is not None else read_header(root, h.path)
        except InvalidDatasetError as exc:
            raise AssemblyError(str(exc)) from exc
    return h


def _common_geometry(
    series_uid: str, headers: Sequence[InstanceHeader]
) -> tuple[tuple[float, ...], int, int, tuple[float, float]]:
    """Orientation, rows, columns and pixel spacing shared by every instance, else AssemblyError."""
    first = headers[0]
    if first.image_orientation is None or not first.rows or not first.columns or first.pixel_spacing is None:
        raise AssemblyError(
            f"series {series_uid}: {first.path} lacks ImageOrientationPatient, Rows, Columns or PixelSpacing"
        )
    try:
        slice_normal(first.image_orientation)
    except ValueError as exc:
        raise AssemblyError(f"series {series_uid}: {first.path}: {exc}") from exc
    for h in headers[1:]:
        same = (
            h.image_orientation is not None
            and h.pixel_spacing is not None
            and (h.rows, h.columns) == (first.rows, first.columns)
            and all(
                abs(a - b) <= _ORIENTATION_TOLERANCE
                for a, b in zip(h.image_orientation, first.image_orientation, strict=True)
            )
            and all(
                abs(a - b) <= _SPACING_TOLERANCE_MM
                for a, b in zip(h.pixel_spacing, first.pixel_spacing, strict=True)
            )
        )
        if not same:
            raise AssemblyError(
                f"series {series_uid}: {h.path} ({h.columns}×{h.rows}, spacing {h.pixel_spacing}, "
                f"orientation {h.image_orientation}) differs from {first.path} ({first.columns}×{first.rows}, "
                f"spacing {first.pixel_spacing}, orientation {first.image_orientation})"
            )
    return first.image_orientation, first.rows, first.columns, first.pixel_spacing


def _by_file(wanted: dict[tuple[str, int], int]) -> list[tuple[str, list[int]]]:
    """Group (path, frame) keys by file, files in order of their first z, frames increasing."""
    files: dict[str, list[int]] = {}
    for path, frame in sorted(wanted, key=lambda k: wanted[k]):
        files.setdefault(path, []).append(frame)
    return [(path, sorted(frames)) for path, frames in files.items()]


def _decode_file(
    root: Path, rel_path: str, frames: list[int], rows: int, columns: int, warnings: list[str]
) -> Iterable[tuple[int, npt.NDArray[np.int16]]]:
    """Yield (frame, HU int16 array) for the wanted frames of one file; one Dataset alive at a time."""
    try:
        ds = dcmread(root / rel_path, force=True)
    except FileNotFoundError as exc:
        raise AssemblyError(f"{rel_path}: file not found (removed from the spool?)") from exc
    except OSError as exc:
        raise StorageError(f"{rel_path}: cannot read: {exc.strerror or exc}") from exc
    except (InvalidDicomError, *_DECODE_ERRORS) as exc:
        raise AssemblyError(f"{rel_path}: not a readable DICOM file: {exc}") from exc

    if (_int(ds.get("Rows")), _int(ds.get("Columns"))) != (rows, columns):
        raise AssemblyError(
            f"{rel_path}: {ds.get('Columns')}×{ds.get('Rows')} pixels, the series header said {columns}×{rows}"
        )
    if (_int(ds.get("SamplesPerPixel")) or 1) != 1:
        raise AssemblyError(
            f"{rel_path}: {ds.get('SamplesPerPixel')} samples per pixel; CT must be grayscale"
        )
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
    syntax_name = getattr(transfer_syntax, "name", str(transfer_syntax))
    rescales = [_rescale(ds, frame, rel_path, warnings) for frame in frames]
    try:
        for frame, rescale, stored in zip(frames, rescales, iter_pixels(ds, indices=frames), strict=True):
            yield frame, _to_hu(stored, rescale)
    except _DECODE_ERRORS as exc:
        raise AssemblyError(f"{rel_path}: cannot decode pixel data ({syntax_name}): {exc}") from exc


def _rescale(ds: Dataset, frame: int, rel_path: str, warnings: list[str]) -> _Rescale:
    """Modality LUT of one frame: per-frame, then shared Pixel Value Transformation, then top level."""
    slope = intercept = None
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        item = per_frame[frame] if frame < len(per_frame) else None
        shared = _first_item(ds, "SharedFunctionalGroupsSequence")
        slope = _float(_functional(item, shared, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _float(_functional(item, shared, "PixelValueTransformationSequence", "RescaleIntercept"))
    if slope is None:
        slope = _float(ds.get("RescaleSlope"))
    if intercept is None:
        intercept = _float(ds.get("RescaleIntercept"))
    if slope is None or intercept is None or slope == 0:
        # Type 1 in the CT Image module; stored values are then taken as HU already.
        note = f"{rel_path}: no usable Rescale Slope/Intercept; stored values taken as HU"
        if note not in warnings:
            warnings.append(note)
        slope, intercept = 1.0, 0.0
    return _Rescale(
        slope,
        intercept,
        _padding(ds, "PixelPaddingValue"),
        _padding(ds, "PixelPaddingRangeLimit"),
    )


def _padding(ds: Dataset, keyword: str) -> int | None:
    """Pixel Padding Value / Range Limit in the stored-value domain (PS3.3 C.7.5.1.1.2).

    Its VR is US or SS following Pixel Representation, but files in the wild carry a US 63536 for a
    signed −2000, so the value is re-read in the signedness and width of the stored pixels.
    """
    if keyword not in ds:
        return None
    value = ds[keyword].value
    signed = _int(ds.get("PixelRepresentation")) == 1
    bits = _int(ds.get("BitsAllocated")) or 16
    if isinstance(value, bytes):
        little = ds.original_encoding[1] is not False
        return int.from_bytes(value[: bits // 8], "little" if little else "big", signed=signed)
    v = _int(value)
    if v is None:
        return None
    if signed and v >= 2 ** (bits - 1):
        v -= 2**bits
    elif not signed and v < 0:
        v += 2**bits
    return v


def _to_hu(stored: npt.NDArray[Any], r: _Rescale) -> npt.NDArray[np.int16]:
    """Stored values → HU int16 with padding and everything below air set to −1024."""
    if r.slope == 1.0 and float(r.intercept).is_integer():
        hu = stored.astype(np.int32) + int(r.intercept)
    else:
        hu = np.rint(stored.astype(np.float64) * r.slope + r.intercept)
    if r.padding is not None:
        if r.padding_limit is None:
            hu[stored == r.padding] = HU_AIR
        else:
            lo, hi = sorted((r.padding, r.padding_limit))
            hu[(stored >= lo) & (stored <= hi)] = HU_AIR
    return np.clip(hu, HU_AIR, _INT16_MAX).astype(np.int16)


def _name(ref: _SliceRef) -> str:
    return f"{ref.sop_instance_uid} frame {ref.frame + 1}" if ref.multi_frame else ref.sop_instance_uid


def _listed(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    return shown + (f"; and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


# ------------------------------------------------------------------------------------- NIfTI


def load_nifti(path: Path) -> Volume:
    """Read a NIfTI (or any SimpleITK-readable) CT image in HU into a :class:`Volume`.

    ITK keeps geometry in LPS whatever the file's RAS convention, so direction × spacing and the
    origin give the LPS affine directly.  There are no SOP Instance UIDs: outputs that reference
    source images cannot be made from such a volume.
    """
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InvalidDatasetError(f"{path}: cannot read as an image: {exc}") from exc
    if image.GetDimension() != 3:
        raise AssemblyError(f"{path}: a 3D image is needed, this one has {image.GetDimension()} dimensions")
    hu = sitk.GetArrayFromImage(image)
    hu = np.clip(np.rint(hu), -1024, 32767).astype(np.int16)
    sx, sy, sz = image.GetSpacing()
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection(), float).reshape(3, 3) * np.array([sx, sy, sz])
    affine[:3, 3] = image.GetOrigin()
    return Volume(
        hu=hu, spacing=(sz, sy, sx), affine=affine, sop_instance_uids=("",) * hu.shape[0],
        series_instance_uid="", study_instance_uid="",
    )


def write_nifti(volume: Volume, array: npt.NDArray[Any], path: Path) -> None:
    """Write ``array`` (on the volume's grid, (z, y, x)) as NIfTI with the volume's geometry."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (volume.affine[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in volume.affine[:3, 3]))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def load_series_folder(folder: Path, rules: SeriesSelectionConfig) -> tuple[Volume, SeriesChoice]:
    """Choose and load the best series of a folder of DICOM files (``triaged analyze``).

    Raises
    ------
    UnusableUIDsError
        No file has usable UIDs and at least one is DICOM whose SeriesInstanceUID or SOPInstanceUID is
        missing, empty or invalid (a bad anonymiser, a hand-edited export): the message counts them.
    AssemblyError
        No DICOM image at all, no analysable series (the series choice's reason), or an unreadable one.
    """
    from triaged.assembly import select_series

    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    headers: list[InstanceHeader] = []
    bad_uids: list[str] = []
    for rel in paths:
        try:
            with warnings.catch_warnings():
                # pydicom warns about each invalid UI value; the UID problem is reported below, once.
                warnings.simplefilter("ignore", UserWarning)
                headers.append(read_header(folder, rel))
        except InstanceUIDError as exc:
            bad_uids.append(str(exc))
        except TriagedError:
            continue  # not DICOM (a README, a thumbnail) or unreadable: as read_headers, skip the file
        except Exception:  # noqa: BLE001, S112 - a malformed file must not stop the others
            continue
    if not headers:
        if bad_uids:
            example = bad_uids[0].replace("not a usable DICOM instance: ", "")
            raise UnusableUIDsError(
                f"{len(bad_uids)} DICOM file(s) in {folder} have no or invalid "
                f"SeriesInstanceUID/SOPInstanceUID (e.g. {example}); no series can be assembled",
                len(bad_uids),
            )
        raise AssemblyError(f"{folder}: no DICOM image found among {len(paths)} file(s)")
    choice = select_series(headers, rules)
    if bad_uids:
        choice = replace(
            choice,
            reason=f"{choice.reason}; {len(bad_uids)} file(s) without valid SeriesInstanceUID/SOPInstanceUID "
            "skipped",
        )
    if choice.series_uid is None:
        raise AssemblyError(f"{folder}: {choice.reason}")
    first = folder / choice.instances[0].path
    study_uid = str(dcmread(first, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).get(
        "StudyInstanceUID", ""))
    return load_volume(folder, choice, study_uid), choice
