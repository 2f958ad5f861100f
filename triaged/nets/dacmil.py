"""Seed 002 (Chikontwe et al. 2020): DA-CMIL, dual attention contrastive MIL (COVID-19 vs bacterial).

A patient is a bag of lung-cropped axial slices (the paper: k = 32 random slices in training, all of
them at inference; 256 × 256).  Each slice goes through a CNN backbone to a ``C × 8 × 8`` map; a
:class:`~triaged.nets.mil.SpatialGatedAttention` pools the map into an instance feature and gives a
spatial attention map; a :class:`~triaged.nets.mil.GatedAttentionPooling` pools the instances into the
bag feature and gives each slice's attention score (the key slices); a linear classifier gives the bag
logits (class 0 bacterial pneumonia, class 1 COVID-19).  Training adds
:func:`~triaged.nets.mil.contrastive_mil_loss` between the instance features and the bag feature:
``L = 0.5 CE + 0.5 L_F`` (τ = 1).

Deviation, for CPUs: the backbone is a ResNet-10-style network (one basic block per stage, stem
7×7/2 + max pool, stages at strides 1, 2, 2, 2 by 2×2 max pooling rather than strided convolutions,
so 256 → 8) with widths (16, 32, 64, 128) instead of
ResNet-34's (64, 128, 256, 512) with (3, 4, 6, 3) blocks, trained from scratch (the paper starts from
ImageNet weights).  The model card says so.

How a pipeline calls it (intensities in [0, 1] from a lung window; slices lung-cropped, resized to
256 × 256)::

    model = DACMIL(**card["widths"]).eval()
    with torch.no_grad():
        out = model(bag.unsqueeze(0), chunk=64)          # bag (N, 1, 256, 256): every slice
    p_covid = out.logits.softmax(-1)[0, 1]
    key = out.instance_attention[0].argsort(descending=True)[:3]   # the key slices for SC and SR
    maps = out.spatial_attention[0, key]                              # (3, 8, 8), upsample for overlays

Research use only - not for diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from triaged.nets.mil import GatedAttentionPooling, SpatialGatedAttention, contrastive_mil_loss
from triaged.nets.unet2d import ResBlock2d

#: Default stage widths (ResNet-34: 64, 128, 256, 512).
DEFAULT_WIDTHS: tuple[int, ...] = (16, 32, 64, 128)
#: Slice side of the paper's bags.
SLICE_SIZE = 256
#: Weight λ of the bag loss in ``λ L_B + (1 − λ) L_F`` (seed 002: 0.5).
BAG_LOSS_WEIGHT = 0.5


class DACMILOutput(NamedTuple):
    """What :class:`DACMIL` returns for ``B`` bags of ``N`` slices.

    ``logits`` ``(B, K)``; ``instance_attention`` ``(B, N)`` (sums to 1 per bag);
    ``spatial_attention`` ``(B, N, h, w)`` (sums to 1 per slice); ``instance_features`` ``(B, N, D)``;
    ``bag_feature`` ``(B, D)``.
    """

    logits: torch.Tensor
    instance_attention: torch.Tensor
    spatial_attention: torch.Tensor
    instance_features: torch.Tensor
    bag_feature: torch.Tensor


class ResNetBackbone(nn.Module):
    """A small ResNet (He et al. 2016): stem conv 7×7/2-BN-ReLU + max pool 3×3/2, then one stage per width.

    Parameters
    ----------
    in_channels : int
        Channels of a slice.
    widths : sequence of int
        Channels of the stages; the first keeps the resolution, each later one halves it.
    blocks : int
        Basic blocks per stage (1: ResNet-10-like).
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS, blocks: int = 1) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, self.widths[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(self.widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        prev = self.widths[0]
        for i, w in enumerate(self.widths):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if i else []
            for j in range(blocks):
                layers.append(ResBlock2d(prev if j == 0 else w, w))
            stages.append(nn.Sequential(*layers))
            prev = w
        self.stages = nn.Sequential(*stages)

    @property
    def out_channels(self) -> int:
        return self.widths[-1]

    @property
    def stride(self) -> int:
        """Input pixels per output pixel (32 for four stages)."""
        return int(4 * 2 ** (len(self.widths) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.stages(self.stem(x)))


class DACMIL(nn.Module):
    """Backbone → spatial gated attention per slice → gated attention over the bag → linear classifier.

    Parameters
    ----------
    in_channels : int
        Channels of a slice (1 for CT).
    widths : sequence of int
        Backbone stage widths; the instance feature has ``widths[-1]`` dimensions.
    blocks : int
        Basic blocks per backbone stage.
    spatial_hidden, instance_hidden : int
        Hidden widths of the spatial and the instance gates.
    classes : int
        Bag classes (2: bacterial pneumonia, COVID-19).
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        blocks: int = 1,
        spatial_hidden: int = 64,
        instance_hidden: int = 64,
        classes: int = 2,
    ) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(in_channels, widths, blocks)
        d = self.backbone.out_channels
        self.spatial = SpatialGatedAttention(d, spatial_hidden)
        self.instance = GatedAttentionPooling(d, instance_hidden)
        self.classifier = nn.Linear(d, classes)

    def embed(self, slices: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Instance features ``(N, D)`` and spatial maps ``(N, h, w)`` of ``(N, C, H, W)`` slices.

        ``chunk`` bounds how many slices go through the backbone at once (memory at inference).
        """
        step = slices.shape[0] if not chunk else int(chunk)
        feats: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []
        for start in range(0, slices.shape[0], max(step, 1)):
            f, m = self.spatial(self.backbone(slices[start : start + step]))
            feats.append(f)
            maps.append(m)
        return torch.cat(feats), torch.cat(maps)

    def forward(
        self, bags: torch.Tensor, mask: torch.Tensor | None = None, chunk: int | None = None
    ) -> DACMILOutput:
        """``bags`` ``(B, N, C, H, W)``; ``mask`` ``(B, N)`` hides padded slices."""
        b, n = bags.shape[:2]
        feats, maps = self.embed(bags.reshape(b * n, *bags.shape[2:]), chunk)
        feats = feats.reshape(b, n, -1)
        z, a = self.instance(feats, mask)
        return DACMILOutput(self.classifier(z), a, maps.reshape(b, n, *maps.shape[1:]), feats, z)


def dacmil_loss(
    out: DACMILOutput,
    target: torch.Tensor,
    temperature: float = 1.0,
    bag_weight: float = BAG_LOSS_WEIGHT,
) -> torch.Tensor:
    """Seed 002's training loss ``λ CE(bag) + (1 − λ) L_F`` averaged over the bags of a batch."""
    bag = F.cross_entropy(out.logits, target.long())
    contrast = torch.stack(
        [
            contrastive_mil_loss(out.instance_features[i], out.bag_feature[i], temperature)
            for i in range(out.logits.shape[0])
        ]
    ).mean()
    return bag_weight * bag + (1.0 - bag_weight) * contrast
