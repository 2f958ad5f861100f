"""Seed 000 (He et al. 2021): M²UNet, a lobe decoder and a hierarchical MIL severity head on one encoder.

Architecture (Table 1, Section 3): five encoding blocks of 3×3 conv-BN-ReLU pairs with 2×2 max pooling
between them (a 128 × 128 patch reaches the fifth block at 8 × 8); a U-Net decoder (up-sample, conv,
concatenate the encoder's skip, two convs) down to a 1×1 convolution into 6 classes (background + five
lobes); and the hierarchical MIL classifier:

* embedding-level MIL: the 8 × 8 positions of a patch's block-5 features are the instances of a bag,
  :class:`~triaged.nets.mil.GlobalContrastPooling` with ``concepts[0]`` concepts (paper: 256) and a
  1×1 convolution (a linear layer on the pooled vector);
* image-level MIL: the patch embeddings are the instances of the CT's bag, GCP with ``concepts[1]``
  concepts (paper: 128) and a 1×1 convolution;
* a 1×1 convolution (linear layer) to two classes: non-severe (0) / severe (1).

Deviations, for CPUs: widths default to (8, 16, 16, 32, 64) instead of (64, 64, 64, 64, 512) and the
concepts to (64, 32) instead of (256, 128); every encoding block is two convolutions to its own width
(the paper's block 5 goes 64 → 64 → 512); a ReLU follows each MIL 1×1 convolution (Table 1 lists
none; two linear maps in a row would collapse into one).

How a pipeline calls it (intensities: HU clamped to [−1200, 0] and scaled to [0, 1] by
:func:`normalise_hu`, the paper's [0, 255] divided by 255)::

    model = M2UNet(**card["widths"]).eval()
    with torch.no_grad():
        lobes = model.segment(slices)            # (Z, 1, H, W) whole slices → (Z, 6, H, W) logits
        out = model(bag.unsqueeze(0))            # (1, n, 1, 128, 128): one patch per slice position
        p_severe = out.severity_logits.softmax(-1)[0, 1]
        p_severe = model.severity(bag.unsqueeze(0)).softmax(-1)[0, 1]   # the same without the decoder

Training (next session, :mod:`triaged.lab`): ``0.01 × CE(severity) + (CE + Dice)(lobes)``, the lobe
term only for cases with lobe masks; SGD lr 0.01 with poly decay (power 0.75).
Research use only - not for diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from triaged.nets.mil import GlobalContrastPooling
from triaged.nets.unet2d import pad_to_multiple

#: Background + the five lobes (order of the decoder's channels: see the lobe pipeline's card).
LOBE_CLASSES = 6
#: Default encoder widths of the five blocks (paper: 64, 64, 64, 64, 512).
DEFAULT_WIDTHS: tuple[int, ...] = (8, 16, 16, 32, 64)
#: Default concepts of the embedding-level and image-level GCP (paper: 256, 128).
DEFAULT_CONCEPTS: tuple[int, int] = (64, 32)
#: Patch side the paper's 8 × 8 embedding-level bag implies (four 2× poolings).
PATCH_SIZE = 128
#: Seed 000's HU clamp.
HU_RANGE: tuple[float, float] = (-1200.0, 0.0)


def normalise_hu(hu: torch.Tensor) -> torch.Tensor:
    """Seed 000's intensities: HU clamped to [−1200, 0] and scaled to [0, 1]."""
    lo, hi = HU_RANGE
    return (hu.float().clamp(lo, hi) - lo) / (hi - lo)


class M2UNetOutput(NamedTuple):
    """Lobe logits ``(B, n, 6, H, W)`` per patch and severity logits ``(B, 2)`` (non-severe, severe)."""

    lobe_logits: torch.Tensor
    severity_logits: torch.Tensor


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class M2UNet(nn.Module):
    """Shared encoder → lobe decoder and hierarchical GCP-MIL severity classifier.

    Parameters
    ----------
    in_channels : int
        Channels of a patch (1 for CT).
    widths : sequence of int
        Widths of the five encoding blocks (shallow → deep); ``len(widths) - 1`` poolings.
    concepts : pair of int
        Concepts of the embedding-level and the image-level GCP.
    lobe_classes : int
        Output channels of the decoder (background + lobes).
    severity_classes : int
        Output classes of the severity classifier.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        concepts: Sequence[int] = DEFAULT_CONCEPTS,
        lobe_classes: int = LOBE_CLASSES,
        severity_classes: int = 2,
    ) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.concepts = tuple(int(c) for c in concepts)
        if len(self.widths) < 2 or len(self.concepts) != 2:
            raise ValueError("M2UNet needs at least two widths and exactly two concept counts")
        self.encoder = nn.ModuleList()
        prev = in_channels
        for w in self.widths:
            self.encoder.append(nn.Sequential(*_conv_bn_relu(prev, w), *_conv_bn_relu(w, w)))
            prev = w
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        prev = self.widths[-1]
        for w in reversed(self.widths[:-1]):
            self.up.append(nn.Sequential(*_conv_bn_relu(prev, w)))
            self.dec.append(nn.Sequential(*_conv_bn_relu(2 * w, w), *_conv_bn_relu(w, w)))
            prev = w
        self.lobe_out = nn.Conv2d(self.widths[0], lobe_classes, 1)
        self.embedding_gcp = GlobalContrastPooling(self.widths[-1], self.concepts[0])
        self.embedding_fc = nn.Linear(self.concepts[0], self.concepts[0])
        self.image_gcp = GlobalContrastPooling(self.concepts[0], self.concepts[1])
        self.image_fc = nn.Linear(self.concepts[1], self.concepts[1])
        self.classifier = nn.Linear(self.concepts[1], severity_classes)

    @property
    def multiple(self) -> int:
        """Height and width of an input must be multiples of it (:meth:`segment` pads for you)."""
        return int(2 ** (len(self.widths) - 1))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of ``(N, C, H, W)`` patches, one per block (the last is the deepest)."""
        feats: list[torch.Tensor] = []
        for i, block in enumerate(self.encoder):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        return feats

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Lobe logits ``(N, lobe_classes, H, W)`` from :meth:`encode`'s features."""
        x = feats[-1]
        for up, dec, skip in zip(self.up, self.dec, reversed(feats[:-1]), strict=True):
            x = up(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
            x = dec(torch.cat([x, skip], dim=1))
        return torch.as_tensor(self.lobe_out(x))

    def embed_patches(self, deepest: torch.Tensor) -> torch.Tensor:
        """Embedding-level MIL: block-5 features ``(N, C, h, w)`` → patch embeddings ``(N, concepts[0])``."""
        instances = deepest.flatten(2).transpose(1, 2)  # (N, h·w, C): the positions are the instances
        return F.relu(self.embedding_fc(self.embedding_gcp(instances)))

    def classify(self, embeddings: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image-level MIL + classifier: ``(B, n, concepts[0])`` → severity logits ``(B, classes)``."""
        volume = F.relu(self.image_fc(self.image_gcp(embeddings, mask)))
        return torch.as_tensor(self.classifier(volume))

    def segment(self, slices: torch.Tensor) -> torch.Tensor:
        """Lobe logits of whole slices ``(Z, C, H, W)`` (any size: padded to :attr:`multiple`, cropped)."""
        h, w = slices.shape[-2:]
        return self.decode(self.encode(pad_to_multiple(slices, self.multiple)))[..., :h, :w]

    def severity(self, patches: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Severity logits ``(B, classes)`` of bags ``(B, n, C, H, W)`` without running the decoder."""
        b, n = patches.shape[:2]
        deepest = self.encode(patches.reshape(b * n, *patches.shape[2:]))[-1]
        return self.classify(self.embed_patches(deepest).reshape(b, n, -1), mask)

    def forward(self, patches: torch.Tensor, mask: torch.Tensor | None = None) -> M2UNetOutput:
        """A batch of bags ``(B, n, C, H, W)`` (``mask`` ``(B, n)`` hides padded patches)."""
        b, n = patches.shape[:2]
        feats = self.encode(patches.reshape(b * n, *patches.shape[2:]))
        lobes = self.decode(feats)
        emb = self.embed_patches(feats[-1]).reshape(b, n, -1)
        return M2UNetOutput(lobes.reshape(b, n, *lobes.shape[1:]), self.classify(emb, mask))
