"""Real-data-first training (issue 11): splits, estimated windows, real negatives, the real-only recipe,
and P(COVID-19) reported only by a classifier validated on real data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import REAL_DATA
from triaged.lab import data
from triaged.lab import train as training
from triaged.nets.weights import MANIFEST

torch.set_num_threads(2)

SLICES = REAL_DATA / "medseg-covid-slices"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data {path} is absent (only on development machines)")
    return path


def test_the_real_splits_never_overlap() -> None:
    assert not set(data.NEGATIVE_VOLUMES) & set(data.VALIDATION_VOLUMES)
    assert (
        "lidc-idri-small/LIDC-IDRI-0001" not in data.NEGATIVE_VOLUMES
    )  # same patient as lidc-idri-0001-full
    root = _need(SLICES)
    train = {e[0] for e in data.pseudo_entries(root, validation=False)}
    held = {e[0] for e in data.pseudo_entries(root, validation=True)}
    assert held == set(data.PSEUDO_VALIDATION) and len(train) == 16
    assert not train & held
    stems = {s.name.split("/")[1] for s in data.load_doctor_slices(root, validation=False)}
    assert not stems & set(data.DOCTOR_VALIDATION) and len(stems) == 35


def test_real_slices_come_in_estimated_windows_not_one_global_mapping() -> None:
    root = _need(SLICES)
    corona = data.load_pseudo_slices(root, limit=30, validation=None)  # coronacases_org_001 first
    assert corona[0].case == "Data-1_coronacases_org_001" and corona[0].window is not None
    # coronacases soft tissue sits at grey ≈ 100: under W1500/L-600 that was about -760 HU
    assert corona[0].window.hi_hu > 1000
    lung = np.concatenate([s.hu[s.hu < -600] for s in corona])
    assert -930 < float(np.median(lung)) < -780
    doctor = data.load_doctor_slices(root, validation=True)
    assert all(s.window is not None for s in doctor)
    assert len({round(s.window.lo_hu) for s in doctor if s.window is not None}) > 3  # per slice


def test_negatives_are_lung_slices_of_real_no_pneumonia_volumes() -> None:
    folder = _need(REAL_DATA / "lidc-idri-small" / "LIDC-IDRI-0002")
    slices = data.load_volume_slices(folder, "LIDC-IDRI-0002")
    assert slices and all(not s.lesion.any() for s in slices)
    for s in slices:
        assert 40 <= max(s.hu.shape) <= 200  # ≈ 2 mm pixels, cropped to the lungs' box
        assert float(np.median(s.hu[s.hu < -500])) < -750  # aerated lung in HU


def test_the_real_only_recipe_trains_the_segmentation_on_real_slices(tmp_path: Path) -> None:
    root = _need(SLICES)
    pools = training.RealPools(
        data.load_pseudo_slices(root, limit=12, validation=False),
        data.load_doctor_slices(root, validation=False)[:4],
        data.load_volume_slices(_need(REAL_DATA / "lidc-idri-small" / "LIDC-IDRI-0002"), "neg")[:4],
    )
    recipe = replace(
        training.RECIPES["multitask"],
        real_batch=4,
        crop_hw=(48, 48),
        widths=(4, 8, 16, 32),
        steps_per_epoch=1,
    )
    assert recipe.phantom_batch == 0 and recipe.negative_share > 0
    torch.manual_seed(0)
    net = training.new_module("multitask", recipe)
    assert net.backbone.out_channels == 4  # type: ignore[union-attr]
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        parts = training.multitask_step(net, rng, [], pools, recipe, torch.device("cpu"))  # type: ignore[arg-type]
        opt.step()
        losses.append(parts["loss"])
    assert "cls" not in parts  # no phantoms: the classification head is not trained
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # the card of such a run says P(COVID-19) is not validated on real data
    info = {
        "seed": 0,
        "epochs": 1,
        "device": "cpu",
        "recipe": training.asdict(recipe),
        "wall_time_s": 1.0,
        "history": [],
        "data_dir": None,
        "real_slices": str(root),
        "phantom_cases": {},
        "real_counts": {"pseudo_label_slices": 12},
        "negative_volumes": ["neg"],
    }
    torch.save(training.compact_state(net.state_dict()), tmp_path / training.WEIGHTS_FILE)
    training.write_manifest(tmp_path, "multitask", net, info, metrics={})
    card = yaml.safe_load((tmp_path / MANIFEST).read_text())
    assert "p_covid_validated_on" in card and card["p_covid_validated_on"] is None
    assert card["architecture"]["kwargs"]["widths"] == [4, 8, 16, 32]
    assert "landmarks" in card["window_estimation"]
    assert [d["source"] for d in card["training"]["data"]][0] == "pseudo-label"
