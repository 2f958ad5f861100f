"""The "not analysed" SR of an IGNORED study: an Enhanced SR (PS3.3 A.35.2) saying why, in the study.

A study that routing or series choice leaves out (job state IGNORED) would otherwise leave no trace in
the PACS.  When ``dispatch.ignored_report`` is ``sr`` (the default) the node sends this short document
to the study's destinations that take SRs.  Content tree (root: LN 18748-4 "Diagnostic imaging
report", as PS3.16 TID 2000, with no finding in it):

* Comment (DCM 121106): "Not analysed by triaged: <reason from the ledger>";
* Comment: the research-use statement (:data:`triaged.encode.context.RESEARCH_USE_TEXT`).

The document is complete, not verified and not final (no person read it).  Its UIDs derive from the
study, the job's revision and the role ``ignored-sr``, so a re-send is the same object.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from triaged.encode import codes
from triaged.encode.context import (
    RESEARCH_USE_TEXT,
    OutputContext,
    set_content_datetime,
    with_patient_study_defaults,
)
from triaged.encode.uids import derive_uid

#: Series Description of the "not analysed" SR.
IGNORED_SR_SERIES_DESCRIPTION = "triaged: study not analysed (research use only)"
#: Root concept of the document (PS3.16 TID 2000 Basic Diagnostic Imaging Report).
IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic imaging report")
#: The pseudo pipeline of the UIDs of a "not analysed" SR (no pipeline ran).
_UID_PIPELINE = "not-analysed"


def not_analysed_text(reason: str) -> str:
    """The first comment of the document: what happened and why."""
    return f"Not analysed by triaged: {reason.strip() or 'no reason recorded'}"


def build_ignored_sr(header: Dataset, reason: str, ctx: OutputContext) -> hd.sr.EnhancedSR:
    """An Enhanced SR in the study of ``header`` saying the study was not analysed, and why.

    Parameters
    ----------
    header
        Any instance header of the study (pixel data not needed): patient and study modules are copied.
    reason
        Why the study was not analysed (the IGNORED job's detail in the ledger).
    ctx
        Output context: revision (the job's), device identity, SR series number, content time.

    Returns
    -------
    highdicom.sr.EnhancedSR
        Enhanced SR (PS3.3 A.35.2) with the two comments above.
    """
    study = str(header.StudyInstanceUID)
    comments = [
        hd.sr.TextContentItem(
            name=codes.COMMENT, value=text[:4096], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        for text in (not_analysed_text(reason), RESEARCH_USE_TEXT)
    ]
    root = hd.sr.ContainerContentItem(name=IMAGING_REPORT, template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence(comments)
    content = hd.sr.ContentSequence([root], is_root=True)
    sr = hd.sr.EnhancedSR(
        evidence=[with_patient_study_defaults(header)],
        content=content,
        series_instance_uid=derive_uid(study, _UID_PIPELINE, "1", ctx.revision, "ignored-sr-series"),
        series_number=ctx.sr_series_number,
        sop_instance_uid=derive_uid(study, _UID_PIPELINE, "1", ctx.revision, "ignored-sr-instance"),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        institution_name=ctx.institution,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    # Evidence lists an image of the study: it was received but not analysed, so it is not "current
    # requested procedure evidence" of a result; keep the reference as pertinent other evidence.
    if "CurrentRequestedProcedureEvidenceSequence" in sr:
        sr.PertinentOtherEvidenceSequence = sr.CurrentRequestedProcedureEvidenceSequence
        del sr.CurrentRequestedProcedureEvidenceSequence
    sr.SeriesDescription = IGNORED_SR_SERIES_DESCRIPTION
    sr.ManufacturerModelName = ctx.model_name(_UID_PIPELINE)
    sr.SoftwareVersions = ctx.software_version
    sr.DeviceSerialNumber = ctx.device_serial_number
    set_content_datetime(sr, ctx.stamp())
    return sr
