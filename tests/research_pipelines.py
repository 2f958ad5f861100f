"""Stand-ins of issue 14's research pipelines for the ``triaged eval`` columns test (named by
``--registry tests.research_pipelines:registry``).

Each wraps the real ``threshold`` pipeline (a few seconds on a small phantom) and derives its research
outputs from what it measured, so the eval path runs end to end without a model:

* ``bacterial-test``: P(covid) = 0.9 for bilateral opacity (both lungs > 1 %), else 0.2 (seed 002's field);
* ``three-test``: P(severe) = worse lung affected % / 100 (seed 000's), normal / cap / covid by the rule
  above plus "no opacity is normal", and one saliency box on the largest lesion's box, labelled with the
  argmax class (seed 003's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from triaged.analysis.pipeline import ThresholdPipeline
from triaged.analysis.registry import PipelineRegistry
from triaged.domain import AnalysisResult, Findings, SaliencyBox, Volume


def _bilateral(findings: Findings) -> bool:
    return min(findings.right.affected_pct, findings.left.affected_pct) > 1.0


@dataclass(frozen=True)
class _Research:
    name: str
    version: str = "test"
    needs: frozenset[str] = frozenset({"volume"})
    description: str = "test stand-in of a research pipeline (threshold + derived outputs)"

    def run(self, volume: Volume, *, progress: object = None) -> AnalysisResult:
        result = ThresholdPipeline().run(volume)
        f = replace(result.findings, pipeline=self.name, pipeline_version=self.version)
        if self.name == "bacterial-test":
            p = 0.9 if _bilateral(f) else 0.2
            f = replace(f, class_probabilities=(("covid", p), ("bacterial", 1.0 - p)))
        else:
            if f.severity_pct < 1.0:
                probs = (("normal", 0.8), ("cap", 0.1), ("covid", 0.1))
            elif _bilateral(f):
                probs = (("normal", 0.05), ("cap", 0.15), ("covid", 0.8))
            else:
                probs = (("normal", 0.1), ("cap", 0.7), ("covid", 0.2))
            label = max(probs, key=lambda kv: kv[1])[0]
            boxes = tuple(
                SaliencyBox(b.z, b.sop_instance_uid, b.row_min, b.col_min, b.row_max, b.col_max, label, 0.7)
                for b in f.lesion_boxes[:1]
                if label != "normal"
            )
            f = replace(
                f, class_probabilities=probs, saliency_boxes=boxes, p_severe=min(f.severity_pct / 100.0, 1.0)
            )
        return AnalysisResult(f, result.masks)


def registry() -> PipelineRegistry:
    return PipelineRegistry([ThresholdPipeline(), _Research("bacterial-test"), _Research("three-test")])
