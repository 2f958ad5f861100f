"""Training loops, evaluation and model cards for the learned pipelines (``multitask``, ``consolidation-em``).

Training is seeded and reproducible: every epoch draws its samples from a generator seeded with
``(seed, epoch)`` and re-seeds torch the same way, and a checkpoint is written after every epoch, so a
run resumed from a checkpoint continues exactly as an uninterrupted one would (on the same machine and
torch build).  CPU by default; CUDA when it is present (or asked for with ``device``).

Data (see :mod:`triaged.lab.data`): a labelled phantom dataset (``data_dir``, the
:mod:`triaged.lab.datasets` format) and, when available, the real 8-bit COVID-19 slices (pseudo-labelled
slices and the training split of the doctor-labelled slices; the validation split is never used here).

``multitask`` (seed 004, Goncharov et al. 2021, Section 4.5): each step takes ``phantom_batch`` stacks
of ``crop_slices`` consecutive slices of phantom volumes, each with its whole (jittered) lung box
in-plane (seg + classification loss), and ``real_batch`` real slices (seg loss only).  Loss = BCE(seg)
+ soft Dice(seg) + ``cls_weight`` × BCE(cls) with seed 004's 0.1; the classification target of a stack
is "a COVID-19 study and the stack shows lesion voxels".  Adam with warm-up and cosine decay, gradient
norm clipped at 5.

``consolidation-em`` (seed 001, Wu et al. 2020): UNet-1 is trained with the smooth Dice loss on 2.5D
stacks (7 adjacent 5 mm slabs) of phantoms and real slices; then UNet-2 starts from UNet-1 and is
trained by hard EM with the φ2 prior from image-level labels z ("has consolidation") inside UNet-1's
infected mask (Algorithm 1).  The last ``em_fraction`` of the epochs are EM epochs (Wu: 200 + 50).

Deviations from the papers, all forced by a CPU budget of minutes instead of 60k batches on GPUs, and
recorded in the model cards: the soft Dice term of the multitask segmentation loss (BCE alone left every
lesion voxel below 0.5 after 160 steps); LayerNorm and a leaky ReLU in the classification head (plain
ReLU units died within 20 steps); training stacks of 12 slices and, at inference, P(COVID-19) = the
maximum over overlapping 12-slice stacks (:func:`triaged.nets.pipelines.classification_windows`);
Wu's step learning-rate schedule compressed to the run's length (3e-3 → ×0.3 → ×0.1); EM samples
balanced between z = 0 and z = 1; narrower networks (widths 8…64 and 16…128); float16 weight files.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
import yaml
from scipy import ndimage
from torch import nn

from triaged.errors import TriagedError
from triaged.lab import data
from triaged.lab.cards import save_card
from triaged.nets import multitask as mt
from triaged.nets import preprocess, wu
from triaged.nets.unet2d import count_parameters
from triaged.nets.weights import MANIFEST, build_module, load_model, sha256_of

F32 = npt.NDArray[np.float32]
B = npt.NDArray[np.bool_]

MODEL_NAMES: Final[tuple[str, ...]] = ("multitask", "consolidation-em")
WEIGHTS_FILE: Final[str] = "model.pt"
CHECKPOINT_FILE: Final[str] = "checkpoint.pt"
#: The version a newly trained card gets, by model: multitask 2.1.0 lobes + CT-SS in the pipeline (weights
#: format unchanged), 2.2.0 weights trained 150 epochs more (two continuations, ``--init-from``);
#: consolidation-em 2.2.0 the thick-slice vessel-haze rule (triaged.nets.thick_slices); both 2.2.1: the
#: lungs extended over the network's lesions stop at the ribs (triaged.nets.pipelines._extend_lungs).
VERSIONS: Final[dict[str, str]] = {"multitask": "2.2.1", "consolidation-em": "2.2.1"}
#: HU used to pad crops that reach outside the volume (air).
PAD_HU: Final[float] = -1024.0


class TrainingError(TriagedError):
    """Training cannot start or continue (unknown model, missing data, incompatible checkpoint)."""


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of one model's training (recorded in the model card)."""

    steps_per_epoch: int
    lr: float
    phantom_batch: int
    crop_hw: tuple[int, int]
    real_batch: int
    crop_slices: int = 16
    cls_weight: float = 0.1
    em_fraction: float = 0.25
    em_lr: float = 5e-4
    em_phantom_batch: int = 8
    em_real_batch: int = 4
    flat_stack_p: float = 0.25
    real_flat_stack_p: float = 0.5
    doctor_share: float = 0.3
    lesion_slice_p: float = 0.7
    dice_weight: float = 1.0
    box_jitter: int = 4
    clip_norm: float = 5.0
    whole_box: bool = True
    #: backbone widths (None = the architecture's default)
    widths: tuple[int, ...] | None = None
    #: share of the real samples drawn from the real no-pneumonia volumes (lesion-free slices)
    negative_share: float = 0.0
    #: real-slice augmentation: "v1" (gamma on the assumed lung window, the first recipes) or "v2"
    #: (windows estimated; moderate contrast, window clipping, noise, blur/sharpening kernels)
    augment: str = "v1"
    #: warm-up steps of the cosine schedule (multitask)
    warmup: int = 20
    #: consolidation-em UNet-1: weight of a pixel BCE term added to Wu's per-image smooth Dice (0 = the
    #: paper's loss; with σ = 1 on lesion-free images that loss alone pushes every prediction to zero)
    unet1_bce_weight: float = 0.0
    #: consolidation-em: a pseudo-labelled 2.5D sample's neighbours are slabs of s adjacent slices, s drawn
    #: from 1..this (1 = adjacent slices, as before); the node's pipeline feeds 5 mm slabs
    neighbour_stride_max: int = 1


RECIPES: Final[dict[str, Recipe]] = {
    # real first (issue 11): the segmentation branch on real slices with estimated windows and real
    # no-pneumonia slices as negatives; no phantoms, so the classification head is not trained
    "multitask": Recipe(
        steps_per_epoch=50,
        lr=2e-3,
        phantom_batch=0,
        crop_slices=12,
        crop_hw=(112, 112),
        real_batch=8,
        cls_weight=0.0,
        doctor_share=0.15,
        negative_share=0.2,
        widths=(12, 24, 48, 96),
        augment="v2",
        warmup=50,
    ),
    # real first (issue 11): UNet-1 on real slices with estimated windows (pseudo- and doctor-labelled)
    # and real no-pneumonia slices as negatives; the EM stage on the doctor slices, whose multiclass
    # labels give the image-level consolidation z; no phantoms
    "consolidation-em": Recipe(
        steps_per_epoch=60,
        lr=3e-3,
        phantom_batch=0,
        crop_hw=(96, 96),
        real_batch=8,
        em_phantom_batch=0,
        em_real_batch=8,
        doctor_share=0.15,
        negative_share=0.2,
        augment="v2",
    ),
}


# ---------------------------------------------------------------------------------------- utilities
def seed_everything(seed: int, epoch: int) -> np.random.Generator:
    """Seed torch for ``(seed, epoch)`` and return the epoch's numpy generator."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return np.random.default_rng([seed, epoch])


def dice(pred: B, truth: B) -> float:
    """Dice coefficient; 1.0 when both are empty."""
    p, t = np.count_nonzero(pred), np.count_nonzero(truth)
    if p + t == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & truth) / (p + t)


def compact_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as shipped: floating tensors in float16 (half the bytes; ``load_state_dict`` casts
    them back to the float32 modules), integer buffers unchanged.  The card's metrics are computed from
    this file, so they describe exactly what ships."""
    out = {}
    for k, v in state.items():
        t = v.detach().cpu()
        if t.is_floating_point():
            half = t.to(torch.float16)
            if not torch.isfinite(half).all():
                raise TrainingError(f"{k} does not fit in float16")
            t = half
        out[k] = t
    return out


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ------------------------------------------------------------------------------------- augmentation
def random_crop(
    rng: np.random.Generator,
    arrays: Sequence[npt.NDArray[Any]],
    hw: tuple[int, int],
    pads: Sequence[float],
    centre: tuple[int, int] | None = None,
) -> list[npt.NDArray[Any]]:
    """Crop the last two axes of every array to ``hw`` at one random (or centred) position, padding with
    ``pads`` where the arrays are smaller."""
    h, w = arrays[0].shape[-2:]
    th, tw = hw
    if centre is not None:
        y0 = int(np.clip(centre[0] - th // 2 + rng.integers(-th // 4, th // 4 + 1), 0, max(0, h - th)))
        x0 = int(np.clip(centre[1] - tw // 2 + rng.integers(-tw // 4, tw // 4 + 1), 0, max(0, w - tw)))
    else:
        y0 = int(rng.integers(0, max(0, h - th) + 1))
        x0 = int(rng.integers(0, max(0, w - tw) + 1))
    out = []
    for a, pad in zip(arrays, pads, strict=True):
        c = a[..., y0 : y0 + th, x0 : x0 + tw]
        ph, pw = th - c.shape[-2], tw - c.shape[-1]
        if ph or pw:
            widths = [(0, 0)] * (c.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]
            c = np.pad(c, widths, mode="constant", constant_values=pad)
        out.append(np.ascontiguousarray(c))
    return out


def augment_real(rng: np.random.Generator, stack: F32, masks: Sequence[B]) -> tuple[F32, list[B]]:
    """Strong geometric and contrast augmentation of a real 8-bit-derived slice stack (C, H, W).

    The real slices' display window is unknown (data module docstring), so besides rotations by 90°
    (their orientation varies), flips and ±25 % scaling, the grey levels are remapped: a gamma of
    0.6–1.7 on the assumed window, then a linear ×0.8–1.25 and ±100 HU change, noise and blur.
    """
    k = int(rng.integers(4))
    stack = np.rot90(stack, k, axes=(1, 2))
    ms = [np.rot90(m, k) for m in masks]
    if rng.random() < 0.5:
        stack, ms = stack[:, :, ::-1], [m[:, ::-1] for m in ms]
    s = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    stack = ndimage.zoom(np.ascontiguousarray(stack), (1, s, s), order=1, mode="nearest")
    ms = [ndimage.zoom(np.ascontiguousarray(m, np.float32), s, order=1, mode="nearest") >= 0.5 for m in ms]
    lo = data.REAL_WINDOW_LEVEL - data.REAL_WINDOW_WIDTH / 2
    v = np.clip((stack - lo) / data.REAL_WINDOW_WIDTH, 0.0, 1.0)
    v = v ** float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
    hu = lo + data.REAL_WINDOW_WIDTH * v
    hu = hu * rng.uniform(0.8, 1.25) + rng.uniform(-100.0, 100.0)
    if rng.random() < 0.3:
        hu = ndimage.gaussian_filter(hu, (0, rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)))
    hu = hu + rng.normal(0.0, rng.uniform(0.0, 30.0), hu.shape)
    return hu.astype(np.float32), ms


def augment_real_v2(rng: np.random.Generator, stack: F32, masks: Sequence[B]) -> tuple[F32, list[B]]:
    """Augmentation of real slices whose HU come from an estimated window (or DICOM): rotations by 90°,
    flips, ±25 % scale; contrast ×0.85–1.15 about −500 HU and ±60 HU (window estimation error), a
    random upper clip at 0–300 HU (export windows), Gaussian noise σ 0–40 HU, and a kernel change: blur
    (smooth kernels) or unsharp masking (sharp kernels)."""
    k = int(rng.integers(4))
    stack = np.rot90(stack, k, axes=(1, 2))
    ms = [np.rot90(m, k) for m in masks]
    if rng.random() < 0.5:
        stack, ms = stack[:, :, ::-1], [m[:, ::-1] for m in ms]
    s = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    stack = ndimage.zoom(np.ascontiguousarray(stack, np.float32), (1, s, s), order=1, mode="nearest")
    ms = [ndimage.zoom(np.ascontiguousarray(m, np.float32), s, order=1, mode="nearest") >= 0.5 for m in ms]
    hu = (stack + 500.0) * rng.uniform(0.85, 1.15) - 500.0 + rng.uniform(-60.0, 60.0)
    if rng.random() < 0.4:
        hu = np.minimum(hu, rng.uniform(0.0, 300.0))
    r = rng.random()
    if r < 0.25:
        hu = ndimage.gaussian_filter(hu, (0, rng.uniform(0.4, 1.0), rng.uniform(0.4, 1.0)))
    elif r < 0.45:
        blur = ndimage.gaussian_filter(hu, (0, 1.0, 1.0))
        hu = hu + rng.uniform(0.3, 1.0) * (hu - blur)
    hu = hu + rng.normal(0.0, rng.uniform(0.0, 40.0), hu.shape)
    return np.asarray(hu, np.float32), ms


def augment_phantom(rng: np.random.Generator, hu: F32) -> F32:
    """Mild intensity augmentation of phantom HU (their HU are exact; scanners differ a little)."""
    hu = hu * rng.uniform(0.95, 1.05) + rng.uniform(-25.0, 25.0)
    return (hu + rng.normal(0.0, rng.uniform(0.0, 15.0), hu.shape)).astype(np.float32)


# --------------------------------------------------------------------------------------- data pools
@dataclass
class RealPools:
    """Real data for training: the training volumes of the pseudo-labelled slices, the doctor-labelled
    training split and the lung slices of the real no-pneumonia volumes (empty masks)."""

    pseudo: list[data.RealSlice]
    doctor: list[data.RealSlice]
    negative: list[data.RealSlice] = field(default_factory=list)

    @staticmethod
    def load(root: Path | None, progress: bool, negatives: bool = False) -> RealPools:
        if root is None:
            return RealPools([], [])
        root = Path(root)
        if progress:
            print(f"reading real slices from {root}", file=sys.stderr)
        neg = data.load_negative_slices(root.parent) if negatives else []
        return RealPools(
            data.load_pseudo_slices(root, validation=False),
            data.load_doctor_slices(root, validation=False),
            neg,
        )

    def __bool__(self) -> bool:
        return bool(self.pseudo or self.doctor)

    def pick(
        self,
        rng: np.random.Generator,
        doctor_share: float,
        need_cons_label: bool = False,
        negative_share: float = 0.0,
    ) -> tuple[list[data.RealSlice], int]:
        """A pool and an index into it; with ``need_cons_label`` a doctor slice, with and without
        consolidation equally often."""
        if need_cons_label:
            groups = [
                [
                    i
                    for i, s in enumerate(self.doctor)
                    if s.consolidation is not None and bool(s.consolidation.any()) == z
                ]
                for z in (False, True)
            ]
            groups = [g for g in groups if g]
            group = groups[int(rng.integers(len(groups)))]
            return self.doctor, group[int(rng.integers(len(group)))]
        if self.negative and rng.random() < negative_share:
            return self.negative, int(rng.integers(len(self.negative)))
        if self.doctor and (not self.pseudo or rng.random() < doctor_share):
            return self.doctor, int(rng.integers(len(self.doctor)))
        return self.pseudo, int(rng.integers(len(self.pseudo)))


def _lesion_centre(rng: np.random.Generator, mask: B) -> tuple[int, int] | None:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])


# ------------------------------------------------------------------------------------ multitask step
def jitter_box(
    rng: np.random.Generator, arrays: Sequence[npt.NDArray[Any]], pads: Sequence[float], jitter: int
) -> list[npt.NDArray[Any]]:
    """Grow or shrink each in-plane side of already lung-cropped arrays by up to ``jitter`` pixels
    (padding with ``pads``): the classical lungs at inference give a box that differs from the
    reference lungs' box by a few pixels."""
    edges = rng.integers(-jitter, jitter + 1, size=4)
    out = []
    for a, pad in zip(arrays, pads, strict=True):
        widths = [(0, 0)] * (a.ndim - 2) + [(jitter, jitter), (jitter, jitter)]
        big = np.pad(a, widths, mode="constant", constant_values=pad)
        h, w = big.shape[-2:]
        y0, y1 = jitter - edges[0], h - jitter + edges[1]
        x0, x1 = jitter - edges[2], w - jitter + edges[3]
        out.append(np.ascontiguousarray(big[..., y0:y1, x0:x1]))
    return out


def multitask_batch(
    rng: np.random.Generator, cases: Sequence[data.VolumeCase], recipe: Recipe
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``phantom_batch`` stacks of ``crop_slices`` consecutive slices, each with the case's whole
    lung box in-plane (jittered): normalised intensities (1, Z, H, W), lesion masks and the
    classification target (COVID-19 study and lesion voxels in the stack).

    Whole lung boxes, because the pyramid pooling's bins are relative to the input's extent: a
    network trained on partial in-plane crops sees differently sized bins at inference.
    """
    covid = [c for c in cases if c.label == "covid"]
    other = [c for c in cases if c.label != "covid"]
    out = []
    for _ in range(recipe.phantom_batch):
        pool = covid if (covid and (not other or rng.random() < 0.5)) else other
        case = pool[int(rng.integers(len(pool)))]
        nz = case.hu.shape[0]
        zl = recipe.crop_slices
        z0 = int(rng.integers(0, max(0, nz - zl) + 1))
        hu = case.hu[z0 : z0 + zl].astype(np.float32)
        les = case.lesions[z0 : z0 + zl]
        if hu.shape[0] < zl:  # short stacks: repeat the last slice
            extra = zl - hu.shape[0]
            hu = np.concatenate([hu, np.repeat(hu[-1:], extra, 0)])
            les = np.concatenate([les, np.repeat(les[-1:], extra, 0)])
        hu, les = jitter_box(rng, [hu, les], [PAD_HU, 0], recipe.box_jitter)
        if not recipe.whole_box:
            hu, les = random_crop(rng, [hu, les], recipe.crop_hw, [PAD_HU, 0])
        if rng.random() < 0.5:
            hu, les = hu[..., ::-1], les[..., ::-1]
        hu = augment_phantom(rng, hu)
        target = 1.0 if case.label == "covid" and np.count_nonzero(les) >= 10 else 0.0
        out.append(
            (
                mt.normalise_hu(torch.from_numpy(np.ascontiguousarray(hu)))[None],
                torch.from_numpy(np.ascontiguousarray(les, np.float32))[None],
                torch.tensor([target]),
            )
        )
    return out


def real_batch_2d(
    rng: np.random.Generator,
    pools: RealPools,
    n: int,
    hw: tuple[int, int],
    doctor_share: float,
    negative_share: float = 0.0,
    augment: str = "v1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented real slices (N, 1, H, W) normalised for the multitask model, and their lesion masks."""
    xs, ys = [], []
    aug = augment_real_v2 if augment == "v2" else augment_real
    for _ in range(n):
        pool, i = pools.pick(rng, doctor_share, negative_share=negative_share)
        s = pool[i]
        hu, (les,) = aug(rng, s.hu[None].astype(np.float32), [s.lesion])
        centre = _lesion_centre(rng, les) if rng.random() < 0.7 else None
        hu, les = random_crop(rng, [hu, les], hw, [PAD_HU, 0], centre)
        xs.append(hu)
        ys.append(les)
    x = mt.normalise_hu(torch.from_numpy(np.stack(xs)))  # (N, 1, H, W)
    return x, torch.from_numpy(np.stack(ys).astype(np.float32))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − smooth Dice (σ = 1) per image/crop, averaged."""
    return 1.0 + wu.smooth_dice_loss(torch.sigmoid(logits), target)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Seed 004's BCE, plus ``dice_weight`` × soft Dice: with a few hundred CPU steps instead of the
    paper's 60k batches, BCE alone leaves the minority lesion class below 0.5 (measured: no voxel above
    0.5 after 160 steps; with Dice added, Dice 0.70 on a fixed phantom batch after 60 steps)."""
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if recipe.dice_weight:
        loss = loss + recipe.dice_weight * soft_dice_loss(logits, target)
    return loss


def multitask_step(
    net: mt.MultitaskNet,
    rng: np.random.Generator,
    cases: Sequence[data.VolumeCase],
    pools: RealPools,
    recipe: Recipe,
    device: torch.device,
) -> dict[str, float]:
    seg = torch.zeros((), device=device)
    cls = torch.zeros((), device=device)
    batch = multitask_batch(rng, cases, recipe) if cases and recipe.phantom_batch else []
    for x, y, c in batch:  # one stack at a time: the whole-lung boxes differ in size
        out = net(x.to(device))
        seg = seg + seg_loss(out.lesion_logits, y.to(device), recipe) / len(batch)
        cls = cls + F.binary_cross_entropy_with_logits(out.covid_logit, c.to(device)) / len(batch)
    loss = seg + recipe.cls_weight * cls
    parts = {"seg": seg.item(), "cls": cls.item()} if batch else {}
    if pools and recipe.real_batch:
        xr, yr = real_batch_2d(
            rng,
            pools,
            recipe.real_batch,
            recipe.crop_hw,
            recipe.doctor_share,
            recipe.negative_share,
            recipe.augment,
        )
        xr, yr = xr.to(device), yr.to(device)
        seg_r = seg_loss(net.segment(net.slice_features(xr)), yr, recipe)
        loss = loss + seg_r
        parts["seg_real"] = seg_r.item()
    loss.backward()
    parts["loss"] = loss.item()
    return parts


# --------------------------------------------------------------------------------------- Wu (seed 001)
@dataclass(frozen=True)
class SlabCase:
    """A phantom on Wu's grid: ≈ 2 mm in-plane, slabs of ≥ 4 mm (5 mm when the slices were thinner)."""

    case: data.VolumeCase
    hu: F32
    lesions: B
    consolidation: B
    lesion_slices: npt.NDArray[np.intp]

    @staticmethod
    def of(case: data.VolumeCase) -> SlabCase:
        dz = case.spacing[0]
        if dz < 4.0:
            hu = preprocess.resample_z(case.hu.astype(np.float32), dz, wu.TARGET_SLICE_MM)
            les = preprocess.resample_z(case.lesions.astype(np.float32), dz, wu.TARGET_SLICE_MM) >= 0.5
            cons = preprocess.resample_z(case.consolidation.astype(np.float32), dz, wu.TARGET_SLICE_MM) >= 0.5
        else:
            hu, les, cons = case.hu.astype(np.float32), case.lesions, case.consolidation
        return SlabCase(case, hu, les, cons, np.nonzero(les.any(axis=(1, 2)))[0])


def wu_phantom_sample(
    rng: np.random.Generator, slabs: Sequence[SlabCase], recipe: Recipe, *, infected_only: bool
) -> tuple[F32, B, B, float]:
    """One 2.5D phantom sample: (7, H, W) HU, lesion and consolidation masks, z = has consolidation.

    UNet-1 samples: a case with lesions with probability ``lesion_slice_p``, else any case.  EM samples
    (``infected_only``): infected cases, z = 0 and z = 1 equally often (Wu et al. trained the EM stage
    on 15 GGO-only and 4 consolidation patients; the phantoms have few GGO-only cases).
    """
    infected = [s for s in slabs if len(s.lesion_slices)]
    if infected_only:
        groups = [
            [s for s in infected if not s.consolidation.any()],
            [s for s in infected if s.consolidation.any()],
        ]
        groups = [g for g in groups if g]
        pool = groups[int(rng.integers(len(groups)))]
    else:
        pool = infected if infected and rng.random() < recipe.lesion_slice_p else list(slabs)
    s = pool[int(rng.integers(len(pool)))]
    nz = s.hu.shape[0]
    if len(s.lesion_slices) and rng.random() < recipe.lesion_slice_p:
        z = int(s.lesion_slices[int(rng.integers(len(s.lesion_slices)))])
    else:
        z = int(rng.integers(nz))
    idx = (
        np.full(wu.CONTEXT_SLICES, z)
        if rng.random() < recipe.flat_stack_p
        else np.clip(np.arange(z - wu.CONTEXT_SLICES // 2, z + wu.CONTEXT_SLICES // 2 + 1), 0, nz - 1)
    )
    stack = s.hu[idx]
    les, cons = s.lesions[z], s.consolidation[z]
    centre = _lesion_centre(rng, les) if rng.random() < 0.5 else None
    stack, les, cons = random_crop(rng, [stack, les, cons], recipe.crop_hw, [PAD_HU, 0, 0], centre)
    if rng.random() < 0.5:
        stack, les, cons = stack[..., ::-1], les[..., ::-1], cons[..., ::-1]
    z_label = 1.0 if s.consolidation.any() else 0.0
    return augment_phantom(rng, stack), les, cons, z_label


def wu_real_sample(
    rng: np.random.Generator, pools: RealPools, recipe: Recipe, *, need_cons_label: bool
) -> tuple[F32, B, B, float]:
    """One 2.5D real sample: pseudo-labelled slices with their neighbours, doctor slices repeated 7×."""
    pool, i = pools.pick(
        rng,
        recipe.doctor_share,
        need_cons_label,
        negative_share=0.0 if need_cons_label else recipe.negative_share,
    )
    s = pool[i]
    if s.case.startswith("doctor-") or rng.random() < recipe.real_flat_stack_p:
        stack = np.repeat(s.hu[None].astype(np.float32), wu.CONTEXT_SLICES, 0)
    else:
        stride = int(rng.integers(1, recipe.neighbour_stride_max + 1)) if recipe.neighbour_stride_max > 1 else 1
        stack = data.neighbour_stack(pool, i, wu.CONTEXT_SLICES, stride).astype(np.float32)
    cons = s.consolidation if s.consolidation is not None else np.zeros_like(s.lesion)
    aug = augment_real_v2 if recipe.augment == "v2" else augment_real
    stack, (les, cons) = aug(rng, stack, [s.lesion, cons])
    centre = _lesion_centre(rng, les) if rng.random() < 0.7 else None
    stack, les, cons = random_crop(rng, [stack, les, cons], recipe.crop_hw, [PAD_HU, 0, 0], centre)
    return stack, les, cons, (1.0 if s.consolidation is not None and s.consolidation.any() else 0.0)


def _stack_wu(
    samples: Iterable[tuple[F32, B, B, float]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ls, cs, zs = zip(*samples, strict=True)
    x = wu.normalise_hu(torch.from_numpy(np.stack(xs)))
    return (
        x,
        torch.from_numpy(np.stack(ls).astype(np.float32)),
        torch.from_numpy(np.stack(cs).astype(np.float32)),
        torch.tensor(zs, dtype=torch.float32),
    )


def _wu_batch(
    rng: np.random.Generator, slabs: Sequence[SlabCase], pools: RealPools, recipe: Recipe, *, em: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch of one Wu stage: phantom samples, then real ones (:func:`_stack_wu`).

    UNet-1 (``em`` False): ``phantom_batch`` phantoms of any case and ``real_batch`` real slices when there
    are any.  EM step (``em`` True): ``em_phantom_batch`` infected phantoms and ``em_real_batch``
    doctor-labelled slices (they carry a consolidation label) when there are any.
    """
    if em:
        phantoms, reals, has_real = recipe.em_phantom_batch, recipe.em_real_batch, bool(pools.doctor)
    else:
        phantoms, reals, has_real = recipe.phantom_batch, recipe.real_batch, bool(pools)
    samples = [wu_phantom_sample(rng, slabs, recipe, infected_only=em) for _ in range(phantoms)]
    if has_real:
        samples += [wu_real_sample(rng, pools, recipe, need_cons_label=em) for _ in range(reals)]
    return _stack_wu(samples)


def wu_unet1_step(
    net: wu.ConsolidationEM,
    rng: np.random.Generator,
    slabs: Sequence[SlabCase],
    pools: RealPools,
    recipe: Recipe,
    device: torch.device,
) -> dict[str, float]:
    x, les, _, _ = _wu_batch(rng, slabs, pools, recipe, em=False)
    x, les = x.to(device), les.to(device)
    logits = net.unet1(x)[:, 0]
    loss = wu.smooth_dice_loss(torch.sigmoid(logits), les)
    if recipe.unet1_bce_weight:
        loss = loss + recipe.unet1_bce_weight * F.binary_cross_entropy_with_logits(logits, les)
    loss.backward()
    return {"loss": loss.item()}


def wu_em_step(
    net: wu.ConsolidationEM,
    rng: np.random.Generator,
    slabs: Sequence[SlabCase],
    pools: RealPools,
    recipe: Recipe,
    device: torch.device,
) -> dict[str, float]:
    """Algorithm 1 of Wu et al.: E-step with φ2 inside UNet-1's infected mask, M-step smooth Dice."""
    x, _, _, z = _wu_batch(rng, slabs, pools, recipe, em=True)
    x, z = x.to(device), z.to(device)
    with torch.no_grad():
        m = (torch.sigmoid(net.unet1(x))[:, 0] > 0.5).float()
    f = torch.sigmoid(net.unet2(x))[:, 0]
    centre = x[:, wu.CONTEXT_SLICES // 2]
    y = wu.e_step(f.detach(), centre, z[:, None, None], m)
    loss = wu.smooth_dice_loss(m * f, y)
    loss.backward()
    return {"loss": loss.item(), "y_frac": y.mean().item()}


# ----------------------------------------------------------------------------------------- the loop
def _lr_at(name: str, recipe: Recipe, step: int, total: int, phase: str) -> float:
    if phase == "em":
        return recipe.em_lr
    if name == "consolidation-em":  # Wu: step decay (1e-2 / 1e-3 / 1e-4 over epochs 1-50 / 50-100 / 100-200)
        frac = step / max(1, total)
        return recipe.lr * (1.0 if frac < 0.5 else 0.3 if frac < 0.75 else 0.1)
    warm = recipe.warmup
    if step < warm:
        return recipe.lr * (step + 1) / warm
    return 1e-5 + (recipe.lr - 1e-5) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _phase_of(name: str, epoch: int, epochs: int, recipe: Recipe) -> str:
    if name != "consolidation-em":
        return "main"
    em_epochs = max(1, round(epochs * recipe.em_fraction)) if epochs > 1 else 0
    return "em" if epoch >= epochs - em_epochs else "unet1"


def new_module(model_name: str, recipe: Recipe | None = None) -> nn.Module:
    if model_name == "multitask":
        widths = recipe.widths if recipe is not None and recipe.widths else None
        return mt.MultitaskNet() if widths is None else mt.MultitaskNet(widths=widths)
    if model_name == "consolidation-em":
        widths = recipe.widths if recipe is not None and recipe.widths else wu.DEFAULT_WIDTHS
        return wu.ConsolidationEM(widths=widths)
    raise TrainingError(f"unknown model {model_name!r}; one of {', '.join(MODEL_NAMES)}")


def architecture_of(model_name: str, recipe: Recipe | None = None) -> dict[str, Any]:
    """The manifest's ``architecture`` section (name → :data:`triaged.nets.weights.ARCHITECTURES`)."""
    if model_name == "multitask":
        widths = recipe.widths if recipe is not None and recipe.widths else mt.DEFAULT_WIDTHS
        return {
            "name": "MultitaskNet",
            "kwargs": {"widths": list(widths), "fc_units": 128, "levels": list(mt.PYRAMID_LEVELS)},
        }
    widths = recipe.widths if recipe is not None and recipe.widths else wu.DEFAULT_WIDTHS
    return {"name": "ConsolidationEM", "kwargs": {"widths": list(widths)}}


def train(
    model_name: str,
    data_dir: Path | str | None,
    out_dir: Path | str,
    *,
    epochs: int,
    seed: int = 0,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    real_slices: Path | str | None = None,
    test_data: Path | str | None = None,
    recipe: Recipe | None = None,
    command: str | None = None,
    data_note: str | None = None,
    evaluate: bool = True,
    until_epoch: int | None = None,
    init_from: Path | str | None = None,
    real_volumes: Path | str | None = None,
) -> Path:
    """Train ``model_name`` and write ``<out_dir>/model.pt`` and its ``manifest.yaml``; return ``out_dir``.

    Parameters
    ----------
    model_name : {'multitask', 'consolidation-em'}
    data_dir : Path or None
        Labelled phantom dataset (``labels.csv`` + NIfTI, :mod:`triaged.lab.datasets`); None trains on real
        data only (a recipe with ``phantom_batch`` 0).
    out_dir : Path
        Model folder to write (checkpoint, weights, manifest, prepared-data cache).
    epochs : int
        Total epochs (``Recipe.steps_per_epoch`` steps each); with ``resume`` the run continues from
        the checkpoint's epoch up to this number.
    seed : int
        Seeds every random choice (samples, augmentation, initialisation, dropout).
    resume : bool
        Continue from ``<out_dir>/checkpoint.pt`` when it exists.
    device : str or None
        ``cpu``, ``cuda``…; None = CUDA when present, else CPU.
    progress : bool
        tqdm progress bars on stderr.
    real_slices : Path or None
        The ``medseg-covid-slices`` folder; None trains on phantoms only.
    test_data : Path or None
        A labelled phantom dataset with seeds disjoint from ``data_dir`` for the card's metrics.
    recipe : Recipe or None
        Override :data:`RECIPES` (tests use tiny ones).
    command, data_note : str or None
        Recorded verbatim in the model card.
    evaluate : bool
        Compute the card's metrics (phantom test set, real validation slices, smoke set); tests skip it.
    until_epoch : int or None
        Stop after this epoch with only the checkpoint written (continue later with ``resume``); the
        schedule still follows ``epochs``.
    init_from : Path or None
        A model folder (``models/<name>``) of the same model and architecture whose weights, verified
        against its card's sha256, start this run instead of a random initialisation (a continuation:
        the whole schedule, warm-up included, runs again).  The card records the folder's name, version,
        sha256 and training command (and where those weights started, in turn) under
        ``training.initialised_from``.  Ignored when ``resume`` finds a checkpoint
        (the checkpoint already holds the continued weights).
    real_volumes : Path or None
        A volume manifest (``eval/real-volumes.csv``): the card's ``metrics.real_volumes_pipeline`` then
        holds the whole pipeline with the new weights on those real series (:func:`evaluate_real_volumes`),
        and a COVID-19 case graded CT0 or a no-pneumonia case graded CT1 or above is printed on stderr.
    """
    if model_name not in MODEL_NAMES:
        raise TrainingError(f"unknown model {model_name!r}; one of {', '.join(MODEL_NAMES)}")
    if epochs < 1:
        raise TrainingError("epochs must be ≥ 1")
    if real_volumes is not None:  # a bad manifest or data root fails now (file and line), not after the run
        from triaged.lab.realsets import default_data_root, read_manifest

        read_manifest(Path(real_volumes), default_data_root())
    recipe = recipe or RECIPES[model_name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.perf_counter()

    cases: list[data.VolumeCase] = []
    if data_dir is not None:
        cases = data.read_phantom_dataset(Path(data_dir), cache_dir=out / "cache", progress=progress)
        if not cases:
            raise TrainingError(f"{data_dir}: no cases")
    elif recipe.phantom_batch or (model_name == "consolidation-em" and recipe.em_phantom_batch):
        raise TrainingError(f"{model_name}: this recipe needs a phantom dataset (--data)")
    pools = RealPools.load(
        Path(real_slices) if real_slices else None, progress, negatives=recipe.negative_share > 0
    )
    if not cases and not pools:
        raise TrainingError("no training data: give a phantom dataset and/or the real slices")
    slabs = [SlabCase.of(c) for c in cases] if model_name == "consolidation-em" else []

    torch.manual_seed(seed)
    net = new_module(model_name, recipe).to(dev)
    state: dict[str, Any] = {"epoch": 0, "history": [], "elapsed_s": 0.0, "phase": None, "optimizer": None}
    ckpt = out / CHECKPOINT_FILE
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("model_name") != model_name or state.get("seed") != seed:
            raise TrainingError(
                f"{ckpt} belongs to {state.get('model_name')} seed {state.get('seed')}, "
                f"not {model_name} seed {seed}"
            )
        net.load_state_dict(state["model"])
    origin: dict[str, Any] | None = None
    if init_from is not None:
        start_weights, origin = _initial_weights(model_name, net, init_from)
        if not (resume and ckpt.is_file()):  # a checkpoint already holds the continued weights
            net.load_state_dict(start_weights)
    optimizer: torch.optim.Optimizer | None = None
    phase_of_opt: str | None = None
    total_steps = epochs * recipe.steps_per_epoch
    for epoch in range(int(state["epoch"]), epochs):
        phase = _phase_of(model_name, epoch, epochs, recipe)
        if optimizer is None or phase_of_opt != phase:
            if phase == "em" and phase_of_opt != "em" and state.get("phase") != "em":
                # Algorithm 1, INITIALIZATION: Θ ← Θ1 — UNet-2 starts as a copy of UNet-1
                assert isinstance(net, wu.ConsolidationEM)
                net.init_unet2_from_unet1()
            params = _trainable(net, phase)
            optimizer = torch.optim.Adam(params, lr=recipe.em_lr if phase == "em" else recipe.lr)
            if state.get("optimizer") is not None and state.get("phase") == phase:
                optimizer.load_state_dict(state["optimizer"])
            phase_of_opt = phase
        rng = seed_everything(seed, epoch)
        net.train()
        if phase == "em":
            assert isinstance(net, wu.ConsolidationEM)
            net.unet1.eval()
        sums: dict[str, float] = {}
        steps: Iterable[int] = range(recipe.steps_per_epoch)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                steps, desc=f"{model_name} {phase} epoch {epoch + 1}/{epochs}", unit="step", file=sys.stderr
            )
            steps = bar
        for k in steps:
            step = epoch * recipe.steps_per_epoch + k
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(model_name, recipe, step, total_steps, phase)
            optimizer.zero_grad(set_to_none=True)
            if model_name == "multitask":
                assert isinstance(net, mt.MultitaskNet)
                parts = multitask_step(net, rng, cases, pools, recipe, dev)
            elif phase == "unet1":
                assert isinstance(net, wu.ConsolidationEM)
                parts = wu_unet1_step(net, rng, slabs, pools, recipe, dev)
            else:
                assert isinstance(net, wu.ConsolidationEM)
                parts = wu_em_step(net, rng, slabs, pools, recipe, dev)
            torch.nn.utils.clip_grad_norm_(
                [q for g in optimizer.param_groups for q in g["params"]], recipe.clip_norm
            )
            optimizer.step()
            for key, v in parts.items():
                sums[key] = sums.get(key, 0.0) + v
            if bar is not None:
                bar.set_postfix(loss=f"{parts['loss']:.4f}")
        if bar is not None:
            bar.close()
        mean = {key: v / recipe.steps_per_epoch for key, v in sums.items()}
        state = {
            "model_name": model_name,
            "seed": seed,
            "epoch": epoch + 1,
            "phase": phase,
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "history": [*state["history"], {"epoch": epoch + 1, "phase": phase, **mean}],
            "elapsed_s": float(state.get("elapsed_s", 0.0)) + (time.perf_counter() - t_start),
        }
        t_start = time.perf_counter()
        _atomic_torch_save(state, ckpt)
        if until_epoch is not None and epoch + 1 >= until_epoch and epoch + 1 < epochs:
            return out
    if isinstance(net, wu.ConsolidationEM) and not any(h.get("phase") == "em" for h in state["history"]):
        net.init_unet2_from_unet1()  # a run too short for an EM epoch: UNet-2 = UNet-1 (Algorithm 1's start)
    net.eval()
    weights = out / WEIGHTS_FILE
    _atomic_torch_save(compact_state(net.state_dict()), weights)
    info = {
        "model_name": model_name,
        "seed": seed,
        "epochs": epochs,
        "recipe": asdict(recipe),
        "device": str(dev),
        "history": state["history"],
        "wall_time_s": round(float(state["elapsed_s"]) + time.perf_counter() - t_start, 1),
        "data_dir": None if data_dir is None else str(data_dir),
        "real_slices": str(real_slices) if real_slices else None,
        "phantom_cases": _case_summary(cases),
        "command": command,
        "data_note": data_note,
        "labels_sha256": None if data_dir is None else sha256_of(Path(data_dir) / "labels.csv"),
        "real_counts": {
            "pseudo_label_slices": len(pools.pseudo),
            "pseudo_label_volumes": len({s.case for s in pools.pseudo}),
            "doctor_label_slices": len(pools.doctor),
            "negative_slices": len(pools.negative),
        },
        "negative_volumes": sorted({s.case for s in pools.negative}),
        "initialised_from": origin,
    }
    write_manifest(out, model_name, net, info, metrics={})
    if evaluate:
        metrics = card_metrics(
            out,
            test_data=Path(test_data) if test_data else None,
            real_slices=Path(real_slices) if real_slices else None,
            progress=progress,
            real_volumes=Path(real_volumes) if real_volumes else None,
            model_name=model_name,
        )
        write_manifest(out, model_name, net, info, metrics=metrics)
        for line in metrics.get("real_volumes_pipeline", {}).get("warnings", []):
            print(f"real volumes: {line}", file=sys.stderr)
    return out


def _initial_weights(
    model_name: str, net: nn.Module, folder: Path | str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The verified weights of the model folder ``folder`` for ``net``, and what its card says of their
    origin (name, version, sha256, epochs, steps, training command, and its own
    ``initialised_from`` when those weights were a continuation too); :class:`TrainingError` naming the
    folder when they are of another model or another architecture."""
    loaded = load_model(Path(folder))
    if loaded.name != model_name:
        raise TrainingError(f"{folder}: --init-from holds {loaded.name!r} weights, not {model_name!r}")
    state = loaded.module.state_dict()
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if theirs != ours:
        diff = sorted(set(theirs.items()) ^ set(ours.items()))[:3]
        raise TrainingError(
            f"{folder}: --init-from weights do not fit this recipe's architecture (first differences: {diff})"
        )
    training = loaded.manifest.get("training") or {}
    recipe = training.get("recipe") or {}
    epochs = training.get("epochs")
    steps = recipe.get("steps_per_epoch")
    return state, {
        "model": loaded.name,
        "version": loaded.version,
        "sha256": loaded.sha256,
        "epochs": epochs,
        "steps": epochs * steps if isinstance(epochs, int) and isinstance(steps, int) else None,
        "command": training.get("command"),
        # a chain of continuations stays on the card: where those weights started in turn
        **({"initialised_from": training["initialised_from"]} if training.get("initialised_from") else {}),
    }


def _trainable(net: nn.Module, phase: str) -> list[nn.Parameter]:
    if phase == "unet1":
        assert isinstance(net, wu.ConsolidationEM)
        return list(net.unet1.parameters())
    if phase == "em":
        assert isinstance(net, wu.ConsolidationEM)
        return list(net.unet2.parameters())
    return list(net.parameters())


def _case_summary(cases: Sequence[data.VolumeCase]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in cases:
        out[c.label] = out.get(c.label, 0) + 1
    return out


# ----------------------------------------------------------------------------------------- evaluation
def _predict_slice(loaded: Any, s: data.RealSlice) -> tuple[B, B | None]:
    """Lesion (and for ``consolidation-em`` consolidation) mask of one real slice, seen alone."""
    net = loaded.module
    hu = torch.from_numpy(s.hu.astype(np.float32))
    if isinstance(net, mt.MultitaskNet):
        x = mt.normalise_hu(hu)[None, None]
        prob = torch.sigmoid(net.segment(net.slice_features(x)))[0].numpy()
        return prob >= loaded.thresholds.get("lesion", 0.5), None
    assert isinstance(net, wu.ConsolidationEM)
    x = wu.normalise_hu(hu)[None].repeat(wu.CONTEXT_SLICES, 1, 1)[None]
    p = torch.sigmoid(net(x))[0].numpy()
    les = p[0] > loaded.thresholds.get("infection", 0.5)
    return les, les & (p[1] > loaded.thresholds.get("consolidation", 0.5))


def score_real_slices(loaded: Any, slices: Sequence[data.RealSlice]) -> dict[str, Any]:
    """Lesion scores of a model on real slices, as the MedSeg literature reports them.

    ``lesion_dice_mean`` (mean per image; an image without lesion scores 1 when nothing is predicted),
    ``lesion_dice_global`` (pixels pooled), ``sensitivity_mean`` (mean recall over images with lesions),
    ``specificity_mean`` (mean per image of TN / (TN + FP)), ``false_positive_slices`` (images without
    lesion where something is predicted) and, for ``consolidation-em``, consolidation Dice.
    """
    per_les: list[float] = []
    sens: list[float] = []
    spec: list[float] = []
    per_cons: list[float] = []
    tp = fp_fn = ctp = cfp_fn = 0
    fp_slices = empty = 0
    with torch.inference_mode():
        for s in slices:
            les, cons = _predict_slice(loaded, s)
            per_les.append(dice(les, s.lesion))
            tp += int(np.count_nonzero(les & s.lesion))
            fp_fn += int(np.count_nonzero(les) + np.count_nonzero(s.lesion))
            neg = ~s.lesion
            n_neg = int(np.count_nonzero(neg))
            spec.append(float(np.count_nonzero(~les & neg)) / max(1, n_neg))
            if s.lesion.any():
                sens.append(float(np.count_nonzero(les & s.lesion) / np.count_nonzero(s.lesion)))
            else:
                empty += 1
                fp_slices += int(les.any())
            if cons is not None and s.consolidation is not None:
                if s.consolidation.any():
                    per_cons.append(dice(cons, s.consolidation))
                ctp += int(np.count_nonzero(cons & s.consolidation))
                cfp_fn += int(np.count_nonzero(cons) + np.count_nonzero(s.consolidation))
    out: dict[str, Any] = {
        "n_slices": len(slices),
        "lesion_dice_mean": round(float(np.mean(per_les)), 4) if per_les else None,
        "lesion_dice_global": round(2.0 * tp / max(1, fp_fn), 4),
        "sensitivity_mean": round(float(np.mean(sens)), 4) if sens else None,
        "specificity_mean": round(float(np.mean(spec)), 4) if spec else None,
        "slices_without_lesion": empty,
        "false_positive_slices": fp_slices,
    }
    if isinstance(loaded.module, wu.ConsolidationEM):
        out["consolidation_dice_global"] = round(2.0 * ctp / max(1, cfp_fn), 4)
        out["consolidation_dice_mean"] = round(float(np.mean(per_cons)), 4) if per_cons else None
        out["consolidation_slices"] = len(per_cons)
    return out


def evaluate_real_slices(model_dir: Path | str, real_slices: Path | str | None = None) -> dict[str, Any]:
    """Lesion scores on the held-out doctor-labelled slices (:data:`triaged.lab.data.DOCTOR_VALIDATION`).

    The 8-bit JPGs are mapped to HU under their estimated display windows (:mod:`triaged.lab.data`);
    the model sees each slice alone (the 2.5D ``consolidation-em`` model gets the slice repeated 7×).
    No lung mask is applied.  For ``consolidation-em`` the consolidation Dice against the multiclass
    labels (class 2) is reported too.

    Returns
    -------
    dict
        ``split``, ``n_slices`` and the scores of :func:`score_real_slices`.
    """
    loaded = load_model(model_dir)
    root = data.default_real_slices(Path(real_slices) if real_slices else None)
    slices = data.load_doctor_slices(root, validation=True)
    return {
        "split": "doctor-label validation (file stems " + " ".join(data.DOCTOR_VALIDATION) + ")",
        **score_real_slices(loaded, slices),
    }


def evaluate_real_fit(model_dir: Path | str, real_slices: Path | str | None = None) -> dict[str, Any]:
    """Held-out pseudo-labelled volumes (:data:`~triaged.lab.data.PSEUDO_VALIDATION`) and, to check that
    the network fits its training data, the same scores on the doctor training split and on every 4th
    slice of the pseudo-labelled training volumes."""
    loaded = load_model(model_dir)
    root = data.default_real_slices(Path(real_slices) if real_slices else None)
    pseudo_val = data.load_pseudo_slices(root, validation=True)
    pseudo_train = data.load_pseudo_slices(root, validation=False)[::4]
    doctor_train = data.load_doctor_slices(root, validation=False)
    return {
        "pseudo_label_validation_volumes": {
            "volumes": list(data.PSEUDO_VALIDATION),
            **score_real_slices(loaded, pseudo_val),
        },
        "training_fit": {
            "doctor_label_training_split": score_real_slices(loaded, doctor_train),
            "pseudo_label_training_volumes_every_4th_slice": score_real_slices(loaded, pseudo_train),
        },
    }


def evaluate_cases(
    model_dir: Path | str, cases: Iterable[data.FullCase], progress: bool = False
) -> dict[str, Any]:
    """Run a model's pipeline on full-resolution labelled phantoms and score it with seed 004's protocol.

    Scores come from :mod:`triaged.lab.metrics` (the same functions as the ``triaged eval`` table):
    the identification score is P(COVID-19) for ``multitask`` and the predicted affected % of the worse
    lung for ``consolidation-em`` (seed 004, Section 5.1, for segmentation-only methods).

    Returns
    -------
    dict
        ``auc_covid_vs_healthy``, ``auc_covid_vs_all``, ``spearman_covid`` (predicted vs reference
        affected % of the worse lung, COVID-19 cases), ``lesion_dice_covid`` (mean over COVID-19 cases,
        seed 004's Dice), ``lesion_dice_global`` (voxels pooled over every case with lesions, bacterial
        pneumonia included), ``consolidation_dice`` (mean over cases with reference consolidation),
        ``lung_dice``, ``severity_mae_pp``, ``seconds_per_case`` and ``per_case`` rows.
    """
    from triaged.domain import Volume
    from triaged.lab.metrics import case_result, table2_row
    from triaged.nets.pipelines import ConsolidationEMPipeline, LearnedPipeline, MultitaskPipeline

    loaded = load_model(model_dir)
    pipe: LearnedPipeline = (
        MultitaskPipeline(loaded)
        if isinstance(loaded.module, mt.MultitaskNet)
        else ConsolidationEMPipeline(loaded)
    )
    rows: list[dict[str, Any]] = []
    results = []
    tp = tot = 0
    seconds = 0.0
    iterator: Iterable[data.FullCase] = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(list(cases), desc=f"evaluate {loaded.name}", unit="case", file=sys.stderr)
    for c in iterator:
        vol = Volume(
            c.hu,
            c.spacing,
            c.affine_lps,
            tuple(f"2.25.{i + 1}" for i in range(c.hu.shape[0])),
            "2.25.1",
            "2.25.2",
        )
        t0 = time.perf_counter()
        res = pipe.run(vol)
        seconds += time.perf_counter() - t0
        les, cons = res.masks.lesions, res.masks.consolidation
        truth_les = c.lesions & (c.lungs > 0)
        truth_cons = c.consolidation & (c.lungs > 0)
        if truth_les.any():
            tp += int(np.count_nonzero(les & truth_les))
            tot += int(np.count_nonzero(les) + np.count_nonzero(truth_les))
        r = case_result(
            c.case_id,
            c.label,
            res.findings,
            true_pct=c.affected_pct_max,
            lungs=res.masks.lungs,
            true_lungs=c.lungs,
            lesions=les,
            true_lesions=truth_les,
            consolidation=cons,
            true_consolidation=truth_cons,
        )
        results.append(r)
        rows.append(
            {
                "case": c.case_id,
                "label": c.label,
                "true_pct": round(c.affected_pct_max, 3),
                "pred_pct": round(res.findings.severity_pct, 3),
                "p_covid": None if res.findings.p_covid is None else round(res.findings.p_covid, 4),
                "lesion_dice": round(dice(les, truth_les), 4) if truth_les.any() else None,
                "consolidation_dice": None
                if r.consolidation_dice is None
                else round(r.consolidation_dice, 4),
                "lung_dice": None if r.lung_dice is None else round(r.lung_dice, 4),
            }
        )
    row = table2_row(loaded.name, results)

    def rnd(v: float | None) -> float | None:
        return None if v is None else round(float(v), 4)

    return {
        "n_cases": len(rows),
        "labels": {
            k: sum(1 for r in rows if r["label"] == k) for k in ("covid", "healthy", "bacterial", "other")
        },
        "score": "p_covid"
        if isinstance(loaded.module, mt.MultitaskNet)
        else "predicted affected % (worse lung)",
        "auc_covid_vs_healthy": rnd(row.auc_vs_healthy),
        "auc_covid_vs_all": rnd(row.auc_vs_all),
        "spearman_covid": rnd(row.spearman_rho),
        "lesion_dice_covid": rnd(row.lesion_dice),
        "lesion_dice_global": round(2.0 * tp / max(1, tot), 4),
        "consolidation_dice": rnd(row.consolidation_dice),
        "lung_dice": rnd(row.lung_dice),
        "severity_mae_pp": rnd(row.severity_mae),
        "seconds_per_case": round(seconds / max(1, len(rows)), 2),
        "per_case": rows,
    }


def evaluate_dataset(model_dir: Path | str, data_dir: Path | str, progress: bool = False) -> dict[str, Any]:
    """:func:`evaluate_cases` on every case of a labelled phantom dataset (read one case at a time)."""
    root = Path(data_dir)
    rows = data.read_labels(root)
    result = evaluate_cases(model_dir, (data.read_full_case(root, r) for r in rows), progress)
    result["dataset"] = str(root)
    result["labels_sha256"] = sha256_of(root / "labels.csv")
    return result


# ------------------------------------------------------------------------------ smoke set and cards
def smoke_specs() -> list[Any]:
    """The small fixed phantom set whose metrics every model card records and ``tests/test_weights.py``
    recomputes: four 160 × 160 studies of 32 slices × 5 mm, seeds never used in training."""
    from triaged.lab.phantom import PhantomSpec

    common = {"matrix": 160, "pixel_spacing": 2.25, "slice_thickness": 5.0, "slices": 32, "noise_hu": 15.0}
    return [
        PhantomSpec(kind="covid", severity=35.0, seed=910001, **common),  # type: ignore[arg-type]
        PhantomSpec(kind="healthy", seed=910002, **common),  # type: ignore[arg-type]
        PhantomSpec(kind="bacterial", severity=20.0, seed=910003, **common),  # type: ignore[arg-type]
        PhantomSpec(kind="covid", severity=65.0, seed=910004, **common),  # type: ignore[arg-type]
    ]


def smoke_cases() -> list[data.FullCase]:
    """:func:`smoke_specs` generated in memory as :class:`~triaged.lab.data.FullCase`."""
    from triaged.lab.phantom import generate

    out = []
    for spec in smoke_specs():
        p = generate(spec)
        t = p.truth
        out.append(
            data.FullCase(
                f"smoke-{spec.seed}",
                t.label,
                p.hu,
                t.lungs,
                t.lesions > 0,
                t.consolidation > 0,
                t.spacing,
                t.affine,
                t.affected_pct_max,
                t.whole_lung_pct,
            )
        )
    return out


def smoke_metrics(model_dir: Path | str, cases: Sequence[data.FullCase] | None = None) -> dict[str, Any]:
    """Per-case results on the smoke set (what the tests compare with the card)."""
    res = evaluate_cases(model_dir, cases if cases is not None else smoke_cases())
    keep = ("lesion_dice_global", "lesion_dice_covid", "consolidation_dice")
    return {**{k: res[k] for k in keep}, "per_case": res["per_case"]}


def evaluate_real_volumes(
    model_name: str, model_dir: Path | str, manifest: Path | str, root: Path | str | None = None
) -> dict[str, Any]:
    """The whole pipeline with these weights on the real series of a volume manifest (``triaged eval``'s
    reading of ``eval/real-volumes.csv``): what the network does on DICOM, not only on 8-bit slices.

    A network that gains on the JPG slices it was trained beside can lose the lesions of a real DICOM
    chest (issue 11: a retrained ``consolidation-em`` went from 0.52 to 0.64 Dice on held-out slices and
    from 4.7 % to 0.5 % on the one real COVID-19 series, CT0); the card says so at training time.

    Returns
    -------
    dict
        ``manifest`` (its file name), ``cases`` (per case: diagnosis, ``whole_pct``, ``worse_lung_pct``,
        ``ct_grade`` or ``error``), ``worst_no_pneumonia`` and ``weakest_covid`` (the case with the highest /
        lowest worse-lung %, or None) and ``warnings``: a COVID-19 or other-pneumonia case graded CT0, a
        no-pneumonia case graded CT1 or above, a failed case.
    """
    from triaged.config import SeriesSelectionConfig
    from triaged.lab.realsets import default_data_root, evaluate_volume_set, read_manifest
    from triaged.nets.pipelines import learned_class
    from triaged.volume import load_nifti, load_series_folder

    entries = read_manifest(Path(manifest), default_data_root(root))
    # the manifest names each folder on purpose: short stacks the node would refuse are read too
    rules = SeriesSelectionConfig(min_slices=1, min_coverage_mm=0.0)

    def load(folder: Path) -> tuple[Any, str]:
        volume, choice = load_series_folder(folder, rules)
        return volume, choice.reason

    pipeline = learned_class(model_name)(Path(model_dir).resolve())
    scores = evaluate_volume_set(entries, {model_name: pipeline}, load, load_mask=lambda p: load_nifti(p).hu)
    cases: dict[str, Any] = {}
    warnings: list[str] = []
    for c in scores.results[model_name]:
        if c.failed:
            cases[c.case_id] = {"diagnosis": c.diagnosis, "error": c.error}
            warnings.append(f"{c.case_id}: failed ({c.error})")
            continue
        cases[c.case_id] = {
            "diagnosis": c.diagnosis,
            "whole_pct": round(c.whole_pct, 4),
            "worse_lung_pct": round(c.severity_pct, 4),
            "ct_grade": f"CT{c.ct_grade}",
        }
        if c.diagnosis == "normal" and c.ct_grade > 0:
            warnings.append(f"{c.case_id} (no pneumonia) graded CT{c.ct_grade}, worse lung {c.severity_pct:.2f} %")
        if c.diagnosis != "normal" and c.ct_grade == 0:
            warnings.append(f"{c.case_id} ({c.diagnosis}) graded CT0, worse lung {c.severity_pct:.2f} %")

    def extreme(diagnoses: tuple[str, ...], pick: Any) -> dict[str, Any] | None:
        ok = [(k, v) for k, v in cases.items() if v["diagnosis"] in diagnoses and "error" not in v]
        if not ok:
            return None
        key, row = pick(ok, key=lambda kv: kv[1]["worse_lung_pct"])
        return {"case": key, **{f: row[f] for f in ("worse_lung_pct", "ct_grade")}}

    return {
        "manifest": Path(manifest).name,
        "cases": cases,
        "worst_no_pneumonia": extreme(("normal",), max),
        "weakest_covid": extreme(("covid",), min),
        "warnings": warnings,
    }


def card_metrics(
    model_dir: Path,
    *,
    test_data: Path | None,
    real_slices: Path | None,
    progress: bool,
    real_volumes: Path | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if test_data is not None:
        metrics["phantom_test"] = evaluate_dataset(model_dir, test_data, progress)
    if real_slices is not None:
        metrics["real_validation"] = evaluate_real_slices(model_dir, real_slices)
        metrics.update(evaluate_real_fit(model_dir, real_slices))
    if real_volumes is not None:
        if model_name is None:
            raise ValueError("real_volumes needs model_name")
        metrics["real_volumes_pipeline"] = evaluate_real_volumes(model_name, model_dir, real_volumes)
    metrics["phantom_smoke"] = smoke_metrics(model_dir)
    return metrics


_LICENCES = {
    "phantoms": "triaged synthetic phantoms (generated by triaged.lab.phantom; ours, same licence as the code)",
    "pseudo-label": (
        "COVID-19 CT Lung and Infection Segmentation Dataset, Ma J. et al. 2020, Zenodo 3757476, as "
        "prepared by the Inf-Net authors (Fan et al., IEEE TMI 2020): 1,600 slices with model-made "
        "pseudo-label infection masks. Licence CC BY-NC 4.0: these weights are for non-commercial use."
    ),
    "negatives": (
        "LIDC-IDRI (TCIA, CC BY 3.0; LIDC-IDRI-0002 and -0003 short stacks) and Lung-PET-CT-Dx (TCIA, CC BY "
        "4.0, Li P. et al. 2020): real chest CT without pneumonia, used as lesion-free slices"
    ),
    "doctor-label": (
        "MedSeg COVID-19 CT segmentation dataset (medicalsegmentation.com; Radiopaedia/SIRM sources) "
        "as split by the Inf-Net authors: the 35 doctor-labelled training slices (validation stems "
        "held out), with the multiclass (GGO/consolidation) labels of the same slices used only as "
        "image-level consolidation yes/no for the EM stage."
    ),
}


_WINDOW_TEXT: Final[str] = (
    "8-bit JPG slices carry no HU; their display window is estimated from anatomical landmarks by "
    "triaged.analysis.window (aerated lung mode = -850 HU, soft-tissue peak = +40 HU, outside air = -1000 HU): "
    "per pseudo-labelled volume (medians of the per-slice landmarks) and per doctor-labelled slice (the "
    "doctor set's median window where a slice's own estimate is implausible). Measured: Ma et al. coronacases "
    "volumes about [-1000, +1500..+2200] HU, MedSeg/Radiopaedia about [-1100, +60..+450] HU (the old fixed "
    "W1500/L-600 put coronacases soft tissue near -650 HU)."
)

#: What each model does differently from its seed paper (copied into the model card; ``{widths}`` becomes the
#: built network's narrowest-widest widths).
DEVIATIONS: Final[dict[str, list[str]]] = {
    "multitask": [
        "real data first (issue 11): the segmentation branch is trained on real 2D slices only (pseudo-labelled "
        "and doctor-labelled COVID-19 slices, lesion-free slices of real no-pneumonia volumes); no phantoms, "
        "so the classification head is untrained and P(COVID-19) is not reported (p_covid_validated_on: null)",
        "widths {widths} (reference code 8-512) and FC 128 (paper 1024); epochs x steps_per_epoch CPU steps of "
        "8 slices (112 px crops) instead of 60k batches",
        "segmentation loss BCE + soft Dice (paper: BCE only)",
        "classification head (LayerNorm of the pooled vector, leaky ReLU) kept in the architecture but not "
        "trained; the pipeline does not report its output",
        "lungs from the classical triaged.analysis.lungs, not a lung U-Net",
        "consolidation (not part of seed 004) = lesion voxels above -200 HU (seed 001's baseline)",
        "weights stored as float16",
    ],
    "consolidation-em": [
        "real data first (issue 11): UNet-1 trained on real 2D slices only (pseudo-labelled and doctor-labelled "
        "COVID-19 slices with estimated display windows, lesion-free slices of real no-pneumonia volumes); "
        "the EM stage (UNet-2) on the 35 doctor-labelled training slices, whose multiclass labels give the "
        "image-level consolidation z; no phantoms",
        "widths {widths} (paper 32-512); epochs x steps_per_epoch CPU steps of 8 crops (96 px) instead of "
        "200 + 50 epochs",
        "input not multiplied by a lung mask (the real 8-bit slices have none); outputs are cut to the lungs",
        "learning rate 3e-3, x0.3 at 50 %, x0.1 at 75 % of the UNet-1 steps (paper 1e-2/1e-3/1e-4 over 200 epochs)",
        "EM samples balanced between z = 0 and z = 1; z per slice (a doctor slice's multiclass label)",
        "real doctor-labelled slices are single slices: their 2.5D input repeats the slice 7 times",
        "lungs from the classical triaged.analysis.lungs",
        "weights stored as float16",
    ],
}


def write_manifest(
    out: Path, model_name: str, net: nn.Module, info: dict[str, Any], metrics: dict[str, Any]
) -> Path:
    """Write ``manifest.yaml``: the model card (architecture, sha256, data and licences, command, metrics)."""
    weights = out / WEIGHTS_FILE
    widths = (info.get("recipe") or {}).get("widths")
    arch = architecture_of(model_name, Recipe(1, 0.0, 0, (1, 1), 0, widths=tuple(widths)) if widths else None)
    arch["parameters"] = count_parameters(net)
    if isinstance(net, wu.ConsolidationEM):
        arch["parameters_per_unet"] = count_parameters(net.unet1)
    data_entries: list[dict[str, Any]] = []
    if info.get("data_dir"):
        data_entries.append(
            {
                "source": "phantoms",
                "path": info["data_dir"],
                "cases": info["phantom_cases"],
                "labels_sha256": info["labels_sha256"],
                "licence": _LICENCES["phantoms"],
                "generated_by": info.get("data_note"),
            }
        )
    counts = info.get("real_counts") or {}
    if info.get("real_slices"):
        data_entries.append(
            {
                "source": "pseudo-label",
                "path": info["real_slices"] + "/pseudo-label",
                "slices": counts.get("pseudo_label_slices"),
                "volumes": counts.get("pseudo_label_volumes"),
                "held_out_volumes": list(data.PSEUDO_VALIDATION),
                "licence": _LICENCES["pseudo-label"],
            }
        )
        data_entries.append(
            {
                "source": "doctor-label",
                "path": info["real_slices"] + "/doctor-label",
                "slices": counts.get("doctor_label_slices"),
                "held_out_stems": list(data.DOCTOR_VALIDATION),
                "licence": _LICENCES["doctor-label"],
            }
        )
    if info.get("negative_volumes"):
        data_entries.append(
            {
                "source": "real no-pneumonia volumes (negatives, empty lesion masks)",
                "volumes": info["negative_volumes"],
                "slices": counts.get("negative_slices"),
                "licence": _LICENCES["negatives"],
            }
        )
    built = arch["kwargs"]["widths"]
    deviations = [d.replace("{widths}", f"{built[0]}-{max(built)}") for d in DEVIATIONS[model_name]]
    bce = float((info.get("recipe") or {}).get("unet1_bce_weight") or 0.0)
    if bce and model_name == "consolidation-em":
        deviations.append(
            f"UNet-1 loss: Wu's per-image smooth Dice plus {bce:g} x pixel BCE (the smooth Dice alone, with sigma 1 "
            "on lesion-free images, left UNet-1 under-fitting its training slices)"
        )
    card = {
        "name": model_name,
        "version": VERSIONS[model_name],
        "intended_use": "Research use only - not for diagnosis. Not a medical device.",
        "licence": (
            "CC BY-NC 4.0 (trained on CC BY-NC 4.0 pseudo-label slices)"
            if info.get("real_slices")
            else "same as triaged (phantom data only)"
        ),
        "seed_paper": (
            "Goncharov et al. 2021, CT-based COVID-19 triage (seed 004)"
            if model_name == "multitask"
            else "Wu et al. 2020, hybrid weak labels, UNet-1 + EM UNet-2 with prior phi2 (seed 001)"
        ),
        "architecture": arch,
        **(
            {
                "p_covid_validated_on": None,
                "p_covid_note": (
                    "P(COVID-19) not assessed: the classification head has not been validated on real data "
                    "(there is one real COVID-19 volume and no real CAP volume here), so the pipeline reports "
                    "no P(COVID-19) and triage falls back to severity. Set this field to a description of "
                    "the real validation set (with its AUC and calibration) only when one exists."
                ),
            }
            if model_name == "multitask"
            else {}
        ),
        "split": {
            "training_never_sees": {
                "doctor_label_stems": list(data.DOCTOR_VALIDATION),
                "pseudo_label_volumes": list(data.PSEUDO_VALIDATION),
                "real_volumes": [*data.VALIDATION_VOLUMES, "lidc-idri-small/LIDC-IDRI-0001 (same patient)"],
            },
            "negatives_trained_on": list(data.NEGATIVE_VOLUMES) if info.get("negative_volumes") else [],
        },
        "window_estimation": _WINDOW_TEXT,
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": sha256_of(weights),
            "bytes": weights.stat().st_size,
            "format": "torch.save state_dict, float16 tensors (load with weights_only=True into float32)",
        },
        "thresholds": (
            {"lesion": 0.5} if model_name == "multitask" else {"infection": 0.5, "consolidation": 0.5}
        ),
        "inference": (
            {"classification_window_slices": info["recipe"]["crop_slices"]}
            if model_name == "multitask"
            else {"slab_mm": wu.TARGET_SLICE_MM, "context_slices": wu.CONTEXT_SLICES}
        ),
        "preprocessing": _preprocessing_text(
            model_name, real_first=(info.get("recipe") or {}).get("augment") == "v2"
        ),
        "deviations_from_seed_paper": deviations,
        "training": {
            "command": info.get("command"),
            "seed": info["seed"],
            "epochs": info["epochs"],
            "device": info["device"],
            "recipe": info["recipe"],
            **({"initialised_from": info["initialised_from"]} if info.get("initialised_from") else {}),
            "wall_time_s": info["wall_time_s"],
            "torch": str(torch.__version__),
            "python": platform.python_version(),
            "finished": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "data": data_entries,
            "loss_history": [
                {k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()}
                for h in info["history"]
            ],
        },
        "metrics": json.loads(json.dumps(metrics)),
    }
    card = json.loads(json.dumps(card))  # plain YAML types only (tuples, numpy scalars)
    path = out / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    save_card(tmp, card)
    tmp.replace(path)
    return path


def _preprocessing_text(model_name: str, real_first: bool = False) -> str:
    if real_first and model_name == "consolidation-em":
        return (
            "axial slices block-averaged to ~2 mm in-plane (WorkGrid, integer factor), z untouched; lungs by "
            "triaged.analysis.lungs (classical), volume cropped to their bounding box + 4 px / 2 slices. "
            "Slices thinner than 4 mm averaged into 5 mm slabs; 7 adjacent slabs as channels; intensities "
            "(HU + 1024) / 110 with HU clipped to [-1024, 160] (seed 001). Real 8-bit slices: HU from the "
            "estimated display window (window_estimation), resized to a 160 px long side; a doctor-labelled "
            "slice (single slice) is repeated 7 times, pseudo-labelled slices come with their neighbours "
            "(half of them flat); real no-pneumonia volumes: HU, ~2 mm. Augmentation: rotations by 90 deg, "
            "flips, scale x0.8-1.25, contrast x0.85-1.15 about -500 HU, +-60 HU, random upper clip 0-300 HU, "
            "Gaussian noise 0-40 HU, blur or unsharp masking; 96 px random crops (70 % centred near a lesion). "
            "Not multiplied by a lung mask (the real slices have none); outputs are intersected with the "
            "lungs, which the network's lesions may extend over dense consolidation (triaged.nets.pipelines)."
        )
    if real_first:
        return (
            "axial slices block-averaged to ~2 mm in-plane (WorkGrid, integer factor), z untouched; lungs by "
            "triaged.analysis.lungs (classical), volume cropped to their bounding box + 4 px / 2 slices; the "
            "network sees one slice at a time. Real 8-bit slices: HU from the estimated display window "
            "(window_estimation), resized to a 160 px long side; real no-pneumonia volumes: HU, ~2 mm, cropped "
            "to the classical lungs' box. Augmentation: rotations by 90 deg, flips, scale x0.8-1.25, contrast "
            "x0.85-1.15 about -500 HU, +-60 HU, random upper clip 0-300 HU, Gaussian noise 0-40 HU, blur or "
            "unsharp masking (kernels); 112 px random crops (70 % centred near a lesion). Intensities clipped "
            "to [-1000, 300] HU and scaled to [0, 1] (seed 004)."
        )
    common = (
        "axial slices block-averaged to ~2 mm in-plane (WorkGrid, integer factor), z untouched; lungs by "
        "triaged.analysis.lungs (classical), volume cropped to their bounding box + 4 px / 2 slices. "
        "Real 8-bit slices: HU = -1350 + 1500 v/255 (assumed lung window W1500/L-600), resized to a 160 px "
        "long side, strong contrast augmentation (gamma 0.6-1.7, x0.8-1.25, +-100 HU, noise, blur)."
    )
    if model_name == "multitask":
        return common + " Intensities clipped to [-1000, 300] HU and scaled to [0, 1] (seed 004)."
    return (
        common + " Slices thinner than 4 mm averaged into 5 mm slabs; 7 adjacent slabs as channels; "
        "intensities (HU + 1024) / 110 with HU clipped to [-1024, 160] (seed 001). Not multiplied by a lung "
        "mask (the real slices have none); outputs are intersected with the lungs."
    )


def rewrite_card_metrics(model_dir: Path | str, *, test_data: Path | None, real_slices: Path | None) -> Path:
    """Recompute the metrics of an existing model folder and rewrite its manifest (weights unchanged)."""
    out = Path(model_dir)
    path = out / MANIFEST
    card = yaml.safe_load(path.read_text(encoding="utf-8"))
    weights = out / str(card["weights"]["file"])
    card["weights"]["sha256"] = sha256_of(weights)
    card["weights"]["bytes"] = weights.stat().st_size
    save_card(path, card)
    card["metrics"] = json.loads(
        json.dumps(card_metrics(out, test_data=test_data, real_slices=real_slices, progress=True))
    )
    net = build_module(card)
    assert count_parameters(net) == card["architecture"]["parameters"]
    save_card(path, card)
    return path


# ---------------------------------------------------------------------------------------------- CLI
def train_from_args(
    args: argparse.Namespace,
    *,
    command: str,
    progress: bool,
    recipe: Recipe | None = None,
    data_note: str | None = None,
) -> Path:
    """Call :func:`train` with the options ``triaged train`` and ``python -m triaged.lab.train`` share.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options with ``model``, ``data``, ``out``, ``epochs``, ``seed``, ``resume``, ``device``,
        ``real_slices`` and ``test_data``.
    command : str
        The command line recorded in the model card.
    progress : bool
        tqdm progress bars on stderr.
    recipe : Recipe or None
        Overrides the model's default recipe.
    data_note : str or None
        How the phantom dataset was generated (for the card).

    Returns
    -------
    Path
        The model folder :func:`train` wrote.
    """
    return train(
        args.model,
        args.data,
        args.out,
        epochs=args.epochs,
        seed=args.seed,
        resume=args.resume,
        device=args.device,
        progress=progress,
        real_slices=args.real_slices,
        test_data=args.test_data,
        recipe=recipe,
        command=command,
        data_note=data_note,
        init_from=getattr(args, "init_from", None),
        real_volumes=getattr(args, "real_volumes", None),
    )


def _recipe_with(recipe: Recipe, item: str, ap: argparse.ArgumentParser) -> Recipe:
    """``recipe`` with one scalar field set from ``FIELD=VALUE`` (the field's own type); a parser error
    naming the field otherwise."""
    name, sep, text = item.partition("=")
    fields = {k: v for k, v in asdict(recipe).items() if isinstance(v, (int, float, str, bool))}
    if sep and name == "widths":
        try:
            widths = tuple(int(w) for w in text.split(","))
        except ValueError:
            widths = ()
        if len(widths) < 2 or min(widths) < 1:
            ap.error(f"--recipe-set {item!r}: widths takes positive whole numbers separated by commas")
        return replace(recipe, widths=widths)
    if not sep or name not in fields:
        names = ", ".join(sorted([*fields, "widths"]))
        ap.error(f"--recipe-set {item!r}: give FIELD=VALUE with FIELD one of {names}")
    kind = type(fields[name])
    try:
        value: Any = (text.lower() in ("1", "true", "yes")) if kind is bool else kind(text)
    except ValueError:
        ap.error(f"--recipe-set {item!r}: {name} takes a {kind.__name__}")
    return replace(recipe, **{name: value})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m triaged.lab.train MODEL --out DIR [--real-slices DIR] [--data DIR] ...``: ``triaged train``
    with the researcher's extra knobs (``--threads``, ``--steps-per-epoch``, ``--data-note``)."""
    ap = argparse.ArgumentParser(prog="python -m triaged.lab.train", description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=MODEL_NAMES)
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="labelled phantom dataset (labels.csv + NIfTI); omit: real data only",
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--real-slices", type=Path, default=None, help="medseg-covid-slices folder")
    ap.add_argument("--test-data", type=Path, default=None, help="labelled phantom test set (card metrics)")
    ap.add_argument("--data-note", default=None, help="how the phantom dataset was generated (for the card)")
    ap.add_argument("--steps-per-epoch", type=int, default=None)
    ap.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from the verified weights of this model folder (a continuation), not at random",
    )
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    ap.add_argument(
        "--recipe-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one recipe field (a number or word; widths: comma-separated), e.g. unet1_bce_weight=1 or "
        "widths=24,48,96,192,192; repeatable",
    )
    ap.add_argument(
        "--real-volumes",
        type=Path,
        default=None,
        metavar="CSV",
        help="a volume manifest (e.g. eval/real-volumes.csv): the card also records the whole pipeline with the "
        "new weights on those real series (data root: $TRIAGED_REAL_DATA, else ../shared/data/real)",
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = RECIPES[args.model]
    if args.steps_per_epoch:
        recipe = replace(recipe, steps_per_epoch=args.steps_per_epoch)
    if args.lr:
        recipe = replace(recipe, lr=args.lr)
    for item in args.recipe_set:
        recipe = _recipe_with(recipe, item, ap)
    command = "python -m triaged.lab.train " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    out = train_from_args(
        args, command=command, progress=not args.no_progress, recipe=recipe, data_note=args.data_note
    )
    print(out / MANIFEST)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
