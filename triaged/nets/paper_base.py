"""The common part of the paper pipelines (``m2unet``, ``dacmil``, ``multiscale``): classical plus a network.

Each of them composes the ``classical`` pipeline (:mod:`triaged.analysis`): lungs, lobes, lesions,
consolidation, CT grade and CT severity score are classical's, so the SEG and SR measurements are
unchanged.  :meth:`ClassicalPlusNetwork.run` then

1. loads the model (sha256-verified) *before* the long classical run, so a missing or corrupt weights file
   fails at once with the :class:`~triaged.nets.weights.WeightsError` that names the file;
2. runs classical on the first :attr:`~ClassicalPlusNetwork.classical_share` of the progress bar;
3. cuts the study's bag of lung-cropped slices from classical's lungs
   (:func:`triaged.nets.bags.make_bag`); when there is none (no lungs), the network is not run and a
   warning names the reason;
4. hands the bag to the subclass's :meth:`~ClassicalPlusNetwork.infer` (the only network-specific step);
5. reports P(COVID-19) only when the model card says on which real data it was validated
   (:func:`~triaged.nets.pipelines.p_covid_validation`), else the note
   :data:`~triaged.nets.pipelines.P_COVID_NOT_ASSESSED`;
6. returns classical's findings with the network's outputs, pipeline name and version, the model's sha256
   and the provenance (``dataclasses.replace``), and classical's masks.

Provenance keys every paper pipeline writes, in this order after classical's own (one spelling each):

* ``masks_from`` = ``classical v<version>``;
* ``model.name``, ``model.version``, ``model.sha256``;
* the pipeline's method keys (:meth:`~ClassicalPlusNetwork.method_provenance`);
* ``identification.method`` (= :data:`~triaged.nets.pipelines.P_COVID_NOT_ASSESSED`) or
  ``identification.validated_on`` (the card's ``p_covid_validated_on``), as the ``multitask`` pipeline;
* with a bag: ``bag.slices``, ``bag.box`` (row0 row1 col0 col1 on the volume grid), then the network's
  keys; without one: ``network`` = ``not run: <reason>``;
* ``precision`` (device and dtype of the network), ``time.classical_s``, ``time.network_s`` (bag and
  network, everything after classical), ``note`` = :data:`~triaged.domain.RESEARCH_NOTE`.

Research use only - not for diagnosis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import torch

from triaged.analysis import Pipeline, default_registry
from triaged.domain import RESEARCH_NOTE, AnalysisResult, SaliencyBox, Volume
from triaged.nets.bags import Bag, make_bag
from triaged.nets.pipelines import (
    P_COVID_NOT_ASSESSED,
    LearnedPipeline,
    Progress,
    _no_progress,
    p_covid_validation,
)
from triaged.nets.weights import MANIFEST, LoadedModel, WeightsError

#: What the provenance says when the model card does not say what an output was validated on.
NOT_STATED: Final[str] = "not stated by the model card"

N = TypeVar("N", bound=torch.nn.Module)


@dataclass(frozen=True)
class NetworkOutput:
    """What a paper pipeline's network step adds to classical's findings (None: keep classical's value).

    ``p_covid`` is the network's P(COVID-19) when it has one; it is reported only when the model card
    names real validation data (:func:`~triaged.nets.pipelines.p_covid_validation`).
    """

    #: the network step's provenance entries (after ``bag.slices`` and ``bag.box``)
    provenance: list[tuple[str, str]]
    p_covid: float | None = None
    p_severe: float | None = None
    class_probabilities: tuple[tuple[str, float], ...] | None = None
    key_slices: tuple[int, ...] | None = None
    saliency_boxes: tuple[SaliencyBox, ...] | None = None

    def changes(self) -> dict[str, Any]:
        """The :class:`~triaged.domain.Findings` fields this output sets (``p_covid`` aside)."""
        fields = {
            "p_severe": self.p_severe,
            "class_probabilities": self.class_probabilities,
            "key_slices": self.key_slices,
            "saliency_boxes": self.saliency_boxes,
        }
        return {k: v for k, v in fields.items() if v is not None}


class ClassicalPlusNetwork(LearnedPipeline, Generic[N]):
    """A learned pipeline that runs a network on the bag cut from the ``classical`` pipeline's lungs.

    Subclasses set :attr:`network_type`, :attr:`network_label`, ``name``, ``seed_paper`` and
    ``network_message`` and implement :meth:`infer` (and :meth:`method_provenance` for their
    bag-independent provenance); everything else is here (module docstring).

    Parameters
    ----------
    model : LoadedModel or path
        The model, or its folder (``models/<name>``), loaded lazily as for every learned pipeline.
    device : str or None
        None = CUDA when present, else CPU (used only by pipelines whose :meth:`network_device` asks).
    allow_bf16 : bool
        Passed to :class:`~triaged.nets.pipelines.LearnedPipeline` (the paper networks run in float32).
    classical : Pipeline, optional
        The pipeline giving masks and measures (default: the default registry's ``classical``).
    """

    #: the torch module class the model card must build
    network_type: type[N]
    #: the network as named in the "not run" warning
    network_label: str = "the network"
    #: share of the progress bar taken by the classical run
    classical_share: float = 0.8
    masks_note = "Masks and measures from classical."

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

    def card_text(self, field: str, default: str = NOT_STATED) -> str:
        """The model card's ``field`` as text, ``default`` when it is absent, null or empty."""
        return str(self._manifest.get(field) or default)

    def network_device(self) -> torch.device:
        """Where the network runs: the CPU (the paper networks are small); a subclass may choose."""
        return torch.device("cpu")

    def method_provenance(self) -> list[tuple[str, str]]:
        """Provenance entries that do not depend on the bag (method, what outputs were validated on)."""
        return []

    def infer(self, net: N, bag: Bag, volume: Volume, device: torch.device, say: Progress) -> NetworkOutput:
        """Run the network on the study's bag (each paper pipeline implements it)."""
        raise NotImplementedError

    def _loaded_network(self) -> tuple[LoadedModel, N]:
        """The verified, loaded model and its module, checked against :attr:`network_type`."""
        model = self.model
        net = model.module
        if not isinstance(net, self.network_type):
            raise WeightsError(
                f"{model.directory / MANIFEST}: the card builds {type(net).__name__}; pipeline {self.name!r} "
                f"needs {self.network_type.__name__}"
            )
        return model, net

    def run(self, volume: Volume, *, progress: Progress | None = None) -> AnalysisResult:
        """Classical analysis, then the network on the bag cut from classical's lungs (module docstring)."""
        say = progress or _no_progress
        model, net = self._loaded_network()  # verified and loaded before the (longer) classical run
        share = self.classical_share
        t = time.perf_counter()
        base = self.classical.run(volume, progress=lambda f, m: say(share * f, f"classical: {m}"))
        t_classical = time.perf_counter() - t
        t = time.perf_counter()
        say(share, self.network_message)
        findings = base.findings
        validated = p_covid_validation(self._manifest)
        prov: list[tuple[str, str]] = [
            ("masks_from", f"classical v{findings.pipeline_version}"),
            ("model.name", model.name),
            ("model.version", model.version),
            ("model.sha256", model.sha256),
            *self.method_provenance(),
            ("identification.method", P_COVID_NOT_ASSESSED)
            if validated is None
            else ("identification.validated_on", validated),
        ]
        warnings = list(findings.warnings)
        device = self.network_device()
        try:
            bag = make_bag(volume.hu, base.masks.lungs, volume.spacing)
        except ValueError as exc:
            out = NetworkOutput([("network", f"not run: {exc}")])
            warnings.append(f"{self.network_label} not run: {exc}")
        else:
            prov += [("bag.slices", str(len(bag.z))), ("bag.box", " ".join(str(v) for v in bag.box))]
            out = self.infer(net.to(device), bag, volume, device, say)
        if validated is None and P_COVID_NOT_ASSESSED not in warnings:
            warnings.append(P_COVID_NOT_ASSESSED)
        prov += [
            *out.provenance,
            ("precision", f"{device.type} fp32"),
            ("time.classical_s", f"{t_classical:.2f}"),
            ("time.network_s", f"{time.perf_counter() - t:.2f}"),
            ("note", RESEARCH_NOTE),
        ]
        findings = replace(
            findings,
            **out.changes(),
            pipeline=self.name,
            pipeline_version=self.version,
            p_covid=out.p_covid if validated is not None else None,
            model_sha256=model.sha256,
            provenance=(*findings.provenance, *prov),
            warnings=tuple(warnings),
        )
        say(1.0, "done")
        return AnalysisResult(findings, base.masks)


__all__ = ["NOT_STATED", "ClassicalPlusNetwork", "NetworkOutput"]
