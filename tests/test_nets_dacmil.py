"""The ``dacmil`` pipeline (seed 002, DA-CMIL): key slices, composition with classical, the shipped weights.

The shipped model card (``models/dacmil/manifest.yaml``) records, under ``reproduce``, the pipeline's
P(COVID-19 vs bacterial) on two small phantoms made here deterministically and on one real series; the
shipped weights must give them again within the card's tolerance.  Research use only - not for diagnosis.
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
from triaged.analysis import default_registry
from triaged.config.schema import SeriesSelectionConfig
from triaged.domain import AnalysisResult, Volume
from triaged.lab.phantom import PhantomSpec, generate, to_volume
from triaged.lab.train_dacmil import Row, augment, binary_figures, split_rows
from triaged.nets.bags import make_bag
from triaged.nets.dacmil import DACMIL
from triaged.nets.paper_dacmil import KEY_SLICES_BY, DACMILPipeline, key_slices, predict_bag
from triaged.nets.pipelines import LEARNED, P_COVID_NOT_ASSESSED, learned_class, node_registry
from triaged.nets.weights import WeightsError, model_dir
from triaged.volume import load_series_folder

CARD = model_dir("dacmil") / "manifest.yaml"


@cache
def _card() -> dict[str, Any]:
    data = yaml.safe_load(CARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@cache
def _pipeline() -> DACMILPipeline:
    return DACMILPipeline(model_dir("dacmil"))


@cache
def _phantom(index: int) -> tuple[Volume, AnalysisResult]:
    spec = PhantomSpec(**_card()["reproduce"]["phantoms"][index]["spec"])
    volume = to_volume(generate(spec, workers=1))
    return volume, _pipeline().run(volume)


# ---------------------------------------------------------------- key slices and the bag prediction


def test_key_slices_are_the_top_attention_slices_with_lung_highest_first() -> None:
    z = np.array([10, 12, 14, 16, 18, 20, 22])
    att = np.array([0.30, 0.05, 0.20, 0.10, 0.20, 0.10, 0.05], np.float32)
    lung = np.ones((7, 4, 4), np.uint8)
    lung[0] = 0  # the highest-attention slice has no lung: never a key slice
    keys = key_slices(z, att, lung)
    # 0.20 at z 14 and 18 (tie: lower z first), then 0.10 at z 16 and 20, then 0.05 at z 12; at most 5
    assert keys == [(14, pytest.approx(0.2)), (18, pytest.approx(0.2)), (16, pytest.approx(0.1)),
                    (20, pytest.approx(0.1)), (12, pytest.approx(0.05))]  # fmt: skip
    assert key_slices(z, att, lung, k=2) == keys[:2]


def test_slices_without_lung_get_no_attention_and_the_prediction_is_deterministic() -> None:
    torch.manual_seed(0)
    net = DACMIL()
    images = np.random.default_rng(0).random((6, 1, 64, 64)).astype(np.float32)
    lung = np.ones((6, 64, 64), np.uint8)
    lung[[1, 4]] = 0
    a = predict_bag(net, images, lung)
    b = predict_bag(net, images, lung)
    assert 0.0 <= a.p_covid <= 1.0 and a.p_covid == b.p_covid
    assert a.attention.shape == (6,) and a.attention[[1, 4]].tolist() == [0.0, 0.0]
    assert a.attention.sum() == pytest.approx(1.0, abs=1e-5)
    # a bag whose lung labels are all empty is classified on all its slices rather than refused
    assert predict_bag(net, images, np.zeros_like(lung)).attention.min() > 0.0


# ---------------------------------------------------------------- training helpers


def test_training_holds_out_validation_bags_of_both_classes_and_never_reads_test_rows() -> None:
    rows = [Row(f"c{i}", "phantom", ("covid", "bacterial", "healthy")[i % 3], "train", "") for i in range(30)]
    rows += [Row("v1", "phantom", "healthy", "val", ""), Row("t1", "phantom", "covid", "test", "")]
    rows += [Row("r1", "real-volume", "normal", "train", ""), Row("r2", "real-volume", "covid", "test", "")]
    train, val, target = split_rows(rows)
    # the cache's val split has no covid/bacterial case: every 5th training case of each class is held out
    assert sorted(r.case_id for r in val) == ["c12", "c13", "c27", "c28"]
    assert not {r.case_id for r in train} & {r.case_id for r in val}
    assert {r.label for r in train} == {"covid", "bacterial"} and len(train) == 16
    assert [r.case_id for r in target] == ["r1"]  # unlabelled target domain: real train volumes only
    x = np.full((3, 1, 32, 32), 0.5, np.float32)
    y = augment(np.random.default_rng(1), x)
    assert y.shape == x.shape and y.dtype == np.float32 and 0.0 <= y.min() and y.max() <= 1.0


def test_binary_figures_match_a_hand_computed_case() -> None:
    f = binary_figures([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1])
    # predictions 1 0 1 0: tp 1, fn 1, fp 1, tn 1; AUC: pairs (0.9>0.6, 0.9>0.1, 0.4<0.6, 0.4>0.1) = 3/4
    assert (f["accuracy"], f["f1"], f["auc"]) == (0.5, 0.5, 0.75)


# ---------------------------------------------------------------- the pipeline with the shipped weights


def test_dacmil_is_registered_with_the_node_and_its_card_says_p_covid_is_not_validated() -> None:
    assert LEARNED["dacmil"][0] == "dacmil" and learned_class("dacmil") is DACMILPipeline
    assert "dacmil" in node_registry().pipeline_names()
    card = _card()
    assert card["p_covid_validated_on"] is None
    assert card["architecture"]["name"] == "DACMIL"
    assert (CARD.parent / card["weights"]["file"]).stat().st_size < 3_000_000


@pytest.mark.parametrize("index", [0, 1])
def test_shipped_weights_reproduce_the_cards_phantom_outputs(index: int) -> None:
    entry = _card()["reproduce"]["phantoms"][index]
    _, result = _phantom(index)
    f = result.findings
    assert f.pipeline == "dacmil" and f.pipeline_version == _card()["version"]
    (c1, p), (c2, q) = f.class_probabilities
    assert (c1, c2) == ("covid", "bacterial") and p + q == pytest.approx(1.0)
    assert p == pytest.approx(entry["p_covid"], abs=_card()["reproduce"]["tolerance"])
    assert (p >= 0.5) == (entry["spec"]["kind"] == "covid")  # both are classified right
    # P(COVID-19) itself is not assessed (phantom-only classifier)
    assert f.p_covid is None and P_COVID_NOT_ASSESSED in f.warnings


def test_pipeline_composes_classical_and_ranks_key_slices_by_attention() -> None:
    volume, result = _phantom(1)
    classical = default_registry().get("classical").run(volume)
    f, c = result.findings, classical.findings
    assert (f.right, f.left, f.ct_grade, f.lobes) == (c.right, c.left, c.ct_grade, c.lobes)
    assert np.array_equal(result.masks.lungs, classical.masks.lungs)
    assert np.array_equal(result.masks.lesions, classical.masks.lesions)
    prov = dict(f.provenance)
    assert prov["key_slices_by"] == KEY_SLICES_BY
    assert prov["masks_from"] == f"classical v{c.pipeline_version}"
    bag = make_bag(volume.hu, classical.masks.lungs, volume.spacing)
    assert 1 <= len(f.key_slices) <= 5 and set(f.key_slices) <= set(bag.z.tolist())
    assert all(classical.masks.lungs[z].any() for z in f.key_slices)
    weights = [float(item.split(":")[1]) for item in prov["key_slices.attention"].split(", ")]
    assert [int(item.split(":")[0][2:]) for item in prov["key_slices.attention"].split(", ")] == list(
        f.key_slices
    )
    assert weights == sorted(weights, reverse=True)


@pytest.mark.slow  # a whole real series (10-15 s): `make soak` runs it, `make test` does not
def test_shipped_weights_reproduce_the_cards_output_on_a_real_series() -> None:
    entry = _card()["reproduce"]["real"]
    folder = REAL_DATA / entry["folder"]
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent (only on development machines)")
    volume, _ = load_series_folder(folder, SeriesSelectionConfig(min_slices=10, min_coverage_mm=10))
    f = _pipeline().run(volume).findings
    assert dict(f.class_probabilities)["covid"] == pytest.approx(
        entry["p_covid"], abs=_card()["reproduce"]["tolerance"]
    )
    assert f.p_covid is None and 1 <= len(f.key_slices) <= 5


def test_a_missing_weights_file_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "dacmil"
    folder.mkdir()
    (folder / "manifest.yaml").write_text(CARD.read_text(encoding="utf-8"), encoding="utf-8")
    pipeline = DACMILPipeline(folder)
    assert "UNAVAILABLE" in pipeline.description
    with pytest.raises(WeightsError, match="model.pt is missing"):
        pipeline.verify()
