"""Encode Findings as a TID 1500 Measurement Report in a Comprehensive 3D SR (PS3.3 A.35.13).

Content tree (PS3.16 TID 1500; every group carries the pipeline's TID 4019 Algorithm Identification
with the model's SHA-256 as a parameter, and the Tracking UID of the SEG segment it describes):

* Observation context: the device observer (TID 1004): name "triaged", manufacturer, model = pipeline,
  serial number, Device Observer UID.
* Procedure reported: CT Chest (LN 24627-2).
* Imaging Measurements:

  - right lung, left lung (TID 1411, referencing the SEG segment; TID 1501 when there is no SEG):
    lung volume (SCT Volume, ml), lesion volume, consolidation volume (ml), affected percentage and
    consolidation percentage (%, lesion or consolidation volume / lung volume x 100);
  - both lungs (TID 1501, finding site Lung): the same five, plus the study severity (affected
    percentage of the worse lung, %) and the CT0–CT4 grade as a qualitative evaluation;
  - lung opacity and consolidation (TID 1411 referencing their SEG segments): total volume (ml), its
    share of both lungs (%) and its mean attenuation (HU);
  - lobes when present (TID 1411): lobe volume, lesion volume, affected percentage and the lobe's CT
    severity score (0–5, ``CTSSLOBE``); the both-lungs group then also holds the CT severity score
    (0–25, ``CTSS``, Chung et al. 2020);
  - classification (TID 1501): P(COVID-19) and the other class probabilities ({probability}) when the
    pipeline's classifier was validated on real data, else the qualitative evaluation P(COVID-19) =
    "Not assessed" (no number);
  - severity classification (TID 1501, only with ``Findings.p_severe``, seed 000): P(severe)
    (``PSEVERE``, {probability});
  - key slices (TID 1501, finding type DCM Key Images): the source images, highest lesion burden first,
    or as the pipeline chose them (provenance ``key_slices_by``, named in the Tracking Identifier);
  - per lesion (a 3-D connected opacity of at least :data:`LESION_FINDING_MIN_ML` ml, none when the
    study is CT0; the same floor as the CT0 rule, so sub-threshold specks are not findings): a TID 1501
    group with its volume (ml) and its share of its lung (%), and a TID 1410 group with the same Tracking
    Identifier and UID holding a closed 5-point POLYLINE SCOORD (its bounding box on its largest slice)
    and 2-D measurements on that slice: area (mm2), long and short axis (mm) and mean attenuation (HU).

Tracking Identifiers of groups that describe a SEG segment are the segment's label (and Tracking ID)
for the same Tracking UID (:func:`triaged.encode.seg.segment_label`).

* per saliency box (seed 003, ``Findings.saliency_boxes``): a TID 1410 group "Saliency region n (class)",
  finding type DCM 130404 Saliency, the box as a POLYLINE, its mean saliency (``SALSCORE``) and the class
  it explains (``SALCLASS``); a region the classifier attended to, not a lesion.

* Qualitative Evaluations (TID 1500 row 12): the research-use statement (TEXT, DCM Comment), "P(COVID-19):
  not assessed ..." (Comment) when there is no P(COVID-19), the research outputs' Comments
  (:func:`research_texts`: what P(severe) was validated on, an unvalidated classifier's classes without
  numbers, the key-slice method), the triage priority (TEXT) and each analysis warning (TEXT, Comment).

docs/codes.md lists every code and what each item means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage
from scipy import ndimage
from scipy.spatial import ConvexHull

from triaged.domain import (
    CT1_MIN_ML,
    P_COVID_NOT_ASSESSED,
    CTGrade,
    Findings,
    LesionBox,
    LungMeasures,
    Masks,
    SaliencyBox,
    Volume,
)
from triaged.encode import codes
from triaged.encode.context import (
    RESEARCH_USE_TEXT,
    SR_SERIES_DESCRIPTION,
    ImageRef,
    OutputContext,
    SourceImages,
    map_source_images,
    set_content_datetime,
    with_patient_study_defaults,
)
from triaged.encode.seg import SegmentationReference, segment_label
from triaged.encode.uids import OutputUIDs, output_uids, tracking_uid

# DS values hold at most 16 characters (PS3.5 6.2): volumes and percentages to 1/1000, probabilities to
# 1/10000 are far finer than the measurements' accuracy.
_VALUE_DECIMALS = 3
_PROBABILITY_DECIMALS = 4
#: The smallest lesion reported as a finding of its own: the lesion volume below which the severity
#: grading calls a study CT0 ("no findings", :data:`triaged.domain.CT1_MIN_ML`).
LESION_FINDING_MIN_ML = CT1_MIN_ML
#: Slices read at a time for the mean attenuation of a segment (bounds the temporaries).
_SLAB = 32

MeasurementGroup = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)


def build_sr(
    findings: Findings,
    masks: Masks,
    volume: Volume,
    source: Sequence[Dataset],
    ctx: OutputContext,
    *,
    segmentation: SegmentationReference | None = None,
    uids: OutputUIDs | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Measurement Report of one analysis.

    Parameters
    ----------
    findings
        What the pipeline measured.
    masks
        Masks on the volume grid; used for the per-lobe figures when ``masks.lobes`` is present.
    volume
        The analysed volume (names the source image of each z index).
    source
        Headers of the analysed series (pixel data not needed); the patient and study modules are
        copied from them and they are listed as evidence (PS3.3 C.17.2.3).
    ctx
        Output context: device, revision, predecessor SR, priority.
    segmentation
        The SEG the lung and lesion groups refer to (see :func:`triaged.encode.seg.segmentation_reference`);
        None gives TID 1501 groups without segment references.
    uids
        UIDs to use; derived from the study, pipeline and revision when None.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Comprehensive 3D SR (PS3.3 A.35.13) in the source study, with the content above.
    """
    images = map_source_images(volume, source)
    uids = uids or output_uids(
        volume.study_instance_uid, findings.pipeline, findings.pipeline_version, ctx.revision
    )
    algorithm = _algorithm(findings)

    groups: list[MeasurementGroup] = []
    for key, site, measures in (
        ("right_lung", codes.RIGHT_LUNG, findings.right),
        ("left_lung", codes.LEFT_LUNG, findings.left),
    ):
        groups.append(
            _region_group(
                key,
                segment_label(key, findings),
                site,
                _lung_measurements(measures),
                segmentation,
                uids,
                algorithm,
            )
        )
    groups.append(_both_lungs_group(findings, uids, algorithm))
    both = findings.both
    for key, finding, volume_ml, pct, mask in (
        ("lesions", codes.OPACITY, both.lesion_ml, both.affected_pct, masks.lesions),
        (
            "consolidation",
            codes.LUNG_CONSOLIDATION,
            both.consolidation_ml,
            both.consolidation_pct,
            masks.consolidation,
        ),
    ):
        if segmentation is not None and segmentation.number(key) is not None:
            measurements = [
                _measurement(codes.VOLUME, volume_ml, codes.UNIT_ML),
                _measurement(codes.AFFECTED_PERCENT, pct, codes.UNIT_PERCENT),
            ]
            mean_hu = _mean_hu(volume, mask)
            if mean_hu is not None:
                measurements.append(_measurement(codes.MEAN_ATTENUATION, mean_hu, codes.UNIT_HU, 1))
            groups.append(
                _region_group(
                    key,
                    segment_label(key, findings),
                    codes.LUNG,
                    measurements,
                    segmentation,
                    uids,
                    algorithm,
                    finding_type=finding,
                )
            )
    groups.extend(_lobe_groups(masks, volume, segmentation, uids, algorithm, findings))
    groups.append(_classification_group(findings, uids, algorithm))
    severe = _severity_classification_group(findings, uids, algorithm)
    if severe is not None:
        groups.append(severe)
    if findings.key_slices:
        groups.append(_key_slices_group(findings, images, uids, algorithm))
    groups.extend(_lesion_groups(findings, masks, volume, images, uids, algorithm))
    groups.extend(_saliency_groups(findings, images, uids, algorithm))

    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(Code("121007", "DCM", "Device")),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.observer_uid,
            name=ctx.device_name,
            manufacturer_name=ctx.manufacturer,
            model_name=findings.pipeline,
            serial_number=ctx.device_serial_number,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.CT_CHEST,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_qualitative_evaluations(findings, ctx))

    evidence = [with_patient_study_defaults(images.first), *images.datasets]
    if segmentation is not None:
        evidence.append(segmentation.evidence())
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.sr_series,
        series_number=ctx.sr_series_number,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=ctx.manufacturer,
        institution_name=ctx.institution,
        # Complete: the report holds everything the pipeline measured.  Not final and unverified: no
        # person has read it (PS3.3 C.17.2.1); it is a research result.
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.ManufacturerModelName = ctx.model_name(findings.pipeline)
    sr.SoftwareVersions = ctx.software_version
    sr.DeviceSerialNumber = ctx.device_serial_number
    sr.CodingSchemeIdentificationSequence = [codes.private_scheme_identification()]
    if ctx.predecessor_sr is not None:
        sr.PredecessorDocumentsSequence = [_predecessor(ctx.predecessor_sr)]
    set_content_datetime(sr, ctx.stamp())
    return sr


# --- groups ------------------------------------------------------------------------------------------


def _algorithm(findings: Findings) -> hd.sr.AlgorithmIdentification:
    """PS3.16 TID 4019 of the pipeline; the model hash links the result to its model card."""
    parameters = [f"model_sha256={findings.model_sha256}"] if findings.model_sha256 else None
    return hd.sr.AlgorithmIdentification(
        name=findings.pipeline, version=findings.pipeline_version, parameters=parameters
    )


def _measurement(name: Code, value: float, unit: Code, decimals: int = _VALUE_DECIMALS) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=round(float(value), decimals), unit=unit)


def _unit_interval_measurement(name: Code, value: float, unit: Code) -> hd.sr.Measurement:
    """A probability-like value (P(severe), a saliency score) clamped to [0, 1], to
    :data:`_PROBABILITY_DECIMALS` decimals."""
    return _measurement(name, min(max(value, 0.0), 1.0), unit, _PROBABILITY_DECIMALS)


def _lung_measurements(m: LungMeasures) -> list[hd.sr.Measurement]:
    return [
        _measurement(codes.VOLUME, m.lung_ml, codes.UNIT_ML),
        _measurement(codes.LESION_VOLUME, m.lesion_ml, codes.UNIT_ML),
        _measurement(codes.CONSOLIDATION_VOLUME, m.consolidation_ml, codes.UNIT_ML),
        _measurement(codes.AFFECTED_PERCENT, m.affected_pct, codes.UNIT_PERCENT),
        _measurement(codes.CONSOLIDATION_PERCENT, m.consolidation_pct, codes.UNIT_PERCENT),
    ]


def _region_group(
    key: str,
    label: str,
    site: Code,
    measurements: list[hd.sr.Measurement],
    segmentation: SegmentationReference | None,
    uids: OutputUIDs,
    algorithm: hd.sr.AlgorithmIdentification,
    finding_type: Code | None = None,
) -> MeasurementGroup:
    """TID 1411 on a SEG segment when the SEG has it, else TID 1501 with the same content."""
    tracking = hd.sr.TrackingIdentifier(uid=tracking_uid(uids, key), identifier=label)
    number = segmentation.number(key) if segmentation is not None else None
    if segmentation is None or number is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=finding_type,
            algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(site)],
            measurements=measurements,
        )
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=segmentation.sop_class_uid,
        sop_instance_uid=segmentation.sop_instance_uid,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(segmentation.source_series_instance_uid),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=segment,
        finding_type=finding_type,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(site)],
        measurements=measurements,
    )


def _both_lungs_group(
    findings: Findings, uids: OutputUIDs, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Whole-lung figures (seed 001) and the study severity with its CT grade (seed 004)."""
    measurements = _lung_measurements(findings.both)
    measurements.append(_measurement(codes.SEVERITY_PERCENT, findings.severity_pct, codes.UNIT_PERCENT))
    ctss = findings.ct_severity_score
    if ctss is not None:
        measurements.append(_measurement(codes.CT_SEVERITY_SCORE, ctss, codes.UNIT_SCORE, 0))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(uids, "lungs"), identifier="Both lungs"
        ),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.LUNG)],
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(codes.CT_SEVERITY_GRADE, codes.ct_grade_code(findings.ct_grade))
        ],
    )


#: Slices counted at once by :func:`_lobe_counts` (np.bincount counts through an intp copy of its input).
_COUNT_SLAB = 16


def _lobe_counts(
    lobes: npt.NDArray[np.uint8], lesions: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Voxels of each lobe label and lesion voxels in each, one pass over slabs of slices."""
    n = max(label for label, _ in codes.LOBES) + 1
    voxels = np.zeros(n, np.int64)
    lesion = np.zeros(n, np.int64)
    for z0 in range(0, lobes.shape[0], _COUNT_SLAB):
        part = lobes[z0 : z0 + _COUNT_SLAB]
        voxels += np.bincount(part.ravel(), minlength=n)[:n]
        lesion += np.bincount(part[lesions[z0 : z0 + _COUNT_SLAB]], minlength=n)[:n]
    return voxels, lesion


def _lobe_groups(
    masks: Masks,
    volume: Volume,
    segmentation: SegmentationReference | None,
    uids: OutputUIDs,
    algorithm: hd.sr.AlgorithmIdentification,
    findings: Findings,
) -> list[MeasurementGroup]:
    """Per-lobe volume, lesion volume and affected percentage, measured on the masks, and the lobe's CT
    severity score when the findings carry one (``Findings.lobes``)."""
    if masks.lobes is None:
        return []
    scores = {lobe.label: lobe.score for lobe in findings.lobes}
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    voxels, lesions = _lobe_counts(masks.lobes, masks.lesions)
    groups: list[MeasurementGroup] = []
    for label, code in codes.LOBES:
        count, lesion = int(voxels[label]), int(lesions[label])
        if count == 0:
            continue
        measurements = [
            _measurement(codes.VOLUME, count * voxel_ml, codes.UNIT_ML),
            _measurement(codes.LESION_VOLUME, lesion * voxel_ml, codes.UNIT_ML),
            _measurement(codes.AFFECTED_PERCENT, 100.0 * lesion / count, codes.UNIT_PERCENT),
        ]
        if label in scores:
            measurements.append(
                _measurement(codes.CT_SEVERITY_LOBE_SCORE, scores[label], codes.UNIT_SCORE, 0)
            )
        groups.append(
            _region_group(
                f"lobe_{label}",
                segment_label(f"lobe_{label}", findings),
                code,
                measurements,
                segmentation,
                uids,
                algorithm,
            )
        )
    return groups


def p_covid_assessed(findings: Findings) -> bool:
    """Whether the findings carry a P(COVID-19) to report (a finite number from a validated classifier)."""
    return findings.p_covid is not None and math.isfinite(findings.p_covid)


def _classification_group(
    findings: Findings, uids: OutputUIDs, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """P(COVID-19) and the classifier's other class probabilities, or "not assessed".

    A pipeline gives ``p_covid`` only when its classifier was validated on real data.  Without it no
    number is encoded (neither P(COVID-19) nor the other class probabilities of the same classifier):
    the group holds the qualitative evaluation ``PCOVID`` = ``NOTASSESSED`` instead.
    """
    tracking = hd.sr.TrackingIdentifier(uid=tracking_uid(uids, "classification"), identifier="Classification")
    if findings.p_covid is None or not p_covid_assessed(findings):
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(codes.LUNG)],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(codes.PROBABILITY_COVID_19, codes.NOT_ASSESSED)
            ],
        )
    measurements = [
        _measurement(
            codes.PROBABILITY_COVID_19, findings.p_covid, codes.UNIT_PROBABILITY, _PROBABILITY_DECIMALS
        )
    ]
    named = {codes.PROBABILITY_COVID_19.value}
    for name, p in findings.class_probabilities:
        code = codes.class_probability_code(name)
        if code.value in named:  # P(COVID-19) is reported once, from p_covid
            continue
        named.add(code.value)
        measurements.append(_measurement(code, p, codes.UNIT_PROBABILITY, _PROBABILITY_DECIMALS))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.LUNG)],
        measurements=measurements,
    )


def p_severe_assessed(findings: Findings) -> bool:
    """Whether the findings carry a P(severe) to report (seed 000's classifier gave a finite number)."""
    return findings.p_severe is not None and math.isfinite(findings.p_severe)


def _severity_classification_group(
    findings: Findings, uids: OutputUIDs, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    """P(severe) (``PSEVERE``, {probability}) of seed 000's severe / non-severe classifier; None when the
    pipeline has none.  What it was validated on is a Comment in the Qualitative Evaluations."""
    if findings.p_severe is None or not p_severe_assessed(findings):
        return None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(uids, "severity_classification"), identifier="Severity classification"
        ),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.LUNG)],
        measurements=[
            _unit_interval_measurement(codes.PROBABILITY_SEVERE, findings.p_severe, codes.UNIT_PROBABILITY)
        ],
    )


def provenance_value(findings: Findings, key: str) -> str | None:
    """The last value of ``key`` in the findings' provenance, None when absent."""
    value = None
    for k, v in findings.provenance:
        if k == key:
            value = v
    return value


def key_slices_title(findings: Findings) -> str:
    """The key-slice group's Tracking Identifier: how the slices were chosen (provenance ``key_slices_by``,
    e.g. "attention (DA-CMIL)"), or the default lesion-burden order."""
    method = provenance_value(findings, "key_slices_by")
    if not method:
        return "Key slices, highest lesion burden first"
    return f"Key slices by {method}"[:64]  # LO, 64 characters (PS3.5 6.2)


def _key_slices_group(
    findings: Findings, images: SourceImages, uids: OutputUIDs, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The key slices as source images of a group whose finding type is DCM 121180 Key Images."""
    sources = [
        hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=ref.sop_class_uid,
            referenced_sop_instance_uid=ref.sop_instance_uid,
            referenced_frame_numbers=[ref.frame_number] if ref.frame_number is not None else None,
        )
        for ref in (_ref(images, z) for z in findings.key_slices)
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(uids, "key_slices"), identifier=key_slices_title(findings)
        ),
        finding_type=codes.KEY_IMAGES,
        algorithm_id=algorithm,
        source_images=sources,
    )


def reported_lesions(findings: Findings) -> tuple[LesionBox, ...]:
    """The lesion boxes reported as findings: none for a CT0 study, else those of at least
    :data:`LESION_FINDING_MIN_ML` ml (the CT0 rule's floor), largest first as the pipeline gave them."""
    if findings.ct_grade == CTGrade.CT0:
        return ()
    return tuple(box for box in findings.lesion_boxes if box.volume_ml >= LESION_FINDING_MIN_ML)


def _mean_hu(volume: Volume, mask: np.ndarray) -> float | None:
    """Mean HU of the voxels of ``mask``, read :data:`_SLAB` slices at a time; None when it is empty."""
    total = 0.0
    count = 0
    for z0 in range(0, mask.shape[0], _SLAB):
        part = np.asarray(mask[z0 : z0 + _SLAB], dtype=bool)
        n = int(np.count_nonzero(part))
        if n:
            total += float(volume.hu[z0 : z0 + _SLAB][part].sum(dtype=np.float64))
            count += n
    return total / count if count else None


class PlanarMeasures(NamedTuple):
    """2-D measurements of a lesion on its slice (the pixels of the lesion mask inside its box)."""

    area_mm2: float
    long_axis_mm: float
    short_axis_mm: float
    mean_hu: float


def planar_measures(box: LesionBox, masks: Masks, volume: Volume) -> PlanarMeasures | None:
    """Area, long and short axis and mean HU of the lesion of ``box`` on its slice.

    The lesion is the largest 8-connected piece of the lesion mask inside the box on slice ``box.z``.
    The axes are measured on the pixels' outline (their corners): the long axis is the largest distance
    across it, the short axis its largest extent perpendicular to the long axis (RECIST style), in mm
    with the slice's pixel spacing.  None when the box holds no lesion pixel.
    """
    rows = slice(box.row_min, box.row_max + 1)
    cols = slice(box.col_min, box.col_max + 1)
    pixels = np.asarray(masks.lesions[box.z, rows, cols], dtype=bool)
    labels, n = ndimage.label(pixels, np.ones((3, 3), bool))
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    piece = labels == int(np.argmax(sizes))
    dy, dx = float(volume.spacing[1]), float(volume.spacing[2])
    r, c = np.nonzero(piece & ~ndimage.binary_erosion(piece, border_value=0))
    corners = np.concatenate(
        [np.stack([(r + a) * dy, (c + b) * dx], axis=1) for a in (0, 1) for b in (0, 1)], axis=0
    )
    hull = corners[ConvexHull(corners).vertices]
    diff = hull[:, None, :] - hull[None, :, :]
    dist = np.sqrt((diff**2).sum(axis=-1))
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    long_axis = float(dist[i, j])
    direction = (hull[j] - hull[i]) / long_axis
    across = hull @ np.array([-direction[1], direction[0]])
    short_axis = float(across.max() - across.min())
    hu = volume.hu[box.z, rows, cols][piece]
    return PlanarMeasures(
        area_mm2=float(piece.sum()) * dy * dx,
        long_axis_mm=long_axis,
        short_axis_mm=short_axis,
        mean_hu=float(hu.mean(dtype=np.float64)),
    )


def _lesion_groups(
    findings: Findings,
    masks: Masks,
    volume: Volume,
    images: SourceImages,
    uids: OutputUIDs,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[MeasurementGroup]:
    """Per reported lesion (:func:`reported_lesions`): TID 1501 with its volume and share of its lung,
    TID 1410 with its box on its largest slice and 2-D measurements there (same Tracking UID).

    SCOORD pixel coordinates are (column, row) with (0, 0) at the top left corner of the top left
    pixel (PS3.3 C.18.6.1.2), so a box over pixel rows r0..r1 and columns c0..c1 (inclusive) runs
    from (c0, r0) to (c1 + 1, r1 + 1).
    """
    groups: list[MeasurementGroup] = []
    for i, box in enumerate(reported_lesions(findings)):
        ref = _ref(images, box.z)
        frame = box.frame_number if box.frame_number is not None else ref.frame_number
        site = codes.RIGHT_LUNG if box.side == "right" else codes.LEFT_LUNG
        lung = findings.right if box.side == "right" else findings.left
        tracking = hd.sr.TrackingIdentifier(
            uid=tracking_uid(uids, f"box_{i}"), identifier=f"Lesion {i + 1} ({box.side} lung)"
        )
        share = 100.0 * box.volume_ml / lung.lung_ml if lung.lung_ml > 0 else 0.0
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                finding_type=codes.OPACITY,
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(site)],
                measurements=[
                    _measurement(codes.VOLUME, box.volume_ml, codes.UNIT_ML),
                    _measurement(codes.AFFECTED_PERCENT, share, codes.UNIT_PERCENT),
                ],
            )
        )
        region = _box_region(box, ref.sop_class_uid, frame)
        planar = planar_measures(box, masks, volume)
        measurements = (
            [
                _measurement(codes.AREA, planar.area_mm2, codes.UNIT_MM2, 1),
                _measurement(codes.LONG_AXIS, planar.long_axis_mm, codes.UNIT_MM, 1),
                _measurement(codes.SHORT_AXIS, planar.short_axis_mm, codes.UNIT_MM, 1),
                _measurement(codes.MEAN_ATTENUATION, planar.mean_hu, codes.UNIT_HU, 1),
            ]
            if planar is not None
            else None
        )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_region=region,
                finding_type=codes.OPACITY,
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(site)],
                measurements=measurements,
            )
        )
    return groups


def _box_region(box: LesionBox | SaliencyBox, sop_class_uid: str, frame: int | None) -> hd.sr.ImageRegion:
    """A box as a closed 5-point POLYLINE on its source image: the outer pixel edges of rows
    ``row_min..row_max`` and columns ``col_min..col_max`` (inclusive), in (column, row) order."""
    c0, r0, c1, r1 = float(box.col_min), float(box.row_min), float(box.col_max + 1), float(box.row_max + 1)
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=sop_class_uid,
            referenced_sop_instance_uid=box.sop_instance_uid,
            referenced_frame_numbers=[frame] if frame is not None else None,
        ),
    )


def _saliency_groups(
    findings: Findings,
    images: SourceImages,
    uids: OutputUIDs,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[MeasurementGroup]:
    """Per saliency box (seed 003): a TID 1410 Planar ROI group, finding type DCM 130404 Saliency (a region
    the classifier attended to, not a lesion), the box as a closed POLYLINE on its source image (pixel
    edges as :func:`_lesion_groups`), the mean normalised saliency (``SALSCORE``, {ratio}) and the class it
    explains (``SALCLASS``).  Tracking identifiers "Saliency region n (class)", UIDs of their own."""
    groups: list[MeasurementGroup] = []
    for i, box in enumerate(findings.saliency_boxes):
        ref = _ref(images, box.z)
        frame = box.frame_number if box.frame_number is not None else ref.frame_number
        region = _box_region(box, ref.sop_class_uid, frame)
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking_uid(uids, f"saliency_{i}"),
                    identifier=f"Saliency region {i + 1} ({box.label})"[:64],
                ),
                referenced_region=region,
                finding_type=codes.SALIENCY,
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(codes.LUNG)],
                measurements=[_unit_interval_measurement(codes.SALIENCY_SCORE, box.score, codes.UNIT_RATIO)],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(codes.SALIENCY_CLASS, codes.saliency_class_code(box.label))
                ],
            )
        )
    return groups


def research_texts(findings: Findings) -> list[str]:
    """The Comments on the new pipelines' research outputs (empty for a pipeline without them).

    * P(severe): its value, pipeline and what it was validated on (provenance ``p_severe_validated_on``);
    * a classifier not validated on real data (``p_covid`` None): its classes are named, its probabilities
      are not reported (no number that could be read as P(COVID-19); they stay in the ledger's findings
      and in ``triaged eval``);
    * how the key slices were chosen (provenance ``key_slices_by``) when not by lesion burden;
    * that saliency regions mark where the classifier looked, not lesions.
    """
    texts: list[str] = []
    if findings.p_severe is not None:
        validated = provenance_value(findings, "p_severe_validated_on") or "not stated"
        value = (
            f"{min(max(findings.p_severe, 0.0), 1.0):.2f}" if p_severe_assessed(findings) else "not available"
        )
        texts.append(
            f"P(severe) {value} from pipeline '{findings.pipeline}' (severe = CT3-CT4, worse lung more than "
            f"50 % affected); validated on: {validated}. Research output, not for diagnosis."
        )
    if findings.class_probabilities and not p_covid_assessed(findings):
        classes = ", ".join(name for name, _ in findings.class_probabilities)
        texts.append(
            f"Pipeline '{findings.pipeline}' has a research classifier ({classes}); its probabilities are not "
            "reported: it is not validated on real data (see the model card)."
        )
    method = provenance_value(findings, "key_slices_by")
    if method and findings.key_slices:
        texts.append(f"Key slices chosen by {method}, highest first.")
    if findings.saliency_boxes:
        texts.append(
            "Saliency regions mark where the classifier looked (integrated gradients), not segmented lesions."
        )
    return texts


def _qualitative_evaluations(findings: Findings, ctx: OutputContext) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 container: research-use statement, triage priority, analysis warnings."""
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items = [hd.sr.TextContentItem(codes.COMMENT, RESEARCH_USE_TEXT, hd.sr.RelationshipTypeValues.CONTAINS)]
    if not p_covid_assessed(findings):
        items.append(
            hd.sr.TextContentItem(
                codes.COMMENT, p_covid_not_assessed_text(findings), hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    for text in research_texts(findings):
        items.append(hd.sr.TextContentItem(codes.COMMENT, text, hd.sr.RelationshipTypeValues.CONTAINS))
    if ctx.priority_level:
        items.append(
            hd.sr.TextContentItem(
                codes.TRIAGE_PRIORITY, ctx.priority_level, hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    for warning in findings.warnings:
        items.append(
            hd.sr.TextContentItem(
                codes.COMMENT, f"Analysis warning: {warning}", hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def p_covid_not_assessed_text(findings: Findings) -> str:
    """The SR comment when P(COVID-19) is not reported, naming the pipeline."""
    return (
        f"{P_COVID_NOT_ASSESSED}. Pipeline '{findings.pipeline}' has no COVID-19 classifier validated "
        "on real data; the triage priority is ranked by severity."
    )


def _predecessor(ref: tuple[str, str, str]) -> Dataset:
    """One Predecessor Documents Sequence item (PS3.3 C.17.2.1, Hierarchical SOP Instance Reference)."""
    study_uid, series_uid, sop_uid = ref
    sop = Dataset()
    sop.ReferencedSOPClassUID = Comprehensive3DSRStorage
    sop.ReferencedSOPInstanceUID = sop_uid
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    series.ReferencedSOPSequence = [sop]
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.ReferencedSeriesSequence = [series]
    return item


def _ref(images: SourceImages, z: int) -> ImageRef:
    if not 0 <= z < len(images.refs):
        raise ValueError(f"slice index {z} outside the volume (0..{len(images.refs) - 1})")
    return images.refs[z]
