"""The learned analysis pipelines ``multitask`` (seed 004) and ``consolidation-em`` (seed 001).

Both follow the analysis Pipeline protocol (``name``, ``version``, ``run(volume, *, progress=None) ->
AnalysisResult``) and share the non-learned front end of :mod:`triaged.analysis`:

1. the volume is block-averaged to ≈ 2 mm in-plane, z untouched (:class:`~triaged.analysis.grid.WorkGrid`;
   seed 004, Section 4.1);
2. the lungs are segmented and split into right/left classically
   (:func:`~triaged.analysis.lungs.segment_lungs_coarse`; no lung network ships yet) and the working
   volume is cropped to their bounding box (seed 004: crop to the predicted lungs);
3. the network runs under ``torch.inference_mode()`` on the crop, slice chunk by slice chunk; on CPUs
   with native bf16 (AVX-512 BF16 / AMX) it runs in bf16 autocast with channels-last tensors, on CUDA
   when a GPU is present;
4. lesions the network finds just outside the air-threshold lungs (dense consolidation against the
   pleura, which no air threshold keeps) extend the lungs when they touch one within :data:`EXTEND_MM`
   and are neither bone nor outside air (:func:`_extend_lungs`; measured on the 50 MedSeg doctor-labelled
   slices with ``multitask`` 2.0.0: radiologists' infection inside the lungs 84.5 → 90.2 %, lesion Dice
   0.551 → 0.597, specificity 0.984 → 0.980; the real no-pneumonia volumes unchanged, 0–0.11 %);
5. probabilities are interpolated back to the volume grid (linearly in-plane; along z too for seed 001,
   which works on 5 mm slabs) and thresholded; lesion voxels outside the (extended) lungs are dropped.

``multitask``: lesion probability ≥ the card's ``lesion`` threshold; consolidation is seed 001's −200 HU
rule inside the lesions.  P(COVID-19) from the classification head is reported only when the model card
says on which real data the classifier was validated (``p_covid_validated_on``); otherwise the pipeline
returns ``p_covid = None`` with the note :data:`P_COVID_NOT_ASSESSED` (triage then falls back to severity).
``consolidation-em``: UNet-1's infection > 0.5 is the lesion mask; UNet-2 > 0.5 inside it is
consolidation (Wu et al. 2020, Algorithm 1 and Section III-C); no P(COVID-19).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from triaged.analysis import Pipeline, PipelineRegistry, default_registry
from triaged.analysis.grid import WorkGrid
from triaged.analysis.lesions import ThresholdParams, threshold_consolidation
from triaged.analysis.lobes import lobes_for
from triaged.analysis.lungs import LungParams, behind_bone, rib_cage, segment_lungs_coarse, upsample_labels
from triaged.analysis.severity import findings_from_masks
from triaged.domain import AnalysisResult, Findings, Masks, Volume
from triaged.nets import multitask as mt
from triaged.nets import preprocess, wu
from triaged.nets import thick_slices as thick
from triaged.nets.weights import (
    MANIFEST,
    LoadedModel,
    WeightsError,
    load_model,
    model_dir,
    read_manifest,
    verify_weights,
)

F32 = npt.NDArray[np.float32]
B = npt.NDArray[np.bool_]
U8 = npt.NDArray[np.uint8]

#: Slices per forward pass (bounds the activations: 32 × 8 × 160 × 160 float32 ≈ 26 MB per tensor).
CHUNK_SLICES = 32
#: Seed 001's consolidation baseline inside lesions (Chaganti et al.), used by the multitask pipeline.
CONSOLIDATION_HU = -200.0
_CONSOLIDATION_CUT = ThresholdParams(consolidation_hu=CONSOLIDATION_HU)
#: Network lesions outside the air-threshold lungs join a lung within this distance of it, mm (in-plane).
EXTEND_MM = 30.0
#: The note of a pipeline whose classifier has not been validated on real data (no P(COVID-19) reported).
P_COVID_NOT_ASSESSED = "P(COVID-19) not assessed: classifier not validated on real data"


def p_covid_validation(manifest: dict[str, Any]) -> str | None:
    """The model card's description of the real data its classifier was validated on, or None (field
    ``p_covid_validated_on`` absent, null or empty): then the pipeline reports no P(COVID-19)."""
    value = manifest.get("p_covid_validated_on")
    if value is None or value == "" or value == {} or value == []:
        return None
    return value if isinstance(value, str) else str(value)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_bf16_native() -> bool:
    """Whether this CPU runs bf16 convolutions natively (otherwise bf16 autocast is emulated and slow)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    """How a network runs: device, autocast dtype (None = float32) and memory format."""

    device: torch.device
    autocast: torch.dtype | None
    channels_last: bool

    @staticmethod
    def choose(device: str | torch.device | None = None, allow_bf16: bool = True) -> Precision:
        dev = pick_device(device)
        if dev.type == "cuda":
            return Precision(dev, torch.bfloat16 if allow_bf16 else None, True)
        bf16 = allow_bf16 and cpu_bf16_native()
        return Precision(dev, torch.bfloat16 if bf16 else None, bf16)

    def describe(self) -> str:
        dtype = "bf16" if self.autocast is torch.bfloat16 else "fp32"
        return f"{self.device.type} {dtype}{' channels-last' if self.channels_last else ''}"

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return module

    def tensor(self, array: npt.NDArray[np.generic]) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(self.device)
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def autocast_context(self) -> Any:
        if self.autocast is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast)


# ----------------------------------------------------------------------------------- network inference
def classification_windows(nz: int, window: int | None) -> list[slice]:
    """Slice ranges the classification head is applied to: the whole stack (``window`` None, seed
    004) or stacks of ``window`` slices every ``window // 2`` slices, the last one flush with the end."""
    if window is None or nz <= window:
        return [slice(0, nz)]
    step = max(1, window // 2)
    starts = list(range(0, nz - window + 1, step))
    if starts[-1] != nz - window:
        starts.append(nz - window)
    return [slice(z0, z0 + window) for z0 in starts]


def multitask_infer(
    net: mt.MultitaskNet,
    hu: F32,
    precision: Precision | None = None,
    chunk: int = CHUNK_SLICES,
    window: int | None = None,
) -> tuple[F32, float]:
    """Run seed 004's multitask network on a lung-cropped working-grid volume.

    Parameters
    ----------
    net : MultitaskNet
        In eval mode.
    hu : ndarray of float32
        (z, y, x) HU on the ≈ 2 mm grid.
    window : int or None
        Apply the classification head to overlapping stacks of this many slices (the stack depth it was
        trained on) and report the maximum; None pools the whole volume at once as seed 004 does.

    Returns
    -------
    (ndarray of float32, float)
        Lesion probability (z, y, x) and P(COVID-19).
    """
    p = precision or Precision.choose()
    net = p.prepare(net)  # type: ignore[assignment]
    x = mt.normalise_hu(torch.from_numpy(np.ascontiguousarray(hu, np.float32))).numpy()
    nz = x.shape[0]
    probs = np.empty(x.shape, np.float32)
    feats: list[torch.Tensor] = []
    with torch.inference_mode():
        with p.autocast_context():
            for z0 in range(0, nz, chunk):
                batch = p.tensor(x[z0 : z0 + chunk, None])
                f = net.slice_features(batch)
                probs[z0 : z0 + chunk] = torch.sigmoid(net.segment(f).float()).cpu().numpy()
                feats.append(f.to(torch.bfloat16 if p.autocast is not None else torch.float32))
        # the small classification head runs in float32 whatever the backbone's precision
        stacked = torch.cat(feats, 0).transpose(0, 1)[None]  # (1, C, Z, H, W)
        logits = [
            net.classify(stacked[:, :, zs].float().contiguous()) for zs in classification_windows(nz, window)
        ]
        logit = torch.stack(logits).max()
    return probs, float(torch.sigmoid(logit))


def wu_stack_indices(nz: int, n: int = wu.CONTEXT_SLICES) -> npt.NDArray[np.intp]:
    """For every slice, the ``n`` adjacent slice indices centred on it, clamped at the ends: (nz, n)."""
    half = n // 2
    return np.clip(np.arange(nz)[:, None] + np.arange(-half, half + 1)[None, :], 0, nz - 1)


def wu_infer(
    net: wu.ConsolidationEM, hu: F32, dz: float, precision: Precision | None = None, chunk: int = CHUNK_SLICES
) -> tuple[F32, F32]:
    """Run UNet-1 and UNet-2 (seed 001) on a lung-cropped working-grid volume.

    Slices thinner than 4 mm are first averaged into 5 mm slabs (Wu et al., Section III-B); the
    probabilities are interpolated back to the input's slices.

    Returns
    -------
    (ndarray of float32, ndarray of float32)
        Infection and consolidation probabilities, (z, y, x) like ``hu``.
    """
    p = precision or Precision.choose()
    net = p.prepare(net)  # type: ignore[assignment]
    nz = hu.shape[0]
    work = preprocess.resample_z(hu, dz, wu.TARGET_SLICE_MM) if dz < 4.0 else np.asarray(hu, np.float32)
    x = wu.normalise_hu(torch.from_numpy(np.ascontiguousarray(work))).numpy()
    idx = wu_stack_indices(x.shape[0])
    out = np.empty((2, *x.shape), np.float32)
    with torch.inference_mode(), p.autocast_context():
        for z0 in range(0, x.shape[0], chunk):
            batch = p.tensor(x[idx[z0 : z0 + chunk]])
            out[:, z0 : z0 + chunk] = torch.sigmoid(net(batch).float()).transpose(0, 1).cpu().numpy()
    if out.shape[1] != nz:
        return preprocess.upsample_z(out[0], nz), preprocess.upsample_z(out[1], nz)
    return out[0], out[1]


# ------------------------------------------------------------------------------------------ pipelines
#: ``progress(fraction in [0, 1], message)`` (the analysis Pipeline protocol's progress sink).
Progress = Callable[[float, str], None]


def _no_progress(fraction: float, message: str) -> None:
    """Default progress sink."""


@dataclass(frozen=True)
class _Front:
    grid: WorkGrid
    coarse_hu: F32
    lungs_coarse: U8
    lungs_full: U8
    box: tuple[slice, slice, slice]
    split: str
    warnings: tuple[str, ...]
    body: B
    #: working-grid voxels the network's lesions added to the air-threshold lungs (:func:`_extend_lungs`)
    extended_voxels: int = 0


def _front_end(volume: Volume, params: LungParams) -> _Front:
    grid = WorkGrid.for_volume(volume.hu.shape, volume.spacing, params.target_mm)  # type: ignore[arg-type]
    chu = grid.downsample(volume.hu)
    seg = segment_lungs_coarse(chu, grid, volume.affine, params)
    box = preprocess.lung_box(seg.labels > 0)
    return _Front(
        grid,
        chu,
        seg.labels,
        upsample_labels(seg.labels, grid),
        box,
        seg.split,
        tuple(seg.warnings),
        seg.body,
    )


def _extend_lungs(front: _Front, crop_prob: F32, threshold: float, params: LungParams) -> _Front:
    """The lungs plus the dense lesions the air threshold left out of them (issue 11).

    The classical lungs are aerated lung (< ``air_hu``) with holes and pleural dents filled; a
    consolidated posterior base or a lobe filled by pneumonia touches the pleura with no aerated lung
    beyond it and stays out (:mod:`triaged.analysis.lungs`, "Limits"). The network, trained on
    radiologists' masks that include such consolidation, sees it. Voxels above ``threshold`` that lie
    outside the lungs are added to them when, on their slice, they are connected to a lung, lie within
    :data:`EXTEND_MM` of it and inside the body, and are neither bone (``bone_hu``) nor air outside the
    lungs (below ``air_hu``); each joins the nearer lung. Nor does a voxel that lies beyond the rib cage:
    one whose straight line to its nearest lung voxel crosses bone of the slices within ``rib_slab_mm``
    (:func:`~triaged.analysis.lungs.rib_cage`: a rib, the scapula; the network fires on the chest-wall
    muscle next to a consolidation and would otherwise pass through an intercostal space). Everything
    else the network marks outside the lungs is still dropped.
    """
    _, dy, dx = front.grid.coarse_spacing
    lungs = front.lungs_coarse
    prob = np.zeros(front.grid.coarse_shape, np.float32)
    prob[front.box] = crop_prob
    hu = front.coarse_hu
    cand = (prob > threshold) & front.body & (hu > params.air_hu) & (hu < params.bone_hu) & (lungs == 0)
    if not cand.any():
        return front
    four = ndimage.generate_binary_structure(2, 1)
    out = lungs.copy()
    added = 0
    for z in np.nonzero(cand.any(axis=(1, 2)))[0]:
        lz = lungs[z]
        if not lz.any():
            continue
        dist, (iy, ix) = ndimage.distance_transform_edt(lz == 0, sampling=(dy, dx), return_indices=True)
        cz = cand[z] & (dist <= EXTEND_MM)
        if not cz.any():
            continue
        ribs = rib_cage(hu, int(z), front.body, front.grid, params.rib_slab_mm, params.bone_hu)
        cz &= ~behind_bone(cz, iy, ix, ribs, EXTEND_MM / min(dy, dx))
        if not cz.any():
            continue
        grown, _ = ndimage.label(cz | (lz > 0), four)
        keep = np.unique(grown[lz > 0])
        add = cz & np.isin(grown, keep[keep > 0])
        out[z][add] = lz[iy[add], ix[add]]
        added += int(np.count_nonzero(add))
    if not added:
        return front
    return replace(
        front, lungs_coarse=out, lungs_full=upsample_labels(out, front.grid), extended_voxels=added
    )


def _to_full(front: _Front, crop_prob: F32, threshold: float) -> B:
    coarse = np.zeros(front.grid.coarse_shape, np.float32)
    coarse[front.box] = crop_prob
    return front.grid.upsample_above(coarse, threshold, within=front.lungs_full)  # chunked: no full temporary


class LearnedPipeline:
    """Shared part of the learned pipelines: lazy, sha256-verified weights and the front end.

    Parameters
    ----------
    model : LoadedModel or path
        An already loaded model, or its folder (``models/<name>``): then the manifest is read now (for
        ``version``) and the weights are verified and loaded on the first :meth:`run`.  A folder whose
        model card cannot be read still makes a pipeline (listed, with the problem in its
        :attr:`description`); :meth:`verify` and :meth:`run` raise the card's
        :class:`~triaged.nets.weights.WeightsError`, which names the file.
    device : str or None
        None = CUDA when present, else CPU.
    allow_bf16 : bool
        Use bf16 autocast where the hardware runs it natively.
    """

    name: str = ""
    seed_paper: str = ""
    #: the last sentence of :attr:`description`: where the masks come from
    masks_note: str = "Non-learned lungs."

    def __init__(
        self,
        model: LoadedModel | Path | str,
        *,
        device: str | None = None,
        allow_bf16: bool = True,
        lung_params: LungParams | None = None,
    ) -> None:
        self._loaded = model if isinstance(model, LoadedModel) else None
        self._dir = model.directory if isinstance(model, LoadedModel) else Path(model)
        #: why the model card cannot be used (None: it can); raised by :meth:`verify` and :meth:`run`
        self._card_error: WeightsError | None = None
        if isinstance(model, LoadedModel):
            self._manifest = model.manifest
        else:
            try:
                self._manifest = read_manifest(self._dir)
            except WeightsError as exc:
                self._card_error = exc
                self._manifest = {"name": self._dir.name, "version": "?", "architecture": {}, "weights": {}}
        self.device = device
        self.allow_bf16 = allow_bf16
        self.lung_params = lung_params or LungParams()

    @property
    def version(self) -> str:
        return str(self._manifest["version"])

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"volume", f"model:{self._manifest['name']}"})

    @property
    def description(self) -> str:
        if self._card_error is not None:
            return f"{self.seed_paper}. UNAVAILABLE: {self._card_error}"
        weights = self._dir / str(self._manifest["weights"]["file"])
        if self._loaded is None and not weights.is_file():
            return f"{self.seed_paper}. UNAVAILABLE: {weights} is missing"
        arch = self._manifest.get("architecture", {})
        return (
            f"{self.seed_paper}; {arch.get('name')} with {arch.get('parameters', '?')} parameters, "
            f"weights {self._dir.name}/{self._manifest['weights']['file']} (sha256 "
            f"{str(self._manifest['weights']['sha256'])[:12]}...). {self.masks_note}"
        )

    @property
    def model(self) -> LoadedModel:
        """The verified model, loaded on first use."""
        if self._card_error is not None:
            raise self._card_error
        if self._loaded is None:
            self._loaded = load_model(self._dir)
        return self._loaded

    def verify(self) -> Path:
        """The weights file after checking it against the model card (sha256), without loading it.

        Raises
        ------
        WeightsError
            The card is missing or invalid, or the weights file is missing or differs from the card's
            sha256; the message names the file (and the expected sha256).
        """
        if self._card_error is not None:
            raise self._card_error
        return verify_weights(self._dir, self._manifest)

    network_message = "running the network"

    def run(self, volume: Volume, *, progress: Progress | None = None) -> AnalysisResult:
        """Analyse one volume: lungs, lesion (and consolidation) probability, findings."""
        say = progress or _no_progress
        times: list[tuple[str, float]] = []
        t = time.perf_counter()
        say(0.0, "segmenting lungs")
        front = _front_end(volume, self.lung_params)
        times.append(("lungs", time.perf_counter() - t))
        t = time.perf_counter()
        say(0.4, self.network_message)
        precision = Precision.choose(self.device, self.allow_bf16)
        out = self._network(front, precision)
        times.append(("network", time.perf_counter() - t))
        t = time.perf_counter()
        front = _extend_lungs(front, out.lesion_prob, out.threshold, self.lung_params)
        lesions = _to_full(front, out.lesion_prob, out.threshold)
        if out.consolidation_prob is None:
            consolidation = threshold_consolidation(volume.hu, lesions, _CONSOLIDATION_CUT)  # slab by slab
        else:
            inside = np.where(out.lesion_prob > out.threshold, out.consolidation_prob, 0.0).astype(np.float32)
            consolidation = _to_full(front, inside, out.consolidation_threshold) & lesions
        times.append(("masks", time.perf_counter() - t))
        t = time.perf_counter()
        say(0.85, "segmenting lobes")
        # the non-learned lobes on the (extended) lungs, so the CT severity score is reported too
        lobes, lobe_prov, lobe_warnings = lobes_for(
            front.coarse_hu, front.lungs_coarse, front.lungs_full, front.grid, volume.affine
        )
        masks = Masks(front.lungs_full, lesions, consolidation, lobes=lobes)
        times.append(("lobes", time.perf_counter() - t))
        say(0.9, "measuring")
        prov = [
            *out.provenance,
            *lobe_prov,
            ("precision", precision.describe()),
            *[(f"time.{k}_s", f"{v:.2f}") for k, v in times],
        ]
        findings = self._findings(volume, masks, front, out.p_covid, prov)
        if out.warnings or lobe_warnings:
            findings = replace(findings, warnings=(*findings.warnings, *lobe_warnings, *out.warnings))
        say(1.0, "done")
        return AnalysisResult(findings, masks)

    def _network(self, front: _Front, precision: Precision) -> _NetOutput:
        """Run the network on the lung crop (each learned pipeline implements it)."""
        raise NotImplementedError

    def _findings(
        self,
        volume: Volume,
        masks: Masks,
        front: _Front,
        p_covid: float | None,
        provenance: list[tuple[str, str]],
    ) -> Findings:
        prov = [
            ("grid.inplane_block", str(front.grid.factor)),
            ("grid.spacing_mm", " x ".join(f"{s:.3f}" for s in front.grid.coarse_spacing)),
            ("lungs.method", "classical (triaged.analysis.lungs)"),
            ("lungs.split", front.split),
            (
                "lungs.extended_ml",
                f"{front.extended_voxels * front.grid.coarse_voxel_ml:.1f} (network lesions beyond the aerated lungs)",
            ),
            ("model.name", self.model.name),
            ("model.version", self.model.version),
            ("model.sha256", self.model.sha256),
            *provenance,
        ]
        findings = findings_from_masks(
            volume,
            masks,
            pipeline=self.name,
            version=self.version,
            provenance=prov,
            warnings=front.warnings,
            p_covid=p_covid,
        )
        return replace(findings, model_sha256=self.model.sha256)


@dataclass(frozen=True)
class _NetOutput:
    """What a learned pipeline's network step hands to the shared remainder of :meth:`LearnedPipeline.run`."""

    #: lesion (infection) probability on the lung crop of the working grid, and its threshold
    lesion_prob: F32
    threshold: float
    #: provenance entries of the network step (method, thresholds, ...), before precision and times
    provenance: list[tuple[str, str]]
    #: consolidation probability on the same crop (None: seed 001's HU rule inside the lesions)
    consolidation_prob: F32 | None = None
    consolidation_threshold: float = 0.5
    p_covid: float | None = None
    #: warnings to add to the findings (e.g. P(COVID-19) not assessed)
    warnings: tuple[str, ...] = ()


class MultitaskPipeline(LearnedPipeline):
    """Seed 004's multitask model behind the Pipeline protocol (module docstring)."""

    name = "multitask"
    seed_paper = "Multitask U-Net + pyramid-pooling classifier of Goncharov et al. 2021 (seed 004)"
    network_message = "running the multitask network"

    def _network(self, front: _Front, precision: Precision) -> _NetOutput:
        net = self.model.module
        assert isinstance(net, mt.MultitaskNet)
        window = (self._manifest.get("inference") or {}).get("classification_window_slices")
        prob, p_covid = multitask_infer(
            net, front.coarse_hu[front.box], precision, window=None if window is None else int(window)
        )
        threshold = self.model.thresholds.get("lesion", 0.5)
        validated = p_covid_validation(self._manifest)
        identification: list[tuple[str, str]] = (
            [
                ("identification.method", "multitask network, pyramid-pooling classification head"),
                (
                    "identification.window_slices",
                    "whole stack" if window is None else f"{window} (max over windows)",
                ),
                ("identification.validated_on", validated),
            ]
            if validated is not None
            else [("identification.method", P_COVID_NOT_ASSESSED)]
        )
        return _NetOutput(
            prob,
            threshold,
            [
                ("lesions.method", "multitask network, segmentation head"),
                ("lesions.threshold", f"{threshold:g}"),
                *identification,
                ("consolidation.method", "seed 001 threshold inside the lesions"),
                ("consolidation.hu", f"> {CONSOLIDATION_HU:g}"),
            ],
            p_covid=p_covid if validated is not None else None,
            warnings=() if validated is not None else (P_COVID_NOT_ASSESSED,),
        )


class ConsolidationEMPipeline(LearnedPipeline):
    """Seed 001's UNet-1 (infection) and EM-trained UNet-2 (consolidation) behind the Pipeline protocol."""

    name = "consolidation-em"
    seed_paper = "UNet-1 infection + hard-EM UNet-2 consolidation (prior phi2) of Wu et al. 2020 (seed 001)"
    network_message = "running UNet-1 and UNet-2"
    #: lesions on slices thicker than the network's slab must be opacities (:mod:`triaged.nets.thick_slices`)
    thick_slice_rule: thick.ThickSliceRule = thick.ThickSliceRule()

    def _network(self, front: _Front, precision: Precision) -> _NetOutput:
        net = self.model.module
        assert isinstance(net, wu.ConsolidationEM)
        dz = front.grid.coarse_spacing[0]
        infection, cons = wu_infer(net, front.coarse_hu[front.box], dz, precision)
        t_inf = self.model.thresholds.get("infection", 0.5)
        t_cons = self.model.thresholds.get("consolidation", 0.5)
        infection, thick_note = self._drop_thick_slice_haze(front, infection, t_inf)
        return _NetOutput(
            infection,
            t_inf,
            [
                ("lesions.method", "seed 001 UNet-1 (2.5D, 7 slabs)"),
                ("lesions.threshold", f"{t_inf:g}"),
                ("lesions.thick_slices", thick_note),
                (
                    "consolidation.method",
                    "seed 001 UNet-2 trained by hard EM with prior phi2 (b2 9.0, k2 0.5)",
                ),
                ("consolidation.threshold", f"{t_cons:g}"),
                ("slab_mm", f"{wu.TARGET_SLICE_MM if dz < 4.0 else dz:g}"),
            ],
            consolidation_prob=cons,
            consolidation_threshold=t_cons,
        )

    def _drop_thick_slice_haze(self, front: _Front, infection: F32, threshold: float) -> tuple[F32, str]:
        """UNet-1's probability with the vessel-haze components of a thick-slice volume set to 0
        (:mod:`triaged.nets.thick_slices`), and a provenance note saying what was dropped.

        The components are judged inside the lungs as the network's lesions extend them
        (:func:`_extend_lungs`), so the dropped ones no longer extend them either.
        """
        rule = self.thick_slice_rule
        dz = front.grid.coarse_spacing[0]
        if dz <= rule.thick_slice_mm:
            return infection, f"slices {dz:.3g} mm <= {rule.thick_slice_mm:g} mm: no thick-slice rule"
        lungs = _extend_lungs(front, infection, threshold, self.lung_params).lungs_coarse
        prob = np.zeros(front.grid.coarse_shape, np.float32)
        prob[front.box] = infection
        found = thick.faint_thick_slice_lesions(prob > threshold, front.coarse_hu, lungs, front.grid, rule)
        dropped = found.dropped[front.box]
        ml = float(np.count_nonzero(dropped)) * front.grid.coarse_voxel_ml
        note = (
            f"slices {dz:.3g} mm > {rule.thick_slice_mm:g} mm: {len(found.dropped_components)} of "
            f"{len(found.components)} component(s) dropped as vessel haze (less than {rule.min_contrast_hu:g} HU "
            f"denser than the lung around them after vessel suppression, at least {rule.min_narrow_hu:g} HU "
            f"of their density from narrow structures): {ml:.1f} mL"
            + "".join(f"; {c.contrast:.0f}/{c.narrow:.0f} HU" for c in found.dropped_components)
        )
        if not dropped.any():
            return infection, note
        return np.where(dropped, np.float32(0.0), infection).astype(np.float32), note


#: Pipeline name → (model folder name, ``"module:Class"`` of the pipeline class).  Every learned pipeline
#: is listed here, by reference: the paper pipelines (``triaged/nets/paper_*.py``) subclass
#: :class:`LearnedPipeline`, so they import this module and it cannot import them at its top; their
#: modules are imported only when a pipeline is built (:func:`learned_class`).
LEARNED: dict[str, tuple[str, str]] = {
    "multitask": ("multitask", "triaged.nets.pipelines:MultitaskPipeline"),
    "consolidation-em": ("consolidation-em", "triaged.nets.pipelines:ConsolidationEMPipeline"),
    "m2unet": ("m2unet", "triaged.nets.paper_m2unet:M2UNetPipeline"),
    "dacmil": ("dacmil", "triaged.nets.paper_dacmil:DACMILPipeline"),
    "multiscale": ("multiscale", "triaged.nets.paper_multiscale:MultiScalePipeline"),
}


def learned_class(name: str) -> type[LearnedPipeline]:
    """The class of the learned pipeline ``name`` (its module imported now); KeyError for an unknown name."""
    module, _, attr = LEARNED[name][1].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, LearnedPipeline)):
        raise TypeError(f"LEARNED[{name!r}] = {LEARNED[name][1]!r} is not a LearnedPipeline subclass")
    return cls


def build_pipeline(
    name: str, models_root: Path | str | None = None, device: str | None = None
) -> LearnedPipeline:
    """The learned pipeline ``name`` for ``<models_root>/<name>`` (weights verified and loaded lazily)."""
    folder = LEARNED[name][0]
    return learned_class(name)(model_dir(folder, Path(models_root) if models_root else None), device=device)


def register_learned(
    registry: PipelineRegistry | MutableMapping[str, Pipeline],
    models_root: Path | str | None = None,
    device: str | None = None,
) -> list[str]:
    """Register the learned pipelines whose model folder is shipped (it has a model card); return their names.

    ``registry`` is a :class:`~triaged.analysis.registry.PipelineRegistry` (``register(pipeline)``) or
    any mapping (``registry[name] = pipeline``).  Only the manifests are read here; each pipeline verifies
    the sha256 and loads its weights on its first run (in the worker process), so a corrupted file fails
    that job with a clear :class:`~triaged.nets.weights.WeightsError` instead of the node's start-up.  A
    shipped model whose weights file is missing or corrupt, or whose card is invalid, is still registered:
    asking for it then gives that error, naming the file, rather than "unknown pipeline".
    """
    added: list[str] = []
    root = Path(models_root) if models_root else None
    for name, (folder, _) in LEARNED.items():
        if not (model_dir(folder, root) / MANIFEST).is_file():
            continue  # not shipped
        pipeline = build_pipeline(name, root, device)
        if isinstance(registry, PipelineRegistry):
            registry.register(pipeline)
        else:
            registry[name] = pipeline
        added.append(name)
    return added


def node_registry(device: str | None = None) -> PipelineRegistry:
    """The node's registry: the non-learned pipelines plus every learned one whose weights are shipped.

    ``device``: ``"auto"``/None picks CUDA when present, else CPU (``analysis.device``).
    """
    registry = default_registry()
    register_learned(registry, device=None if device in (None, "auto") else device)
    return registry
