"""Training runs on a few tiny phantoms: the loss goes down, runs are reproducible and resumable."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from triaged.errors import TriagedError
from triaged.lab import data
from triaged.lab import train as training
from triaged.lab.datasets import write_dataset
from triaged.lab.phantom import PhantomSpec
from triaged.nets.weights import MANIFEST, load_model
from triaged.nets.wu import ConsolidationEM

torch.set_num_threads(2)

TINY = training.Recipe(
    steps_per_epoch=8,
    lr=3e-3,
    phantom_batch=2,
    crop_hw=(32, 48),
    real_batch=0,
    crop_slices=6,
    em_phantom_batch=4,
    em_real_batch=0,
)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 64 × 64 × 16 phantoms (5 mm slices): two COVID-19, one healthy, one bacterial."""
    root = tmp_path_factory.mktemp("tiny-phantoms")
    common = {"matrix": 64, "slices": 16, "slice_thickness": 5.0, "noise_hu": 10.0}
    specs = [
        PhantomSpec(kind="covid", severity=40.0, seed=71, **common),  # type: ignore[arg-type]
        PhantomSpec(kind="healthy", seed=72, **common),  # type: ignore[arg-type]
        PhantomSpec(kind="bacterial", severity=30.0, seed=73, **common),  # type: ignore[arg-type]
        PhantomSpec(kind="covid", severity=60.0, seed=74, **common),  # type: ignore[arg-type]
    ]
    write_dataset(specs, root, progress=False)
    return root


def _states_equal(a: Path, b: Path) -> bool:
    sa = torch.load(a / training.WEIGHTS_FILE, weights_only=True)
    sb = torch.load(b / training.WEIGHTS_FILE, weights_only=True)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_short_multitask_run_lowers_the_segmentation_loss(tiny_dataset: Path, tmp_path: Path) -> None:
    cases = data.read_phantom_dataset(tiny_dataset)
    x, y, _ = training.multitask_batch(np.random.default_rng(123), cases, TINY)[0]

    def seg_loss(net: torch.nn.Module) -> float:
        # batch statistics (train-mode BN): a 24-step run has not settled its running averages yet
        with torch.no_grad():
            return float(training.seg_loss(net.train()(x).lesion_logits, y, TINY))

    torch.manual_seed(5)
    before = seg_loss(training.new_module("multitask"))
    out = training.train(
        "multitask",
        tiny_dataset,
        tmp_path / "mt",
        epochs=3,
        seed=5,
        progress=False,
        recipe=TINY,
        evaluate=False,
    )
    after = seg_loss(load_model(out).module)
    assert after < 0.9 * before, (before, after)
    card = yaml.safe_load((out / MANIFEST).read_text())
    history = card["training"]["loss_history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert card["architecture"]["parameters"] > 0


def test_the_same_seed_trains_the_same_weights_and_a_resumed_run_matches_an_uninterrupted_one(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    recipe = replace(TINY, steps_per_epoch=3)
    straight = training.train(
        "multitask",
        tiny_dataset,
        tmp_path / "a",
        epochs=2,
        seed=9,
        progress=False,
        recipe=recipe,
        evaluate=False,
    )
    again = training.train(
        "multitask",
        tiny_dataset,
        tmp_path / "b",
        epochs=2,
        seed=9,
        progress=False,
        recipe=recipe,
        evaluate=False,
    )
    assert _states_equal(straight, again)
    stopped = training.train(
        "multitask",
        tiny_dataset,
        tmp_path / "c",
        epochs=2,
        seed=9,
        progress=False,
        recipe=recipe,
        evaluate=False,
        until_epoch=1,
    )
    assert (stopped / training.CHECKPOINT_FILE).is_file()
    assert not (stopped / training.WEIGHTS_FILE).exists()
    resumed = training.train(
        "multitask",
        tiny_dataset,
        tmp_path / "c",
        epochs=2,
        seed=9,
        progress=False,
        recipe=recipe,
        evaluate=False,
        resume=True,
    )
    assert _states_equal(straight, resumed)


def test_resuming_with_another_seed_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    recipe = replace(TINY, steps_per_epoch=1)
    training.train(
        "multitask",
        tiny_dataset,
        tmp_path / "m",
        epochs=2,
        seed=1,
        progress=False,
        recipe=recipe,
        evaluate=False,
        until_epoch=1,
    )
    with pytest.raises(training.TrainingError, match="seed"):
        training.train(
            "multitask",
            tiny_dataset,
            tmp_path / "m",
            epochs=2,
            seed=2,
            progress=False,
            recipe=recipe,
            evaluate=False,
            resume=True,
        )


def test_consolidation_em_trains_unet1_then_unet2_by_em(tiny_dataset: Path, tmp_path: Path) -> None:
    out = training.train(
        "consolidation-em",
        tiny_dataset,
        tmp_path / "em",
        epochs=2,
        seed=3,
        progress=False,
        recipe=replace(TINY, steps_per_epoch=4),
        evaluate=False,
    )
    card = yaml.safe_load((out / MANIFEST).read_text())
    assert [h["phase"] for h in card["training"]["loss_history"]] == ["unet1", "em"]
    net = load_model(out).module
    w1 = dict(net.unet1.named_parameters())  # type: ignore[union-attr]
    w2 = dict(net.unet2.named_parameters())  # type: ignore[union-attr]
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # the M-steps moved UNet-2 away from UNet-1


def test_an_unknown_model_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(training.TrainingError, match="unknown model"):
        training.train("resnet", tiny_dataset, tmp_path / "x", epochs=1, progress=False)


def _one_epoch(
    data_dir: Path, out: Path, recipe: training.Recipe, *, seed: int, model: str = "multitask", **kw: Any
) -> Path:
    """One epoch of ``model`` on the tiny phantoms into ``out`` (no card metrics)."""
    return training.train(
        model, data_dir, out, epochs=1, seed=seed, progress=False, recipe=recipe, evaluate=False, **kw
    )


def test_a_continuation_starts_from_the_given_models_verified_weights(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    recipe = replace(TINY, steps_per_epoch=2)
    first = _one_epoch(tiny_dataset, tmp_path / "first", recipe, seed=4)
    still = replace(recipe, lr=1e-12, warmup=0)  # the weights can barely move: what is left is the start

    def parameters(folder: Path) -> dict[str, torch.Tensor]:
        return dict(load_model(folder).module.named_parameters())

    kept = _one_epoch(tiny_dataset, tmp_path / "kept", still, seed=6, init_from=first)
    fresh = _one_epoch(tiny_dataset, tmp_path / "fresh", still, seed=6)
    a, b, c = parameters(first), parameters(kept), parameters(fresh)
    assert all(torch.allclose(a[k], b[k], atol=2e-3) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=2e-3) for k in a)
    card = yaml.safe_load((kept / MANIFEST).read_text())
    origin = card["training"]["initialised_from"]
    assert origin["model"] == "multitask"
    assert origin["sha256"] == load_model(first).sha256
    assert origin["steps"] == 2  # one epoch of two steps
    assert "initialised_from" not in yaml.safe_load((fresh / MANIFEST).read_text())["training"]
    again = _one_epoch(tiny_dataset, tmp_path / "again", still, seed=6, init_from=kept)
    chain = yaml.safe_load((again / MANIFEST).read_text())["training"]["initialised_from"]
    assert chain["sha256"] == load_model(kept).sha256 and chain["initialised_from"] == origin


def test_a_continuation_from_weights_that_do_not_fit_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    recipe = replace(TINY, steps_per_epoch=1)
    small = _one_epoch(tiny_dataset, tmp_path / "small", replace(recipe, widths=(4, 8, 16, 32)), seed=4)
    deviations = yaml.safe_load((small / MANIFEST).read_text())["deviations_from_seed_paper"]
    assert any(d.startswith("widths 4-32 (reference code 8-512)") for d in deviations)  # the card names its widths
    with pytest.raises(training.TrainingError, match="do not fit"):
        _one_epoch(
            tiny_dataset, tmp_path / "wide", replace(recipe, widths=(8, 16, 32, 64)), seed=4, init_from=small
        )
    with pytest.raises(training.TrainingError, match="not 'consolidation-em'"):
        _one_epoch(tiny_dataset, tmp_path / "em", recipe, seed=4, model="consolidation-em", init_from=small)


def test_a_recipe_field_is_set_from_the_command_line_in_its_own_type(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    recipe = training._recipe_with(TINY, "unet1_bce_weight=1", ap)
    assert recipe.unet1_bce_weight == 1.0 and isinstance(recipe.unet1_bce_weight, float)
    assert training._recipe_with(recipe, "steps_per_epoch=3", ap).steps_per_epoch == 3
    assert training._recipe_with(recipe, "widths=8,16,32", ap).widths == (8, 16, 32)
    for bad, says in (
        ("nosuch=1", "FIELD one of"),
        ("steps_per_epoch=many", "takes a int"),
        ("lr", "FIELD=VALUE"),
        ("widths=8,x", "positive whole numbers"),
        ("widths=8", "positive whole numbers"),
    ):
        with pytest.raises(SystemExit):
            training._recipe_with(TINY, bad, ap)
        assert says in capsys.readouterr().err


def test_consolidation_em_is_built_with_the_recipes_widths_and_its_card_says_so(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    recipe = replace(TINY, steps_per_epoch=1, widths=(4, 8, 16, 24, 24))
    out = _one_epoch(tiny_dataset, tmp_path / "narrow", recipe, seed=3, model="consolidation-em")
    card = yaml.safe_load((out / MANIFEST).read_text())
    assert card["architecture"]["kwargs"]["widths"] == [4, 8, 16, 24, 24]
    assert any(d.startswith("widths 4-24 (paper 32-512)") for d in card["deviations_from_seed_paper"])
    net = load_model(out).module
    assert isinstance(net, ConsolidationEM) and net.unet1.widths == (4, 8, 16, 24, 24)


def test_the_unet1_bce_term_is_added_to_wus_smooth_dice(tiny_dataset: Path, tmp_path: Path) -> None:
    recipe = replace(TINY, steps_per_epoch=2)
    plain = _one_epoch(tiny_dataset, tmp_path / "dice", recipe, seed=8, model="consolidation-em")
    mixed = _one_epoch(
        tiny_dataset,
        tmp_path / "bce",
        replace(recipe, unet1_bce_weight=1.0),
        seed=8,
        model="consolidation-em",
    )

    def first_loss(folder: Path) -> float:
        return float(yaml.safe_load((folder / MANIFEST).read_text())["training"]["loss_history"][0]["loss"])

    # same seed and batches: the BCE term (positive) is what lifts the loss above the Dice term (negative)
    assert first_loss(mixed) > first_loss(plain)
    card = yaml.safe_load((mixed / MANIFEST).read_text())
    assert card["training"]["recipe"]["unet1_bce_weight"] == 1.0
    assert any("pixel BCE" in d for d in card["deviations_from_seed_paper"])
    assert not any(
        "pixel BCE" in d for d in yaml.safe_load((plain / MANIFEST).read_text())["deviations_from_seed_paper"]
    )


def _volume_manifest(tmp_path: Path, series: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data root ($TRIAGED_REAL_DATA) with a chest series and an empty folder, and a manifest naming the
    chest as COVID-19 and as no pneumonia, and the empty folder."""
    root = tmp_path / "real"
    root.mkdir()
    (root / "chest").symlink_to(series, target_is_directory=True)
    (root / "empty").mkdir()
    manifest = tmp_path / "volumes.csv"
    manifest.write_text(
        "case_id,folder,diagnosis\nsick,chest,covid\nwell,chest,normal\nbroken,empty,normal\n", encoding="utf-8"
    )
    monkeypatch.setenv("TRIAGED_REAL_DATA", str(root))
    return manifest


def test_the_card_records_the_whole_pipeline_on_real_volumes_and_what_looks_wrong(
    tiny_dataset: Path,
    tmp_path: Path,
    phantom_ct_series: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = _volume_manifest(tmp_path, phantom_ct_series, monkeypatch)
    out = training.train(
        "consolidation-em", tiny_dataset, tmp_path / "run", epochs=1, seed=2, progress=False,
        recipe=replace(TINY, steps_per_epoch=2), real_volumes=manifest,
    )
    got = yaml.safe_load((out / MANIFEST).read_text())["metrics"]["real_volumes_pipeline"]
    assert got["manifest"] == "volumes.csv"
    sick, well, broken = (got["cases"][k] for k in ("sick", "well", "broken"))
    assert "error" in broken and "broken: failed (" in " ".join(got["warnings"])
    # the same series under two diagnoses: the same figures, judged by what each diagnosis expects
    assert sick["whole_pct"] == well["whole_pct"] and sick["ct_grade"] == well["ct_grade"]
    grade = sick["ct_grade"]
    assert (f"sick (covid) graded CT0, worse lung {sick['worse_lung_pct']:.2f} %" in got["warnings"]) == (grade == "CT0")
    assert any(w.startswith(f"well (no pneumonia) graded {grade}") for w in got["warnings"]) == (grade != "CT0")
    assert got["worst_no_pneumonia"]["case"] == "well" and got["weakest_covid"]["case"] == "sick"
    err = capsys.readouterr().err
    assert all(f"real volumes: {w}" in err for w in got["warnings"])


def test_a_bad_volume_manifest_is_refused_before_training_starts(
    tiny_dataset: Path, tmp_path: Path, phantom_ct_series: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _volume_manifest(tmp_path, phantom_ct_series, monkeypatch)
    manifest.write_text("case_id,folder,diagnosis\nsick,chest,flu\n", encoding="utf-8")
    with pytest.raises(TriagedError, match=r"volumes\.csv:2: diagnosis .flu. of sick"):
        _one_epoch(tiny_dataset, tmp_path / "run", TINY, seed=1, model="consolidation-em", real_volumes=manifest)
    assert not (tmp_path / "run" / training.WEIGHTS_FILE).exists()
