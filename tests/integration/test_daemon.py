"""`triaged serve` as a process: SIGTERM drains in-flight stores, SIGHUP reloads only a valid config."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import free_port, make_config
from tests.integration.conftest import listening, start_storescp, storescu, wait_for
from triaged.config import CompletionConfig, Config
from triaged.daemon import Node
from triaged.domain import JobState
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


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, int]]:
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(_config_text(tmp_path, port))
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "triaged.cli", "serve", "--config", str(cfg)], stderr=log, text=True
    )
    wait_for(lambda: listening(port) or proc.poll() is not None, what="the daemon to listen")
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
    wait_for(lambda: not listening(port), what="the listening socket to close")
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


def test_a_config_edit_that_is_not_utf8_is_refused_and_the_node_keeps_running(
    daemon: tuple[subprocess.Popen[str], Path, int], tmp_path: Path
) -> None:
    # Issue 12 item 4: the auto-reload used to die on UnicodeDecodeError, taking the node down.
    proc, cfg, port = daemon
    cfg.write_bytes(_config_text(tmp_path, port, ", allowed_calling_aes: [PACS]").encode() + b"# caf\xe9\n")
    wait_for(lambda: "not valid UTF-8" in (tmp_path / "daemon.log").read_text(), what="the refusal")
    assert proc.poll() is None
    assert _accepts(port, "ANYONE")  # the old config still runs
    proc.send_signal(signal.SIGHUP)  # the same file by signal: refused again, still alive
    wait_for(lambda: (tmp_path / "daemon.log").read_text().count("not valid UTF-8") >= 2, what="2nd refusal")
    assert proc.poll() is None and _accepts(port, "ANYONE")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log = (tmp_path / "daemon.log").read_text()
    assert f"config reload refused, keeping the running config: {cfg}:5: not valid UTF-8" in log
    assert "Traceback" not in log


def test_one_edit_is_applied_once_when_the_watcher_and_sighup_both_see_it(
    daemon: tuple[subprocess.Popen[str], Path, int], tmp_path: Path
) -> None:
    # Issue 12 item 4: edit, the watcher applies it, then `systemctl reload` applied it a second time.
    proc, cfg, port = daemon
    log_path = tmp_path / "daemon.log"
    cfg.write_text(_config_text(tmp_path, port, ", allowed_calling_aes: [PACS]"))
    wait_for(lambda: "configuration reloaded" in log_path.read_text(), what="the watcher to apply the edit")
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "unchanged since it was applied" in log_path.read_text(), what="the SIGHUP to skip it")
    assert not _accepts(port, "ANYONE") and _accepts(port, "PACS")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert log_path.read_text().count("configuration reloaded") == 1


def test_a_second_serve_on_the_same_state_exits_touching_nothing(
    daemon: tuple[subprocess.Popen[str], Path, int], tmp_path: Path
) -> None:
    # Issue 12 item 5: a second node used to delete the running node's partial writes (and re-queue its
    # running jobs) before failing on "port in use".
    proc, cfg, port = daemon
    partial = tmp_path / "spool" / "tmp" / "in-flight.part"
    partial.write_bytes(b"half a C-STORE")
    second = subprocess.run(
        [sys.executable, "-m", "triaged.cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1, second.stderr
    lock = tmp_path / "spool" / "triaged.lock"
    assert f"{lock} is locked by another triaged node (PID {proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    assert partial.read_bytes() == b"half a C-STORE"
    assert proc.poll() is None and _accepts(port, "ANYONE")
    # The lock dies with its holder, however it dies: a kill -9 leaves no stale lock behind.
    proc.kill()
    proc.wait()
    restarted = subprocess.Popen(
        [sys.executable, "-m", "triaged.cli", "serve", "--config", str(cfg)],
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_for(lambda: listening(port) or restarted.poll() is not None, what="the restarted daemon")
        assert restarted.poll() is None
        assert lock.read_text().strip() == str(restarted.pid)
        assert not partial.exists()  # the restarted node, holding the lock, cleans the dead one's partials
    finally:
        restarted.terminate()
        restarted.wait(timeout=30)


def test_a_study_reaches_its_destination_within_delay_plus_work_not_timer_ticks(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    # Issue 13 item 1: default timers (sweep, feeder, dispatch tick) except a small completion delay.  With
    # tick-driven hand-offs COMPLETE -> QUEUED alone waited a whole sweep period (5 s) on top of the delay.
    delay = 1.0
    storescp, dest_port, received = start_storescp(tmp_path)
    try:
        node = node_factory(
            make_config(
                tmp_path,
                completion={
                    "delay_seconds": delay,
                    "sweep_interval_seconds": CompletionConfig().sweep_interval_seconds,
                },
                destinations={"dest": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": dest_port}},
                routing={"default": {"destinations": ["dest"]}},
            )
        )
        assert node.workers.wait_ready(120), "the worker did not start with the node"
        assert storescu(*node.listener.address, phantom_ct_series).returncode == 0
        last_store = datetime.now(UTC)
        job = wait_for(
            lambda: next(iter(node.ledger.jobs(states=[JobState.DONE])), None),
            timeout=120,
            what="the results to be delivered",
        )
    finally:
        storescp.terminate()
        storescp.wait()
    job = node.ledger.job(job.id)
    acked = max(i.sent_at for i in node.ledger.outbox(job_id=job.id) if i.sent_at is not None)
    at = {to: when for when, _frm, to, _detail in job.history}
    work = (at["DISPATCHING"] - at["ANALYSING"]).total_seconds()  # analysis and encoding
    elapsed = (acked - last_store).total_seconds()
    logging.getLogger(__name__).warning(
        "last C-STORE -> last result acknowledged: %.2f s (delay %.1f s, analysis + encoding %.2f s, "
        "COMPLETE +%.2f s, ANALYSING +%.2f s)",
        elapsed,
        delay,
        work,
        (at["COMPLETE"] - last_store).total_seconds(),
        (at["ANALYSING"] - last_store).total_seconds(),
    )
    assert len(list(received.iterdir())) == len(node.ledger.outbox(job_id=job.id)) == 3
    assert elapsed <= delay + work + 2.5, f"{elapsed:.2f} s > delay {delay} s + work {work:.2f} s + 2.5 s"
