"""Slice-wise 2D U-Net with residual blocks (seed 004's backbone, scaled down for CPU).

Goncharov et al. (2021, Section 2.2-2.3 and Fig. 3) build every segmentation model of the paper, and the
backbone of the multitask model, from 2D residual convolutional blocks (He et al. 2016) arranged as a
U-Net that processes each axial slice independently; the reference code uses widths 8…512.  triaged runs
on CPUs, so the widths stop at 64 (four levels, three 2× down-samplings): at a 2 mm working pixel the
deepest level still sees 16 mm per feature pixel, and a lung-cropped slice (≈ 130 × 100 pixels) reaches
the bottleneck at ≈ 16 × 12.

The network only ever sees inputs whose height and width it pads itself to a multiple of
``2 ** (levels - 1)`` (edge replication) and crops back, so callers pass any slice size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Default widths of the four levels (seed 004's reference code starts at 8 as well).
DEFAULT_WIDTHS: tuple[int, ...] = (8, 16, 32, 64)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the last two axes of ``x`` at their ends, by edge replication, to a multiple of ``multiple``.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C, H, W)`` input.
    multiple : int
        Height and width of the result are multiples of it.

    Returns
    -------
    torch.Tensor
        ``x`` itself when it already fits, else the padded copy; crop back with ``[..., :H, :W]``.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


class ResBlock2d(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus an identity (or 1×1 projected) shortcut, then ReLU (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x), inplace=True)


class UNet2d(nn.Module):
    """Residual 2D U-Net returning the full-resolution feature map (``widths[0]`` channels).

    Parameters
    ----------
    in_channels : int
        Channels of each input slice (1 for a CT slice).
    widths : sequence of int
        Channels per level, shallow to deep; ``len(widths) - 1`` 2× max-pool down-samplings.

    Notes
    -----
    Down: 2 × 2 max pooling; up: bilinear 2× upsampling, concatenation with the skip, one residual
    block.  Input ``(N, C, H, W)`` → output ``(N, widths[0], H, W)``.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError("a U-Net needs at least two levels")
        self.widths = widths
        self.encoders = nn.ModuleList()
        prev = in_channels
        for w in widths:
            self.encoders.append(ResBlock2d(prev, w))
            prev = w
        self.decoders = nn.ModuleList()
        for deep, shallow in zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True):
            self.decoders.append(ResBlock2d(deep + shallow, shallow))

    @property
    def out_channels(self) -> int:
        return self.widths[0]

    @property
    def multiple(self) -> int:
        """Height and width are padded to a multiple of this."""
        return int(2 ** (len(self.widths) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.multiple)
        skips: list[torch.Tensor] = []
        for i, enc in enumerate(self.encoders):
            if i:
                x = F.max_pool2d(x, 2)
            x = enc(x)
            skips.append(x)
        x = skips.pop()
        for dec in self.decoders:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat([x, skip], dim=1))
        return x[..., :h, :w]


class LungUNet2d(nn.Module):
    """Seed 004's slice-wise lung segmentation network: the residual U-Net and a 1×1 conv → lung logit.

    Input ``(N, 1, H, W)`` with intensities clipped to [−1000, 300] HU and scaled to [0, 1]; output the
    lung logit ``(N, 1, H, W)`` (sigmoid ≥ 0.5 = lung, Section 4.2).  No weights ship for it yet: triaged's
    pipelines take their lungs from :mod:`triaged.analysis.lungs`.
    """

    def __init__(self, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        self.backbone = UNet2d(1, widths)
        self.head = nn.Conv2d(self.backbone.out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.head(self.backbone(x)))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
