"""Pipeline ``m2unet``: seed 000 (He et al. 2021) severe / non-severe COVID-19 by hierarchical MIL.

The pipeline composes ``classical`` (:mod:`triaged.analysis`): lungs, lobes, lesions, consolidation, CT
grade and CT severity score are classical's, so the SEG and SR measurements are unchanged.  It then

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

import time
from dataclasses import replace
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch

from triaged.analysis import Pipeline
from triaged.analysis.registry import default_registry
from triaged.domain import RESEARCH_NOTE, AnalysisResult, Volume
from triaged.nets.bags import make_bag
from triaged.nets.m2unet import M2UNet
from triaged.nets.pipelines import (
    LEARNED,
    P_COVID_NOT_ASSESSED,
    LearnedPipeline,
    Progress,
    _no_progress,
    p_covid_validation,
)
from triaged.nets.weights import LoadedModel

#: Slices of the bag the severity head sees (evenly spread; training bags have 20 random slices).
INFER_BAG: Final[int] = 24
#: What the provenance says when the card does not say what P(severe) was validated on.
NOT_VALIDATED: Final[str] = "not stated by the model card"


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


class M2UNetPipeline(LearnedPipeline):
    """Seed 000's hierarchical-MIL severity head on top of ``classical`` (module docstring)."""

    name = "m2unet"
    seed_paper = (
        "M2UNet hierarchical multiple-instance learning, severe vs non-severe COVID-19, of He et al. 2021 "
        "(seed 000), on the classical pipeline's masks"
    )
    network_message = "running the M2UNet severity head"

    def __init__(
        self,
        model: LoadedModel | Path | str,
        *,
        device: str | None = None,
        allow_bf16: bool = True,
        classical: Pipeline | None = None,
    ) -> None:
        super().__init__(model, device=device, allow_bf16=allow_bf16)
        self._classical = classical

    @property
    def classical(self) -> Pipeline:
        """The composed ``classical`` pipeline (the default registry's unless one was given)."""
        if self._classical is None:
            self._classical = default_registry().get("classical")
        return self._classical

    def run(self, volume: Volume, *, progress: Progress | None = None) -> AnalysisResult:
        """Classical masks and findings plus P(severe) from the M²UNet's hierarchical MIL head."""
        say = progress or _no_progress
        t0 = time.perf_counter()
        base = self.classical.run(volume, progress=lambda f, m: say(0.8 * f, m))
        t_classical = time.perf_counter() - t0
        say(0.8, self.network_message)
        t = time.perf_counter()
        net = self.model.module
        assert isinstance(net, M2UNet)
        validated_on = str(self._manifest.get("p_severe_validated_on") or NOT_VALIDATED)
        lobes_used = str((self._manifest.get("lobes") or {}).get("used", "classical"))
        prov: list[tuple[str, str]] = [
            (
                "masks.method",
                f"classical v{base.findings.pipeline_version} (lungs, lobes, lesions, consolidation)",
            ),
            ("lobes.source", f"{lobes_used} (chosen on the test phantoms' lobe Dice, model card)"),
            ("model.name", self.model.name),
            ("model.version", self.model.version),
            ("model.sha256", self.model.sha256),
            ("severity.method", "M2UNet hierarchical MIL (GCP over slice positions, then over slices)"),
            ("p_severe_validated_on", validated_on),
        ]
        p_severe: float | None = None
        warnings = list(base.findings.warnings)
        try:
            bag = make_bag(volume.hu, base.masks.lungs, volume.spacing)
        except ValueError as exc:
            bag = None
            warnings.append(f"P(severe) not assessed: {exc}")
        if bag is not None:
            # the network is small: float32 on the CPU whatever the node's device
            p_severe = round(severity_probability(net.cpu(), bag.images), 4)
            prov.append(("bag.slices", f"{len(bag.z)} (severity head on {len(bag_indices(len(bag.z)))})"))
        prov += [
            ("time.network_s", f"{time.perf_counter() - t:.2f}"),
            ("time.classical_s", f"{t_classical:.2f}"),
        ]
        if p_covid_validation(self._manifest) is None and P_COVID_NOT_ASSESSED not in warnings:
            warnings.append(P_COVID_NOT_ASSESSED)
        findings = replace(
            base.findings,
            pipeline=self.name,
            pipeline_version=self.version,
            p_covid=None,
            p_severe=p_severe,
            model_sha256=self.model.sha256,
            provenance=(*base.findings.provenance, *prov, ("note", RESEARCH_NOTE)),
            warnings=tuple(warnings),
        )
        say(1.0, "done")
        return AnalysisResult(findings, base.masks)


LEARNED.setdefault(M2UNetPipeline.name, ("m2unet", M2UNetPipeline))


__all__ = ["INFER_BAG", "M2UNetPipeline", "bag_indices", "severity_probability"]
