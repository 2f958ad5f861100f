"""Encode an analysis result as DICOM: TID 1500 SR, SEG and Secondary Capture (pure: no disk I/O).

:func:`build_outputs` is the entry point of the encode stage; the builders it composes can be used on
their own.  All outputs join the analysed study in their own series, carry UIDs derived from (study,
pipeline, version, revision) (:mod:`triaged.encode.uids`) and say they are for research use only.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

from triaged.domain import Findings, Masks, Volume
from triaged.encode.context import OutputContext
from triaged.encode.sc import build_sc
from triaged.encode.seg import SegmentationReference, build_seg, planned_reference, segmentation_reference
from triaged.encode.sr import build_sr
from triaged.encode.uids import OutputUIDs, output_uids

__all__ = [
    "OutputContext",
    "OutputUIDs",
    "SegmentationReference",
    "build_outputs",
    "build_report_and_images",
    "build_sc",
    "build_seg",
    "build_sr",
    "output_uids",
    "planned_reference",
    "segmentation_reference",
]


def build_outputs(
    findings: Findings,
    masks: Masks,
    volume: Volume,
    source: Sequence[Dataset],
    ctx: OutputContext,
) -> list[Dataset]:
    """All outputs of one analysis: ``[SR, SEG, SC overview, SC key slices...]``.

    The SR's lung, lesion and lobe measurement groups reference the SEG's segments (PS3.16 TID 1411).
    When every mask is empty no SEG is made and the list is ``[SR, SC...]``.

    Parameters
    ----------
    findings
        What the pipeline measured.
    masks
        The masks on the volume grid (z, y, x).
    volume
        The analysed volume.
    source
        Headers (pixel data not needed) of the analysed series' instances.
    ctx
        Device identity, revision, predecessor SR, priority.
    """
    uids = output_uids(volume.study_instance_uid, findings.pipeline, findings.pipeline_version, ctx.revision)
    seg = build_seg(findings, masks, volume, source, ctx, uids=uids)
    sr, *scs = build_report_and_images(findings, masks, volume, source, ctx, uids=uids)
    return [sr, seg, *scs] if seg is not None else [sr, *scs]


def build_report_and_images(
    findings: Findings,
    masks: Masks,
    volume: Volume,
    source: Sequence[Dataset],
    ctx: OutputContext,
    *,
    uids: OutputUIDs,
) -> list[Dataset]:
    """The outputs but the SEG: ``[SR, SC overview, SC key slices...]``, the SR referencing the SEG that
    :func:`build_seg` makes with the same ``uids`` (:func:`planned_reference`), so both can be built at
    the same time (the worker builds the SEG in a second process)."""
    reference = planned_reference(findings, masks, volume, uids)
    sr = build_sr(findings, masks, volume, source, ctx, segmentation=reference, uids=uids)
    return [sr, *build_sc(findings, masks, volume, source, ctx, uids=uids)]
