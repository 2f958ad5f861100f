"""Pipelines for the cluster test (named by ``analysis.registry``); every other name as
:mod:`tests.worker_pipelines`.

``gate:<name>`` analyses until the file ``<name>`` appears in the folder ``$TRIAGED_TEST_GATES`` (the test
opens the gate), then answers as the stand-in ``ok`` does: the test decides when an analyser comes free,
with no sleep to tune.  A gate never opened fails the analysis after :data:`GATE_TIMEOUT` seconds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from tests import worker_pipelines
from triaged.domain import AnalysisResult, Volume

GATE_TIMEOUT = 120.0


@dataclass(frozen=True)
class _Gate:
    name: str
    version: str = "test"

    def run(self, volume: Volume, *, progress: object = None) -> AnalysisResult:
        gate = Path(os.environ["TRIAGED_TEST_GATES"]) / self.name.split(":", 1)[1]
        deadline = time.monotonic() + GATE_TIMEOUT
        while not gate.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {gate} was never opened")
            time.sleep(0.05)
        return worker_pipelines.registry().get(self.name).run(volume, progress=progress)


class _Registry(worker_pipelines._Registry):
    def get(self, name: str) -> _Gate | worker_pipelines._Pipeline:  # type: ignore[override]
        return _Gate(name) if name.startswith("gate:") else super().get(name)


def registry() -> _Registry:
    return _Registry()
