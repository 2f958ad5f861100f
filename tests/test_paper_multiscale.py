"""Pipeline ``multiscale`` (seed 003, Hu et al. 2020) with the shipped weights.

* the study pooling (mean of the top quarter of slice scores) by hand;
* the pipeline on small phantoms: classical's masks and measurements unchanged, three class
  probabilities in the shared order, no P(COVID-19), saliency boxes inside the image and the lungs' box,
  naming their slice, key slices from the boxes; and the model card's reproduction figures (the same
  phantoms, regenerated deterministically) within the card's tolerance;
* end to end on the real RICORD COVID-19 series: the card's real-test output is reproduced.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import REAL_DATA
from triaged.analysis.pipeline import ClassicalPipeline
from triaged.config import SeriesSelectionConfig
from triaged.domain import RESEARCH_NOTE, AnalysisResult, Volume, findings_from_json, findings_to_json
from triaged.nets.paper_multiscale import CLASS_KEYS, MultiScalePipeline, aggregate, top_k
from triaged.nets.pipelines import (
    LEARNED,
    P_COVID_NOT_ASSESSED,
    build_pipeline,
    learned_class,
    node_registry,
)
from triaged.nets.weights import model_dir

CARD: dict[str, Any] = yaml.safe_load((model_dir("multiscale") / "manifest.yaml").read_text(encoding="utf-8"))
REPRO: dict[str, Any] = CARD["reproduce"]
RICORD = "ricord-1a-covid-001012"


@cache
def _pipeline() -> MultiScalePipeline:
    p = build_pipeline("multiscale")
    assert isinstance(p, MultiScalePipeline)
    return p


@cache
def _phantom(kind: str, seed: int) -> Volume:
    from triaged.lab.phantom import PhantomSpec, generate, to_volume

    spec = PhantomSpec(kind=kind, seed=seed, **REPRO["phantom_spec"])  # type: ignore[arg-type]
    return to_volume(generate(spec))


@cache
def _run(kind: str, seed: int) -> tuple[AnalysisResult, AnalysisResult]:
    volume = _phantom(kind, seed)
    return _pipeline().run(volume), ClassicalPipeline().run(volume)


def test_top_fraction_pooling_by_hand() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0], [2.0, 3.0, 1.0], [4.0, -1.0, 0.0], [1.0, 0.0, 2.0]])
    assert top_k(4) == 1 and top_k(8) == 2 and top_k(1) == 1
    assert torch.equal(aggregate(logits), torch.tensor([4.0, 3.0, 5.0]))
    # top half: the two largest per class, averaged
    assert torch.allclose(aggregate(logits, 0.5), torch.tensor([3.0, 2.0, 3.5]))


def test_registered_with_a_card_that_reports_no_p_covid() -> None:
    assert LEARNED["multiscale"][0] == "multiscale" and learned_class("multiscale") is MultiScalePipeline
    assert "multiscale" in node_registry().pipeline_names()
    assert CARD["p_covid_validated_on"] is None
    assert CARD["architecture"]["name"] == "MultiScaleNet"
    assert (model_dir("multiscale") / "model.pt").stat().st_size < 3_000_000
    _pipeline().verify()


def test_pipeline_composes_classical_and_adds_saliency() -> None:
    case = next(c for c in REPRO["phantoms"] if c["predicted"] != "normal")
    result, classical = _run(case["kind"], int(case["seed"]))
    f, c = result.findings, classical.findings
    volume = _phantom(case["kind"], int(case["seed"]))
    # classical's masks and measurements are kept as they are
    assert np.array_equal(result.masks.lesions, classical.masks.lesions)
    assert np.array_equal(result.masks.lungs, classical.masks.lungs)
    assert (f.right, f.left, f.ct_grade, f.lobes) == (c.right, c.left, c.ct_grade, c.lobes)
    assert f.pipeline == "multiscale" and f.pipeline_version == CARD["version"]
    assert f.model_sha256 == CARD["weights"]["sha256"]
    # three research probabilities in the shared order; no P(COVID-19)
    assert tuple(k for k, _ in f.class_probabilities) == CLASS_KEYS == ("normal", "cap", "covid")
    assert sum(v for _, v in f.class_probabilities) == pytest.approx(1.0, abs=1e-3)
    assert f.p_covid is None
    assert P_COVID_NOT_ASSESSED in f.warnings
    prov = dict(f.provenance)
    assert prov["note"] == RESEARCH_NOTE
    assert prov["masks_from"].startswith("classical v")
    # boxes: in the image, inside the lungs' box, on slices with lung, naming their source image
    assert f.saliency_boxes, "a non-normal prediction with no saliency box"
    lungs = result.masks.lungs > 0
    rows = np.nonzero(lungs.any(axis=(0, 2)))[0]
    cols = np.nonzero(lungs.any(axis=(0, 1)))[0]
    ny, nx = volume.hu.shape[1:]
    for b in f.saliency_boxes:
        assert 0 <= b.row_min <= b.row_max < ny and 0 <= b.col_min <= b.col_max < nx
        assert rows[0] - 1 <= b.row_min and b.row_max <= rows[-1] + 1
        assert cols[0] - 1 <= b.col_min and b.col_max <= cols[-1] + 1
        assert lungs[b.z, b.row_min : b.row_max + 1, b.col_min : b.col_max + 1].any()
        assert b.sop_instance_uid == volume.sop_instance_uids[b.z]
        assert b.label == case["predicted"] and 0.0 <= b.score <= 1.0
    scores = [b.score for b in f.saliency_boxes]
    assert scores == sorted(scores, reverse=True)
    assert f.key_slices and f.key_slices[0] == f.saliency_boxes[0].z
    assert set(f.key_slices) <= {b.z for b in f.saliency_boxes} and len(f.key_slices) <= 5
    assert prov["key_slices_by"] == "saliency (multi-scale IG)"
    assert findings_from_json(findings_to_json(f)) == f  # the ledger keeps boxes and probabilities


@pytest.mark.parametrize("case", REPRO["phantoms"], ids=lambda c: f"{c['kind']}-{c['seed']}")
def test_card_reproduction_phantoms(case: dict[str, Any]) -> None:
    result, _ = _run(case["kind"], int(case["seed"]))
    got = dict(result.findings.class_probabilities)
    for key, value in case["probabilities"].items():
        assert got[key] == pytest.approx(value, abs=REPRO["tolerance"]), (key, got)
    assert max(got, key=lambda k: got[k]) == case["predicted"]
    if case["predicted"] == "normal":
        assert result.findings.saliency_boxes == ()


@pytest.mark.slow  # a whole real series (10-15 s): `make soak` runs it, `make test` does not
def test_real_ricord_end_to_end() -> None:
    folder = REAL_DATA / RICORD
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent (only on development machines)")
    from triaged.volume import load_series_folder

    volume, _ = load_series_folder(folder, SeriesSelectionConfig())
    f = _pipeline().run(volume).findings
    expected = REPRO["real"][RICORD]
    got = dict(f.class_probabilities)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=REPRO["tolerance"]), (key, got)
    assert f.p_covid is None and f.ct_grade >= 1
    for b in f.saliency_boxes:
        assert b.sop_instance_uid == volume.sop_instance_uids[b.z]
        assert 0 <= b.row_min <= b.row_max < volume.hu.shape[1]


def test_models_root_is_the_shipped_folder() -> None:
    assert Path(_pipeline().model.directory).name == "multiscale"
