"""Analysis pipelines (pure layer): a :class:`~triaged.domain.Volume` in, an
:class:`~triaged.domain.AnalysisResult` out; no file or network I/O.

``default_registry`` is what ``analysis.registry`` names by default (``triaged.analysis:default_registry``).
"""

from triaged.analysis.pipeline import (
    ClassicalPipeline,
    Pipeline,
    PipelineRegistry,
    ThresholdPipeline,
    UnknownPipelineError,
    default_registry,
    get_pipeline,
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
    "pipeline_names",
]
