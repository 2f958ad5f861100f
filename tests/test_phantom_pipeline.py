"""Phantoms through the real non-learned pipeline: priority order per policy, and valid result objects."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.encode_fixtures import dciodvfy, errors, round_trip
from triaged.analysis import default_registry
from triaged.config import Config
from triaged.domain import AnalysisResult, Volume
from triaged.encode import OutputContext, build_outputs
from triaged.lab.phantom import PhantomSpec, generate, to_datasets, to_volume
from triaged.priority import prioritise

SEVERITIES = {"mild": 8.0, "moderate": 30.0, "severe": 62.0}


@pytest.fixture(scope="module")
def analysed() -> dict[str, tuple[Volume, AnalysisResult, list[object]]]:
    pipeline = default_registry().get("classical")
    out = {}
    specs = {name: PhantomSpec(kind="covid", severity=pct, seed=21, matrix=160, slice_thickness=5.0)
             for name, pct in SEVERITIES.items()}
    specs["healthy"] = PhantomSpec(kind="healthy", seed=21, matrix=160, slice_thickness=5.0)
    for name, spec in specs.items():
        phantom = generate(spec)
        volume = to_volume(phantom)
        source = [ds for ds in to_datasets(phantom) if ds.SeriesInstanceUID == volume.series_instance_uid]
        out[name] = (volume, pipeline.run(volume), source)
    return out


@pytest.mark.parametrize("policy", ["severity", "both", "identification"])
def test_each_policy_ranks_the_severe_phantom_first_and_the_healthy_one_last(
    analysed: dict[str, tuple[Volume, AnalysisResult, list[object]]], policy: str
) -> None:
    policies = Config().priority.policies
    ranked = sorted(analysed, key=lambda n: prioritise(analysed[n][1].findings, policies[policy]).sort_key())
    assert ranked == ["severe", "moderate", "mild", "healthy"], ranked
    severe = prioritise(analysed["severe"][1].findings, policies[policy])
    assert severe.summary.startswith("CT3: ")
    # Severity-aware policies escalate CT3 to STAT; identification alone has no P(COVID-19) from this
    # non-learned pipeline, ranks by severity instead and says so, but does not escalate on severity.
    if policy == "identification":
        assert severe.level == "ROUTINE" and "no P(COVID-19)" in severe.summary
    else:
        assert severe.level == "STAT"


def test_result_objects_of_a_phantom_are_dciodvfy_clean_and_the_sc_shows_its_severity(
    analysed: dict[str, tuple[Volume, AnalysisResult, list[object]]], tmp_path: Path
) -> None:
    volume, result, source = analysed["severe"]
    ctx = OutputContext(software_version="test", priority_level="STAT", content_datetime=datetime(2026, 1, 1))
    outputs = build_outputs(result.findings, result.masks, volume, source, ctx)  # type: ignore[arg-type]
    assert [ds.Modality for ds in outputs][:2] == ["SR", "SEG"]
    for i, ds in enumerate(outputs):
        assert errors(dciodvfy(round_trip(ds), tmp_path / f"out{i}.dcm")) == []
    sc = outputs[2]
    rgb = sc.pixel_array
    Image.fromarray(rgb).save(tmp_path / "sc-phantom.png")  # rendered for a human to look at
    # A radiograph: lungs dark, mediastinum bright; lesions tinted (the heat overlay is not grey).
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    tinted = np.abs(rgb[..., 0].astype(int) - rgb[..., 2].astype(int)) > 40
    assert tinted.mean() > 0.01
