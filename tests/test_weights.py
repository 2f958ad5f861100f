"""Weights loading refuses what the model card does not vouch for; the shipped weights reproduce their cards."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from triaged.domain import AnalysisResult
from triaged.lab import train as training
from triaged.nets.pipelines import register_learned
from triaged.nets.weights import (
    DEFAULT_MODELS_ROOT,
    MANIFEST,
    WeightsError,
    load_model,
    sha256_of,
    verify_weights,
    weights_present,
)

torch.set_num_threads(2)
SHIPPED = ("multitask", "consolidation-em")


def _write_model(folder: Path, *, name: str = "consolidation-em", seed: int = 0) -> Path:
    """A real (untrained) model folder: state dict + manifest with the right hash."""
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    net = training.new_module(name)
    torch.save(net.state_dict(), folder / "model.pt")
    card = {
        "name": name,
        "version": "0.0.1",
        "architecture": training.architecture_of(name),
        "weights": {"file": "model.pt", "sha256": sha256_of(folder / "model.pt")},
        "thresholds": {"infection": 0.5},
    }
    (folder / MANIFEST).write_text(yaml.safe_dump(card), encoding="utf-8")
    return folder


def test_a_model_whose_hash_matches_its_card_loads_in_eval_mode(tmp_path: Path) -> None:
    loaded = load_model(_write_model(tmp_path / "m"))
    assert loaded.name == "consolidation-em"
    assert not loaded.module.training
    assert loaded.thresholds == {"infection": 0.5}
    assert loaded.sha256 == sha256_of(tmp_path / "m" / "model.pt")


def test_a_weight_file_that_differs_from_the_card_is_refused_before_loading(tmp_path: Path) -> None:
    folder = _write_model(tmp_path / "m")
    blob = bytearray((folder / "model.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (folder / "model.pt").write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match="sha256 .* does not match the manifest"):
        load_model(folder)
    with pytest.raises(WeightsError, match="refusing to load"):
        verify_weights(folder)


def test_weights_swapped_for_another_valid_file_are_refused(tmp_path: Path) -> None:
    folder = _write_model(tmp_path / "m", seed=0)
    other = _write_model(tmp_path / "other", seed=1)
    shutil.copy(other / "model.pt", folder / "model.pt")
    with pytest.raises(WeightsError, match="does not match"):
        load_model(folder)


def test_a_model_folder_without_a_card_or_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="manifest.yaml is missing"):
        load_model(tmp_path / "empty")
    folder = _write_model(tmp_path / "m")
    (folder / "model.pt").unlink()
    with pytest.raises(WeightsError, match="missing"):
        load_model(folder)
    assert not weights_present("m", tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architecture": {"name": "os.system"}}, "architecture.name must be one of"),
        ({"weights": {"file": "../model.pt", "sha256": "00"}}, "plain file name"),
        ({"weights": {"file": "model.pt"}}, "weights.sha256 are required"),
    ],
)
def test_a_card_that_names_unknown_code_or_paths_is_refused(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    folder = _write_model(tmp_path / "m")
    card = yaml.safe_load((folder / MANIFEST).read_text())
    card.update(change)
    (folder / MANIFEST).write_text(yaml.safe_dump(card))
    with pytest.raises(WeightsError, match=message):
        load_model(folder)


def test_register_learned_adds_only_pipelines_whose_weights_are_present(tmp_path: Path) -> None:
    from triaged.analysis import Pipeline, default_registry

    _write_model(tmp_path / "consolidation-em")
    registry = default_registry()
    assert register_learned(registry, models_root=tmp_path) == ["consolidation-em"]
    pipeline = registry.get_pipeline("consolidation-em")
    assert isinstance(pipeline, Pipeline)
    assert pipeline.version == "0.0.1"
    assert pipeline.needs == frozenset({"volume", "model:consolidation-em"})
    assert "multitask" not in registry


def test_a_registered_pipeline_refuses_weights_changed_after_registration(tmp_path: Path) -> None:
    folder = _write_model(tmp_path / "consolidation-em")
    registry: dict[str, Any] = {}
    register_learned(registry, models_root=tmp_path)
    (folder / "model.pt").write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="does not match"):
        _ = registry["consolidation-em"].model


# ------------------------------------------------------------------------------ the shipped weights
def _shipped(name: str) -> Path:
    folder = DEFAULT_MODELS_ROOT / name
    if not (folder / MANIFEST).is_file():
        pytest.fail(f"{folder} has no model card: the shipped weights are part of the repository")
    return folder


@pytest.fixture(scope="module")
def smoke_cases() -> list[Any]:
    return training.smoke_cases()


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_weights_match_their_cards(name: str) -> None:
    folder = _shipped(name)
    verify_weights(folder)
    card = yaml.safe_load((folder / MANIFEST).read_text())
    assert (folder / card["weights"]["file"]).stat().st_size < 8 * 2**20
    assert card["training"]["command"]
    assert card["training"]["data"]
    # real validation first; phantom test figures where phantoms were part of the training
    assert card["metrics"]["real_validation"]["n_slices"] == 15
    if any(d["source"] == "phantoms" for d in card["training"]["data"]):
        assert card["metrics"]["phantom_test"]["n_cases"] > 0
    if name == "multitask":
        assert "p_covid_validated_on" in card  # says whether P(COVID-19) means anything (issue 11)


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_weights_reproduce_the_smoke_metrics_of_their_card(
    name: str, smoke_cases: list[Any]
) -> None:
    folder = _shipped(name)
    card = yaml.safe_load((folder / MANIFEST).read_text())
    expected = card["metrics"]["phantom_smoke"]
    got = training.smoke_metrics(folder, smoke_cases)
    assert got["lesion_dice_global"] == pytest.approx(expected["lesion_dice_global"], abs=0.02)
    for key in ("lesion_dice_covid", "consolidation_dice"):
        if expected[key] is not None:
            assert got[key] == pytest.approx(expected[key], abs=0.03), key
    for want, have in zip(expected["per_case"], got["per_case"], strict=True):
        assert have["case"] == want["case"]
        assert have["pred_pct"] == pytest.approx(want["pred_pct"], abs=1.5), have["case"]
        if want["p_covid"] is not None:
            assert have["p_covid"] == pytest.approx(want["p_covid"], abs=0.03), have["case"]


def test_the_multitask_pipeline_returns_masks_on_the_volume_grid(smoke_cases: list[Any]) -> None:
    from triaged.domain import Volume
    from triaged.nets.pipelines import build_pipeline

    _shipped("multitask")
    case = smoke_cases[0]
    volume = Volume(
        case.hu,
        case.spacing,
        case.affine_lps,
        tuple(f"2.25.{i + 1}" for i in range(case.hu.shape[0])),
        "2.25.1",
        "2.25.2",
    )
    result = build_pipeline("multitask").run(volume)
    assert isinstance(result, AnalysisResult)
    assert result.masks.lesions.shape == case.hu.shape
    assert set(np.unique(result.masks.lungs)) <= {0, 1, 2}
    assert not (result.masks.lesions & (result.masks.lungs == 0)).any()
    card = yaml.safe_load((DEFAULT_MODELS_ROOT / "multitask" / MANIFEST).read_text())
    if card.get("p_covid_validated_on") is None:
        assert result.findings.p_covid is None
    else:
        assert 0.0 <= (result.findings.p_covid or 0.0) <= 1.0
    assert result.findings.model_sha256 == sha256_of(DEFAULT_MODELS_ROOT / "multitask" / "model.pt")


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_weights_reproduce_the_real_slice_dice_of_their_card(name: str) -> None:
    from triaged.lab.data import default_real_slices

    root = default_real_slices()
    if not root.is_dir():
        pytest.skip(f"real slices not available at {root} (set TRIAGED_REAL_DATA to the folder holding them)")
    folder = _shipped(name)
    card = yaml.safe_load((folder / MANIFEST).read_text())["metrics"]["real_validation"]
    got = training.evaluate_real_slices(folder, root)
    assert got["n_slices"] == card["n_slices"] == 15
    assert got["lesion_dice_mean"] == pytest.approx(card["lesion_dice_mean"], abs=0.02)
    assert got["lesion_dice_global"] == pytest.approx(card["lesion_dice_global"], abs=0.02)
    for key in ("sensitivity_mean", "specificity_mean"):
        if card.get(key) is not None:
            assert got[key] == pytest.approx(card[key], abs=0.02), key


@pytest.mark.parametrize("validated_on", [None, "a real validation set (AUC 0.9)"])
def test_p_covid_is_reported_only_by_a_classifier_validated_on_real_data(
    tmp_path: Path, smoke_cases: list[Any], validated_on: str | None
) -> None:
    from triaged.domain import Volume
    from triaged.nets.pipelines import P_COVID_NOT_ASSESSED, MultitaskPipeline

    folder = _write_model(tmp_path / "mt", name="multitask")
    card = yaml.safe_load((folder / MANIFEST).read_text())
    card["p_covid_validated_on"] = validated_on
    (folder / MANIFEST).write_text(yaml.safe_dump(card), encoding="utf-8")
    case = smoke_cases[0]
    volume = Volume(
        case.hu,
        case.spacing,
        case.affine_lps,
        tuple(f"2.25.{i + 1}" for i in range(case.hu.shape[0])),
        "2.25.1",
        "2.25.2",
    )
    findings = MultitaskPipeline(folder).run(volume).findings
    prov = dict(findings.provenance)
    if validated_on is None:
        assert findings.p_covid is None
        assert P_COVID_NOT_ASSESSED in findings.warnings
        assert prov["identification.method"] == P_COVID_NOT_ASSESSED
    else:
        assert findings.p_covid is not None and 0.0 <= findings.p_covid <= 1.0
        assert prov["identification.validated_on"] == validated_on
        assert P_COVID_NOT_ASSESSED not in findings.warnings
