"""Encode the analysis masks as a DICOM Segmentation (PS3.3 A.51 Segmentation IOD, C.8.20 SEG modules).

One BINARY Segmentation instance in the analysed study, in its own series, derived from the analysed CT
series.  Segments (numbered in this order, empty ones left out):

1. right lung, 2. left lung (SCT anatomical structure),
3. lung opacity, ground glass and consolidation together (DCM 112001 Opacity, morphologically abnormal
   structure), labelled "Lung opacity (ground glass / consolidation)"; only a pipeline whose COVID-19
   classifier was validated on real data and calls the study COVID-19 (P >= 0.5) labels it as COVID-19
   pneumonia opacity, 4. consolidation (SCT Lung consolidation),
5–9. lobes RUL, RML, RLL, LUL, LLL when the pipeline produced ``masks.lobes``.

Every segment has a Segment Description (0062,0006) saying what it is and how it was found, and an
Anatomic Region Sequence (SCT Lung) with a laterality modifier (Right, Left or Bilateral, PS3.16 CID
244) for the side(s) it lies in.  The segment label is also the segment's Tracking ID, and the SR uses
the same text as the Tracking Identifier of the group with the same Tracking UID.

Lesions overlap the lungs and consolidation overlaps lesions, so the segments are encoded as separate
binary frames (a label map cannot hold them).  Every segment carries the pipeline's Segment Algorithm
Identification (PS3.3 C.8.20.2.1, algorithm type AUTOMATIC) with the model's SHA-256 as a parameter; its
family (PS3.16 CID 7162) is Artificial Intelligence for a learned pipeline and the non-learned
pipeline's own family otherwise (:func:`triaged.encode.codes.algorithm_family`); frames without any
pixel of their segment are omitted (highdicom's ``omit_empty_frames``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from triaged.domain import Findings, Masks, Volume
from triaged.encode import codes
from triaged.encode.context import (
    SEG_SERIES_DESCRIPTION,
    OutputContext,
    SourceImages,
    body_part,
    map_source_images,
    set_content_datetime,
)
from triaged.encode.uids import OutputUIDs, derive_uid, output_uids, tracking_uid


@dataclass(frozen=True)
class SegmentSpec:
    """What one segment is: a stable key, its label and its PS3.16 CID 7150/7151 codes.

    ``label`` is the Segment Label and Tracking ID (and the SR's Tracking Identifier); ``description``
    the Segment Description; ``side`` the lung side(s) it lies in ("right", "left", "both" or "" when
    not known), the laterality modifier of its anatomic region (SCT Lung).
    """

    key: str  # "right_lung", "left_lung", "lesions", "consolidation", "lobe_1" ... "lobe_5"
    label: str
    category: Code
    property_type: Code
    rgb: tuple[int, int, int]  # recommended display colour
    description: str = ""
    side: str = ""


#: Segment label of the lesion segment (and SR Tracking Identifier): neutral, names no cause.
OPACITY_LABEL = "Lung opacity (ground glass / consolidation)"
#: The label when a classifier validated on real data calls the study COVID-19 (P(COVID-19) >= 0.5).
COVID_OPACITY_LABEL = "COVID-19 pneumonia opacity (ground glass / consolidation)"


def lesion_label(findings: Findings | None) -> str:
    """Label of the lesion segment: COVID-19 only on the word of a classifier validated on real data.

    A pipeline reports ``p_covid`` only when its classifier was validated on real data (the SR's
    "P(COVID-19): not assessed" otherwise); the segment is called COVID-19 pneumonia opacity when that
    probability is at least 0.5, else the neutral :data:`OPACITY_LABEL`.
    """
    p = findings.p_covid if findings is not None else None
    if p is not None and math.isfinite(p) and p >= 0.5:
        return COVID_OPACITY_LABEL
    return OPACITY_LABEL


def segment_label(key: str, findings: Findings | None = None) -> str:
    """The Segment Label (= Tracking ID, = SR Tracking Identifier) of the segment with ``key``."""
    if key == "lesions":
        return lesion_label(findings)
    for spec, _ in _LUNG_SEGMENTS:
        if spec.key == key:
            return spec.label
    for label, code in codes.LOBES:
        if key == f"lobe_{label}":
            return code.meaning
    raise KeyError(f"no segment with key {key!r}")


@dataclass(frozen=True)
class SegmentationReference:
    """Where a SEG is and which segment number holds which structure (for the SR's references)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    source_series_instance_uid: str
    segment_numbers: tuple[tuple[str, int], ...]  # (SegmentSpec.key, Segment Number)
    sop_class_uid: str = SegmentationStorage

    def number(self, key: str) -> int | None:
        """Segment Number of the segment with ``key``, None when the SEG has no such segment."""
        return dict(self.segment_numbers).get(key)

    def evidence(self) -> Dataset:
        """The minimal dataset highdicom needs to list the SEG as SR evidence (PS3.3 C.17.2.3)."""
        ds = Dataset()
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        return ds


# Segments in SEG order, and how each is cut from Masks (the slices ``zs`` of it).
_LUNG_SEGMENTS: tuple[tuple[SegmentSpec, Callable[[Masks, slice], npt.NDArray[np.bool_]]], ...] = (
    (
        SegmentSpec(
            "right_lung",
            "Right lung",
            codes.ANATOMICAL_STRUCTURE,
            codes.RIGHT_LUNG,
            (80, 160, 255),
            "Right lung, aerated and opacified parts, automatic segmentation",
            "right",
        ),
        lambda m, zs: m.lungs[zs] == 1,
    ),
    (
        SegmentSpec(
            "left_lung",
            "Left lung",
            codes.ANATOMICAL_STRUCTURE,
            codes.LEFT_LUNG,
            (80, 220, 120),
            "Left lung, aerated and opacified parts, automatic segmentation",
            "left",
        ),
        lambda m, zs: m.lungs[zs] == 2,
    ),
    (
        SegmentSpec(
            "lesions",
            OPACITY_LABEL,
            codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            codes.OPACITY,
            (255, 170, 0),
            "Lung opacity: ground-glass opacity and consolidation together, automatic segmentation; "
            "not a diagnosis of its cause",
        ),
        lambda m, zs: m.lesions[zs].astype(bool, copy=False),
    ),
    (
        SegmentSpec(
            "consolidation",
            "Consolidation",
            codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            codes.LUNG_CONSOLIDATION,
            (230, 40, 40),
            "Consolidation: the dense part of the lung opacity, automatic segmentation",
        ),
        lambda m, zs: m.consolidation[zs].astype(bool, copy=False),
    ),
)
_LOBE_COLOURS = ((128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79))
#: Key of every segment the encoder can write, in SEG order.
SEGMENT_KEYS: tuple[str, ...] = tuple(s.key for s, _ in _LUNG_SEGMENTS) + tuple(
    f"lobe_{label}" for label, _ in codes.LOBES
)


#: Slices cut at once when a segment is checked for emptiness (bounds the temporaries).
_SLAB = 16

#: A segment's mask on the slices ``zs`` (a (z, y, x) boolean array).
SegmentCut = Callable[[slice], npt.NDArray[np.bool_]]


def _lobe_cut(masks: Masks, label: int) -> SegmentCut:
    lobes = masks.lobes
    assert lobes is not None
    return lambda zs: lobes[zs] == label


def _sides(masks: Masks, cut: SegmentCut) -> str:
    """ "right", "left", "both" or "": the lung(s) a segment's voxels lie in, slab by slab."""
    right = left = False
    for z0 in range(0, masks.lungs.shape[0], _SLAB):
        zs = slice(z0, z0 + _SLAB)
        part = cut(zs)
        if not part.any():
            continue
        lungs = masks.lungs[zs][part]
        right = right or bool((lungs == 1).any())
        left = left or bool((lungs == 2).any())
        if right and left:
            return "both"
    return "right" if right else "left" if left else ""


def planned_cuts(masks: Masks, findings: Findings | None = None) -> list[tuple[SegmentSpec, SegmentCut]]:
    """The non-empty segments of ``masks`` in SEG order, each with a function cutting its mask slab-wise.

    Nothing of the size of the volume is allocated: emptiness is checked :data:`_SLAB` slices at a time.
    ``findings`` decide the lesion segment's label (:func:`lesion_label`).
    """
    nz = masks.lungs.shape[0]

    def non_empty(cut: SegmentCut) -> bool:
        return any(cut(slice(z0, z0 + _SLAB)).any() for z0 in range(0, nz, _SLAB))

    planned: list[tuple[SegmentSpec, SegmentCut]] = []
    for spec, cut_of in _LUNG_SEGMENTS:
        cut: SegmentCut = functools.partial(cut_of, masks)
        if non_empty(cut):
            if spec.key in ("lesions", "consolidation"):
                text = lesion_label(findings) if spec.key == "lesions" else spec.label
                spec = replace(spec, label=text, side=_sides(masks, cut))
            planned.append((spec, cut))
    if masks.lobes is not None:
        for (label, code), rgb in zip(codes.LOBES, _LOBE_COLOURS, strict=True):
            lobe = _lobe_cut(masks, label)
            if non_empty(lobe):
                side = "right" if code.meaning.endswith("right lung") else "left"
                spec = SegmentSpec(
                    f"lobe_{label}",
                    code.meaning,
                    codes.ANATOMICAL_STRUCTURE,
                    code,
                    rgb,
                    f"{code.meaning}, automatic segmentation",
                    side,
                )
                planned.append((spec, lobe))
    return planned


def planned_segments(
    masks: Masks, findings: Findings | None = None
) -> list[tuple[SegmentSpec, npt.NDArray[np.bool_]]]:
    """The non-empty segments of ``masks`` in SEG order, each with its (z, y, x) boolean mask."""
    return [(spec, cut(slice(None))) for spec, cut in planned_cuts(masks, findings)]


_LATERALITY = {"right": codes.RIGHT, "left": codes.LEFT, "both": codes.BILATERAL}


def _anatomy(description: hd.seg.SegmentDescription, spec: SegmentSpec) -> None:
    """Segment Description and a laterality modifier on the anatomic region (Lung) of one segment."""
    description.SegmentDescription = (
        f"{spec.description or spec.label}. Research use only, not for diagnosis."
    )[:1024]
    modifier = _LATERALITY.get(spec.side)
    if modifier is not None and "AnatomicRegionSequence" in description:
        item = Dataset()
        item.CodeValue = modifier.value
        item.CodingSchemeDesignator = modifier.scheme_designator
        item.CodeMeaning = modifier.meaning
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [item]


class _Frame:
    """One (rows, columns, segments) frame of a :class:`_FrameStack`, cut segment by segment when asked.

    highdicom asks each frame once per segment (segments outer, frames inner) for ``frame[:, :, s]``
    and, to drop empty planes, ``np.any(frame)``; building all segments at every ask cost ~1 ms per
    call, segments x frames calls (2.9 s of a 300-slice SEG with nine segments).  Anything else
    materialises the frame (:meth:`__array__`).
    """

    ndim = 3
    dtype = np.dtype(bool)

    def __init__(self, z: int | None, shape: tuple[int, ...], cuts: Sequence[SegmentCut]) -> None:
        self._z = z
        self._cuts = cuts
        self.shape = shape

    def _segment(self, s: int) -> npt.NDArray[np.bool_]:
        if self._z is None:
            return np.zeros(self.shape[:2], dtype=bool)
        return self._cuts[s](slice(self._z, self._z + 1))[0]

    def __getitem__(self, index: Any) -> Any:
        if (
            isinstance(index, tuple)
            and len(index) == 3
            and index[0] == slice(None)
            and index[1] == slice(None)
            and isinstance(index[2], (int, np.integer))
        ):
            return self._segment(int(index[2]) % self.shape[2])
        return np.asarray(self)[index]

    def any(self, axis: Any = None, out: Any = None, **kwargs: Any) -> Any:
        """``np.any(frame)``: whether any segment has a pixel here (other forms: on the whole frame)."""
        if axis is None and out is None and not kwargs:
            return np.bool_(any(self._segment(s).any() for s in range(self.shape[2])))
        return np.asarray(self).any(axis=axis, out=out, **kwargs)

    def __array__(self, dtype: Any = None, copy: Any = None) -> npt.NDArray[Any]:
        frame = np.zeros(self.shape, dtype=bool)
        for s in range(self.shape[2]):
            frame[..., s] = self._segment(s)
        return frame if dtype is None else frame.astype(dtype)


class _FrameStack:
    """The (frames, rows, columns, segments) boolean array highdicom encodes, built one frame at a time.

    highdicom (0.28) only takes ``shape``/``ndim``, iterates the frames and indexes one frame at a time,
    so the frames are cut from the masks when asked for: a materialised stack would be one byte per
    pixel and segment (315 MB for 300 slices of 512 x 512 with four segments), plus the per-segment
    masks it was built from.  Frame ``i`` is volume slice ``z_of_frame[i]`` (None: an empty frame, a
    frame of an enhanced source that the volume dropped).
    """

    ndim = 4
    dtype = np.dtype(bool)

    def __init__(
        self, z_of_frame: Sequence[int | None], rows: int, columns: int, cuts: Sequence[SegmentCut]
    ) -> None:
        self._z = list(z_of_frame)
        self._cuts = list(cuts)
        self.shape = (len(self._z), rows, columns, len(self._cuts))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> _Frame:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"frames are indexed one at a time, not by {index!r}")
        return _Frame(self._z[int(index)], self.shape[1:], self._cuts)

    def __iter__(self) -> Iterator[_Frame]:
        return (self[i] for i in range(len(self)))

    def overlap(self) -> bool:
        """Whether two segments share a pixel (PS3.3 C.8.20.2 Segments Overlap), slab by slab."""
        n = len(self._cuts)
        zs = sorted({z for z in self._z if z is not None})
        for k in range(0, len(zs), _SLAB):
            part = zs[k : k + _SLAB]
            slabs = [cut(slice(part[0], part[-1] + 1)) for cut in self._cuts]
            if any(np.logical_and(slabs[i], slabs[j]).any() for i in range(n) for j in range(i + 1, n)):
                return True
        return False


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation with a cheaper overlap check for stacked boolean segments.

    highdicom decides Segments Overlap (PS3.3 C.8.20.2) by summing the 4D array over segments, which
    allocates an int64 copy of the whole stack (about 0.6 GB and 2 s for 300 slices of 512 x 512 with
    four segments).  For a boolean stack, pairwise ``logical_and(...).any()`` answers the same question
    without the copy; a :class:`_FrameStack` answers it slab by slab.  Anything else goes to
    highdicom's own check.
    """

    @classmethod
    def _check_and_cast_pixel_array(  # type: ignore[override]
        cls, pixel_array: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, hd.seg.SegmentsOverlapValues]:
        if isinstance(pixel_array, _FrameStack):
            overlap = pixel_array.overlap()
            return (
                pixel_array,
                hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO,
            )
        if not (
            isinstance(pixel_array, np.ndarray) and pixel_array.ndim == 4 and pixel_array.dtype == np.bool_
        ):
            return super()._check_and_cast_pixel_array(pixel_array, *args, **kwargs)  # type: ignore[misc]
        n = pixel_array.shape[-1]
        overlap = any(
            np.logical_and(pixel_array[..., i], pixel_array[..., j]).any()
            for i in range(n)
            for j in range(i + 1, n)
        )
        return pixel_array, hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO


def algorithm_identification(findings: Findings) -> hd.AlgorithmIdentificationSequence:
    """PS3.3 C.8.20.2.1 Segment Algorithm Identification of the pipeline.

    The family (PS3.16 CID 7162) is Artificial Intelligence (DCM 123110) for a pipeline that ran a
    model (``model_sha256`` set), else the non-learned pipeline's family (:func:`codes.algorithm_family`).
    """
    parameters = {"model_sha256": findings.model_sha256} if findings.model_sha256 else None
    return hd.AlgorithmIdentificationSequence(
        name=findings.pipeline,
        family=codes.algorithm_family(findings.pipeline, learned=bool(findings.model_sha256)),
        version=findings.pipeline_version,
        source="triaged",
        parameters=parameters,
    )


def build_seg(
    findings: Findings,
    masks: Masks,
    volume: Volume,
    source: Sequence[Dataset],
    ctx: OutputContext,
    *,
    uids: OutputUIDs | None = None,
    workers: int = 0,
) -> hd.seg.Segmentation | None:
    """Build the BINARY Segmentation of lungs, lesions, consolidation (and lobes).

    Parameters
    ----------
    findings
        Pipeline name, version and model hash (for the algorithm identification).
    masks
        Masks on the volume grid (z, y, x).
    volume
        The analysed volume; its per-z SOP Instance UIDs (and frame numbers) name the source images.
    source
        Headers of the analysed series (pixel data not needed).
    ctx
        Output context (device, revision, series number).
    uids
        UIDs to use; derived from the study, pipeline and revision when None.
    workers
        Passed to highdicom: processes encoding frames in parallel (0: in this process).

    Returns
    -------
    highdicom.seg.Segmentation or None
        None when every mask is empty (a SEG must hold at least one segment, PS3.3 C.8.20.2).

    Notes
    -----
    PS3.3 A.51 (Segmentation IOD), C.8.20.2 (Segmentation Image module), C.7.6.16 (functional groups:
    plane positions and Derivation Image Sequence are taken from the source images).
    """
    planned = planned_cuts(masks, findings)
    if not planned:
        return None
    images = map_source_images(volume, source)
    if masks.lungs.shape != volume.hu.shape:
        raise ValueError(f"masks shape {masks.lungs.shape} differs from the volume's {volume.hu.shape}")
    uids = uids or output_uids(
        volume.study_instance_uid, findings.pipeline, findings.pipeline_version, ctx.revision
    )
    algorithm = algorithm_identification(findings)
    descriptions = []
    for number, (spec, _) in enumerate(planned, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.label,
            segmented_property_category=spec.category,
            segmented_property_type=spec.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=tracking_uid(uids, spec.key),
            tracking_id=spec.label,
            anatomic_regions=[codes.LUNG],
            display_color=hd.color.CIELabColor.from_rgb(*spec.rgb),
        )
        _anatomy(description, spec)
        descriptions.append(description)
    pixels = _frame_stack(images, masks.lungs.shape, [cut for _, cut in planned])
    seg = _Segmentation(
        source_images=list(images.datasets),
        pixel_array=pixels,  # type: ignore[arg-type]  # array-like: see _FrameStack
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.seg_series,
        series_number=ctx.seg_series_number,
        sop_instance_uid=uids.seg_instance,
        instance_number=1,
        manufacturer=ctx.manufacturer,
        manufacturer_model_name=ctx.model_name(findings.pipeline),
        software_versions=ctx.software_version,
        device_serial_number=ctx.device_serial_number,
        content_description="Lungs and lung opacity, research use only"[:64],
        content_label="TRIAGED",
        content_creator_name=None,
        omit_empty_frames=True,
        workers=workers,
    )
    # highdicom draws a random Dimension Organization UID; derive it like every other UID so that a
    # re-send of the same analysis is the same object, byte for byte (PS3.3 C.7.6.17).
    organization = derive_uid(
        uids.study_instance_uid,
        uids.pipeline,
        uids.pipeline_version,
        uids.revision,
        "seg-dimension-organization",
    )
    for item in [*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])]:
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = organization
    seg.SeriesDescription = SEG_SERIES_DESCRIPTION
    seg.BodyPartExamined = body_part(images.first)
    if ctx.institution:
        seg.InstitutionName = ctx.institution
    set_content_datetime(seg, ctx.stamp())
    return seg


def planned_reference(
    findings: Findings, masks: Masks, volume: Volume, uids: OutputUIDs
) -> SegmentationReference | None:
    """The :class:`SegmentationReference` of the SEG :func:`build_seg` makes of these masks, without
    building it (None: every mask is empty, no SEG), so that the SR can be built while the SEG is.

    Equal to ``segmentation_reference(build_seg(findings, masks, volume, ..., uids=uids))`` (tested).
    """
    planned = planned_cuts(masks, findings)
    if not planned:
        return None
    return SegmentationReference(
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=uids.seg_series,
        sop_instance_uid=uids.seg_instance,
        source_series_instance_uid=volume.series_instance_uid,
        segment_numbers=tuple((spec.key, number) for number, (spec, _) in enumerate(planned, start=1)),
    )


def segmentation_reference(seg: Dataset) -> SegmentationReference:
    """Read the UIDs and segment numbers of a SEG built by :func:`build_seg` (or any SEG whose segment
    property types are those of :func:`planned_segments`)."""
    by_code = {(s.property_type.value, s.property_type.scheme_designator): s.key for s, _ in _LUNG_SEGMENTS}
    # SEGs of earlier versions coded the lesion segment as SCT Lesion.
    by_code[(codes.LESION.value, codes.LESION.scheme_designator)] = "lesions"
    for label, code in codes.LOBES:
        by_code[(code.value, code.scheme_designator)] = f"lobe_{label}"
    numbers: list[tuple[str, int]] = []
    for item in seg.SegmentSequence:
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        key = by_code.get((str(prop.CodeValue), str(prop.CodingSchemeDesignator)))
        if key is not None:
            numbers.append((key, int(item.SegmentNumber)))
    source_series = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    return SegmentationReference(
        study_instance_uid=str(seg.StudyInstanceUID),
        series_instance_uid=str(seg.SeriesInstanceUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        source_series_instance_uid=str(source_series),
        segment_numbers=tuple(numbers),
        sop_class_uid=str(seg.SOPClassUID),
    )


def _frame_stack(images: SourceImages, shape: tuple[int, ...], cuts: Sequence[SegmentCut]) -> _FrameStack:
    """(frames, rows, columns, segments) frames in the order highdicom pairs frames with source images.

    Single-frame sources: frame i is source dataset i, i.e. volume slice i.  Enhanced CT: frames follow
    the source's frame order, so slice z goes to frame ``refs[z].frame_number``; frames the volume
    dropped (duplicates) stay empty.
    """
    nz, rows, cols = (int(v) for v in shape)
    if not images.multi_frame:
        return _FrameStack(list(range(nz)), rows, cols, cuts)
    if len(images.datasets) != 1:
        raise ValueError("a volume from several multi-frame instances cannot be encoded as one SEG")
    z_of_frame: list[int | None] = [None] * int(images.first.NumberOfFrames)
    for z, ref in enumerate(images.refs):
        assert ref.frame_number is not None
        z_of_frame[ref.frame_number - 1] = z
    return _FrameStack(z_of_frame, rows, cols, cuts)
