"""The read-only CLI commands against a ledger filled by a real node."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage as SR
from pydicom.uid import CTImageStorage as CT_IMAGE
from pydicom.uid import SegmentationStorage as SEG

from tests.conftest import free_port, write_config
from tests.integration.conftest import storescu, wait_for
from triaged.cli import build_parser, main
from triaged.config import Config, load_config
from triaged.daemon import Node
from triaged.domain import InstanceRecord, JobState, OutboxState
from triaged.ledger import Ledger

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
    job = wait_for(
        lambda: next(iter(node.ledger.jobs(states=[JobState.DONE])), None), timeout=120, what="DONE"
    )
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


def test_status_exits_non_zero_when_the_listener_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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


# ------------------------------------------------------------------------------------- CLI manners (issue 15)
REPO = Path(__file__).resolve().parents[2]


def _triaged(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The ``triaged`` CLI as a real subprocess (from the repository root: the test registry imports)."""
    return subprocess.run(
        [sys.executable, "-m", "triaged.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_every_command_and_option_has_help_text() -> None:
    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                for name, sub in action.choices.items():
                    if not (helps.get(name) or "").strip():
                        missing.append(f"{path} {name}")
                    walk(sub, f"{path} {name}")
            elif not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "triaged")
    assert not missing, "no help text: " + ", ".join(missing)


@pytest.mark.parametrize(
    ("command", "valid"),
    [("jobs", [s.value for s in JobState]), ("outbox", [s.value for s in OutboxState])],
)
def test_an_unknown_state_is_refused_listing_the_valid_ones(command: str, valid: list[str]) -> None:
    ran = _triaged(command, "--state", "BOGUS" if command == "jobs" else "bogus")
    assert ran.returncode == 2
    assert "invalid choice: 'BOGUS'" in ran.stderr and all(repr(s) in ran.stderr for s in valid), ran.stderr
    assert "Traceback" not in ran.stderr


def test_a_port_in_use_is_one_line_naming_the_port_and_its_setting(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        for setting, sections in (
            ("listener.port", {"listener": {"port": taken}}),
            ("worklist.http_port", {"worklist": {"http_port": taken}}),
        ):
            cfg = write_config(tmp_path, **sections)
            ran = _triaged("serve", "--config", cfg, timeout=60)
            assert ran.returncode == 1, ran.stderr
            [line] = ran.stderr.splitlines()
            assert f"port {taken} on 127.0.0.1 is already in use" in line and f"{setting} in {cfg}" in line
    assert not (tmp_path / "ledger.sqlite").exists()  # nothing started


def test_check_config_lists_schema_and_reference_errors_in_one_pass(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["listener"]["port"] = 99999
    data["destinations"] = {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}
    # the stand-in registry (tests/worker_pipelines.py) knows every pipeline but "not-installed"
    data["routing"] = {"default": {"pipelines": ["ok", "not-installed"], "destinations": ["pacs", "nowhere"],
                                   "priority_policy": "bogus"}}  # fmt: skip
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    lines = cfg.read_text().splitlines()

    def line_of(text: str) -> int:
        return next(i for i, line in enumerate(lines, 1) if text in line)

    ran = _triaged("check-config", cfg)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    err = ran.stderr
    assert (
        f"{cfg}:{line_of('port: 99999')}: listener.port: Input should be less than or equal to 65535" in err
    )
    assert (
        f"{cfg}:{line_of('- nowhere')}: routing.default.destinations[1]: unknown destination 'nowhere'" in err
    )
    assert (
        f"{cfg}:{line_of('priority_policy')}: routing.default.priority_policy: unknown priority policy" in err
    )
    assert (
        f"{cfg}:{line_of('- not-installed')}: routing.default.pipelines[1]: unknown pipeline 'not-installed'"
        in err
    )
    assert "4 error(s)" in err

    cfg.write_text("# nothing but a comment\n")
    ran = _triaged("check-config", cfg)
    assert ran.returncode == 2 and f"{cfg}:1: the file is empty" in ran.stderr, ran.stderr


def test_status_shows_retries_and_the_latest_dead_letters(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        record = InstanceRecord("1.2.3", "1.2.3.4", "1.2.3.4.1", CT_IMAGE, "1.2.840.10008.1.2.1",
                                "studies/1.2.3/1.2.3.4/1.2.3.4.1.dcm", 1000, "0" * 64)  # fmt: skip
        assoc = ledger.open_association(calling_ae="CT01", called_ae="TRIAGED", peer_address="127.0.0.1",
                                        peer_port=4100)  # fmt: skip
        ledger.record_instance(record, association_id=assoc)
        (job,) = ledger.jobs()
        ledger.enqueue_outbox(job.id, [("pacs", "sr", "work/1/sr.dcm", SR, "1.2.9.1"),
                                       ("pacs", "seg", "work/1/seg.dcm", SEG, "1.2.9.2")])  # fmt: skip
        first, second = ledger.outbox(job_id=job.id)
        later = datetime.now(UTC) + timedelta(minutes=5)
        ledger.mark_attempt_failed(first.id, status=None, error="connection refused", next_attempt_at=later)
        ledger.mark_dead(second.id, "0xA700 out of resources, 5 tries")
    ran = _triaged("status", "--config", cfg)
    assert ran.returncode == 1  # the listener is down
    out = ran.stdout
    assert "outbox     1 pending (1 retrying after a failed attempt), 1 dead letter(s)" in out, out
    assert f"retrying job {job.id} sr -> pacs: try 2" in out and "connection refused" in out
    assert f"dead     job {job.id} seg -> pacs" in out and "0xA700 out of resources, 5 tries" in out


def test_selftest_checks_c_echo_before_making_a_phantom(tmp_path: Path) -> None:
    ran = _triaged("selftest", "--to", f"TRIAGED@127.0.0.1:{free_port()}", "--timeout", "5", timeout=60)
    assert ran.returncode == 1
    assert "does not answer C-ECHO" in ran.stderr and "Traceback" not in ran.stderr
    assert "phantom" not in ran.stdout  # nothing was generated


def test_selftest_says_where_the_nodes_route_sends_results_when_none_arrive(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    pacs_port = free_port()  # nobody listens there
    cfg = write_config(
        tmp_path, destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}}
    )
    node = node_factory(load_config(cfg))
    host, port = node.listener.address
    ran = _triaged("selftest", "--to", f"TRIAGED@{host}:{port}", "--config", cfg, "--listen-port", str(free_port()),
                   "--matrix", "64", "--slice-thickness", "10", "--seed", "4", "--timeout", "2")  # fmt: skip
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "answers C-ECHO" in ran.stdout
    assert "FAIL: after 2 s nothing arrived" in ran.stderr
    assert f"route 'default' sends results to pacs (PACS@127.0.0.1:{pacs_port})" in ran.stderr, ran.stderr


def test_check_config_says_when_the_postgresql_ledger_cannot_be_reached(tmp_path: Path) -> None:
    """A server ledger that does not answer: one line naming host, port and database, never the password."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"storage:\n  ledger: postgresql://triage:s3cret-pw@127.0.0.1:{free_port()}/triage\n")
    ran = _triaged("check-config", cfg, timeout=60)
    assert ran.returncode == 1
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran.stderr
    assert "storage.ledger: cannot reach the PostgreSQL ledger at 127.0.0.1:" in lines[0]
    assert "/triage" in lines[0]
    assert "s3cret-pw" not in ran.stderr + ran.stdout
    assert "Traceback" not in ran.stderr


def test_status_lists_every_node_of_the_ledger(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, node={"name": "node-a", "lease_seconds": 4, "heartbeat_seconds": 1})
    config = load_config(cfg)
    with Ledger(config.storage.ledger) as ledger:
        now = datetime.now(UTC)
        ledger.register_node("node-a", ["receive", "complete"], version="9.9", lease_seconds=4, pid=4242)
        ledger.register_node(
            "node-b",
            ["analyse"],
            version="9.9",
            lease_seconds=4,
            host="gpu-1",
            pid=7,
            now=now - timedelta(seconds=30),
        )
        ledger.register_node("node-c", ["analyse"], version="9.9", lease_seconds=4, host="gpu-2", pid=8)
        ledger.node_stopped("node-c")
    ran = _triaged("status", "--config", cfg)
    assert ran.returncode == 1, ran.stderr  # no listener answers: the node is not running
    lines = {
        line.split(":")[0].strip(): line for line in ran.stdout.splitlines() if line.startswith("  node-")
    }
    assert "nodes      3 (1 alive); leader: node-a" in ran.stdout
    assert "alive, leader; roles receive,complete;" in lines["node-a (this config)"]
    assert "PID 4242" in lines["node-a (this config)"] and "triaged 9.9" in lines["node-a (this config)"]
    assert ": lost; roles analyse; gpu-1 PID 7" in lines["node-b"]
    assert 30 <= int(lines["node-b"].split("heartbeat ")[1].split(" s ago")[0]) < 60
    assert ": stopped; roles analyse" in lines["node-c"]
