"""An IGNORED study through a real node: DCMTK storescp receives a short SR saying why (issue 15)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread

from tests.conftest import make_config
from tests.encode_fixtures import dciodvfy, errors
from tests.integration.conftest import start_storescp, storescu, wait_for
from triaged.config import Config
from triaged.daemon import Node
from triaged.domain import JobState
from triaged.encode.context import RESEARCH_USE_TEXT

pytestmark = pytest.mark.integration

#: A rule that ignores every study sent by the calling AE title "SKIPME".
_RULES = [{"name": "skip-me", "match": {"calling_ae": "SKIPME"}, "action": {"ignore": "sent by a test AE"}}]


def _node_and_storescp(
    node_factory: Callable[[Config], Node], tmp_path: Path, report: str
) -> tuple[Node, subprocess.Popen[bytes], Path]:
    storescp, port, received = start_storescp(tmp_path)
    node = node_factory(
        make_config(
            tmp_path,
            completion={"delay_seconds": 0.5, "sweep_interval_seconds": 1},
            destinations={"dest": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": port}},
            routing={"default": {"destinations": ["dest"]}, "rules": _RULES},
            dispatch={"interval_seconds": 0.3, "ignored_report": report},
        )
    )
    return node, storescp, received


def test_an_ignored_study_gets_a_not_analysed_sr_in_its_study(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    node, storescp, received = _node_and_storescp(node_factory, tmp_path, "sr")
    try:
        sent = sorted(phantom_ct_series.iterdir())[:3]
        assert storescu(*node.listener.address, sent, aet="SKIPME").returncode == 0
        job = wait_for(
            lambda: next(iter(node.ledger.jobs(states=[JobState.IGNORED])), None),
            what="the job to be IGNORED",
        )
        wait_for(lambda: list(received.iterdir()), what="the SR to arrive at storescp")
        wait_for(
            lambda: all(i.state == "SENT" for i in node.ledger.outbox(job_id=job.id)),  # type: ignore[attr-defined]
            what="the outbox to record the delivery",
        )
    finally:
        storescp.terminate()
        storescp.wait()
    (path,) = received.iterdir()
    source = dcmread(sent[0], stop_before_pixels=True)
    sr = dcmread(path)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    texts = [item.TextValue for item in sr.ContentSequence]
    reason = node.ledger.job(job.id).detail  # type: ignore[attr-defined]
    assert "sent by a test AE" in reason
    assert texts[0] == f"Not analysed by triaged: {reason}"
    assert RESEARCH_USE_TEXT in texts and "not for diagnosis" in RESEARCH_USE_TEXT
    assert isinstance(hd.sr.srread(path), hd.sr.EnhancedSR)
    assert errors(dciodvfy(sr, tmp_path / "check.dcm")) == []
    assert node.ledger.job(job.id).state is JobState.IGNORED  # type: ignore[attr-defined]


def test_ignored_report_none_sends_nothing(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    node, storescp, received = _node_and_storescp(node_factory, tmp_path, "none")
    try:
        assert (
            storescu(*node.listener.address, sorted(phantom_ct_series.iterdir())[:3], aet="SKIPME").returncode
            == 0
        )
        job = wait_for(
            lambda: next(iter(node.ledger.jobs(states=[JobState.IGNORED])), None),
            what="the job to be IGNORED",
        )
        node.dispatch.dispatch_due()
    finally:
        storescp.terminate()
        storescp.wait()
    assert node.ledger.outbox(job_id=job.id) == []  # type: ignore[attr-defined]
    assert list(received.iterdir()) == []
