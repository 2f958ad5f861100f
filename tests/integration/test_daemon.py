"""`triaged serve` as a process: SIGTERM drains in-flight stores, SIGHUP reloads only a valid config."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import free_port
from tests.integration.conftest import wait_for
from triaged.ledger import Ledger

pytestmark = pytest.mark.integration


def _config_text(tmp_path: Path, port: int, extra: str = "") -> str:
    return (
        f"listener: {{bind_address: 127.0.0.1, port: {port}{extra}}}\n"
        f"storage: {{spool: {tmp_path / 'spool'}, ledger: {tmp_path / 'ledger.sqlite'}, min_free_mb: 0}}\n"
        "completion: {delay_seconds: 600}\nworklist: {http_port: 0}\n"
    )


def _associate(port: int, ae_title: str = "TESTSCU"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="TRIAGED")


def _accepts(port: int, ae_title: str) -> bool:
    assoc = _associate(port, ae_title)
    if assoc.is_established:
        assoc.release()
        return True
    return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, int]]:
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(_config_text(tmp_path, port))
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "triaged.cli", "serve", "--config", str(cfg)], stderr=log, text=True)
    wait_for(lambda: _listening(port) or proc.poll() is not None, what="the daemon to listen")
    assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
    yield proc, cfg, port
    log.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_stops_accepting_lets_the_open_association_finish_and_exits_zero(
    daemon: tuple[subprocess.Popen[str], Path, int], tmp_path: Path, phantom_ct_series: Path
) -> None:
    proc, _, port = daemon
    files = sorted(phantom_ct_series.iterdir())
    assoc = _associate(port)
    assert assoc.is_established
    assert assoc.send_c_store(files[0]).Status == 0
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not _listening(port), what="the listening socket to close")
    # The association opened before SIGTERM is still served to the end.
    assert all(assoc.send_c_store(f).Status == 0 for f in files[1:])
    assoc.release()
    assert proc.wait(timeout=30) == 0
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        [study] = ledger.studies()
        assert study.instances == len(files)
    finally:
        ledger.close()
    assert dcmread(files[0]).StudyInstanceUID == study.study_instance_uid


def test_sighup_with_a_broken_file_keeps_the_running_config_and_a_valid_one_is_applied(
    daemon: tuple[subprocess.Popen[str], Path, int], tmp_path: Path
) -> None:
    proc, cfg, port = daemon
    cfg.write_text(_config_text(tmp_path, port) + "completion: {delay_seconds: -5}\nbogus: 1\n")
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reload refused" in (tmp_path / "daemon.log").read_text(), what="the refusal")
    # Still running the old config: any AE may associate.
    assert _accepts(port, "ANYONE")
    cfg.write_text(_config_text(tmp_path, port, ", allowed_calling_aes: [PACS]"))
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: not _accepts(port, "ANYONE"), what="the new access rule to apply")
    ok = _associate(port, "PACS")
    assert ok.is_established
    ok.release()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log = (tmp_path / "daemon.log").read_text()
    assert f"config reload refused, keeping the running config: {cfg}:" in log
    assert "completion.delay_seconds" in log and "bogus" in log
    assert "configuration reloaded" in log


def test_an_edited_config_file_is_applied_without_a_signal(
    daemon: tuple[subprocess.Popen[str], Path, int], tmp_path: Path
) -> None:
    proc, cfg, port = daemon
    cfg.write_text(_config_text(tmp_path, port, ", allowed_calling_aes: [PACS]"))
    wait_for(lambda: not _accepts(port, "ANYONE"), what="the edited file to apply")
    assert _accepts(port, "PACS")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "changed on disk" in (tmp_path / "daemon.log").read_text()
