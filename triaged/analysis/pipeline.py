"""The :class:`Pipeline` protocol and the two non-learned pipelines.

A pipeline turns a :class:`~triaged.domain.Volume` into an :class:`~triaged.domain.AnalysisResult`
(findings + masks). The registry lives in :mod:`triaged.analysis.registry`; its names are re-exported
here (``triaged.analysis.pipeline:default_registry`` stays a valid ``analysis.registry``).

Built-in pipelines (both run on seed 004's 2 × 2 mm in-plane working grid, see
:mod:`triaged.analysis.grid`, with the classical lungs of :mod:`triaged.analysis.lungs`):

``threshold``
    Seed 004's thresholding baseline for lesions (Goncharov et al. 2021, Sections 2.1.2 and 5.1) and
    seed 001's −200 HU consolidation baseline (Wu et al. 2020, Section III-C). Version 1.1: the z blur
    repeats the end slices instead of padding with zeros (findings at the ends of a stack survive).
    Version 1.2 (both pipelines): lobes and the CT severity score. Version 1.3 (both): the lungs leave
    out the partial-volume rim of stomach and colon gas under the left dome, and keep hyperlucent lung
    that has no gut wall around it (issue 11, :func:`triaged.analysis.lungs._remove_abdominal_gas`).
    Version 1.4 (both): a pleural pocket bordered by ground glass or consolidation also takes its
    fat-range voxels (partly aerated consolidation) and may open inside the outline of both lungs (the
    paravertebral gutter): :func:`triaged.analysis.lungs._fill_pleural_pockets`, issue 11.
``classical``
    The vessel-suppressed density variant of :func:`triaged.analysis.lesions.classical_lesions` and
    its consolidation. Version 1.1: components that are not pneumonia on a real scan (faint haze,
    subpleural bands, partial volume at the domes and apices, round nodules) are dropped.

Both grade with the explicit CT0 of :meth:`triaged.domain.CTGrade.from_affected_pct` (version 1.1), split
the lungs into lobes with the fissure-aware, non-learned :mod:`triaged.analysis.lobes` (none when the
stack does not cover the lungs from base to apex) and report the CT severity score (0–25) from them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from triaged.analysis.grid import WorkGrid
from triaged.analysis.lesions import (
    ClassicalParams,
    CoarseLesions,
    ThresholdParams,
    classical_consolidation,
    classical_lesions,
    lesions_to_full,
    posterior_sign_of,
    threshold_consolidation,
    threshold_lesions,
)
from triaged.analysis.lobes import lobes_for
from triaged.analysis.lungs import LungParams, segment_lungs_coarse, upsample_labels
from triaged.analysis.registry import (
    PipelineRegistry,
    UnknownPipelineError,
    default_registry,
    get_pipeline,
    pipeline_names,
)
from triaged.analysis.severity import findings_from_masks
from triaged.domain import AnalysisResult, Masks, Volume

__all__ = [
    "ClassicalPipeline",
    "Pipeline",
    "PipelineRegistry",
    "Progress",
    "ThresholdPipeline",
    "UnknownPipelineError",
    "default_registry",
    "get_pipeline",
    "pipeline_names",
]

B = npt.NDArray[np.bool_]
F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

#: ``progress(fraction in [0, 1], message)``, called from the thread running the pipeline.
Progress = Callable[[float, str], None]


@runtime_checkable
class Pipeline(Protocol):
    """What the worker runs: a named, versioned analysis of one volume.

    ``needs`` names what the pipeline requires besides the volume (``{"volume"}`` for the
    non-learned ones, ``{"volume", "model:<name>"}`` for a learned one), so the caller can check
    that weights are present before queueing work.
    """

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def needs(self) -> frozenset[str]: ...

    @property
    def description(self) -> str: ...

    def run(self, volume: Volume, *, progress: Progress | None = None) -> AnalysisResult:
        """Analyse one volume; raise :class:`~triaged.errors.TriagedError` when it cannot be."""
        ...


# ----------------------------------------------------------------------------------- the pipelines
def _no_progress(fraction: float, message: str) -> None:
    """Default progress sink."""


class _Stopwatch:
    """Wall-clock seconds per step, for the provenance."""

    def __init__(self) -> None:
        self.laps: list[tuple[str, float]] = []
        self._start = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.laps.append((step, now - self._start))
        self._start = now

    def provenance(self) -> list[tuple[str, str]]:
        total = sum(s for _, s in self.laps)
        return [(f"time.{k}_s", f"{s:.2f}") for k, s in self.laps] + [("time.total_s", f"{total:.2f}")]


class _Steps(Protocol):
    """The parts in which the non-learned pipelines differ."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def lung_params(self) -> LungParams: ...

    def lesion_step(self, hu: F32, lungs: U8, grid: WorkGrid, posterior_sign: int) -> CoarseLesions: ...

    def consolidation_step(self, volume: Volume, coarse: CoarseLesions, lesions: B, grid: WorkGrid) -> B: ...

    def method_provenance(self) -> list[tuple[str, str]]: ...


def _run_steps(steps: _Steps, volume: Volume, progress: Progress) -> AnalysisResult:
    """The shared body of the non-learned pipelines: grid → lungs → lobes → lesions → consolidation → findings."""
    watch = _Stopwatch()
    lung_params = steps.lung_params
    shape = volume.hu.shape
    grid = WorkGrid.for_volume((shape[0], shape[1], shape[2]), volume.spacing, lung_params.target_mm)
    progress(0.0, "resampling to the working grid")
    hu_c = grid.downsample(volume.hu)
    watch.lap("resample")
    progress(0.15, "segmenting lungs")
    seg = segment_lungs_coarse(hu_c, grid, volume.affine, lung_params)
    lungs = upsample_labels(seg.labels, grid)
    watch.lap("lungs")
    progress(0.4, "segmenting lobes")
    lobes, lobe_prov, lobe_warnings = lobes_for(hu_c, seg.labels, lungs, grid, volume.affine)
    watch.lap("lobes")
    progress(0.5, "segmenting lesions")
    coarse = steps.lesion_step(hu_c, seg.labels, grid, posterior_sign_of(volume.affine))
    del hu_c
    lesions = lesions_to_full(coarse, lungs, grid)
    watch.lap("lesions")
    progress(0.75, "segmenting consolidation")
    consolidation = steps.consolidation_step(volume, coarse, lesions, grid)
    watch.lap("consolidation")
    masks = Masks(lungs=lungs, lesions=lesions, consolidation=consolidation, lobes=lobes)
    progress(0.85, "measuring")
    prov = [
        ("grid.inplane_block", str(grid.factor)),
        ("grid.spacing_mm", " x ".join(f"{s:.3f}" for s in grid.coarse_spacing)),
        ("lungs.method", "classical (threshold, airway tracking, pleural pockets)"),
        ("lungs.split", seg.split),
        ("lungs.air_hu", f"{lung_params.air_hu:g}"),
        *lobe_prov,
        *steps.method_provenance(),
    ]
    findings = findings_from_masks(
        volume,
        masks,
        pipeline=steps.name,
        version=steps.version,
        provenance=prov,
        warnings=(*seg.warnings, *lobe_warnings),
    )
    watch.lap("measure")
    findings = replace(findings, provenance=findings.provenance + tuple(watch.provenance()))
    progress(1.0, "done")
    return AnalysisResult(findings, masks)


@dataclass(frozen=True)
class ThresholdPipeline:
    """Seed 004's thresholding baseline + seed 001's −200 HU consolidation (module docstring)."""

    name: str = "threshold"
    version: str = "1.5"
    needs: frozenset[str] = frozenset({"volume"})
    description: str = (
        "HU thresholding baseline of Goncharov et al. 2021 (seed 004): [-700, 300] HU in the lungs, "
        "Gaussian blur sigma 4 (2 mm grid; end slices repeated along z), > 0.5, components >= 0.1 % of "
        "lung volume; consolidation = lesion voxels > -200 HU (Wu et al. 2020, seed 001). Non-learned lungs."
    )
    lung_params: LungParams = LungParams()
    params: ThresholdParams = ThresholdParams()

    def run(self, volume: Volume, *, progress: Progress | None = None) -> AnalysisResult:
        """Analyse ``volume`` (see :class:`Pipeline`)."""
        return _run_steps(self, volume, progress or _no_progress)

    def lesion_step(self, hu: F32, lungs: U8, grid: WorkGrid, posterior_sign: int) -> CoarseLesions:
        """Seed 004's thresholding baseline on the working grid (orientation-free)."""
        return threshold_lesions(hu, lungs, grid, self.params)

    def consolidation_step(self, volume: Volume, coarse: CoarseLesions, lesions: B, grid: WorkGrid) -> B:
        """Seed 001's −200 HU cut on the volume's own voxels."""
        return threshold_consolidation(volume.hu, lesions, self.params)

    def method_provenance(self) -> list[tuple[str, str]]:
        """Thresholds as applied."""
        p = self.params
        return [
            ("lesions.method", "seed 004 thresholding baseline"),
            ("lesions.hu_window", f"[{p.hu_min:g}, {p.hu_max:g}]"),
            ("lesions.sigma", f"{p.sigma_slices:g} slices x {p.sigma_mm:g} mm x {p.sigma_mm:g} mm"),
            ("lesions.sigma_z_edges", "nearest (end slices repeated)"),
            ("lesions.min_component", f"{100 * p.min_fraction:g} % of lung volume"),
            ("consolidation.method", "seed 001 threshold"),
            ("consolidation.hu", f"> {p.consolidation_hu:g}"),
        ]


@dataclass(frozen=True)
class ClassicalPipeline:
    """Vessel-suppressed density lesions and consolidation (module docstring)."""

    name: str = "classical"
    version: str = "1.5"
    needs: frozenset[str] = frozenset({"volume"})
    description: str = (
        "Classical lesion segmentation: lung HU extended past the pleura, per-slice grey opening "
        "(vessel suppression), ground glass >= -720 HU, central-vessel and small-component removal, "
        "then faint haze, subpleural bands, dome/apex partial volume and round nodules dropped; "
        "consolidation = vessel-suppressed density > -200 HU. Non-learned lungs."
    )
    lung_params: LungParams = LungParams()
    params: ClassicalParams = ClassicalParams()

    def run(self, volume: Volume, *, progress: Progress | None = None) -> AnalysisResult:
        """Analyse ``volume`` (see :class:`Pipeline`)."""
        return _run_steps(self, volume, progress or _no_progress)

    def lesion_step(self, hu: F32, lungs: U8, grid: WorkGrid, posterior_sign: int) -> CoarseLesions:
        """Vessel-suppressed density lesions on the working grid."""
        return classical_lesions(hu, lungs, grid, self.params, posterior_sign=posterior_sign)

    def consolidation_step(self, volume: Volume, coarse: CoarseLesions, lesions: B, grid: WorkGrid) -> B:
        """−200 HU on the vessel-suppressed density inside the lesion."""
        return classical_consolidation(coarse, lesions, grid, self.params)

    def method_provenance(self) -> list[tuple[str, str]]:
        """Parameters as applied."""
        p = self.params
        return [
            ("lesions.method", "vessel-suppressed density (grey opening)"),
            ("lesions.vessel_radius_mm", f"{p.vessel_radius_mm:g}"),
            ("lesions.hu_window", f"[{p.ggo_hu:g}, {p.max_hu:g}]"),
            ("lesions.min_component_ml", f"{p.min_component_ml:g}"),
            ("lesions.min_contrast_hu", f"{p.min_contrast_hu:g} (ring {p.contrast_ring_mm:g} mm)"),
            (
                "lesions.subpleural_band",
                f"<= {p.pleural_max_width_mm:g} mm thick, {p.pleural_band_mm:g} mm band, dependent "
                f"(beyond {p.pleural_band_dependent:g} of the lung's depth from the front; supine assumed)",
            ),
            ("lesions.nodule", f"round, <= {p.nodule_max_mm:g} mm, fill >= {p.nodule_min_fill:g}"),
            ("consolidation.method", "vessel-suppressed density threshold"),
            ("consolidation.hu", f"> {p.consolidation_hu:g}"),
        ]
