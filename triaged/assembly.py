"""Choose the series of a study to analyse, from instance headers only.

Pure logic: no file I/O.  :func:`select_series` groups the headers of a frozen study by Series Instance
UID, gives every series a verdict (analysable axial CT stack, or refused and why) and picks the best
stack.  The slice-geometry helpers (:func:`slice_normal`, :func:`group_positions`, :func:`assess_spacing`)
are shared with :mod:`triaged.volume` so that the series choice and the volume load apply one rule.

DICOM references: PS3.3 C.7.6.1.1.2 Image Type, C.7.6.2 Image Plane (ImageOrientationPatient,
ImagePositionPatient, PixelSpacing), C.8.2.1 CT Image, C.8.15 Enhanced CT Image and C.7.6.16 Multi-frame
Functional Groups (per-frame Plane Position), PS3.4 B.5 (Storage SOP Classes).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from triaged.config import SeriesSelectionConfig
from triaged.domain import CT_SOP_CLASSES, InstanceHeader, SeriesChoice

#: Two slice positions closer than this along the normal are the same position.  DS values carry at
#: most 16 characters; real scanners write positions to 0.001 mm or better, real steps are >= 0.1 mm.
POSITION_TOLERANCE_MM = 0.01
#: A slice step further than this fraction from the median step is "irregular" (a warning).
IRREGULAR_STEP_FRACTION = 0.10
#: A slice step larger than this multiple of the median step is a gap: missing slices (an error).
GAP_FACTOR = 2.0
#: Slice thickness classes for ranking (mm): within one class the kernel decides, across classes the
#: thinner class wins, so a 1 mm soft-tissue series beats a 5 mm lung series.
THICKNESS_CLASSES_MM = (1.5, 3.0)

# Tolerances for "the same geometry" inside one series.
_ORIENTATION_TOLERANCE = 1e-3  # direction cosines; ~0.06 degrees
_SPACING_TOLERANCE_MM = 1e-3

# PS3.4 B.5: Structured Report and Secondary Capture storage SOP class roots, and the dose SR classes.
_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_SC_CLASS_ROOT = "1.2.840.10008.5.1.4.1.1.7"  # .7 and its children .7.1 ... .7.4
_DOSE_SR_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
        "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR
        "1.2.840.10008.5.1.4.1.1.88.73",  # Patient Radiation Dose SR
        "1.2.840.10008.5.1.4.1.1.88.76",  # Enhanced X-Ray Radiation Dose SR
    }
)
# "Low dose chest" is an analysable screening CT, so "DOSE" alone in a description does not make a dose
# report; it does together with REPORT/INFO/..., or on an SR/SC object.  "Patient Protocol" is the
# Siemens dose screen.
_DOSE_DESCRIPTION = re.compile(r"\bDOSE\s*(REPORT|INFO|SUMMARY|SCREEN|SR)\b|PATIENT\s+PROTOCOL", re.I)
# PS3.3 C.7.6.1.1.2 / C.8.2.1.1.1 / C.8.16.1: Image Type values 3 and later that mark reformats,
# projections and renderings: not the acquired axial slices.  Whole values, and words within a value
# ("CSA MPR", "MIP_THICK", "VOLUME RENDERING").
_REFORMAT_VALUES = frozenset(
    {"PROJECTION IMAGE", "VOLUME RENDERING", "VOLUME_RENDER", "VOLUME RENDER", "SURFACE RENDERING", "CURVED"}
)
_REFORMAT_WORDS = frozenset(
    {
        "MPR", "MIP", "MINIP", "MAXIP", "AVERAGE", "AVG", "REFORMATTED", "REFORMAT", "CPR", "CURVED",
        "PROJECTION", "3D", "VR", "VRT", "SSD", "RENDERING", "SLAB",
    }
)
_LOCALIZER_MARKERS = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM"})


@dataclass(frozen=True)
class FramedInstanceHeader(InstanceHeader):
    """An Enhanced CT (multi-frame) instance header with the position of every frame.

    PS3.3 C.7.6.16.2.3 Plane Position (Patient) Macro: in a multi-frame image the position lives per
    frame, so one ``image_position`` (that of frame 1) cannot tell the extent of the stack.
    ``frame_positions[i]`` is the ImagePositionPatient of frame ``i + 1``.
    """

    frame_positions: tuple[tuple[float, float, float], ...] = ()


@dataclass(frozen=True)
class SpacingReport:
    """How regular the slice steps of a stack are (see :func:`assess_spacing`)."""

    median_step_mm: float | None  # None for a single position
    irregular: tuple[str, ...] = ()  # one message per step more than 10 % off the median
    gaps: tuple[str, ...] = ()  # one message per step more than 2x the median


@dataclass(frozen=True)
class _SlicePoint:
    """One slice (an instance, or one frame of a multi-frame instance) of a candidate stack."""

    header: InstanceHeader
    offset: float  # position along the slice normal, mm


@dataclass
class _Stack:
    """Instances of one series that share rows, columns, pixel spacing and orientation."""

    headers: list[InstanceHeader] = field(default_factory=list)

    @property
    def key(self) -> InstanceHeader:
        return self.headers[0]


@dataclass(frozen=True)
class _Verdict:
    """The assessment of one series (or of its best consistent stack)."""

    label: str  # "series 3 'Lung 1.0 B70f'"
    uid: str
    category: str | None  # localizer / dose report / ...: counted in a refusal; None for image stacks
    summary: str  # "312 axial slices × 1.0 mm, 311 mm coverage, kernel B70f"
    problems: tuple[str, ...]  # empty: eligible
    notes: tuple[str, ...] = ()
    instances: tuple[InstanceHeader, ...] = ()
    rank: tuple[float, ...] = ()
    slices: int = 0
    thickness: float | None = None
    kernel: str = ""
    coverage: float = 0.0

    @property
    def eligible(self) -> bool:
        return self.category is None and not self.problems


def slice_normal(orientation: Sequence[float]) -> npt.NDArray[np.float64]:
    """Unit slice normal ``n = row_dir × col_dir`` of an ImageOrientationPatient (PS3.3 C.7.6.2.1.1).

    Slices sorted by ``dot(ImagePositionPatient, n)`` run along +n, the third axis of a right-handed
    (column, row, slice) voxel frame.

    Raises
    ------
    ValueError
        If the orientation does not have 6 values or its two direction cosines are parallel or zero.
    """
    if len(orientation) != 6:
        raise ValueError(f"ImageOrientationPatient has {len(orientation)} values, not 6")
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    norm = float(np.linalg.norm(n))
    if not math.isfinite(norm) or norm < 1e-6:
        raise ValueError(
            f"ImageOrientationPatient {tuple(orientation)} has parallel or zero direction cosines"
        )
    return n / norm


def tilt_degrees(orientation: Sequence[float]) -> float:
    """Angle between the slice normal and the patient z (head-feet) axis, in degrees (0 = axial)."""
    n = slice_normal(orientation)
    return math.degrees(math.acos(min(1.0, abs(float(n[2])))))


def group_positions(offsets: Sequence[float], tolerance: float = POSITION_TOLERANCE_MM) -> list[list[int]]:
    """Group indices of ``offsets`` (positions along the normal) that are the same position.

    Returns groups in increasing offset order; each group lists indices into ``offsets`` in their input
    order.  Consecutive sorted offsets within ``tolerance`` of the group's first join the group.
    """
    order = sorted(range(len(offsets)), key=lambda i: (offsets[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and offsets[i] - offsets[groups[-1][0]] <= tolerance:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def assess_spacing(offsets: Sequence[float]) -> SpacingReport:
    """Check the steps between sorted, distinct slice positions along the normal.

    The median step is the slice spacing (PS3.3 C.7.6.2: slice spacing is derived from
    ImagePositionPatient, not from SliceThickness or SpacingBetweenSlices).  A step more than 10 % off
    the median is *irregular* (reported, harmless for most analyses); a step larger than twice the median
    is a *gap*: slices are missing and a volume built from the stack would be distorted.

    Parameters
    ----------
    offsets
        Distinct positions along the slice normal in mm, increasing.
    """
    if len(offsets) < 2:
        return SpacingReport(median_step_mm=None)
    pos = np.asarray(offsets, dtype=np.float64)
    steps = np.diff(pos)
    median = float(np.median(steps))
    irregular: list[str] = []
    gaps: list[str] = []
    for k, step in enumerate(steps):
        where = f"between {_fmt_mm(float(pos[k]))} and {_fmt_mm(float(pos[k + 1]))} mm"
        if step > GAP_FACTOR * median:
            gaps.append(
                f"gap of {_fmt_mm(float(step))} mm {where} along the slice normal "
                f"(median step {_fmt_mm(median)} mm; about {round(step / median) - 1} slice(s) missing)"
            )
        if abs(step - median) > IRREGULAR_STEP_FRACTION * median:
            irregular.append(f"step {_fmt_mm(float(step))} mm {where} (median {_fmt_mm(median)} mm)")
    return SpacingReport(median_step_mm=median, irregular=tuple(irregular), gaps=tuple(gaps))


def instance_positions(header: InstanceHeader) -> list[tuple[float, float, float]]:
    """The ImagePositionPatient of every slice an instance contributes (one per frame).

    A multi-frame header without per-frame positions contributes ``number_of_frames`` copies of its
    single position: the stack then looks like duplicates and is refused rather than guessed.
    """
    if isinstance(header, FramedInstanceHeader) and header.frame_positions:
        return list(header.frame_positions)
    if header.image_position is None:
        return []
    return [header.image_position] * max(1, header.number_of_frames)


def select_series(headers: Sequence[InstanceHeader], rules: SeriesSelectionConfig) -> SeriesChoice:
    """Choose the series to analyse from the headers of one study.

    A series is eligible when it is CT (Modality CT; CT Image Storage or Enhanced CT Image Storage, PS3.4
    B.5), acquired axial slices (PS3.3 C.7.6.1.1.2 Image Type: no reformat/projection/rendering marker
    such as MPR, MIP, MINIP, REFORMATTED, PROJECTION IMAGE, CURVED, 3D or VOLUME RENDERING in values 3+,
    not DERIVED\\SECONDARY, not a LOCALIZER), not a dose report (SR or Secondary Capture object, or a
    "Dose Report"-like description), axial (slice normal of ImageOrientationPatient, PS3.3 C.7.6.2.1.1,
    within ``rules.max_tilt_degrees`` of the patient z axis), geometrically consistent (the same Rows,
    Columns, PixelSpacing and orientation; when a series mixes geometries its largest eligible consistent
    stack is used), without gaps (no step between slice positions > 2x the median), and covers enough:
    ``rules.min_slices`` distinct slice positions and ``rules.min_coverage_mm`` along the normal (the span
    of slice centres plus one median step, i.e. the length imaged).

    ``DERIVED\\PRIMARY\\AXIAL`` CT is accepted: PET/CT scanners label the CT of the attenuation series
    so, and vendors their own reconstructions; such series rank below every ORIGINAL one.
    ``ORIGINAL\\SECONDARY`` images are accepted too: SECONDARY only says the image was created after the
    examination, which is how retrospective reconstructions from raw data are labelled (e.g. GE).

    Among eligible series the ranking is: ORIGINAL before DERIVED, then thickness class (<= 1.5 mm,
    <= 3 mm, thicker), then the first ``rules.preferred_kernels`` substring found in ConvolutionKernel
    (else in SeriesDescription), then thinner slices, then more slices, then the lower Series Number.
    The reason names the criterion that decided against the runner-up.

    Parameters
    ----------
    headers
        Headers of every instance of the study (any order, any SOP class).
    rules
        Thresholds and kernel preferences.

    Returns
    -------
    SeriesChoice
        ``series_uid`` set and ``instances`` the chosen stack, or ``series_uid`` None and a ``reason``
        listing what was found.  ``candidates`` has one line per series with its verdict.
    """
    by_series: dict[str, list[InstanceHeader]] = {}
    for h in headers:
        by_series.setdefault(h.series_instance_uid, []).append(h)

    verdicts = [_assess_series(hs, rules) for hs in by_series.values()]
    verdicts.sort(key=lambda v: (_series_number(by_series[v.uid]), v.uid))
    eligible = sorted((v for v in verdicts if v.eligible), key=lambda v: v.rank)
    chosen = eligible[0] if eligible else None

    candidates: list[str] = []
    for v in verdicts:
        if v is chosen:
            outcome = "chosen"
        elif v.eligible:
            outcome = f"eligible, ranked {eligible.index(v) + 1} of {len(eligible)}"
        else:
            outcome = "refused: " + "; ".join(v.problems or (v.category or "not analysable",))
        notes = f" [{'; '.join(v.notes)}]" if v.notes else ""
        candidates.append(f"{v.label} ({v.uid}): {v.summary}{notes} -> {outcome}")

    if chosen is not None:
        reason = f"{chosen.label}: {chosen.summary}"
        if chosen.notes:
            reason += f" ({'; '.join(chosen.notes)})"
        if len(eligible) > 1:
            why = _why_first(chosen, eligible[1])
            reason += f"; preferred over {len(eligible) - 1} other eligible series ({why})"
        return SeriesChoice(
            series_uid=chosen.uid, reason=reason, instances=chosen.instances, candidates=tuple(candidates)
        )

    wanted = (
        f"no axial CT series with ≥ {rules.min_slices} slices and ≥ {rules.min_coverage_mm:g} mm coverage"
    )
    return SeriesChoice(
        series_uid=None, reason=f"{wanted}; found: {_found(verdicts)}", candidates=tuple(candidates)
    )


#: The rank keys of :func:`_assess_stack`, in order, in words.
_RANK_WORDS = (
    "image type (ORIGINAL before DERIVED)",
    "slice thickness class (≤ 1.5 mm, ≤ 3 mm, thicker)",
    "kernel preference",
    "slice thickness",
    "number of slices",
    "series number",
)


def _why_first(first: _Verdict, second: _Verdict) -> str:
    """The ranking criterion that put ``first`` before the runner-up ``second``, in words."""
    for words, a, b in zip(_RANK_WORDS, first.rank, second.rank, strict=False):
        if a != b:
            return f"next: {second.label}, ranked lower by {words}"
    return f"next: {second.label}, ranked equal"


def _found(verdicts: list[_Verdict]) -> str:
    """Summarise refused series: non-image categories as counts, image series one by one."""
    if not verdicts:
        return "no instances"
    counts = Counter(v.category for v in verdicts if v.category is not None)
    parts = [f"{cat} ×{n}" for cat, n in counts.items()]
    for v in verdicts:
        if v.category is None:
            parts.append(f"{v.label} {v.summary} ({'; '.join(v.problems)})")
    return ", ".join(parts)


def _series_number(hs: Sequence[InstanceHeader]) -> float:
    numbers = [h.series_number for h in hs if h.series_number is not None]
    return float(min(numbers)) if numbers else math.inf


def _label(hs: Sequence[InstanceHeader]) -> str:
    number = next((h.series_number for h in hs if h.series_number is not None), None)
    desc = next((h.series_description.strip() for h in hs if h.series_description.strip()), "")
    name = f"series {number}" if number is not None else f"series {hs[0].series_instance_uid}"
    return f"{name} '{desc}'" if desc else f"{name} (no description)"


def _instance_category(h: InstanceHeader) -> str | None:
    """Why one instance is no CT image slice (None: it may be one), in the words of a refusal."""
    sop = h.sop_class_uid
    modality = h.modality.upper().strip()
    is_sr = modality == "SR" or sop.startswith(_SR_CLASS_PREFIX)
    is_sc = sop == _SC_CLASS_ROOT or sop.startswith(_SC_CLASS_ROOT + ".")
    desc = h.series_description.upper()
    if sop in _DOSE_SR_CLASSES or _DOSE_DESCRIPTION.search(desc) or ((is_sr or is_sc) and "DOSE" in desc):
        return "dose report"
    if is_sr:
        return "structured report"
    if is_sc:
        return "secondary capture"
    if modality != "CT":
        return f"non-CT ({modality or 'no modality'})"
    if sop not in CT_SOP_CLASSES:
        return f"non-image CT object (SOP class {sop})"
    image_type = tuple(v.upper().strip() for v in h.image_type)
    if _LOCALIZER_MARKERS.intersection(image_type):
        return "localizer"
    if _is_reformat(image_type):
        return "derived reformat"
    if image_type[:2] == ("DERIVED", "SECONDARY"):
        # DERIVED\SECONDARY: made from other images after the examination (post-processing, a
        # reformat without a value-3 marker).  DERIVED\PRIMARY (PET/CT attenuation CT, vendor
        # reconstructions) and ORIGINAL\SECONDARY (retrospective reconstructions) are read.
        return "derived secondary image"
    return None


def _is_reformat(image_type: tuple[str, ...]) -> bool:
    """Whether Image Type values 3+ mark a reformat, projection or rendering (MPR, MIP, 3D, ...)."""
    for value in image_type[2:]:
        if value in _REFORMAT_VALUES or _REFORMAT_WORDS.intersection(re.split(r"[\s_]+", value)):
            return True
    return False


def _is_derived(hs: Sequence[InstanceHeader]) -> bool:
    """Whether most images of a stack are DERIVED (Image Type value 1), e.g. DERIVED\\PRIMARY\\AXIAL."""
    derived = sum(1 for h in hs if h.image_type[:1] and h.image_type[0].upper().strip() == "DERIVED")
    return 2 * derived > len(hs)


def _assess_series(hs: list[InstanceHeader], rules: SeriesSelectionConfig) -> _Verdict:
    label = _label(hs)
    uid = hs[0].series_instance_uid
    categories = [_instance_category(h) for h in hs]
    images = [h for h, c in zip(hs, categories, strict=True) if c is None]
    notes: list[str] = []
    if not images:
        # Vendors put one kind of object per series; the most common kind names the series.
        category = Counter(categories).most_common(1)[0][0]
        return _Verdict(label, uid, category, f"{len(hs)} instance(s)", (), ())
    if len(images) < len(hs):
        others = Counter(c for c in categories if c is not None)
        notes.append("ignored " + ", ".join(f"{c} ×{n}" for c, n in others.items()))

    located = [
        h
        for h in images
        if h.image_orientation is not None
        and h.image_position is not None
        and h.rows
        and h.columns
        and h.pixel_spacing is not None
        and _normal_or_none(h.image_orientation) is not None
    ]
    if not located:
        return _Verdict(
            label,
            uid,
            None,
            f"{len(images)} image(s)",
            ("no usable Image Plane geometry (ImageOrientationPatient/ImagePositionPatient/PixelSpacing)",),
            tuple(notes),
        )
    if len(located) < len(images):
        notes.append(f"ignored {len(images) - len(located)} image(s) without Image Plane geometry")

    # Scouts: one or two single-frame images that are not axial (some vendors omit LOCALIZER).
    if len(located) <= 2 and all(h.number_of_frames <= 1 for h in located):
        if all(tilt_degrees(h.image_orientation or ()) > rules.max_tilt_degrees for h in located):
            return _Verdict(label, uid, "localizer", f"{len(located)} non-axial image(s)", (), tuple(notes))

    stacks = _split_stacks(located)
    assessed = [_assess_stack(label, uid, s.headers, rules) for s in stacks]
    if len(stacks) == 1:
        v = assessed[0]
        return replace(v, notes=tuple(notes) + v.notes)
    described = "; ".join(
        f"{s.key.columns}×{s.key.rows} {_fmt_mm(_ps(s.key)[1])} mm {_orientation_name(s.key)} ×{len(s.headers)}"
        for s in stacks
    )
    mixed = f"mixed geometry in one series: {len(stacks)} stacks ({described})"
    ok = sorted((v for v in assessed if v.eligible), key=lambda v: v.rank)
    if ok:
        best = ok[0]
        used = f"{mixed}; using the stack of {len(best.instances)} of {len(located)} images"
        return replace(best, notes=(*notes, used, *best.notes))
    largest = max(assessed, key=lambda v: len(v.instances))
    return _Verdict(
        label,
        uid,
        None,
        largest.summary,
        (f"{mixed}, none analysable on its own; largest: {'; '.join(largest.problems)}",),
        tuple(notes),
    )


def _normal_or_none(orientation: Sequence[float]) -> npt.NDArray[np.float64] | None:
    try:
        return slice_normal(orientation)
    except ValueError:
        return None


def _ps(h: InstanceHeader) -> tuple[float, float]:
    return h.pixel_spacing if h.pixel_spacing is not None else (math.nan, math.nan)


def _same_geometry(a: InstanceHeader, b: InstanceHeader) -> bool:
    if (a.rows, a.columns) != (b.rows, b.columns):
        return False
    if any(abs(x - y) > _SPACING_TOLERANCE_MM for x, y in zip(_ps(a), _ps(b), strict=True)):
        return False
    oa, ob = a.image_orientation or (), b.image_orientation or ()
    return len(oa) == len(ob) == 6 and all(
        abs(x - y) <= _ORIENTATION_TOLERANCE for x, y in zip(oa, ob, strict=True)
    )


def _split_stacks(hs: list[InstanceHeader]) -> list[_Stack]:
    """Partition instances into stacks of identical geometry, largest first."""
    stacks: list[_Stack] = []
    for h in hs:
        for s in stacks:
            if _same_geometry(s.key, h):
                s.headers.append(h)
                break
        else:
            stacks.append(_Stack([h]))
    stacks.sort(key=lambda s: -sum(max(1, h.number_of_frames) for h in s.headers))
    return stacks


def _orientation_name(h: InstanceHeader) -> str:
    n = np.abs(slice_normal(h.image_orientation or ()))
    return ("sagittal", "coronal", "axial")[int(np.argmax(n))]


def _kernel(hs: Sequence[InstanceHeader]) -> str:
    kernels = Counter(h.convolution_kernel.strip() for h in hs if h.convolution_kernel.strip())
    return kernels.most_common(1)[0][0] if kernels else ""


def _kernel_rank(kernel: str, description: str, preferred: Sequence[str]) -> int:
    for text in (kernel.upper(), description.upper()):
        if not text:
            continue
        for i, sub in enumerate(preferred):
            if sub and sub.upper() in text:
                return i
    return len(preferred)


def _thickness_class(thickness: float | None) -> int:
    if thickness is None or not math.isfinite(thickness):
        return len(THICKNESS_CLASSES_MM)
    return next(
        (i for i, limit in enumerate(THICKNESS_CLASSES_MM) if thickness <= limit), len(THICKNESS_CLASSES_MM)
    )


def _assess_stack(label: str, uid: str, hs: list[InstanceHeader], rules: SeriesSelectionConfig) -> _Verdict:
    """Verdict for instances of one consistent geometry."""
    orientation = hs[0].image_orientation or ()
    n = slice_normal(orientation)
    tilt = tilt_degrees(orientation)
    points = [_SlicePoint(h, float(np.dot(p, n))) for h in hs for p in instance_positions(h)]
    groups = group_positions([p.offset for p in points])
    offsets = [points[g[0]].offset for g in groups]
    slices = len(groups)
    spacing = assess_spacing(offsets)
    step = spacing.median_step_mm
    thicknesses = [h.slice_thickness for h in hs if h.slice_thickness is not None and h.slice_thickness > 0]
    thickness = float(np.median(thicknesses)) if thicknesses else step
    coverage = (offsets[-1] - offsets[0]) + (step if step is not None else (thickness or 0.0))
    kernel = _kernel(hs)
    description = next((h.series_description for h in hs if h.series_description), "")

    name = _orientation_name(hs[0])
    axial = tilt <= rules.max_tilt_degrees
    kind = "axial" if axial else ("oblique" if name == "axial" else name)
    summary = f"{slices} {kind} slices × {_fmt_mm(thickness) if thickness else '?'} mm"
    if step is not None and thickness is not None and abs(step - thickness) > _SPACING_TOLERANCE_MM * 10:
        summary += f" (step {_fmt_mm(step)} mm)"
    summary += f", {coverage:.0f} mm coverage, kernel {kernel or 'unknown'}"

    problems: list[str] = []
    notes: list[str] = []
    if not axial:
        problems.append(
            f"not axial: slice normal {tilt:.1f}° from the patient z axis (> {rules.max_tilt_degrees:g}°)"
        )
    if slices < rules.min_slices:
        problems.append(f"too few slices: {slices} < {rules.min_slices}")
    if coverage < rules.min_coverage_mm:
        problems.append(f"too short: {coverage:.0f} mm coverage < {rules.min_coverage_mm:g} mm")
    problems.extend(spacing.gaps)
    if len(points) > slices:
        notes.append(f"{len(points) - slices} duplicate slice position(s)")
    if spacing.irregular and not spacing.gaps:
        notes.append(f"{len(spacing.irregular)} irregular slice step(s)")

    derived = _is_derived(hs)
    if derived:
        types = Counter("\\".join(h.image_type[:3]) for h in hs if h.image_type)
        notes.append(f"{types.most_common(1)[0][0]} image type: accepted, ranked below ORIGINAL series")
    rank = (
        float(derived),
        float(_thickness_class(thickness)),
        float(_kernel_rank(kernel, description, rules.preferred_kernels)),
        thickness if thickness is not None else math.inf,
        -float(slices),
        _series_number(hs),
    )
    return _Verdict(
        label=label,
        uid=uid,
        category=None,
        summary=summary,
        problems=tuple(problems),
        notes=tuple(notes),
        instances=tuple(hs),
        rank=rank,
        slices=slices,
        thickness=thickness,
        kernel=kernel,
        coverage=coverage,
    )


def _fmt_mm(x: float) -> str:
    """Millimetres with up to 3 decimals and at least one: 1.0, 2.5, 1.25, 0.625."""
    s = f"{x:.3f}".rstrip("0")
    return s + "0" if s.endswith(".") else s
