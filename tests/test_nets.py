"""The torch architectures of triaged.nets: shapes, determinism, and seed 001's EM rule by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from triaged.lab import data
from triaged.nets import multitask, unet2d, wu
from triaged.nets.pipelines import wu_stack_indices

torch.set_num_threads(2)


def _seeded(factory, seed: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    return factory().eval()


def test_the_residual_unet_returns_features_of_the_input_size_for_any_slice_size() -> None:
    net = unet2d.UNet2d(1, (8, 16, 32, 64)).eval()
    with torch.no_grad():
        out = net(torch.rand(3, 1, 37, 50))
    assert out.shape == (3, 8, 37, 50)


def test_the_lung_unet_gives_one_logit_per_pixel() -> None:
    with torch.no_grad():
        out = unet2d.LungUNet2d().eval()(torch.rand(2, 1, 24, 40))
    assert out.shape == (2, 1, 24, 40)


def test_the_multitask_net_segments_every_slice_and_classifies_the_stack() -> None:
    net = multitask.MultitaskNet().eval()
    with torch.no_grad():
        out = net(torch.rand(2, 5, 40, 48))
    assert out.lesion_logits.shape == (2, 5, 40, 48)
    assert out.covid_logit.shape == (2,)


def test_the_multitask_net_stays_small() -> None:
    n = unet2d.count_parameters(multitask.MultitaskNet())
    assert 200_000 < n < 2_000_000


def test_pyramid_pooling_gives_the_same_length_for_any_stack_depth() -> None:
    for z in (3, 8, 40):
        pooled = multitask.pyramid_max_pool3d(torch.rand(1, 8, z, 20, 24))
        assert pooled.shape == (1, 8 * (1 + 8 + 64 + 512))


def test_pyramid_pooling_level_one_is_the_global_maximum() -> None:
    x = torch.rand(1, 2, 6, 10, 10)
    x[0, 1, 3, 4, 5] = 7.0
    pooled = multitask.pyramid_max_pool3d(x, (1,))
    assert pooled[0, 1] == 7.0
    assert pooled[0, 0] == x[0, 0].max()


def test_wu_unet_maps_seven_slices_to_the_central_slice_mask() -> None:
    net = wu.WuUNet().eval()
    with torch.no_grad():
        out = net(torch.rand(2, wu.CONTEXT_SLICES, 45, 60))
    assert out.shape == (2, 1, 45, 60)
    pair = wu.ConsolidationEM().eval()
    with torch.no_grad():
        assert pair(torch.rand(1, 7, 32, 32)).shape == (1, 2, 32, 32)


def test_unet2_starts_as_a_copy_of_unet1() -> None:
    pair = wu.ConsolidationEM().eval()
    x = torch.rand(1, 7, 32, 32)
    pair.init_unet2_from_unet1()
    with torch.no_grad():
        out = pair(x)
    assert torch.equal(out[:, 0], out[:, 1])


@pytest.mark.parametrize("factory", [multitask.MultitaskNet, wu.ConsolidationEM, unet2d.LungUNet2d])
def test_the_same_seed_gives_the_same_network_and_output(factory) -> None:  # type: ignore[no-untyped-def]
    x = torch.rand(1, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    if factory is wu.ConsolidationEM:
        x = torch.rand(2, 7, 32, 32, generator=torch.Generator().manual_seed(5))
    if factory is unet2d.LungUNet2d:
        x = x[:, :1]

    def run(seed: int) -> torch.Tensor:
        net = _seeded(factory, seed)
        with torch.no_grad():
            out = net(x)
        return out.lesion_logits if isinstance(out, multitask.MultitaskOutput) else out

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


# ----------------------------------------------------------------------- seed 001: φ2 and the E-step
def test_b2_of_nine_is_minus_34_hu_in_wu_units() -> None:
    assert wu.hu_from_normalised(wu.B2) == pytest.approx(-34.0)
    assert float(wu.normalise_hu(torch.tensor(-34.0))) == pytest.approx(9.0)
    assert float(wu.normalise_hu(torch.tensor(1000.0))) == pytest.approx((160 + 1024) / 110)


def test_phi2_is_one_at_and_above_b2_at_least_a_half_below_and_zero_without_consolidation() -> None:
    x = torch.tensor([9.0, 12.0, 7.0, 0.0])
    one = torch.ones(4)
    p = wu.phi2(one, x)
    assert p[0] == 1.0  # sigmoid(0) + 0.5 = 1
    assert p[1] == 1.0  # clipped by min(1, ·)
    assert float(p[2]) == pytest.approx(1 / (1 + math.exp(1.0)) + 0.5)  # k2 (x - b2) = -1
    assert float(p[3]) == pytest.approx(1 / (1 + math.exp(4.5)) + 0.5)
    assert torch.all(wu.phi2(torch.zeros(4), x) == 0)


def test_the_e_step_labels_consolidation_where_prediction_plus_prior_exceeds_one() -> None:
    # hand-computed: φ2(1, 9.0) = 1.0, φ2(1, 7.0) = 0.7689, φ2(1, 4.0) = 0.5759
    f = torch.tensor([0.10, 0.20, 0.25, 0.40, 0.50, 0.90, 0.90, 0.60])
    x = torch.tensor([9.00, 7.00, 7.00, 4.00, 4.00, 9.00, 9.00, 9.00])
    z = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    m = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    y = wu.e_step(f, x, z, m)
    # 0.1+1.0>1 → 1; 0.2+0.769<1 → 0; 0.25+0.769>1 → 1; 0.4+0.576<1 → 0; 0.5+0.576>1 → 1;
    # z = 0: φ = 0 and 0.9 < 1 → 0; outside the infected mask → 0; 0.6 + 1 > 1 → 1
    assert y.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_the_e_step_never_labels_a_patient_without_consolidation() -> None:
    f = torch.rand(2, 16, 16)
    x = torch.full((2, 16, 16), 11.0)
    y = wu.e_step(f, x, torch.zeros(2, 1, 1), torch.ones(2, 16, 16))
    assert not y.any()


def test_the_smooth_dice_loss_matches_its_formula() -> None:
    prob = torch.tensor([[[0.5, 1.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    expected = -(2 * 1.5 + 1) / (1.5 + 2 + 1)
    assert float(wu.smooth_dice_loss(prob, target)) == pytest.approx(expected)
    assert float(wu.smooth_dice_loss(target, target)) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------------- data helpers
def test_eight_bit_lung_window_maps_to_hounsfield_units() -> None:
    hu = data.hu_from_8bit(np.array([0, 255, 127.5]))
    assert hu.tolist() == pytest.approx([-1350.0, 150.0, -600.0])


def test_thin_slices_become_five_millimetre_slabs_and_come_back() -> None:
    vol = np.arange(60, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
    slabs = data.resample_z(vol, 1.25, 5.0)
    assert slabs.shape == (15, 4, 4)
    assert slabs[7, 0, 0] == pytest.approx(29.5)  # slab 7 covers 35-40 mm: slices 28-31
    back = data.upsample_z(slabs, 60)
    assert back.shape == (60, 4, 4)
    assert np.abs(back[4:-4, 0, 0] - vol[4:-4, 0, 0]).max() < 1.0


def test_the_25d_stack_repeats_the_end_slices() -> None:
    idx = wu_stack_indices(5)
    assert idx.shape == (5, 7)
    assert idx[0].tolist() == [0, 0, 0, 0, 1, 2, 3]
    assert idx[4].tolist() == [1, 2, 3, 4, 4, 4, 4]


def test_the_lung_box_keeps_a_margin_inside_the_array() -> None:
    lung = np.zeros((10, 30, 30), bool)
    lung[3:6, 10:20, 2:8] = True
    zs, ys, xs = data.lung_box(lung, margin_px=4, margin_slices=2)
    assert (zs.start, zs.stop, ys.start, ys.stop, xs.start, xs.stop) == (1, 8, 6, 24, 0, 12)


def test_the_classification_windows_cover_the_stack_with_half_overlap() -> None:
    from triaged.nets.pipelines import classification_windows

    assert classification_windows(10, None) == [slice(0, 10)]
    assert classification_windows(10, 12) == [slice(0, 10)]
    wins = classification_windows(30, 12)
    assert [(w.start, w.stop) for w in wins] == [(0, 12), (6, 18), (12, 24), (18, 30)]
    assert [(w.start, w.stop) for w in classification_windows(27, 12)][-1] == (15, 27)


def _extension_case() -> tuple[object, np.ndarray]:
    """A working-grid slice at 2 mm: body, a right lung of aerated HU with a dense posterior base
    (consolidation, +30 HU) that the air threshold leaves out, a rib behind it and chest wall beside it."""
    from triaged.analysis.grid import WorkGrid
    from triaged.nets.pipelines import _Front

    ny = nx = 80
    hu = np.full((1, ny, nx), -1000.0, np.float32)
    yy, xx = np.mgrid[:ny, :nx]
    body = ((yy - 40) / 36.0) ** 2 + ((xx - 40) / 36.0) ** 2 <= 1.0
    hu[0][body] = 40.0
    lung = (yy >= 15) & (yy < 40) & (xx >= 12) & (xx < 34)
    hu[0][lung] = -850.0
    cons = (yy >= 40) & (yy < 50) & (xx >= 12) & (xx < 34)  # 20 mm of consolidation under the lung
    hu[0][cons] = 30.0
    hu[0][(yy >= 52) & (yy < 55) & (xx >= 12) & (xx < 34)] = 700.0  # a rib beyond it
    labels = np.zeros((1, ny, nx), np.uint8)
    labels[0][lung] = 1
    grid = WorkGrid.for_volume((1, ny, nx), (5.0, 2.0, 2.0))
    front = _Front(
        grid, hu, labels, labels.copy(), (slice(0, 1), slice(0, ny), slice(0, nx)), "one lung", (), body[None]
    )
    return front, cons


def test_network_lesions_touching_a_lung_extend_it_over_dense_consolidation() -> None:
    from triaged.analysis.lungs import LungParams
    from triaged.nets.pipelines import _extend_lungs

    front, cons = _extension_case()
    prob = np.zeros(front.grid.coarse_shape, np.float32)  # type: ignore[attr-defined]
    prob[0][cons] = 0.9
    prob[0, 52:55, 12:34] = 0.9  # the network also fires on the rib: bone never joins
    prob[0, 20:30, 60:70] = 0.9  # and on chest wall far from the lung: not connected, dropped
    out = _extend_lungs(front, prob, 0.5, LungParams())  # type: ignore[arg-type]
    assert out.extended_voxels == int(cons.sum())
    assert (out.lungs_coarse[0][cons] == 1).all()
    assert not out.lungs_coarse[0, 52:55].any() and not out.lungs_coarse[0, 20:30, 60:70].any()
    # nothing above the threshold outside the lungs: the front end is returned unchanged
    assert _extend_lungs(front, np.zeros_like(prob), 0.5, LungParams()) is front  # type: ignore[arg-type]


def test_network_lesions_beyond_a_rib_of_a_neighbouring_slice_stay_out_of_the_lungs() -> None:
    """The network fires on consolidation under the lung and on the chest wall beyond it; on this slice
    the chest wall lies in an intercostal space, but the rib of the slice 5 mm above closes it."""
    from triaged.analysis.grid import WorkGrid
    from triaged.analysis.lungs import LungParams
    from triaged.nets.pipelines import _extend_lungs, _Front

    nz, ny, nx = 3, 80, 80
    yy, xx = np.mgrid[:ny, :nx]
    body = np.broadcast_to(((yy - 40) / 36.0) ** 2 + ((xx - 40) / 36.0) ** 2 <= 1.0, (nz, ny, nx)).copy()
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    lung = (yy >= 15) & (yy < 40) & (xx >= 12) & (xx < 34)
    hu[:, lung] = -850.0
    cons = (yy >= 40) & (yy < 45) & (xx >= 12) & (xx < 34)  # 10 mm of consolidation under the lung
    hu[1][cons] = 30.0
    labels = np.zeros((nz, ny, nx), np.uint8)
    labels[:, lung] = 1
    prob = np.zeros((nz, ny, nx), np.float32)
    prob[1, 40:53, 12:34] = 0.9  # consolidation and, below row 45, chest-wall muscle
    grid = WorkGrid.for_volume((nz, ny, nx), (5.0, 2.0, 2.0))
    box = (slice(0, nz), slice(0, ny), slice(0, nx))

    def extend(hu: np.ndarray) -> np.ndarray:
        front = _Front(grid, hu, labels, labels.copy(), box, "one lung", (), body)
        return np.asarray(_extend_lungs(front, prob, 0.5, LungParams()).lungs_coarse)  # type: ignore[arg-type]

    open_wall = extend(hu)
    assert open_wall[1, 40:53, 12:34].all()  # no rib anywhere near: the chest wall joins (the old leak)
    hu[0, 45:47, 8:38] = 700.0  # a rib on the slice above, at the level of the pleura
    out = extend(hu)
    assert (out[1][cons] == 1).all()  # the consolidation between the lung and the rib joins
    assert not out[1, 45:53].any()  # the muscle at and beyond the rib's level does not
    assert np.array_equal(out[[0, 2]], labels[[0, 2]])


def test_network_lesions_beyond_the_extension_distance_stay_out() -> None:
    from triaged.analysis.lungs import LungParams
    from triaged.nets import pipelines

    front, cons = _extension_case()
    prob = np.zeros(front.grid.coarse_shape, np.float32)  # type: ignore[attr-defined]
    prob[0][cons] = 0.9
    old = pipelines.EXTEND_MM
    try:
        pipelines.EXTEND_MM = 10.0  # 5 of the 10 consolidated rows are within 10 mm of the lung
        out = pipelines._extend_lungs(front, prob, 0.5, LungParams())  # type: ignore[arg-type]
    finally:
        pipelines.EXTEND_MM = old
    assert out.lungs_coarse[0, 40:45, 12:34].all() and not out.lungs_coarse[0, 45:50].any()
