"""Issue 14's outputs: P(severe), research class probabilities, saliency boxes and key-slice method in the
SR (highdicom, dciodvfy, dcmqi), the SC key slices, the ``severity_mil`` priority measure and the papers'
``triaged eval`` columns (hand-computed cases).

The pipelines that make these fields (m2unet, dacmil, multiscale) are tested in their own files; here the
fields are set by hand on Findings measured on the session's phantom series, so every encoder path runs
without a model.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import cast

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydantic import ValidationError

from tests.encode_fixtures import Case, dciodvfy, errors, load_real_case, round_trip
from tests.test_encode_dcmqi import TID1500READER
from triaged.config import PriorityPolicyConfig
from triaged.domain import CTGrade, Findings, LesionBox, LungMeasures, SaliencyBox
from triaged.encode import OutputContext, build_outputs, build_sr, codes
from triaged.encode import sc as sc_module
from triaged.encode.context import RESEARCH_USE_TEXT
from triaged.lab.metrics import (
    Metric,
    PaperCase,
    box_hit_rate,
    covid_bacterial_metrics,
    paper_case,
    paper_row,
    papers_markdown,
    reference_class,
    severe_metrics,
    three_way_metrics,
)
from triaged.priority import prioritise

CTX = OutputContext(
    software_version="0.1.0",
    priority_level="URGENT",
    key_slice_images=1,
    content_datetime=datetime(2026, 1, 2, 3, 4, 5),
)
VALIDATED = "phantoms only (n=24 test phantoms)"


@pytest.fixture(scope="module")
def case(phantom_ct_series: Path) -> Case:
    return load_real_case(phantom_ct_series)


def _saliency(case: Case) -> tuple[SaliencyBox, ...]:
    """Two boxes on the key slice: one on the painted lesion, one in an empty corner of the lung."""
    z = case.findings.key_slices[0]
    rows, cols = np.nonzero(case.masks.lesions[z])
    lung_r, lung_c = np.nonzero(case.masks.lungs[z] == 2)
    uid = case.volume.sop_instance_uids[z]
    return (
        SaliencyBox(
            z, uid, int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max()), "covid", 0.82
        ),
        SaliencyBox(
            z,
            uid,
            int(lung_r.min()),
            int(lung_c.min()),
            int(lung_r.min()) + 6,
            int(lung_c.min()) + 6,
            "cap",
            0.41,
        ),
    )


def _research(case: Case, **extra: object) -> Findings:
    """The phantom's findings as a research pipeline would give them: no validated P(COVID-19), a 3-way
    research classifier, P(severe), saliency boxes and key slices chosen by saliency."""
    fields: dict[str, object] = dict(
        pipeline="multiscale",
        pipeline_version="1.0",
        p_covid=None,
        class_probabilities=(("normal", 0.1), ("cap", 0.2), ("covid", 0.7)),
        p_severe=0.91,
        saliency_boxes=_saliency(case),
        provenance=(("p_severe_validated_on", VALIDATED), ("key_slices_by", "saliency (multi-scale IG)")),
    )
    fields.update(extra)
    return replace(case.findings, **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def encoded(case: Case) -> list[pydicom.Dataset]:
    return [
        round_trip(ds) for ds in build_outputs(_research(case), case.masks, case.volume, case.source, CTX)
    ]


def _texts(ds: pydicom.Dataset) -> list[str]:
    out: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                out.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out


def test_the_sr_reports_p_severe_saliency_regions_and_the_key_slice_method(
    encoded: list[pydicom.Dataset], case: Case, tmp_path: Path
) -> None:
    sr = encoded[0]
    assert errors(dciodvfy(sr, tmp_path / "sr.dcm")) == []
    path = tmp_path / "read.dcm"
    sr.save_as(path, enforce_file_format=True)
    report = cast(hd.sr.MeasurementReport, hd.sr.srread(path).content)
    groups = report.get_image_measurement_groups()
    by_id = {g.tracking_identifier: g for g in groups}
    # P(severe) as a NUM of its own group, a probability.
    (severe,) = by_id["Severity classification"].get_measurements()
    assert severe.name == hd.sr.CodedConcept.from_code(codes.PROBABILITY_SEVERE)
    assert (float(severe.value), severe.unit.value) == (0.91, "{probability}")
    # No P(COVID-19) number and no research class probability anywhere; a Comment says why.
    assert by_id["Classification"].get_measurements() == []
    texts = _texts(sr)
    assert RESEARCH_USE_TEXT in texts
    assert any(t.startswith("P(COVID-19): not assessed") for t in texts)
    assert (
        "Pipeline 'multiscale' has a research classifier (normal, cap, covid); its probabilities are not "
        "reported: it is not validated on real data (see the model card)."
    ) in texts
    assert not any("0.70" in t or "0.20" in t for t in texts)
    units = [m.unit.value for g in groups for m in g.get_measurements()]
    assert units.count("{probability}") == 1  # P(severe) only
    assert any("P(severe) 0.91 from pipeline 'multiscale'" in t and VALIDATED in t for t in texts)
    assert "Key slices chosen by saliency (multi-scale IG), highest first." in texts
    assert "Key slices by saliency (multi-scale IG)" in by_id
    # Saliency regions: TID 1410, finding DCM 130404 Saliency, a rectangle on the source image.
    planar = report.get_planar_roi_measurement_groups()
    regions = [g for g in planar if (g.tracking_identifier or "").startswith("Saliency region")]
    assert [g.tracking_identifier for g in regions] == [
        "Saliency region 1 (covid)",
        "Saliency region 2 (cap)",
    ]
    lesion_uids = {g.tracking_uid for g in planar if (g.tracking_identifier or "").startswith("Lesion")}
    assert lesion_uids and not lesion_uids & {g.tracking_uid for g in regions}
    box = _saliency(case)[0]
    first = regions[0]
    assert first.finding_type == hd.sr.CodedConcept.from_code(codes.SALIENCY)
    region = first.roi
    assert region is not None
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    c0, r0, c1, r1 = box.col_min, box.row_min, box.col_max + 1, box.row_max + 1
    np.testing.assert_allclose(region.value, [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]])
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == box.sop_instance_uid
    (score,) = first.get_measurements()
    assert (float(score.value), score.unit.value) == (0.82, "{ratio}")
    (klass,) = first.get_qualitative_evaluations()
    assert klass.value == hd.sr.CodedConcept.from_code(codes.COVID_19)
    (klass2,) = regions[1].get_qualitative_evaluations()
    assert klass2.value == hd.sr.CodedConcept.from_code(codes.COMMUNITY_ACQUIRED_PNEUMONIA)  # SCT 385093006


@pytest.mark.skipif(TID1500READER is None, reason="dcmqi's tid1500reader is not installed")
def test_dcmqi_reads_the_new_groups(encoded: list[pydicom.Dataset], tmp_path: Path) -> None:
    encoded[0].save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert TID1500READER is not None
    args = [
        TID1500READER,
        "--inputDICOM",
        str(tmp_path / "sr.dcm"),
        "--outputMetadata",
        str(tmp_path / "sr.json"),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    groups = json.loads((tmp_path / "sr.json").read_text())["Measurements"]
    by_id = {g["TrackingIdentifier"]: g for g in groups}
    (item,) = by_id["Severity classification"]["measurementItems"]
    assert (item["quantity"]["CodeValue"], item["units"]["CodeValue"], float(item["value"])) == (
        "PSEVERE",
        "{probability}",
        0.91,
    )
    saliency = by_id["Saliency region 1 (covid)"]
    assert saliency["Finding"]["CodeValue"] == "130404"
    assert saliency["measurementItems"][0]["units"]["CodeValue"] == "{ratio}"


def test_without_the_new_fields_the_sr_has_no_new_group(case: Case) -> None:
    sr = build_sr(case.findings, case.masks, case.volume, case.source, CTX)
    ids = [
        g.tracking_identifier
        for g in cast(
            hd.sr.MeasurementReport, hd.sr.Comprehensive3DSR.from_dataset(round_trip(sr)).content
        ).get_image_measurement_groups()
    ]
    assert "Severity classification" not in ids
    assert "Key slices, highest lesion burden first" in ids
    assert not any((i or "").startswith("Saliency") for i in ids)


def _colour_pixels(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(rgb == np.array(colour, np.uint8), axis=-1)


def test_key_slices_draw_labelled_saliency_boxes_and_only_reported_lesion_boxes(case: Case) -> None:
    findings = _research(case)
    z = findings.key_slices[0]
    rgb = sc_module.render_key_slice(findings, case.masks, case.volume, CTX, z, image_label="CT image 9")
    saliency = _colour_pixels(rgb, sc_module._SALIENCY_RGB)
    box = findings.saliency_boxes[0]
    # The box outline (1 px outside the box, 2 px wide) is magenta on all four sides.
    assert saliency[box.row_min - 1, box.col_min : box.col_max].all()
    assert saliency[box.row_max + 1, box.col_min : box.col_max].all()
    assert saliency[box.row_min : box.row_max, box.col_min - 1].all()
    # The label above it: magenta text pixels in the rows just above the box.
    near = np.abs(rgb.astype(int) - np.array(sc_module._SALIENCY_RGB)).sum(axis=-1) < 60  # anti-aliased text
    assert near[max(0, box.row_min - 20) : box.row_min - 3, box.col_min : box.col_min + 80].sum() > 20
    assert sc_module.saliency_label(box) == "saliency: covid 0.82"
    # Lesion boxes: the reported one (>= 5 ml) is drawn, a 2 ml one is not (as in the SR).
    lesion = findings.lesion_boxes[0]
    assert lesion.volume_ml >= 5
    yellow = _colour_pixels(rgb, sc_module._BOX_RGB)
    assert yellow[lesion.row_max + 2, lesion.col_min : lesion.col_max].all()  # its outer bottom edge
    small = LesionBox(z, lesion.sop_instance_uid, 5, 5, 20, 20, 2.0, "left")
    only_small = replace(findings, lesion_boxes=(small,), saliency_boxes=())
    rgb2 = sc_module.render_key_slice(only_small, case.masks, case.volume, CTX, z, image_label="CT image 9")
    assert not _colour_pixels(rgb2, sc_module._BOX_RGB)[3:23, 3:23].any()
    assert not _colour_pixels(rgb2, sc_module._SALIENCY_RGB)[: case.volume.hu.shape[1]].any()


def test_the_text_block_has_a_p_severe_line_and_the_key_slice_method(case: Case) -> None:
    lines = [text for text, _ in sc_module._summary_lines(_research(case), CTX)]
    assert f"P(severe) 0.91 (multiscale; validated on {VALIDATED})" in lines
    assert "P(COVID-19): not assessed   Priority URGENT" in lines
    assert not any("P(severe)" in t for t, _ in sc_module._summary_lines(case.findings, CTX))


# --- priority ---------------------------------------------------------------------------------------


def _findings(p_severe: float | None, pipeline: str = "m2unet") -> Findings:
    return Findings(
        pipeline=pipeline,
        pipeline_version="1",
        right=LungMeasures(2000.0, 400.0, 0.0),
        left=LungMeasures(2000.0, 100.0, 0.0),
        ct_grade=CTGrade.CT1,
        p_severe=p_severe,
    )


MIL_POLICY = PriorityPolicyConfig.model_validate(
    {"scenario": "severity", "escalate": [{"measure": "severity_mil", "at_least": 0.8, "level": "URGENT"}]}
)


def test_severity_mil_escalates_and_the_reason_names_the_pipeline() -> None:
    result = prioritise(_findings(0.91), MIL_POLICY)
    assert result.level == "URGENT"
    assert "P(severe) 0.91 (m2unet)" in result.reasons
    assert "URGENT: P(severe) 0.91 (m2unet) >= 0.8" in result.reasons
    assert prioritise(_findings(0.5), MIL_POLICY).level == "ROUTINE"


def test_without_p_severe_the_escalation_does_not_fire_and_the_reason_says_so() -> None:
    for p in (None, float("nan")):
        result = prioritise(_findings(p, pipeline="classical"), MIL_POLICY)
        assert result.level == "ROUTINE"
        assert any(r.startswith("P(severe) not available") for r in result.reasons), result.reasons
    # A policy that does not use it says nothing about it for a pipeline without it.
    plain = PriorityPolicyConfig.model_validate({"scenario": "severity"})
    assert not any("P(severe)" in r for r in prioritise(_findings(None, "classical"), plain).reasons)


def test_config_validation_knows_severity_mil_and_its_range() -> None:
    with pytest.raises(ValidationError, match="severity_mil threshold must be between 0 and 1"):
        PriorityPolicyConfig.model_validate(
            {
                "scenario": "severity",
                "escalate": [{"measure": "severity_mil", "at_least": 80, "level": "STAT"}],
            }
        )
    with pytest.raises(ValidationError, match="'severity_mil'"):
        PriorityPolicyConfig.model_validate(
            {
                "scenario": "severity",
                "escalate": [{"measure": "severity_ml", "at_least": 0.8, "level": "STAT"}],
            }
        )


# --- the papers' eval columns (hand-computed) -----------------------------------------------------------


def _case(
    ref: str,
    *,
    severe: bool | None = None,
    p_severe: float | None = None,
    probs: dict[str, float] | None = None,
    hits: int = 0,
    boxes: int | None = None,
) -> PaperCase:
    return PaperCase("c", ref, severe, p_severe, tuple((probs or {}).items()), hits, boxes)


def test_reference_classes_map_phantom_labels_and_diagnoses() -> None:
    assert [reference_class(x) for x in ("covid", "healthy", "other", "normal", "bacterial", "cap", "x")] == [
        "covid",
        "normal",
        "normal",
        "normal",
        "cap",
        "cap",
        "",
    ]


def test_severe_accuracy_and_auc_by_hand() -> None:
    # severe: 0.9, 0.4; non-severe: 0.6, 0.1.  Pairs (s > n): 0.9>0.6, 0.9>0.1, 0.4<0.6, 0.4>0.1 -> 3/4.
    # Calls at 0.5: 0.9 severe (right), 0.4 non (wrong), 0.6 severe (wrong), 0.1 non (right) -> 2/4.
    cases = [
        _case("covid", severe=True, p_severe=0.9),
        _case("covid", severe=True, p_severe=0.4),
        _case("covid", severe=False, p_severe=0.6),
        _case("covid", severe=False, p_severe=0.1),
        _case("normal", p_severe=0.99),  # not a COVID-19 case: left out
        _case("covid", severe=None, p_severe=0.99),  # no reference: left out
    ]
    acc, auc, counts = severe_metrics(cases)
    assert (acc.value, auc.value, acc.n, counts) == (0.5, 0.75, 4, "2/2")
    acc, auc, _ = severe_metrics(cases[:2])
    assert acc.value is None and auc.text() == "n/a (n=severe 2, non-severe 0; no non-severe case)"


def test_covid_vs_bacterial_by_hand() -> None:
    # covid P: 0.8, 0.3; bacterial P(covid): 0.6, 0.2.  Called covid: 0.8, 0.6 -> TP 1, FP 1, FN 1, TN 1.
    def c(ref: str, p: float) -> PaperCase:
        return _case(ref, probs={"covid": p, "bacterial": 1 - p})

    cases = [c("covid", 0.8), c("covid", 0.3), c("cap", 0.6), c("cap", 0.2), c("normal", 0.9)]
    acc, auc, f1, counts = covid_bacterial_metrics(cases)
    assert (acc.value, auc.value, f1.value, counts) == (0.5, 0.75, 0.5, "2/2")
    acc, auc, f1, counts = covid_bacterial_metrics([c("covid", 0.8), c("normal", 0.1)])
    assert (acc.value, auc.value, f1.value, counts) == (None, None, None, "1/0")
    assert auc.text() == "n/a (n=covid 1, bacterial 0; no bacterial case)"


def test_three_way_accuracy_macro_and_pair_auc_by_hand() -> None:
    def c(ref: str, n: float, cap: float, cov: float) -> PaperCase:
        return _case(ref, probs={"normal": n, "cap": cap, "covid": cov})

    cases = [
        c("normal", 0.7, 0.2, 0.1),  # argmax normal (right)
        c("cap", 0.2, 0.5, 0.3),  # cap (right)
        c("covid", 0.1, 0.6, 0.3),  # cap (wrong)
        c("covid", 0.1, 0.2, 0.7),  # covid (right)
    ]
    acc, macro, pairs, counts = three_way_metrics(cases)
    assert acc.value == 0.75 and counts == "1/1/2"
    # one vs rest: normal 1.0 (0.7 above all); cap: 0.5 vs others 0.2, 0.6, 0.2 -> 2/3;
    # covid: 0.3, 0.7 vs 0.1, 0.3 -> (1 + 0.5 + 1 + 1) / 4 = 0.875.  Mean = (1 + 2/3 + 0.875) / 3.
    assert macro.value == pytest.approx((1 + 2 / 3 + 0.875) / 3)
    got = dict(pairs)
    # cap/covid: AUC(P(cap); cap vs covid) = 0.5 vs 0.6, 0.2 -> 0.5; AUC(P(covid); covid vs cap) = 0.3, 0.7
    # vs 0.3 -> (0.5 + 1) / 2 = 0.75; pair = 0.625.
    assert got["cap/covid"].value == pytest.approx(0.625)
    assert got["normal/cap"].value == 1.0 and got["normal/covid"].value == 1.0
    # Real sets: no CAP case -> accuracy, macro AUC and the CAP pairs are n/a, normal/covid is not.
    acc, macro, pairs, counts = three_way_metrics([cases[0], cases[3]])
    got = dict(pairs)
    assert acc.value is None and macro.value is None and got["cap/covid"].value is None
    assert got["normal/covid"].value == 1.0 and counts == "1/0/1"


def test_box_hits_count_boxes_overlapping_a_reference_lesion_on_their_slice() -> None:
    truth = np.zeros((3, 20, 20), bool)
    truth[1, 5:8, 5:8] = True
    base = _findings(None)
    boxes = (
        SaliencyBox(1, "1.2", 7, 7, 10, 10, "covid", 0.9),  # touches (7, 7): hit
        SaliencyBox(0, "1.2", 5, 5, 8, 8, "covid", 0.8),  # same place, other slice: miss
        SaliencyBox(1, "1.2", 9, 9, 12, 12, "cap", 0.5),  # next to it: miss
    )
    found = replace(
        base, class_probabilities=(("normal", 0.1), ("cap", 0.1), ("covid", 0.8)), saliency_boxes=boxes
    )
    covid = paper_case("a", "covid", found, true_lesions=truth)
    assert (covid.box_hits, covid.boxes) == (1, 3)
    healthy = paper_case("b", "healthy", found, true_lesions=truth)
    assert healthy.boxes is None  # boxes on a no-pneumonia case are not scored
    assert box_hit_rate([covid, healthy]) == Metric(1 / 3, 3)
    assert box_hit_rate([paper_case("c", "covid", found)]).value is None  # no reference mask


def test_columns_appear_only_for_pipelines_that_output_the_field() -> None:
    classical = [paper_case("a", "covid", _findings(None, "classical"), true_pct=60.0)]
    assert paper_row("classical", classical).empty
    m2unet = [
        paper_case("a", "covid", _findings(0.9), true_pct=60.0),
        paper_case("b", "covid", _findings(0.2), true_pct=20.0),
    ]
    row = paper_row("m2unet", m2unet)
    assert row.severe_auc == Metric(1.0, 2) and row.cvb_auc is None and row.three_accuracy is None
    table = papers_markdown([paper_row("classical", classical), row])
    assert "| m2unet | 1.000 (n=2) | 1.000 (n=2) | 1/1 |" in table
    assert "classical" not in table and "Seed 002" not in table


def test_eval_prints_the_papers_columns_for_the_pipelines_that_have_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``triaged eval`` on four small phantoms (2 COVID-19: one severe, one not; bacterial; healthy) with
    stand-ins of the research pipelines (tests/research_pipelines.py) and the plain threshold pipeline."""
    from triaged.cli import main
    from triaged.lab.datasets import write_dataset
    from triaged.lab.phantom import PhantomSpec

    kinds = [("covid", 65.0), ("covid", 15.0), ("bacterial", 30.0), ("healthy", None)]
    specs = [
        PhantomSpec(kind=k, severity=s, seed=i, matrix=96, slice_thickness=10.0)
        for i, (k, s) in enumerate(kinds)
    ]
    write_dataset(specs, tmp_path / "ds", progress=False)
    report = tmp_path / "r.json"
    registry = ["--registry", "tests.research_pipelines:registry"]
    args = ["eval", str(tmp_path / "ds"), "-p", "threshold,bacterial-test,three-test", "-q", *registry]
    assert main([*args, "--json", str(report)]) == 0
    out = capsys.readouterr().out
    papers = json.loads(report.read_text(encoding="utf-8"))["papers"]
    # Only the pipelines with the fields get columns, each only its own task.
    assert [r["method"] for r in papers["rows"]] == ["bacterial-test", "three-test"]
    bacterial, three = papers["rows"]
    assert bacterial["seed000_severe"] is None and bacterial["seed003_three_way"] is None
    assert bacterial["seed002_covid_vs_bacterial"]["cases"] == "2/1"  # the healthy case is left out
    assert three["seed002_covid_vs_bacterial"] is None
    assert three["seed000_severe"]["cases"] == "1/1"  # 65 % is severe (CT3), 15 % is not
    assert three["seed003_three_way"]["cases"] == "1/1/2"
    assert "| threshold |" not in out.split("The papers' classifier columns")[1]
    # The printed figures are those of the per-case outputs in the report.
    for row in papers["rows"]:
        cases = [
            PaperCase(
                c["case_id"],
                c["reference"],
                c["severe"],
                c["p_severe"],
                tuple((k, v) for k, v in c["probabilities"]),
                c["box_hits"],
                c["boxes"],
            )
            for c in papers["cases"][row["method"]]
        ]
        again = paper_row(row["method"], cases)
        assert papers_markdown([again]).splitlines()[3] in out
    assert three["seed003_three_way"]["box_hit_rate"]["n"] >= 1


def test_the_saliency_swatch_wraps_onto_a_second_legend_row_instead_of_leaving_the_image() -> None:
    # A 512-pixel key slice had room for four swatches: the fifth (saliency) was drawn past the right edge.
    from PIL import Image

    from triaged.encode.sc import _SALIENCY_RGB, _with_legend

    image = Image.new("RGB", (512, 512))
    plain = _with_legend(image, colour_bar=False)
    with_saliency = _with_legend(image, colour_bar=False, saliency=True)
    assert with_saliency.height > plain.height  # a second row
    band = np.asarray(with_saliency)[512:]
    assert (band == np.array(_SALIENCY_RGB, np.uint8)).all(axis=-1).any()  # its swatch is in the picture
