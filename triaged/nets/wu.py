"""Seed 001 (Wu et al. 2020): 2.5D infection U-Net (UNet-1) and the consolidation U-Net trained by hard EM.

Architecture (Section III-B): 7 adjacent axial slices in as channels, the central slice's mask out;
five down-sampling blocks and four up-sampling blocks of two 3×3 convolutions with batch normalisation
and leaky ReLU; stride-2 convolutions down, transposed convolutions up; encoder features *added* to the
decoder (not concatenated); a 1×1 convolution and a sigmoid.  The paper starts at 32 channels and
doubles per level (32…512); triaged starts at 16 and caps at 128 so that it trains and runs on CPUs.

Intensities (Section III-B and reference code): ``(HU + 1024) / 110``, clipped at 160 HU above.

UNet-2 has the same structure, is initialised from UNet-1 and is trained by hard EM (Section II-C,
Algorithm 1) from a patient-level label ``z`` ("this patient has consolidation") inside the infected
mask ``m`` predicted by UNet-1:

* E-step (eq. 10): ``y_j = 1`` iff ``m_j f_j(x) + m_j φ(z, x_j) > 1``;
* M-step: smooth Dice (σ = 1) between ``y`` and ``m · f(x)``;
* prior φ2 (eq. 13): ``φ2(1, x) = min(1, sigmoid(k2 (x − b2)) + 0.5)``, ``φ2(0, x) = 0``, with
  ``b2 = 9.0`` (≈ −34 HU) and ``k2 = 0.5`` in the normalised units.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from triaged.nets.unet2d import pad_to_multiple

#: Adjacent slices fed as channels (Wu et al.: 7).
CONTEXT_SLICES = 7
#: Slice spacing the 2.5D input is resampled to when slices are thinner than 4 mm (Wu et al.: 5 mm).
TARGET_SLICE_MM = 5.0
#: Default widths (paper: 32, 64, 128, 256, 512).
DEFAULT_WIDTHS: tuple[int, ...] = (16, 32, 64, 128, 128)
#: φ2 hyperparameters chosen by Wu et al. (Fig. 3): b2 = 9.0 (−34 HU), k2 = 0.5.
B2 = 9.0
K2 = 0.5
#: Upper clip of the reference code, HU.
HU_CLIP_MAX = 160.0


def normalise_hu(hu: torch.Tensor) -> torch.Tensor:
    """Wu's intensity units: ``(HU + 1024) / 110``, HU clipped to [−1024, 160] first."""
    return (hu.float().clamp(-1024.0, HU_CLIP_MAX) + 1024.0) / 110.0


def hu_from_normalised(x: float) -> float:
    """Inverse of :func:`normalise_hu` for documentation and tests (b2 = 9.0 → −34 HU)."""
    return x * 110.0 - 1024.0


def phi2(z: torch.Tensor, x: torch.Tensor, b2: float = B2, k2: float = K2) -> torch.Tensor:
    """Wu's HU prior φ2 (eq. 13) of each pixel being consolidation.

    Parameters
    ----------
    z : tensor
        Image-level label (1 = this patient has consolidation), broadcastable to ``x``.
    x : tensor
        Intensities in Wu's normalised units (:func:`normalise_hu`).
    """
    prior = torch.clamp(torch.sigmoid(k2 * (x - b2)) + 0.5, max=1.0)
    return torch.where(z.to(torch.bool), prior, torch.zeros_like(prior))


def e_step(
    f: torch.Tensor, x: torch.Tensor, z: torch.Tensor, m: torch.Tensor, b2: float = B2, k2: float = K2
) -> torch.Tensor:
    """Hard-EM E-step (Wu et al. eq. 10 and Algorithm 1, lines 4–7): latent consolidation labels.

    ``y_j = 1`` iff ``m_j f_j + m_j φ2(z, x_j) > 1``, i.e. only inside the infected mask ``m`` and, for
    ``z = 0``, never (φ2 = 0 and f < 1).

    Parameters
    ----------
    f : tensor
        UNet-2's current consolidation probabilities (after the sigmoid), any shape.
    x : tensor
        Normalised intensities of the same pixels.
    z : tensor
        Image-level labels broadcastable to ``f`` (e.g. shape ``(B, 1, 1)`` for ``(B, H, W)``).
    m : tensor
        Infected-region mask predicted by UNet-1 (0/1), same shape as ``f``.

    Returns
    -------
    tensor of float32
        0/1 latent labels ``y``.
    """
    mf = m.float()
    return ((mf * f + mf * phi2(z, x, b2, k2)) > 1.0).float()


def smooth_dice_loss(prob: torch.Tensor, target: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Wu's smooth Dice loss (eq. 2): ``−mean_i (2 l·f + σ) / (|l| + |f| + σ)``, per image then averaged."""
    dims = tuple(range(1, prob.dim()))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return -((2.0 * inter + sigma) / (denom + sigma)).mean()


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, inplace=True),
    )


class WuUNet(nn.Module):
    """Wu et al.'s UNet (UNet-1 and UNet-2 share it): additive skips, strided/transposed convolutions.

    Input ``(N, 7, H, W)`` normalised intensities; output the central slice's logit ``(N, 1, H, W)``
    (the sigmoid is applied by the caller).
    """

    def __init__(self, in_channels: int = CONTEXT_SLICES, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.widths = widths
        self.down = nn.ModuleList()
        prev = in_channels
        for i, w in enumerate(widths):
            self.down.append(nn.Sequential(_conv_bn(prev, w, stride=1 if i == 0 else 2), _conv_bn(w, w)))
            prev = w
        self.up_sample = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for i in range(len(widths) - 2, -1, -1):
            self.up_sample.append(
                nn.Sequential(
                    nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2, bias=False),
                    nn.BatchNorm2d(widths[i]),
                    nn.LeakyReLU(0.2, inplace=True),
                )
            )
            self.up_conv.append(nn.Sequential(_conv_bn(widths[i], widths[i]), _conv_bn(widths[i], widths[i])))
        self.out = nn.Conv2d(widths[0], 1, 1)

    @property
    def multiple(self) -> int:
        return int(2 ** (len(self.widths) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.multiple)
        skips: list[torch.Tensor] = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()
        for up, conv in zip(self.up_sample, self.up_conv, strict=True):
            x = conv(up(x) + skips.pop())
        return torch.as_tensor(self.out(x))[..., :h, :w]


class ConsolidationEM(nn.Module):
    """The pair the ``consolidation-em`` pipeline runs: UNet-1 (infection) and UNet-2 (consolidation).

    ``forward`` returns both logits ``(N, 2, H, W)``: channel 0 infection, channel 1 consolidation.
    Consolidation is only reported inside the infected region (UNet-1 > 0.5), as in training.
    """

    def __init__(self, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        self.unet1 = WuUNet(CONTEXT_SLICES, widths)
        self.unet2 = WuUNet(CONTEXT_SLICES, widths)

    def init_unet2_from_unet1(self) -> None:
        """Algorithm 1, INITIALIZATION: Θ ← Θ1."""
        self.unet2.load_state_dict(self.unet1.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.unet1(x), self.unet2(x)], dim=1)
