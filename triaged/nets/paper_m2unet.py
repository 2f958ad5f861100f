"""Pipeline ``m2unet``: seed 000 (He et al. 2021) severe / non-severe COVID-19 by hierarchical MIL.

The pipeline composes ``classical`` (:mod:`triaged.analysis`): lungs, lobes, lesions, consolidation, CT
grade and CT severity score are classical's, so the SEG and SR measurements are unchanged.  Like every
paper pipeline (:class:`~triaged.nets.paper_base.ClassicalPlusNetwork`: model loading, bag, common
provenance, P(COVID-19) note), it then

1. cuts the study's bag of lung-cropped slices (:func:`triaged.nets.bags.make_bag` on classical's lungs:
   one slice every ≈ 5 mm, at most 64, 128 × 128, HU → [0, 1]);
2. runs the M²UNet encoder and its hierarchical MIL head (:meth:`~triaged.nets.m2unet.M2UNet.severity`:
   global contrast pooling over the 8 × 8 positions of each slice, then over the slices) on
   :data:`INFER_BAG` slices spread evenly over the bag (the bag size it was trained near) and reports the
   softmax's severe probability as ``Findings.p_severe``.

Lobes: the model card's ``lobes.used`` says which lobes the findings carry; the learned lobe decoder was
compared with the non-learned fissure-aware lobes of :mod:`triaged.analysis.lobes` on the test phantoms
(both figures in the card) and the pipeline keeps classical's lobes when those scored better.

P(severe) was validated on synthetic phantoms only (no real severity labels exist here): the card's
``p_severe_validated_on`` goes into the provenance as ``p_severe_validated_on``.  ``p_covid`` stays None
(the network classifies severity among COVID-19 cases only; it does not say whether a study is
COVID-19), so triage falls back to severity and the SR says
:data:`~triaged.nets.pipelines.P_COVID_NOT_ASSESSED`.  Research use only - not for diagnosis.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import torch

from triaged.domain import Volume
from triaged.nets.bags import Bag
from triaged.nets.m2unet import M2UNet
from triaged.nets.paper_base import ClassicalPlusNetwork, NetworkOutput
from triaged.nets.pipelines import Progress

#: Slices of the bag the severity head sees (evenly spread; training bags have 20 random slices).
INFER_BAG: Final[int] = 24


def bag_indices(n: int, k: int = INFER_BAG) -> npt.NDArray[np.int64]:
    """At most ``k`` indices spread evenly over ``range(n)``."""
    if n <= k:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.rint(np.linspace(0, n - 1, k)).astype(np.int64))


def severity_probability(model: M2UNet, images: npt.ArrayLike, k: int = INFER_BAG) -> float:
    """P(severe) of a bag ``(n, 1, S, S)``: the severity head's softmax on :func:`bag_indices` slices."""
    x = np.asarray(images, np.float32)
    idx = bag_indices(x.shape[0], k)
    with torch.inference_mode():
        logits = model.severity(torch.from_numpy(np.ascontiguousarray(x[idx]))[None])
    return float(logits.float().softmax(-1)[0, 1])


class M2UNetPipeline(ClassicalPlusNetwork[M2UNet]):
    """Seed 000's hierarchical-MIL severity head on top of ``classical`` (module docstring)."""

    name = "m2unet"
    seed_paper = (
        "M2UNet hierarchical multiple-instance learning, severe vs non-severe COVID-19, of He et al. 2021 "
        "(seed 000), on the classical pipeline's masks"
    )
    network_message = "running the M2UNet severity head"
    network_type = M2UNet
    network_label = "M2UNet severity head"

    def method_provenance(self) -> list[tuple[str, str]]:
        lobes_used = str((self._manifest.get("lobes") or {}).get("used", "classical"))
        return [
            ("lobes.source", f"{lobes_used} (chosen on the test phantoms' lobe Dice, model card)"),
            ("severity.method", "M2UNet hierarchical MIL (GCP over slice positions, then over slices)"),
            ("p_severe_validated_on", self.card_text("p_severe_validated_on")),
        ]

    def infer(
        self, net: M2UNet, bag: Bag, volume: Volume, device: torch.device, say: Progress
    ) -> NetworkOutput:
        """P(severe) from the hierarchical MIL head on :func:`bag_indices` slices of the bag."""
        p_severe = round(severity_probability(net, bag.images), 4)
        return NetworkOutput([("severity.slices", str(len(bag_indices(len(bag.z)))))], p_severe=p_severe)


__all__ = ["INFER_BAG", "M2UNetPipeline", "bag_indices", "severity_probability"]
