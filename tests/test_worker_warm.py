"""The worker's encoder warm-up: it must walk every encoding path a real study takes (research use only)."""

from __future__ import annotations

from triaged.analysis.severity import findings_from_masks
from triaged.domain import CTGrade
from triaged.encode import OutputContext, build_outputs
from triaged.worker.warm import synthetic_study, warm_encoders


def test_the_warm_up_study_goes_through_sr_seg_and_sc_with_lesions_consolidation_and_lobes() -> None:
    volume, source, masks = synthetic_study()
    findings = findings_from_masks(volume, masks, pipeline="warm-up", version="0")
    assert findings.ct_grade != CTGrade.CT0  # a CT0 study would skip the lesion groups and key slices
    assert findings.lesion_boxes and findings.key_slices
    outputs = build_outputs(findings, masks, volume, source, OutputContext(software_version="t"))
    sr, seg, *scs = outputs
    assert (sr.Modality, seg.Modality) == ("SR", "SEG")
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels[:4] == [
        "Right lung",
        "Left lung",
        "Lung opacity (ground glass / consolidation)",
        "Consolidation",
    ]
    assert len(labels) == 4 + 4  # and the four lobes it draws (RUL, RLL, LUL, LLL)
    assert len(scs) >= 2  # the overview and at least one key slice
    assert warm_encoders() > 0.0
