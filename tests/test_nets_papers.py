"""Building blocks of seeds 000, 002 and 003: pooling, losses, architectures, integrated gradients, boxes.

Hand-computed cases use tiny tensors with hand-set weights; the architectures run at small widths.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from triaged.nets.dacmil import DACMIL, dacmil_loss
from triaged.nets.m2unet import M2UNet
from triaged.nets.mil import (
    GatedAttentionPooling,
    GlobalContrastPooling,
    SpatialGatedAttention,
    class_balanced_focal_loss,
    contrastive_mil_loss,
    inverse_frequency_weights,
)
from triaged.nets.multiscale import MultiScaleNet, scale_saliency
from triaged.nets.saliency import integrated_gradients, joint_saliency, saliency_boxes

# ---------------------------------------------------------------- pooling


def test_gcp_is_the_max_cosine_per_concept() -> None:
    gcp = GlobalContrastPooling(2, 2)
    with torch.no_grad():
        gcp.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))  # concepts along x and y (norms irrelevant)
    bag = torch.tensor([[1.0, 1.0], [2.0, 0.0], [-1.0, 3.0]])
    # cos with x: 1/√2, 1, −1/√10 → 1;  cos with y: 1/√2, 0, 3/√10 → 3/√10
    expected = torch.tensor([1.0, 3.0 / math.sqrt(10.0)])
    assert torch.allclose(gcp(bag), expected, atol=1e-6)
    # batched bags and a mask hiding the second instance: x concept falls back to 1/√2
    batch = torch.stack([bag, bag])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    out = gcp(batch, mask)
    assert torch.allclose(out[0], expected, atol=1e-6)
    assert torch.allclose(out[1], torch.tensor([1.0 / math.sqrt(2.0), 3.0 / math.sqrt(10.0)]), atol=1e-6)
    with pytest.raises(ValueError, match="at least one unmasked"):
        gcp(batch, torch.zeros(2, 3, dtype=torch.bool))


def test_gated_attention_weights_by_hand() -> None:
    pool = GatedAttentionPooling(2, hidden=1)
    with torch.no_grad():
        pool.V.weight.copy_(torch.tensor([[1.0, 0.0]]))  # tanh(h0)
        pool.V.bias.zero_()
        pool.U.weight.copy_(torch.tensor([[0.0, 1.0]]))  # sigm(h1)
        pool.U.bias.zero_()
        pool.w.weight.copy_(torch.tensor([[2.0]]))
        pool.w.bias.fill_(0.3)  # a shared bias cancels in the softmax
    h = torch.tensor([[0.5, 0.0], [1.0, 2.0], [-1.0, -1.0]])
    s = [2.0 * math.tanh(h0) / (1.0 + math.exp(-h1)) for h0, h1 in h.tolist()]
    e = [math.exp(v) for v in s]
    a_expected = torch.tensor([v / sum(e) for v in e])
    z, a = pool(h)
    assert torch.allclose(a, a_expected, atol=1e-6)
    assert torch.allclose(z, (a_expected[:, None] * h).sum(0), atol=1e-6)
    # padding: a masked instance gets no weight and the bag equals the unpadded bag
    zb, ab = pool(torch.cat([h, torch.full((1, 2), 9.0)])[None], torch.tensor([[True, True, True, False]]))
    assert ab[0, 3] == 0.0
    assert torch.allclose(zb[0], z, atol=1e-6)


def test_spatial_gated_attention_by_hand() -> None:
    att = SpatialGatedAttention(2, hidden=1)
    with torch.no_grad():
        for conv in (att.conv_v, att.conv_u, att.conv_w):
            for param in conv.parameters():
                nn.init.zeros_(param)
    g = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(1, 2, 2, 3)
    pooled, maps = att(g)  # all logits 0 → uniform attention → mean over positions
    assert torch.allclose(maps, torch.full((1, 2, 3), 1.0 / 6.0))
    assert torch.allclose(pooled, g.mean(dim=(-2, -1)))
    with torch.no_grad():
        att.conv_v.weight[0, 0, 0, 0] = 1.0  # tanh(channel 0)
        att.conv_w.weight.fill_(2.0)  # × sigm(0) = 0.5 → logit = tanh(g0)
    pooled, maps = att(g)
    logits = torch.tanh(g[0, 0]).reshape(-1)
    alpha = torch.exp(logits) / torch.exp(logits).sum()
    assert torch.allclose(maps[0].reshape(-1), alpha, atol=1e-6)
    assert torch.allclose(pooled[0], (g[0].reshape(2, -1) * alpha).sum(-1), atol=1e-5)


# ---------------------------------------------------------------- losses


def test_contrastive_loss_by_hand() -> None:
    inst = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    bag = torch.tensor([1.0, 1.0])
    c = 1.0 / math.sqrt(2.0)  # cos(instance, bag); cos(instance, instance) = 0; cos(bag, bag) = 1
    for tau in (1.0, 0.5):
        ec, e1 = math.exp(c / tau), math.exp(1.0 / tau)
        anchor_instance = -math.log(ec / (1.0 + 2.0 * ec))  # others: the other instance, two bag copies
        anchor_bag = -math.log(ec / (2.0 * ec + e1))  # others: two instances, the other bag copy
        expected = (anchor_instance + anchor_bag) / 2.0
        got = contrastive_mil_loss(inst, bag, temperature=tau)
        assert got.item() == pytest.approx(expected, rel=1e-5)
        # (N, D) bag features give the same when every instance is of the same bag
        assert contrastive_mil_loss(inst, bag.expand(2, 2), tau).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_mil_loss(inst, bag, temperature=0.0)


def test_focal_loss_and_weights_by_hand() -> None:
    weights = inverse_frequency_weights(torch.tensor([0, 1, 1]), 3)
    assert torch.allclose(weights, torch.tensor([3.0, 1.5, 0.0]))
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p(true) = 3/4 and 1/2
    target = torch.tensor([0, 1])
    w = weights[:2]
    expected = -(3.0 * 0.25 * math.log(0.75) + 1.5 * 0.5 * math.log(0.5)) / 2.0
    assert class_balanced_focal_loss(logits, target, w, gamma=1.0).item() == pytest.approx(expected, rel=1e-6)
    ce = -(3.0 * math.log(0.75) + 1.5 * math.log(0.5)) / 2.0  # γ = 0: weighted cross-entropy
    assert class_balanced_focal_loss(logits, target, w, gamma=0.0).item() == pytest.approx(ce, rel=1e-6)
    unweighted = -(0.25 * math.log(0.75) + 0.5 * math.log(0.5)) / 2.0
    assert class_balanced_focal_loss(logits, target).item() == pytest.approx(unweighted, rel=1e-6)


# ---------------------------------------------------------------- architectures


def _twice(build: type[nn.Module], kwargs: dict[str, Any], x: torch.Tensor) -> tuple[Any, Any]:
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build(**kwargs).eval()
        with torch.no_grad():
            outs.append(model(x))
    return outs[0], outs[1]


def _assert_bitwise(a: object, b: object) -> None:
    assert isinstance(a, tuple) and isinstance(b, tuple)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, tuple):
            _assert_bitwise(x, y)
        else:
            assert torch.equal(x, y)


def test_m2unet_shapes_determinism_and_training_step() -> None:
    kwargs: dict[str, Any] = {"widths": (4, 4, 4, 4, 8), "concepts": (8, 4)}
    bags = torch.rand(2, 3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    a, b = _twice(M2UNet, kwargs, bags)
    _assert_bitwise(a, b)
    assert a.lobe_logits.shape == (2, 3, 6, 64, 64)
    assert a.severity_logits.shape == (2, 2)
    torch.manual_seed(0)
    model = M2UNet(**kwargs)
    assert model.segment(torch.rand(2, 1, 50, 70)).shape == (2, 6, 50, 70)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.severity(bags), model(bags).severity_logits, atol=1e-6)
    model.train()
    out = model(bags)
    loss = 0.01 * nn.functional.cross_entropy(out.severity_logits, torch.tensor([0, 1]))
    loss = loss + nn.functional.cross_entropy(out.lobe_logits.flatten(0, 1), torch.zeros(6, 64, 64).long())
    loss.backward()
    first = next(model.encoder.parameters())
    assert first.grad is not None and model.image_gcp.weight.grad is not None


def test_dacmil_shapes_attention_and_loss() -> None:
    kwargs: dict[str, Any] = {"widths": (4, 8, 8, 16), "spatial_hidden": 8, "instance_hidden": 8}
    bags = torch.rand(2, 5, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    a, b = _twice(DACMIL, kwargs, bags)
    _assert_bitwise(a, b)
    assert a.logits.shape == (2, 2)
    assert a.instance_attention.shape == (2, 5)
    assert a.spatial_attention.shape == (2, 5, 2, 2)
    assert a.instance_features.shape == (2, 5, 16)
    assert a.bag_feature.shape == (2, 16)
    assert torch.allclose(a.instance_attention.sum(-1), torch.ones(2))
    assert torch.allclose(a.spatial_attention.sum((-2, -1)), torch.ones(2, 5))
    torch.manual_seed(0)
    model = DACMIL(**kwargs).eval()
    with torch.no_grad():
        chunked = model(bags, chunk=3)
    assert torch.allclose(chunked.logits, a.logits, atol=1e-6)
    model.train()
    loss = dacmil_loss(model(bags), torch.tensor([0, 1]))
    loss.backward()
    assert model.backbone.stem[0].weight.grad is not None


def test_multiscale_shapes_determinism_and_saliency_maps() -> None:
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    a, b = _twice(MultiScaleNet, {"width": 0.125}, x)
    _assert_bitwise(a, b)
    assert a.logits.shape == (2, 3)
    assert [tuple(m.shape) for m in a.score_maps] == [(2, 3, 16, 16), (2, 3, 8, 8), (2, 3, 4, 4)]
    summed = torch.stack([m.amax(dim=(-2, -1)) for m in a.score_maps]).sum(0)
    assert torch.allclose(a.logits, summed)
    torch.manual_seed(0)
    model = MultiScaleNet(width=0.125).eval()
    maps = scale_saliency(model, x[:1], target=2, steps=8)
    assert [m.shape for m in maps] == [(16, 16), (8, 8), (4, 4)]
    assert all(np.isfinite(m).all() for m in maps)
    # running the layers before each scale once gives the same maps as repeating them per step
    repeated = scale_saliency(model, x[:1], target=2, steps=8, expand_input=True)
    for fast, slow in zip(maps, repeated, strict=True):
        assert np.allclose(fast, slow, rtol=1e-4, atol=1e-6)
    assert any(np.abs(m).max() > 0 for m in maps)


# ---------------------------------------------------------------- integrated gradients


def test_ig_is_exact_for_a_linear_model() -> None:
    lin = nn.Linear(4, 1).double()
    x = torch.tensor([[0.5, -1.0, 2.0, 3.0]], dtype=torch.float64)
    attr = integrated_gradients(lin, x, target=None, steps=5)
    assert torch.allclose(attr, lin.weight * x)
    zero = torch.zeros_like(x)
    assert attr.sum().item() == pytest.approx((lin(x) - lin(zero)).item(), abs=1e-12)


def test_ig_quadratic_by_hand_both_rules() -> None:
    def f(t: torch.Tensor) -> torch.Tensor:
        return (t**2).sum(-1, keepdim=True)

    x = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    m = 10
    # right Riemann sum: x · (1/m) Σ_k 2 (k/m) x = x² (m + 1) / m; trapezoid is exact for a linear integrand
    right = integrated_gradients(f, x, None, steps=m)
    assert torch.allclose(right, x**2 * (m + 1) / m)
    trap = integrated_gradients(f, x, None, steps=m, method="trapezoid", batch_size=3)
    assert torch.allclose(trap, x**2)
    with pytest.raises(ValueError, match="integration method"):
        integrated_gradients(f, x, None, method="simpson")


def test_ig_completeness_on_a_smooth_model_and_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    attr = integrated_gradients(model, x, target=1, steps=50, method="trapezoid")
    with torch.no_grad():
        gap = model(x)[:, 1] - model(torch.zeros(1, 4, dtype=torch.float64))[:, 1]
    assert torch.allclose(attr.sum(-1), gap, rtol=1e-3, atol=1e-5)
    chunked = integrated_gradients(model, x, target=1, steps=50, method="trapezoid", batch_size=7)
    assert torch.allclose(chunked, attr)


def test_ig_at_an_intermediate_layer() -> None:
    torch.manual_seed(0)
    # linear after the layer: attributions are exactly w ⊙ activation
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    attr = integrated_gradients(model, x, None, steps=3, layer=model[1])
    act = torch.tanh(model[0](x))
    head = model[2]
    assert isinstance(head, nn.Linear)
    assert attr.shape == (1, 4)
    assert torch.allclose(attr, head.weight * act)
    # nonlinear after the layer: completeness against the suffix run from a zero activation
    deep = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    attr = integrated_gradients(deep, x, 0, steps=50, layer=deep[1], method="trapezoid")
    with torch.no_grad():
        gap = deep(x)[0, 0] - deep[2:](torch.zeros(1, 4, dtype=torch.float64))[0, 0]
    assert attr.sum().item() == pytest.approx(gap.item(), rel=1e-3, abs=1e-6)
    twice = nn.Sequential(model[1], model[1])
    with pytest.raises(ValueError, match="exactly once"):
        integrated_gradients(twice, x, None, layer=model[1])


# ---------------------------------------------------------------- boxes


def _blob(shape: tuple[int, int], centre: tuple[float, float], sigma: float) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) / (2.0 * sigma**2))


def test_two_blobs_give_two_boxes_around_their_centres() -> None:
    rng = np.random.default_rng(0)
    shape = (64, 64)
    centres = [(16.0, 18.0), (44.0, 47.0)]
    full = _blob(shape, centres[0], 3.0) + 0.8 * _blob(shape, centres[1], 4.0)
    full = full + rng.uniform(0.0, 0.01, shape)
    # three scales as the network gives them: full, half and quarter resolution (signed at coarse scales)
    half = full[::2, ::2] * -1.0
    quarter = full[::4, ::4]
    boxes = saliency_boxes([full, half, quarter], shape=shape, min_area=9, floor=1e-3)
    assert len(boxes) == 2
    for centre in centres:
        assert sum(box.contains(*centre) for box in boxes) == 1
    assert boxes[0].contains(*centres[0])  # the stronger blob first
    assert all(0 <= b.row0 < b.row1 <= 64 and 0 <= b.col0 < b.col1 <= 64 for b in boxes)
    assert joint_saliency([full, half, quarter], shape).shape == shape


def test_noise_below_the_floor_gives_no_box() -> None:
    rng = np.random.default_rng(1)
    noise = rng.uniform(0.0, 0.05, (64, 64))
    assert saliency_boxes([noise, noise[::2, ::2], noise[::4, ::4]], shape=(64, 64), floor=1e-3) == []
    assert saliency_boxes(np.zeros((16, 16))) == []
    with pytest.raises(ValueError, match="2-D"):
        saliency_boxes([np.zeros((4, 4, 4))])
