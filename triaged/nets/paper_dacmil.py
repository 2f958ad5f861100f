"""The ``dacmil`` pipeline: seed 002's DA-CMIL (Chikontwe et al. 2021), COVID-19 vs bacterial pneumonia.

It composes the ``classical`` pipeline (:mod:`triaged.analysis`): classical segments the lungs, lesions,
consolidation and lobes and measures the CT grade and CT severity score, so the SEG and the SR keep their
content.  Model loading, the bag, the common provenance and the P(COVID-19) note are
:class:`~triaged.nets.paper_base.ClassicalPlusNetwork`'s.  DA-CMIL then runs on the bag of lung-cropped
slices cut from classical's lungs (:func:`triaged.nets.bags.make_bag`) and adds

* ``class_probabilities`` ``(("covid", p), ("bacterial", 1 - p))``: the bag classifier's softmax;
* ``key_slices``: the slices with the highest instance attention (highest first, at most
  :data:`KEY_SLICES`, only slices that contain lung), with their attention weights in the provenance
  (``key_slices.attention``) and ``key_slices_by`` = ``attention (DA-CMIL)``.

``p_covid`` stays None: the classifier was trained and tested on phantoms only (there is one real
COVID-19 volume and no real bacterial pneumonia here), so P(COVID-19) is "not assessed"
(:data:`~triaged.nets.pipelines.P_COVID_NOT_ASSESSED`) unless the model card's ``p_covid_validated_on``
names real validation data.  The two-class output answers "COVID-19 or bacterial pneumonia?" only; it
says nothing about whether there is a pneumonia at all.  Research use only - not for diagnosis.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from triaged.domain import Volume
from triaged.nets.bags import Bag
from triaged.nets.dacmil import DACMIL
from triaged.nets.paper_base import ClassicalPlusNetwork, NetworkOutput
from triaged.nets.pipelines import Progress, pick_device

F32 = npt.NDArray[np.float32]

#: At most this many key slices (highest attention first).
KEY_SLICES = 5
#: Slices per backbone pass at inference (bounds the activations).
CHUNK = 64
#: Provenance value of ``key_slices_by``.
KEY_SLICES_BY = "attention (DA-CMIL)"


class BagPrediction(NamedTuple):
    """DA-CMIL's output for one bag: P(COVID-19 vs bacterial) and the slice attention (n,)."""

    p_covid: float
    attention: F32


def lung_mask(lung: npt.NDArray[np.generic]) -> npt.NDArray[np.bool_]:
    """Which slices of a bag (n, S, S) contain lung; all of them when none does."""
    has: npt.NDArray[np.bool_] = np.asarray(np.asarray(lung).reshape(len(lung), -1).any(axis=1), bool)
    return has if has.any() else np.ones(len(lung), bool)


def predict_bag(
    net: DACMIL,
    images: npt.NDArray[np.generic],
    lung: npt.NDArray[np.generic] | None = None,
    device: torch.device | None = None,
) -> BagPrediction:
    """Run DA-CMIL on one bag in eval mode.

    Parameters
    ----------
    net : DACMIL
        The model (put in eval mode here).
    images : ndarray (n, 1, S, S)
        The bag's images in [0, 1] (:func:`~triaged.nets.bags.make_bag`).
    lung : ndarray (n, S, S), optional
        The bag's lung labels: slices without lung get no attention.
    device : torch.device, optional
        Where to run (the module's device by default).

    Returns
    -------
    BagPrediction
        P(class 1 = COVID-19) and the attention over the n slices (0 for masked slices).
    """
    net.eval()
    dev = device or next(net.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(dev)[None]
    mask = None if lung is None else torch.from_numpy(lung_mask(lung)).to(dev)[None]
    with torch.inference_mode():
        out = net(x, mask=mask, chunk=CHUNK)
        p = float(out.logits.float().softmax(-1)[0, 1])
        att = out.instance_attention[0].float().cpu().numpy()
    return BagPrediction(p, np.asarray(att, np.float32))


def key_slices(
    z: npt.NDArray[np.integer], attention: F32, lung: npt.NDArray[np.generic], k: int = KEY_SLICES
) -> list[tuple[int, float]]:
    """The ``k`` (volume z, attention) pairs of highest attention among slices with lung, highest first
    (ties: lower z first)."""
    has = lung_mask(lung) if np.asarray(lung).any() else np.zeros(len(lung), bool)
    order = sorted((i for i in range(len(z)) if has[i]), key=lambda i: (-float(attention[i]), int(z[i])))
    return [(int(z[i]), float(attention[i])) for i in order[:k]]


class DACMILPipeline(ClassicalPlusNetwork[DACMIL]):
    """Classical masks and measures + DA-CMIL's COVID-19 vs bacterial probabilities and key slices.

    Parameters
    ----------
    model : LoadedModel or path
        The model (``models/dacmil``), loaded lazily as for every learned pipeline.
    device : str or None
        None = CUDA when present, else CPU.
    classical : Pipeline, optional
        The pipeline giving the masks (default: the registry's ``classical``).
    """

    name = "dacmil"
    seed_paper = "DA-CMIL dual-attention contrastive MIL of Chikontwe et al. 2021 (seed 002)"
    network_message = "running DA-CMIL"
    network_type = DACMIL
    network_label = "DA-CMIL"

    def network_device(self) -> torch.device:
        """The pipeline's device: CUDA when present unless one was given (float32 either way)."""
        return pick_device(self.device)

    def method_provenance(self) -> list[tuple[str, str]]:
        return [("class_probabilities.validated_on", self.card_text("class_probabilities_validated_on"))]

    def infer(
        self, net: DACMIL, bag: Bag, volume: Volume, device: torch.device, say: Progress
    ) -> NetworkOutput:
        """DA-CMIL on the whole bag: class probabilities, and the key slices by instance attention."""
        pred = predict_bag(net, bag.images, bag.lung, device)
        keys = key_slices(bag.z, pred.attention, bag.lung)
        return NetworkOutput(
            [
                ("identification.classes", "covid vs bacterial (DA-CMIL bag classifier)"),
                ("key_slices_by", KEY_SLICES_BY),
                ("key_slices.attention", ", ".join(f"z={z}:{a:.3f}" for z, a in keys)),
            ],
            p_covid=pred.p_covid,
            class_probabilities=(("covid", pred.p_covid), ("bacterial", 1.0 - pred.p_covid)),
            key_slices=tuple(z for z, _ in keys),
        )


__all__ = ["KEY_SLICES", "KEY_SLICES_BY", "BagPrediction", "DACMILPipeline", "key_slices", "predict_bag"]
