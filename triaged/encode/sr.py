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
  - COVID-19 lesions and consolidation (TID 1411 referencing their SEG segments): total volume (ml);
  - lobes when present (TID 1411): lobe volume, lesion volume, affected percentage;
  - classification (TID 1501): P(COVID-19) and the other class probabilities ({probability}) when the
    pipeline's classifier was validated on real data, else the qualitative evaluation P(COVID-19) =
    "Not assessed" (no number);
  - key slices (TID 1501, finding type DCM Key Images): the source images, highest lesion burden first;
  - one TID 1410 group per lesion box: a closed 5-point POLYLINE SCOORD on its source image and the
    lesion volume (ml).

* Qualitative Evaluations (TID 1500 row 12): the research-use statement (TEXT, DCM Comment), "P(COVID-19):
  not assessed ..." (Comment) when there is no P(COVID-19), the triage priority (TEXT) and each analysis
  warning (TEXT, Comment).

docs/codes.md lists every code and what each item means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage

from triaged.domain import P_COVID_NOT_ASSESSED, Findings, LungMeasures, Masks, Volume
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
from triaged.encode.seg import SegmentationReference
from triaged.encode.uids import OutputUIDs, output_uids, tracking_uid

# DS values hold at most 16 characters (PS3.5 6.2): volumes and percentages to 1/1000, probabilities to
# 1/10000 are far finer than the measurements' accuracy.
_VALUE_DECIMALS = 3
_PROBABILITY_DECIMALS = 4

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
                site.meaning,
                site,
                _lung_measurements(measures),
                segmentation,
                uids,
                algorithm,
            )
        )
    groups.append(_both_lungs_group(findings, uids, algorithm))
    for key, finding, volume_ml in (
        ("lesions", codes.LESION, findings.both.lesion_ml),
        ("consolidation", codes.LUNG_CONSOLIDATION, findings.both.consolidation_ml),
    ):
        if segmentation is not None and segmentation.number(key) is not None:
            groups.append(
                _region_group(
                    key,
                    finding.meaning,
                    codes.LUNG,
                    [_measurement(codes.VOLUME, volume_ml, codes.UNIT_ML)],
                    segmentation,
                    uids,
                    algorithm,
                    finding_type=finding,
                )
            )
    groups.extend(_lobe_groups(masks, volume, segmentation, uids, algorithm))
    groups.append(_classification_group(findings, uids, algorithm))
    if findings.key_slices:
        groups.append(_key_slices_group(findings, images, uids, algorithm))
    groups.extend(_lesion_box_groups(findings, images, uids, algorithm))

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


def _lobe_groups(
    masks: Masks,
    volume: Volume,
    segmentation: SegmentationReference | None,
    uids: OutputUIDs,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[MeasurementGroup]:
    """Per-lobe volume, lesion volume and affected percentage, measured on the masks."""
    if masks.lobes is None:
        return []
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    groups: list[MeasurementGroup] = []
    for label, code in codes.LOBES:
        lobe = masks.lobes == label
        count = int(np.count_nonzero(lobe))
        if count == 0:
            continue
        lesion = int(np.count_nonzero(masks.lesions & lobe))
        groups.append(
            _region_group(
                f"lobe_{label}",
                code.meaning,
                code,
                [
                    _measurement(codes.VOLUME, count * voxel_ml, codes.UNIT_ML),
                    _measurement(codes.LESION_VOLUME, lesion * voxel_ml, codes.UNIT_ML),
                    _measurement(codes.AFFECTED_PERCENT, 100.0 * lesion / count, codes.UNIT_PERCENT),
                ],
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
            uid=tracking_uid(uids, "key_slices"), identifier="Key slices, highest lesion burden first"
        ),
        finding_type=codes.KEY_IMAGES,
        algorithm_id=algorithm,
        source_images=sources,
    )


def _lesion_box_groups(
    findings: Findings, images: SourceImages, uids: OutputUIDs, algorithm: hd.sr.AlgorithmIdentification
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """TID 1410 per lesion box: a closed rectangle (5-point POLYLINE) on the lesion's largest slice.

    SCOORD pixel coordinates are (column, row) with (0, 0) at the top left corner of the top left
    pixel (PS3.3 C.18.6.1.2), so a box over pixel rows r0..r1 and columns c0..c1 (inclusive) runs
    from (c0, r0) to (c1 + 1, r1 + 1).
    """
    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    for i, box in enumerate(findings.lesion_boxes):
        ref = _ref(images, box.z)
        frame = box.frame_number if box.frame_number is not None else ref.frame_number
        c0, r0, c1, r1 = (
            float(box.col_min),
            float(box.row_min),
            float(box.col_max + 1),
            float(box.row_max + 1),
        )
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=ref.sop_class_uid,
                referenced_sop_instance_uid=box.sop_instance_uid,
                referenced_frame_numbers=[frame] if frame is not None else None,
            ),
        )
        site = codes.RIGHT_LUNG if box.side == "right" else codes.LEFT_LUNG
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking_uid(uids, f"box_{i}"), identifier=f"Lesion {i + 1} ({box.side} lung)"
                ),
                referenced_region=region,
                finding_type=codes.LESION,
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(site)],
                measurements=[_measurement(codes.VOLUME, box.volume_ml, codes.UNIT_ML)],
            )
        )
    return groups


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
