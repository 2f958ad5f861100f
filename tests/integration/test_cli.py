"""The read-only CLI commands against a ledger filled by a real node."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import write_config
from tests.integration.conftest import storescu, wait_for
from triaged.cli import main
from triaged.config import Config, load_config
from triaged.daemon import Node
from triaged.domain import JobState

pytestmark = pytest.mark.integration


def test_studies_jobs_and_status_show_what_the_node_recorded(
    node_factory: Callable[[Config], Node],
    tmp_path: Path,
    phantom_ct_series: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = write_config(tmp_path)
    node = node_factory(load_config(cfg))
    assert storescu(*node.listener.address, phantom_ct_series).returncode == 0
    job = wait_for(lambda: next(iter(node.ledger.jobs(states=[JobState.DONE])), None), timeout=120, what="DONE")
    files = sorted(phantom_ct_series.iterdir())
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID

    assert main(["studies", "--config", str(cfg), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["study_instance_uid"], row["instances"], row["state"]) == (study_uid, len(files), "DONE")

    assert main(["jobs", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert study_uid in out and "DONE" in out

    assert main(["jobs", str(job.id), "--config", str(cfg)]) == 0
    rows = capsys.readouterr().out.splitlines()[4:]  # after the job line, the series line and the table head
    states = [r.split()[3] for r in rows]
    assert states == ["RECEIVING", "COMPLETE", "QUEUED", "ANALYSING", "ENCODING", "DISPATCHING", "DONE"]
    assert f"{len(files)} axial slices" in rows[2]

    assert main(["status", "--config", str(cfg)]) == 0
    status = capsys.readouterr().out
    assert "C-ECHO status 0x0000" in status and "DONE 1" in status and "GiB free" in status


def test_status_exits_non_zero_when_the_listener_is_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    assert main(["status", "--config", str(cfg)]) == 1
    assert "not answering" in capsys.readouterr().out


def test_a_missing_ledger_is_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["jobs", "--config", str(cfg)])
    assert info.value.code == 1
    assert "no ledger at" in capsys.readouterr().err


def test_rules_test_explains_which_route_a_study_folder_takes(
    tmp_path: Path, phantom_ct_series: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = [
        {"name": "mr-out", "match": {"series": {"Modality": "MR"}}, "action": {"ignore": "not CT"}},
        {"name": "from-icu", "match": {"calling_ae": "CT_ICU"}, "action": {"analysis_priority": "STAT"}},
    ]
    cfg = write_config(tmp_path, routing={"rules": rules})
    folder = str(phantom_ct_series)
    assert main(["rules", "test", "--config", str(cfg), folder, "--calling-ae", "CT_ICU"]) == 0
    out = capsys.readouterr().out
    assert "rule 'mr-out'" in out and "MR" in out
    assert "-> rule 'from-icu'" in out and "analysis STAT" in out
    assert main(["rules", "test", "--config", str(cfg), folder, "--calling-ae", "OTHER"]) == 0
    assert "-> rule 'default'" in capsys.readouterr().out
