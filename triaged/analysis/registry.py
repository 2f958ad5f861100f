"""The pipeline registry: pipelines by name, the default registry and loading a configured one.

The registry is an ordinary object: :func:`default_registry` builds a fresh one holding the built-in
pipelines every time it is called, so nothing is registered as a side effect of importing a module, and
a test or plug-in can build its own.  ``analysis.registry`` in the config names the factory as
``module:function`` (:func:`load_registry`); the node's default adds the learned pipelines whose
weights are shipped (``triaged.nets.pipelines:node_registry``, registered from :mod:`triaged.nets`
because this layer does not import the networks).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from triaged.errors import TriagedError

if TYPE_CHECKING:
    from triaged.analysis.pipeline import Pipeline


class UnknownPipelineError(TriagedError):
    """No pipeline of that name is registered (the message lists the known ones)."""


class PipelineRegistry:
    """Pipelines by name.

    Parameters
    ----------
    pipelines : iterable of Pipeline
        Registered in order; names must be unique.
    """

    def __init__(self, pipelines: Iterable[Pipeline] = ()) -> None:
        self._pipelines: dict[str, Pipeline] = {}
        for p in pipelines:
            self.register(p)

    def register(self, pipeline: Pipeline, *, replace: bool = False) -> None:
        """Add a pipeline; a second one with the same name is refused unless ``replace``."""
        if pipeline.name in self._pipelines and not replace:
            raise TriagedError(f"a pipeline named {pipeline.name!r} is already registered")
        self._pipelines[pipeline.name] = pipeline

    def get_pipeline(self, name: str) -> Pipeline:
        """The pipeline called ``name``.

        Raises
        ------
        UnknownPipelineError
            No such pipeline; the message lists the registered names.
        """
        try:
            return self._pipelines[name]
        except KeyError:
            known = ", ".join(self.pipeline_names()) or "none"
            raise UnknownPipelineError(f"unknown pipeline {name!r}; known pipelines: {known}") from None

    def get(self, name: str) -> Pipeline:
        """Alias of :meth:`get_pipeline` (the worker's spelling)."""
        return self.get_pipeline(name)

    def pipeline_names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._pipelines))

    def __contains__(self, name: object) -> bool:
        return name in self._pipelines

    def __iter__(self) -> Iterator[Pipeline]:
        return iter(self._pipelines[n] for n in self.pipeline_names())

    def __len__(self) -> int:
        return len(self._pipelines)


def default_registry(extra: Iterable[Pipeline] = ()) -> PipelineRegistry:
    """A fresh registry with the built-in pipelines (``threshold``, ``classical``) and ``extra``."""
    # Imported here: triaged.analysis.pipeline re-exports this module's names (it imports this module).
    from triaged.analysis.pipeline import ClassicalPipeline, ThresholdPipeline

    return PipelineRegistry([ThresholdPipeline(), ClassicalPipeline(), *extra])


def get_pipeline(name: str) -> Pipeline:
    """A built-in pipeline by name (from a fresh :func:`default_registry`)."""
    return default_registry().get_pipeline(name)


def pipeline_names() -> tuple[str, ...]:
    """Names of the built-in pipelines."""
    return default_registry().pipeline_names()


def load_registry(spec: str, device: str | None = None) -> PipelineRegistry:
    """The pipeline registry made by the factory named ``module:function`` (``analysis.registry``).

    ``device`` is passed when the factory takes one (learned pipelines place their networks on it).

    Raises
    ------
    TypeError
        The factory returned something other than a :class:`PipelineRegistry`.
    """
    module, _, factory = spec.partition(":")
    make = getattr(importlib.import_module(module), factory)
    takes_device = device is not None and "device" in inspect.signature(make).parameters
    registry = make(device=device) if takes_device else make()
    if not isinstance(registry, PipelineRegistry):
        raise TypeError(f"{spec} returned a {type(registry).__name__}, not a PipelineRegistry")
    return registry
