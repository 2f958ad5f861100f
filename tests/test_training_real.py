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


def _slices(case: str, values: list[int], shape: tuple[int, int] = (4, 4)) -> list[data.RealSlice]:
    return [
        data.RealSlice(f"pseudo-label/{case}_{i}", case, i, np.full(shape, v, np.int16), np.zeros(shape, bool))
        for i, v in enumerate(values)
    ]


def test_a_neighbour_stack_of_slabs_averages_stride_slices_around_each_neighbour() -> None:
    """Seed 001's 2.5D input: 7 adjacent slices, or (stride s) 7 slabs of s slices each, as the pipeline
    averages thin slices into 5 mm slabs; clamped at the ends of a case, never crossing into the next."""
    pool = _slices("a", list(range(0, 200, 10))) + _slices("b", [999] * 3)
    plain = data.neighbour_stack(pool, 10, 7)
    assert [int(x[0, 0]) for x in plain] == [70, 80, 90, 100, 110, 120, 130]
    slabs = data.neighbour_stack(pool, 10, 7, stride=2)  # slab k: slices 10 + 2k - 1 and 10 + 2k
    assert [int(x[0, 0]) for x in slabs] == [35, 55, 75, 95, 115, 135, 155]
    three = data.neighbour_stack(pool, 10, 7, stride=3)  # slab k: slices 10 + 3k - 1 … 10 + 3k + 1
    assert [int(x[0, 0]) for x in three] == [10, 40, 70, 100, 130, 160, 187]  # the last: 18, 19, 19 (end of a)
    assert int(data.neighbour_stack(pool, 1, 7, stride=4)[0, 0, 0]) == 0  # case a's first slice at the top
    assert all(int(x.max()) < 999 for x in data.neighbour_stack(pool, 19, 7, stride=4))  # never case b
    # a neighbour of another matrix is resized to the centre's
    odd = _slices("c", [5, 5]) + _slices("c", [7], shape=(8, 8))
    odd[2] = data.RealSlice("pseudo-label/c_2", "c", 2, np.full((8, 8), 7, np.int16), np.zeros((8, 8), bool))
    assert data.neighbour_stack(odd, 0, 3, stride=2).shape == (3, 4, 4)


def test_the_slab_stride_is_drawn_per_sample_only_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """``neighbour_stride_max`` 1 (the default) always stacks adjacent slices; 4 draws slabs of 1–4 slices."""
    strides: list[int] = []
    real_stack = data.neighbour_stack

    def recording(slices: list[data.RealSlice], i: int, n: int, stride: int = 1) -> np.ndarray:
        strides.append(stride)
        return real_stack(slices, i, n, stride)

    monkeypatch.setattr(data, "neighbour_stack", recording)
    pools = training.RealPools(pseudo=_slices("a", list(range(0, 200, 10)), shape=(8, 8)), doctor=[])
    recipe = replace(
        training.RECIPES["consolidation-em"], real_flat_stack_p=0.0, crop_hw=(8, 8), doctor_share=0.0, negative_share=0.0
    )
    for seed in range(30):
        training.wu_real_sample(np.random.default_rng(seed), pools, recipe, need_cons_label=False)
    assert set(strides) == {1}
    strides.clear()
    for seed in range(30):
        training.wu_real_sample(
            np.random.default_rng(seed), pools, replace(recipe, neighbour_stride_max=4), need_cons_label=False
        )
    assert set(strides) == {1, 2, 3, 4}
