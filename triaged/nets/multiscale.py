"""Seed 003 (Hu et al. 2020): weakly supervised multi-scale classification (normal / CAP / COVID-19).

Architecture (Section "Multi-scale learning", Fig. 1): a VGG-like fully convolutional CNN,
``2×C32-MP-2×C64-MP-3×C128-MP-3×C256-MP-3×C256-MP`` (3×3 conv + BN + ReLU); at the outputs of
Conv3, Conv4 and Conv5 (before their pooling) a 1×1 convolution maps the features to ``K`` class-score
maps; each is reduced by global max pooling, the three score vectors are summed, and a softmax gives
the class probabilities.  Loss: :func:`~triaged.nets.mil.class_balanced_focal_loss` (γ = 1,
inverse-frequency weights).  Input 224 × 224 slices.

Deviation, for CPUs: the widths are the paper's times ``width`` (default 0.125: 4-8-16-32-32; 0.25 doubles
the cost of a 300-slice study).

Localisation (:mod:`triaged.nets.saliency`): integrated gradients (zero baseline, 25 steps) of the
predicted class's score at the activations of Conv3, Conv4 and Conv5, summed over channels, |·|,
up-sampled to the slice, multiplied, then Gaussian → Isodata → closing → components → boxes.
How a pipeline calls it::

    model = MultiScaleNet(width=card["width"]).eval()
    with torch.no_grad():
        out = model(slices)                                   # (Z, 1, 224, 224)
    probs = out.logits.softmax(-1)                            # (Z, 3): normal, CAP, COVID-19
    for z in key_slices:
        maps = scale_saliency(model, slices[z : z + 1], target=int(probs[z].argmax()))
        boxes = saliency_boxes(maps, shape=slices.shape[-2:], min_area=..., floor=...)

Research use only - not for diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from triaged.nets.saliency import integrated_gradients

#: The paper's blocks: (convolutions, channels).
PAPER_BLOCKS: tuple[tuple[int, int], ...] = ((2, 32), (2, 64), (3, 128), (3, 256), (3, 256))
#: Blocks whose outputs feed a class-score map (Conv3, Conv4, Conv5; 1-based as in the paper).
SCORE_BLOCKS: tuple[int, ...] = (3, 4, 5)
#: Classes of the three-way task, in the order of the logits.
CLASSES: tuple[str, ...] = ("normal", "CAP", "COVID-19")
#: Default width multiplier.
DEFAULT_WIDTH = 0.125
#: Slice side of the paper's input.
SLICE_SIZE = 224


class MultiScaleOutput(NamedTuple):
    """``logits`` ``(N, K)`` (sum of the three max-pooled score vectors) and the score maps
    ``(N, K, h_s, w_s)`` at Conv3, Conv4 and Conv5."""

    logits: torch.Tensor
    score_maps: tuple[torch.Tensor, ...]


class MultiScaleNet(nn.Module):
    """Hu et al.'s multi-scale CNN with class-score maps at three depths.

    Parameters
    ----------
    in_channels : int
        Channels of a slice.
    classes : int
        ``K`` (3 for normal / CAP / COVID-19, 2 for the binary tasks).
    width : float
        Multiplier of the paper's channel counts (at least one channel per layer).
    blocks : sequence of (int, int)
        (convolutions, channels) per block before the multiplier.
    score_blocks : sequence of int
        1-based blocks with a class-score map.
    """

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = len(CLASSES),
        width: float = DEFAULT_WIDTH,
        blocks: Sequence[tuple[int, int]] = PAPER_BLOCKS,
        score_blocks: Sequence[int] = SCORE_BLOCKS,
    ) -> None:
        super().__init__()
        self.width = float(width)
        self.score_blocks = tuple(int(b) for b in score_blocks)
        self.channels = tuple(max(1, round(c * self.width)) for _, c in blocks)
        convs = nn.ModuleList()
        prev = in_channels
        for (n, _), c in zip(blocks, self.channels, strict=True):
            layers: list[nn.Module] = []
            for _ in range(n):
                layers += [nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
                prev = c
            convs.append(nn.Sequential(*layers))
        #: ``convs[i]`` is the paper's Conv{i+1}; hook these for layer attributions.
        self.convs = convs
        self.heads = nn.ModuleDict(
            {str(b): nn.Conv2d(self.channels[b - 1], classes, 1) for b in self.score_blocks}
        )

    def score_layers(self) -> list[nn.Module]:
        """The modules whose activations the saliency is taken at (Conv3, Conv4, Conv5)."""
        return [self.convs[b - 1] for b in self.score_blocks]

    def forward(self, x: torch.Tensor) -> MultiScaleOutput:
        """``x`` ``(N, C, H, W)`` normalised slices."""
        maps: list[torch.Tensor] = []
        for i, block in enumerate(self.convs, start=1):
            x = block(x)
            if str(i) in self.heads:
                maps.append(self.heads[str(i)](x))
            x = F.max_pool2d(x, 2)
        # a sum that broadcasts: integrated gradients at a deeper layer may run what precedes it once
        # (batch 1) and what follows it once per step (see ``scale_saliency``)
        logits = maps[0].amax(dim=(-2, -1))
        for m in maps[1:]:
            logits = logits + m.amax(dim=(-2, -1))
        return MultiScaleOutput(logits, tuple(maps))


def scale_saliency(
    model: MultiScaleNet, x: torch.Tensor, target: int, steps: int = 25, expand_input: bool = False
) -> list[np.ndarray]:
    """Seed 003's per-scale saliency of one slice ``x`` ``(1, C, H, W)`` for class ``target``.

    Integrated gradients (zero baseline, ``steps`` steps) of the class score at each of
    :meth:`MultiScaleNet.score_layers`' activations, summed over channels: one 2-D map per scale (at
    that scale's resolution) for :func:`~triaged.nets.saliency.saliency_boxes`.  The layers before
    each scale run once (``expand_input=False``), the rest once per step.
    """
    maps: list[np.ndarray] = []
    for layer in model.score_layers():
        attr = integrated_gradients(
            lambda t: model(t).logits, x, target, steps=steps, layer=layer, expand_input=expand_input
        )
        maps.append(attr[0].sum(0).detach().cpu().numpy())
    return maps
