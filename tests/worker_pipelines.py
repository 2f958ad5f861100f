"""Pipelines that misbehave on purpose, for the worker tests (named by ``analysis.registry``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from triaged.analysis import PipelineRegistry
from triaged.domain import AnalysisResult, CTGrade, Findings, LungMeasures, Masks, Volume


@dataclass(frozen=True)
class _Pipeline:
    name: str
    version: str = "test"

    def run(self, volume: Volume, *, progress: object = None) -> AnalysisResult:
        if self.name == "crash":
            os._exit(70)  # as a segfault in native code would: no exception, no answer
        if self.name == "hang":
            time.sleep(3600)
        if self.name == "hog":
            ballast = np.ones(3 * 2**30 // 8)  # 3 GiB, touched
            time.sleep(60)
            del ballast
        if self.name == "raise":
            raise ValueError("no lungs found in this volume")
        lungs = np.zeros(volume.hu.shape, np.uint8)
        lungs[:, :, : lungs.shape[2] // 2] = 1
        lungs[:, :, lungs.shape[2] // 2 :] = 2
        empty = np.zeros(volume.hu.shape, bool)
        pct, p_covid = 0.0, None
        if self.name.startswith("sev:"):  # "sev:<affected % of the right lung>:<P(COVID-19)>"
            _, pct_text, p_text = self.name.split(":")
            pct, p_covid = float(pct_text), float(p_text)
        right = LungMeasures(lung_ml=1000.0, lesion_ml=10.0 * pct, consolidation_ml=0.0)
        left = LungMeasures(lung_ml=1000.0, lesion_ml=0.0, consolidation_ml=0.0)
        findings = Findings(self.name, self.version, right, left, CTGrade.from_affected_pct(pct), p_covid=p_covid)
        return AnalysisResult(findings, Masks(lungs, empty, empty))


class _Registry(PipelineRegistry):  # answers any name: a stand-in, it lists none
    def get(self, name: str) -> _Pipeline:
        return _Pipeline(name)

    def __contains__(self, name: object) -> bool:
        return name != "not-installed"


def registry() -> _Registry:
    return _Registry()
