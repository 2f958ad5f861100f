"""Results back to a real PACS: Orthanc on loopback receives SR, SEG and SC in the original study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from tests.conftest import make_config, write_config
from tests.integration import orthanc as orthanc_helpers
from tests.integration.conftest import storescu, wait_for
from tests.integration.orthanc import OrthancPeer
from triaged.config import Config
from triaged.daemon import Node
from triaged.domain import JobState
from triaged.ledger import Ledger

pytestmark = pytest.mark.integration
orthanc = orthanc_helpers.orthanc
orthanc_factory = orthanc_helpers.orthanc_factory

SR, SEG, SC = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.7"


def _sections(peer: OrthancPeer) -> dict[str, dict[str, object]]:
    return {
        "destinations": {"pacs": {"ae_title": peer.aet, "host": "127.0.0.1", "port": peer.dicom_port}},
        "routing": {"default": {"destinations": ["pacs"]}},
        "dispatch": {"interval_seconds": 0.3, "base_delay_seconds": 0.5, "max_delay_seconds": 2},
    }


def _study_uid(series: Path) -> str:
    return str(dcmread(next(series.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def _classes(peer: OrthancPeer, study_uid: str) -> list[str]:
    return sorted(peer.instance_tags(i["ID"])["SOPClassUID"] for i in peer.instances_of_study(study_uid))


def test_sr_seg_and_sc_arrive_in_the_original_study_exactly_once(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path, orthanc: OrthancPeer
) -> None:
    node = node_factory(make_config(tmp_path, **_sections(orthanc)))
    assert storescu(*node.listener.address, phantom_ct_series).returncode == 0
    job = wait_for(lambda: next(iter(node.ledger.jobs(states=[JobState.DONE])), None), timeout=120, what="DONE")
    study_uid = _study_uid(phantom_ct_series)
    classes = _classes(orthanc, study_uid)
    assert SR in classes and SEG in classes and SC in classes, classes
    items = node.ledger.outbox(job_id=job.id)
    assert {i.state for i in items} == {"SENT"} and len(items) == len(classes)
    assert "delivered to pacs" in job.detail
    # Resend is idempotent: same UIDs, so the PACS still holds each object once.
    assert node.dispatch.resend(job.id) == len(items)
    wait_for(lambda: node.ledger.job(job.id).state is JobState.DONE and
             all(i.state == "SENT" for i in node.ledger.outbox(job_id=job.id)), what="the resend")
    assert _classes(orthanc, study_uid) == classes


def test_an_outage_of_the_pacs_delays_delivery_and_loses_nothing(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path, orthanc: OrthancPeer
) -> None:
    orthanc.stop()
    node = node_factory(make_config(tmp_path, **_sections(orthanc)))
    assert storescu(*node.listener.address, phantom_ct_series).returncode == 0
    job = wait_for(lambda: next(iter(node.ledger.jobs(states=[JobState.RETRY_WAIT])), None), timeout=120,
                   what="RETRY_WAIT while the PACS is down")
    assert "next attempt" in job.detail
    wait_for(lambda: all(i.attempts >= 2 for i in node.ledger.outbox(job_id=job.id)), what="a second attempt")
    orthanc.start()
    wait_for(lambda: node.ledger.job(job.id).state is JobState.DONE, timeout=60, what="delivery after the outage")
    items = node.ledger.outbox(job_id=job.id)
    assert len(_classes(orthanc, _study_uid(phantom_ct_series))) == len(items)
    assert orthanc.count_instances() == len(items)  # nothing twice
    history = [to for _, _, to, _ in node.ledger.job(job.id).history]
    assert history.count("RETRY_WAIT") >= 1 and history[-1] == "DONE"


def test_an_item_past_its_maximum_age_is_dead_lettered_and_can_be_resent(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path, orthanc: OrthancPeer
) -> None:
    orthanc.stop()
    sections = _sections(orthanc)
    sections["dispatch"]["max_age_hours"] = 0.0005  # 1.8 s
    node = node_factory(make_config(tmp_path, **sections))
    assert storescu(*node.listener.address, phantom_ct_series).returncode == 0
    job = wait_for(lambda: next(iter(node.ledger.jobs(states=[JobState.FAILED])), None), timeout=120,
                   what="dead letters")
    assert job.detail.startswith("dispatch: ") and "dead-lettered" in job.detail
    assert {i.state for i in node.ledger.outbox(job_id=job.id)} == {"DEAD"}
    orthanc.start()
    node.dispatch.resend(job.id)
    wait_for(lambda: node.ledger.job(job.id).state is JobState.DONE, timeout=60, what="the resent objects")


def test_a_killed_daemon_delivers_after_restart(
    tmp_path: Path, phantom_ct_series: Path, orthanc: OrthancPeer
) -> None:
    orthanc.stop()
    cfg = write_config(tmp_path, **_sections(orthanc))
    log = (tmp_path / "daemon.log").open("w")

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "triaged.cli", "serve", "--config", str(cfg)],
                                stderr=log, text=True)

    proc = start()
    try:
        ledger_path = tmp_path / "ledger.sqlite"
        wait_for(lambda: ledger_path.exists(), what="the ledger")
        port = int(yaml.safe_load(cfg.read_text())["listener"]["port"])
        wait_for(lambda: storescu("127.0.0.1", port, phantom_ct_series).returncode == 0, what="the upload")

        def state() -> JobState | None:
            with Ledger(ledger_path) as ledger:
                jobs = ledger.jobs()
                return jobs[0].state if jobs else None

        wait_for(lambda: state() is JobState.RETRY_WAIT, timeout=120, what="encoded results waiting to be sent")
        os.kill(proc.pid, signal.SIGKILL)  # no drain, no goodbye
        proc.wait()
        orthanc.start()
        proc = start()
        wait_for(lambda: state() is JobState.DONE, timeout=60, what="delivery after the restart")
        with Ledger(ledger_path) as ledger:
            [job] = ledger.jobs()
            items = ledger.outbox(job_id=job.id)
        assert {i.state for i in items} == {"SENT"}
        assert orthanc.count_instances() == len(items) >= 3
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
