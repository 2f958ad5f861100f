"""Seed 004's multitask network: one slice-wise U-Net backbone, a segmentation and a classification head.

Goncharov et al. (2021, Section 2.3, Fig. 3): a 2D residual U-Net processes every axial slice and
returns a feature map of the slice's size; stacking the slices gives a 3D feature map that two heads
share.

* Segmentation head (slice-wise): one residual block and a 1×1 convolution → lesion logit per pixel
  (backbone + this head "forms exactly the 2D U-Net").
* Classification head: 3D pyramid pooling (He et al. 2014) of the stacked feature map — max pooling
  over 1³, 2³, 4³ and 8³ bins of (z, y, x), four levels — → LayerNorm → FC → leaky ReLU → FC 1 →
  sigmoid = P(COVID-19) (the LayerNorm and the leaky ReLU are ours: see the comment in ``__init__``).

Scaled for CPU: widths 8…64 and an FC of 128 units instead of 1024 (the pooled vector has
``8 × (1 + 8 + 64 + 512) = 4680`` entries, so the first FC dominates the parameter count).
Loss (Section 4.5): BCE of the segmentation on the studies that have masks + 0.1 × BCE of the
classification; see :mod:`triaged.lab.train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from triaged.nets.unet2d import DEFAULT_WIDTHS, ResBlock2d, UNet2d

#: Pyramid levels: bins per axis of each max-pooling level (seed 004 reference code: 4 levels).
PYRAMID_LEVELS: tuple[int, ...] = (1, 2, 4, 8)

#: Intensity window of seed 004's preprocessing (METHODS.md): HU clipped to it, scaled to [0, 1].
HU_WINDOW: tuple[float, float] = (-1000.0, 300.0)


def normalise_hu(hu: torch.Tensor) -> torch.Tensor:
    """Seed 004's intensity normalisation: clip to [−1000, 300] HU and scale to [0, 1]."""
    lo, hi = HU_WINDOW
    return (hu.float().clamp(lo, hi) - lo) / (hi - lo)


def pyramid_max_pool3d(features: torch.Tensor, levels: Sequence[int] = PYRAMID_LEVELS) -> torch.Tensor:
    """Spatial pyramid max pooling of ``(B, C, Z, H, W)`` → ``(B, C · Σ l³)`` (He et al. 2014, in 3D).

    Adaptive bins, so any (Z, H, W) maps to the same vector length; an axis shorter than ``l`` repeats
    voxels across bins rather than failing (a 6-slice stack still gives 8 z bins).
    """
    pooled = [F.adaptive_max_pool3d(features, (n, n, n)).flatten(1) for n in levels]
    return torch.cat(pooled, dim=1)


@dataclass(frozen=True)
class MultitaskOutput:
    """Lesion logits ``(B, Z, H, W)`` and the COVID-19 logit ``(B,)``."""

    lesion_logits: torch.Tensor
    covid_logit: torch.Tensor


class MultitaskNet(nn.Module):
    """Shared residual U-Net → segmentation head and pyramid-pooling classification head.

    Parameters
    ----------
    widths : sequence of int
        Backbone widths (shallow → deep).
    fc_units : int
        Width of the hidden fully connected layer (seed 004: 1024; here 128).
    levels : sequence of int
        Pyramid pooling bins per axis.
    """

    def __init__(
        self,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        fc_units: int = 128,
        levels: Sequence[int] = PYRAMID_LEVELS,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.backbone = UNet2d(1, widths)
        c = self.backbone.out_channels
        self.seg_block = ResBlock2d(c, c)
        self.seg_out = nn.Conv2d(c, 1, 1)
        self.levels = tuple(int(n) for n in levels)
        n_pooled = c * sum(n**3 for n in self.levels)
        # LayerNorm of the pooled vector and a leaky hidden layer: with a plain ReLU the hidden units
        # died within the first 20 steps of a CPU run (the classification loss sat at ln 2 after that)
        self.norm = nn.LayerNorm(n_pooled)
        self.fc1 = nn.Linear(n_pooled, fc_units)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(fc_units, 1)

    def slice_features(self, slices: torch.Tensor) -> torch.Tensor:
        """Backbone features of ``(N, 1, H, W)`` slices → ``(N, C, H, W)``."""
        return torch.as_tensor(self.backbone(slices))

    def segment(self, features: torch.Tensor) -> torch.Tensor:
        """Segmentation head on slice features ``(N, C, H, W)`` → lesion logits ``(N, H, W)``."""
        return torch.as_tensor(self.seg_out(self.seg_block(features)))[:, 0]

    def classify(self, volume_features: torch.Tensor) -> torch.Tensor:
        """Classification head on stacked features ``(B, C, Z, H, W)`` → COVID-19 logit ``(B,)``."""
        pooled = self.norm(pyramid_max_pool3d(volume_features.float(), self.levels))
        hidden = F.leaky_relu(self.fc1(self.dropout(pooled)), 0.1)
        return torch.as_tensor(self.fc2(self.dropout(hidden)))[:, 0]

    def forward(self, volume: torch.Tensor) -> MultitaskOutput:
        """``volume``: normalised intensities ``(B, Z, H, W)`` → :class:`MultitaskOutput`."""
        b, z, h, w = volume.shape
        feats = self.slice_features(volume.reshape(b * z, 1, h, w))
        lesion = self.segment(feats).reshape(b, z, h, w)
        stacked = feats.reshape(b, z, feats.shape[1], h, w).transpose(1, 2)
        return MultitaskOutput(lesion, self.classify(stacked))
