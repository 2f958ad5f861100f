"""The three paper pipelines (issue 14) end to end through a real node: C-STORE in, SR + SEG + SC out to
DCMTK storescp, on a phantom and on a real series, each with the shipped weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import make_config
from tests.encode_fixtures import dciodvfy, errors
from tests.integration.conftest import start_storescp, storescu, wait_for
from triaged.config import Config
from triaged.daemon import Node
from triaged.domain import JobState
from triaged.nets.weights import weights_present

pytestmark = pytest.mark.integration

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
#: Calling AE title → the pipeline its studies are routed to.
PIPELINES = {"M2U": "m2unet", "DAC": "dacmil", "MSC": "multiscale"}


def _copy_as_new_study(files: list[Path], out: Path) -> list[Path]:
    """The same images as another study (new study, series and instance UIDs)."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    copies = []
    for f in files:
        ds = dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(out / f.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def test_each_paper_pipeline_analyses_a_phantom_and_a_real_series_through_the_node(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path, pet_ct_dx: Path
) -> None:
    missing = [name for name in PIPELINES.values() if not weights_present(name)]
    assert not missing, f"models/ lacks the weights of {missing}"
    storescp, port, received = start_storescp(tmp_path)
    rules = [
        {"name": f"to-{name}", "match": {"calling_ae": aet}, "action": {"pipelines": [name]}}
        for aet, name in PIPELINES.items()
    ]
    node = node_factory(
        make_config(
            tmp_path,
            completion={"delay_seconds": 1, "sweep_interval_seconds": 1},
            analysis={"registry": "triaged.nets.pipelines:node_registry", "default_pipeline": "classical"},
            destinations={"dest": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": port}},
            routing={"default": {"destinations": ["dest"]}, "rules": rules},
            dispatch={"interval_seconds": 0.3},
        )
    )
    phantom = sorted(phantom_ct_series.iterdir())
    real = sorted(pet_ct_dx.iterdir())
    try:
        for aet in PIPELINES:
            for kind, files in (("phantom", phantom), ("real", real)):
                copies = _copy_as_new_study(files, tmp_path / f"{aet}-{kind}")
                assert storescu(*node.listener.address, copies, aet=aet).returncode == 0
        jobs = wait_for(
            lambda: done if len(done := node.ledger.jobs(states=[JobState.DONE])) == 6 else None,
            timeout=600,
            what="six studies analysed and delivered",
        )
    finally:
        storescp.terminate()
        storescp.wait()
    assert not node.ledger.jobs(states=[JobState.FAILED])
    by_pipeline: dict[str, int] = {}
    for job in jobs:  # type: ignore[attr-defined]
        findings = node.ledger.findings(job.id)  # type: ignore[attr-defined]
        assert findings is not None
        assert findings.pipeline in PIPELINES.values() and findings.p_covid is None
        by_pipeline[findings.pipeline] = by_pipeline.get(findings.pipeline, 0) + 1
        if findings.pipeline == "m2unet":
            assert findings.p_severe is not None and 0.0 <= findings.p_severe <= 1.0
        else:
            assert [c for c, _ in findings.class_probabilities] == (
                ["covid", "bacterial"] if findings.pipeline == "dacmil" else ["normal", "cap", "covid"]
            )
    assert by_pipeline == {name: 2 for name in PIPELINES.values()}

    paths = sorted(received.iterdir())
    objects = [dcmread(p) for p in paths]
    classes = [str(ds.SOPClassUID) for ds in objects]
    assert classes.count(SEG) == 6 and classes.count(SC) >= 6
    srs = [p for p, ds in zip(paths, objects, strict=True) if ds.Modality == "SR"]
    assert len(srs) == 6
    severe_reported = 0
    for path in srs:
        sr = hd.sr.srread(path)
        values = [str(e.value) for e in dcmread(path).iterall() if e.keyword in ("TextValue", "CodeValue")]
        assert any("not for diagnosis" in v.lower() for v in values)
        severe_reported += "PSEVERE" in values
        assert errors(dciodvfy(dcmread(path), tmp_path / "check.dcm")) == []
        assert isinstance(sr, hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR)
    assert severe_reported == 2  # the two m2unet studies
