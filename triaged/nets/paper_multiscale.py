"""Pipeline ``multiscale``: seed 003 (Hu et al. 2020) normal / CAP / COVID-19 with saliency boxes.

The pipeline composes ``classical`` (:mod:`triaged.analysis`): lungs, lobes, lesions, consolidation,
CT grade and CT severity score are classical's, so the SEG and SR measurements are unchanged.  Like every
paper pipeline (:class:`~triaged.nets.paper_base.ClassicalPlusNetwork`: model loading, bag, common
provenance, P(COVID-19) note), it then

1. cuts the study's bag of lung-cropped slices (:func:`triaged.nets.bags.make_bag` on classical's lungs:
   one slice every ≈ 5 mm, at most 64, 128 × 128, HU → [0, 1]);
2. runs :class:`~triaged.nets.multiscale.MultiScaleNet` on every slice (class scores = sum of the
   global-max-pooled score maps at Conv3, Conv4 and Conv5);
3. aggregates the slices' scores per class by the mean of the top :data:`TOP_FRACTION` of slices
   (:func:`aggregate`; the same pooling the network was trained through) and applies a softmax:
   ``class_probabilities = (("normal", a), ("cap", b), ("covid", c))``;
4. when the predicted class is not normal, takes integrated gradients (zero baseline, 25 steps) at the
   three scales on the :data:`MAX_SALIENCY_SLICES` slices that score that class highest, turns them
   into boxes (:func:`triaged.nets.saliency.saliency_boxes`: product → Gaussian → Isodata → closing →
   components), keeps those that overlap the slice's lungs, clipped to the lungs' box, and maps them
   to the source image's pixels (:meth:`~triaged.nets.bags.Bag.to_volume`) as
   :class:`~triaged.domain.SaliencyBox`; the key slices are the slices of the best boxes.

``p_covid`` stays None: the classifier was trained and tested on phantoms; the real data here (one
COVID-19 volume, no CAP) cannot validate it (model card ``p_covid_validated_on: null``), so triage
falls back to severity and the SR says :data:`~triaged.nets.pipelines.P_COVID_NOT_ASSESSED`.  The class
probabilities are research outputs.  Research use only - not for diagnosis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from triaged.domain import SaliencyBox, Volume
from triaged.nets.bags import Bag
from triaged.nets.multiscale import MultiScaleNet, scale_saliency
from triaged.nets.paper_base import ClassicalPlusNetwork, NetworkOutput
from triaged.nets.pipelines import Precision, Progress
from triaged.nets.saliency import joint_saliency, saliency_boxes

F32 = npt.NDArray[np.float32]

#: Class names of the logits, in order (the shared ``class_probabilities`` keys).
CLASS_KEYS: tuple[str, ...] = ("normal", "cap", "covid")
#: A study's class score is the mean of its slices' scores over the top this share of slices.
TOP_FRACTION = 0.25
#: Integrated-gradient saliency is computed on at most this many slices (inference budget).
MAX_SALIENCY_SLICES = 5
#: Integration steps of the integrated gradients (seed 003: m = 25).
IG_STEPS = 25
#: Smallest saliency component kept, in bag pixels (≈ 2.3 mm each on a 300 mm box: ≈ 1 cm²).
MIN_BOX_AREA = 16
#: At most this many boxes per slice.
BOXES_PER_SLICE = 3
#: Slices per forward pass.
CHUNK = 64
#: ``class_probabilities.validated_on`` when the card has no ``class_probabilities_validated_on``.
VALIDATED_ON_DEFAULT = "phantoms only (p_covid_validated_on: null)"


def top_k(n: int, fraction: float = TOP_FRACTION) -> int:
    """How many slices of an ``n``-slice bag are pooled (at least one)."""
    return max(1, int(round(fraction * n)))


def aggregate(logits: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """Per class, the mean of the top ``fraction`` of the slice scores: ``(n, K)`` → ``(K,)``."""
    k = top_k(int(logits.shape[0]), fraction)
    return logits.topk(k, dim=0).values.mean(dim=0)


def slice_logits(model: MultiScaleNet, images: npt.ArrayLike, precision: Precision | None = None) -> F32:
    """Class scores of every slice of a bag ``(n, 1, S, S)`` → ``(n, K)`` float32 (model in eval mode)."""
    x = np.asarray(images, np.float32)
    device = precision.device if precision is not None else torch.device("cpu")
    out: list[F32] = []
    with torch.inference_mode():
        for i in range(0, len(x), CHUNK):
            t = torch.from_numpy(np.ascontiguousarray(x[i : i + CHUNK])).to(device)
            out.append(model(t).logits.float().cpu().numpy())
    return np.concatenate(out, 0) if out else np.zeros((0, len(CLASS_KEYS)), np.float32)


def study_probabilities(logits: F32, fraction: float = TOP_FRACTION) -> F32:
    """Softmax of :func:`aggregate` of the slice scores: ``(K,)``."""
    agg = aggregate(torch.from_numpy(np.asarray(logits, np.float32)), fraction)
    return np.asarray(agg.softmax(-1).numpy(), np.float32)


@dataclass(frozen=True)
class BagBox:
    """A saliency box on bag slice ``index``: rows ``row0 ≤ r < row1``, columns ``col0 ≤ c < col1`` (bag
    pixels); ``score`` the mean of the blurred joint saliency in the box over the study's maximum (0–1)."""

    index: int
    row0: int
    col0: int
    row1: int
    col1: int
    score: float


def _lung_box(lung: npt.NDArray[np.generic]) -> tuple[int, int, int, int] | None:
    any_z: npt.NDArray[np.bool_] = np.any(np.asarray(lung, dtype=bool), axis=0)
    if not any_z.any():
        return None
    rows = np.nonzero(np.any(any_z, axis=1))[0]
    cols = np.nonzero(np.any(any_z, axis=0))[0]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def bag_saliency_boxes(
    model: MultiScaleNet,
    images: npt.ArrayLike,
    lung: npt.NDArray[np.generic],
    target: int,
    slice_scores: npt.ArrayLike,
    max_slices: int = MAX_SALIENCY_SLICES,
    steps: int = IG_STEPS,
) -> list[BagBox]:
    """Seed 003's boxes for class ``target`` on the ``max_slices`` slices scoring it highest.

    Boxes that do not overlap the slice's lungs are dropped, the rest clipped to the lungs' box (over
    the whole bag); highest score first.  ``model`` must be in eval mode on the CPU.
    """
    x = torch.from_numpy(np.asarray(images, np.float32))
    scores = np.asarray(slice_scores, np.float64)
    order = np.argsort(-scores, kind="stable")[: max(0, int(max_slices))]
    lbox = _lung_box(lung)
    if lbox is None:
        return []
    lr0, lr1, lc0, lc1 = lbox
    size = tuple(int(s) for s in x.shape[-2:])
    found: list[tuple[int, int, int, int, int, npt.NDArray[np.float64]]] = []
    peak = 0.0
    for i in order:
        maps = scale_saliency(model, x[int(i) : int(i) + 1], target=int(target), steps=steps)
        if not all(np.isfinite(m).all() for m in maps):
            continue
        blurred = ndimage.gaussian_filter(joint_saliency(maps, size), sigma=1.0, truncate=2.0, mode="nearest")
        lung_i = np.asarray(lung[int(i)]).astype(bool)
        kept = 0
        for b in saliency_boxes(maps, shape=size, min_area=MIN_BOX_AREA):
            r0, r1 = max(b.row0, lr0), min(b.row1, lr1)
            c0, c1 = max(b.col0, lc0), min(b.col1, lc1)
            if r0 >= r1 or c0 >= c1 or not lung_i[r0:r1, c0:c1].any():
                continue
            found.append((int(i), r0, c0, r1, c1, blurred))
            kept += 1
            if kept >= BOXES_PER_SLICE:
                break
        peak = max(peak, float(blurred.max()))
    if peak <= 0:
        return []
    boxes = [
        BagBox(i, r0, c0, r1, c1, float(bl[r0:r1, c0:c1].mean() / peak)) for i, r0, c0, r1, c1, bl in found
    ]
    return sorted(boxes, key=lambda b: -b.score)


def to_source_boxes(volume: Volume, bag: Bag, boxes: list[BagBox], label: str) -> tuple[SaliencyBox, ...]:
    """Bag boxes as :class:`~triaged.domain.SaliencyBox` in the source image's pixels (inclusive, clipped
    to the image), with the SOP Instance UID and frame number of their slice."""
    ny, nx = volume.hu.shape[1:]
    out: list[SaliencyBox] = []
    for b in boxes:
        rows, cols = bag.to_volume([b.row0, b.row1 - 1], [b.col0, b.col1 - 1])
        r0, r1 = int(np.clip(rows[0], 0, ny - 1)), int(np.clip(rows[1], 0, ny - 1))
        c0, c1 = int(np.clip(cols[0], 0, nx - 1)), int(np.clip(cols[1], 0, nx - 1))
        z = int(bag.z[b.index])
        frame = volume.frame_numbers[z] if len(volume.frame_numbers) > z else None
        uid = volume.sop_instance_uids[z] if len(volume.sop_instance_uids) > z else ""
        out.append(SaliencyBox(z, uid, r0, c0, r1, c1, label, round(b.score, 4), frame))
    return tuple(out)


def key_slices_of(boxes: tuple[SaliencyBox, ...], limit: int = 5) -> tuple[int, ...]:
    """The distinct slices of the best boxes, best first, at most ``limit``."""
    seen: list[int] = []
    for b in boxes:
        if b.z not in seen:
            seen.append(b.z)
        if len(seen) >= limit:
            break
    return tuple(seen)


class MultiScalePipeline(ClassicalPlusNetwork[MultiScaleNet]):
    """Seed 003's multi-scale classifier and integrated-gradient boxes on top of ``classical`` (module
    docstring)."""

    name = "multiscale"
    seed_paper = (
        "Weakly supervised multi-scale CNN, normal / CAP / COVID-19 with integrated-gradient boxes, of "
        "Hu et al. 2020 (seed 003), on the classical pipeline's masks"
    )
    network_message = "running the multi-scale network"
    network_type = MultiScaleNet
    network_label = "multi-scale classifier"
    classical_share = 0.7

    def method_provenance(self) -> list[tuple[str, str]]:
        return [
            ("classification.method", "multi-scale CNN (Conv3-5 class-score maps, max-pooled, summed)"),
            ("classification.pooling", f"mean of the top {TOP_FRACTION:g} of slice scores per class"),
            (
                "class_probabilities.validated_on",
                self.card_text("class_probabilities_validated_on", VALIDATED_ON_DEFAULT),
            ),
        ]

    def infer(
        self, net: MultiScaleNet, bag: Bag, volume: Volume, device: torch.device, say: Progress
    ) -> NetworkOutput:
        """Class probabilities of the bag and, for a non-normal prediction, the saliency boxes."""
        # the network is tiny: float32 on the CPU (integrated gradients need autograd there anyway)
        logits = slice_logits(net, bag.images, Precision(device, None, False))
        p = study_probabilities(logits)
        probs = tuple((k, round(float(v), 4)) for k, v in zip(CLASS_KEYS, p, strict=True))
        cls = int(np.argmax(p))
        if cls == 0:
            return NetworkOutput(
                [("saliency.method", "none (predicted normal)")], class_probabilities=probs, saliency_boxes=()
            )
        t = time.perf_counter()
        say(0.85, "integrated-gradient saliency")
        slice_p = torch.from_numpy(logits).softmax(-1)[:, cls].numpy()
        bag_boxes = bag_saliency_boxes(net, bag.images, bag.lung, cls, slice_p)
        boxes = to_source_boxes(volume, bag, bag_boxes, CLASS_KEYS[cls])
        prov = [
            (
                "saliency.method",
                f"integrated gradients ({IG_STEPS} steps, zero baseline) at Conv3-5 of the "
                f"{MAX_SALIENCY_SLICES} slices scoring {CLASS_KEYS[cls]} highest; product, Gaussian, "
                "Isodata, closing, components",
            )
        ]
        if boxes:
            prov.append(("key_slices_by", "saliency (multi-scale IG)"))
        prov.append(("time.saliency_s", f"{time.perf_counter() - t:.2f}"))
        key_slices = key_slices_of(boxes) if boxes else None  # None: classical's (lesion burden)
        return NetworkOutput(prov, class_probabilities=probs, key_slices=key_slices, saliency_boxes=boxes)
