"""Analysis pipelines (pure layer): a :class:`~triaged.domain.Volume` in, an
:class:`~triaged.domain.AnalysisResult` out; no file or network I/O.

The registry (:mod:`triaged.analysis.registry`): ``default_registry`` builds the non-learned one
(``triaged.analysis:default_registry``), ``load_registry`` the one ``analysis.registry`` names.
"""

from triaged.analysis.pipeline import ClassicalPipeline, Pipeline, ThresholdPipeline
from triaged.analysis.registry import (
    PipelineRegistry,
    UnknownPipelineError,
    default_registry,
    get_pipeline,
    load_registry,
    pipeline_names,
)

__all__ = [
    "ClassicalPipeline",
    "Pipeline",
    "PipelineRegistry",
    "ThresholdPipeline",
    "UnknownPipelineError",
    "default_registry",
    "get_pipeline",
    "load_registry",
    "pipeline_names",
]
