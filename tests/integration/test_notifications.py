"""Notification destinations over real sockets: a webhook (local HTTP server) and HL7 ORU^R01 over MLLP."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hl7
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.conftest import make_config
from tests.integration.conftest import analysing_job
from triaged.config import Config
from triaged.domain import CTGrade, Findings, JobState, LungMeasures
from triaged.ledger import Ledger
from triaged.spool import Spool
from triaged.stages import Dispatch

pytestmark = pytest.mark.integration


def notified_job(ledger: Ledger, spool: Path, study: str, level: str, destinations: list[str]) -> int:
    """A job with a stored header (PatientID, name, accession), analysed at priority ``level``, at ENCODING."""
    rel = f"studies/{study}/{study}.1/{study}.1.1.dcm"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.1.1"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, f"{study}.1.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{study}.1"
    ds.PatientID, ds.PatientName, ds.AccessionNumber = "PID-42", "Doe^Jane|Q", "ACC^7"
    (spool / rel).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(spool / rel, enforce_file_format=True)
    job_id = analysing_job(ledger, study, [{"name": d} for d in destinations])
    findings = Findings(
        "classical",
        "1",
        LungMeasures(2000.0, 700.0, 50.0),
        LungMeasures(1800.0, 90.0, 0.0),
        CTGrade.from_affected_pct(35.0),
        p_covid=0.87,
    )
    ledger.record_analysis(
        job_id, findings, priority=(0.9, level, "CT2: 35.0 % of the worse lung"), detail=""
    )
    return job_id


class Hook:
    """A local HTTP server answering each POST with the next scripted status (the last one repeats)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], dict[str, Any]]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.received.append((dict(self.headers), json.loads(body)))
                status = hook.statuses[min(len(hook.received), len(hook.statuses)) - 1]
                text = b'{"error": "unknown field accession"}' if status == 400 else b"{}"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class MLLPListener:
    """A local MLLP receiver: keeps each message and answers an ACK with the scripted MSA-1 code."""

    def __init__(self, code: str, text: str = "") -> None:
        self.messages: list[hl7.Message] = []
        listener = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = b""
                while not data.endswith(b"\x1c\r"):
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                msg = hl7.parse(data.strip(b"\x0b\x1c\r").decode("utf-8"))
                listener.messages.append(msg)
                control = str(msg.segment("MSH")[10])
                ack = f"MSH|^~\\&|RIS|H|TRIAGED||20260101000000||ACK^R01|A1|P|2.5.1\rMSA|{code}|{control}|{text}"
                self.request.sendall(b"\x0b" + ack.encode() + b"\x1c\r")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook_500_then_200() -> Iterator[Hook]:
    hook = Hook([500, 200])
    yield hook
    hook.close()


def _config(tmp_path: Path, destinations: dict[str, dict[str, object]]) -> Config:
    return make_config(
        tmp_path,
        destinations=destinations,
        dispatch={"base_delay_seconds": 0.5, "max_delay_seconds": 1, "timeout_seconds": 5},
    )


def test_webhook_is_retried_after_a_500_then_sent_and_quiet_below_its_level(
    tmp_path: Path, hook_500_then_200: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = hook_500_then_200
    monkeypatch.setenv("TRIAGED_TEST_HOOK_TOKEN", "s3cret")
    config = _config(
        tmp_path,
        {
            "pager": {
                "type": "webhook",
                "url": hook.url,
                "min_priority": "URGENT",
                "headers": {
                    "Authorization": {"env": "TRIAGED_TEST_HOOK_TOKEN", "prefix": "Bearer "},
                    "X-Site": "ward",
                },
            }
        },
    )
    with Ledger(config.storage.ledger) as ledger:
        dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config)
        try:
            job = notified_job(ledger, config.storage.spool, "1.2.826.0.9.501", "STAT", ["pager"])
            dispatch.enqueue_outputs(ledger.job(job), ())
            assert dispatch.dispatch_due() == 0
            (item,) = ledger.outbox(job_id=job)
            assert (item.kind, item.state, item.attempts, item.last_status) == ("notify", "PENDING", 1, 500)
            assert "HTTP 500" in item.last_error
            assert ledger.job(job).state is JobState.RETRY_WAIT
            assert dispatch.dispatch_due(datetime.now(UTC) + timedelta(seconds=5)) == 1
            assert ledger.job(job).state is JobState.DONE
            assert [i.state for i in ledger.outbox(job_id=job)] == ["SENT"]
            headers, body = hook.received[-1]
            assert len(hook.received) == 2
            assert headers["Authorization"] == "Bearer s3cret" and headers["X-Site"] == "ward"
            assert body["study_instance_uid"] == "1.2.826.0.9.501" and body["accession_number"] == "ACC^7"
            assert body["priority_level"] == "STAT" and body["priority_reasons"].startswith("CT2")
            assert body["p_covid_text"] == "P(COVID-19) 0.87" and body["ct_grade"] == "CT2"
            assert body["pipeline"] == "ok" and body["job_id"] == job
            assert "not for diagnosis" in body["note"]
            assert "patient_id" not in body and "patient_name" not in body
            # A ROUTINE study is below the destination's level: nothing queued, the job is done at once.
            quiet = notified_job(ledger, config.storage.spool, "1.2.826.0.9.502", "ROUTINE", ["pager"])
            dispatch.enqueue_outputs(ledger.job(quiet), ())
            assert ledger.outbox(job_id=quiet) == []
            assert ledger.job(quiet).state is JobState.DONE
            assert "not notified: pager (below URGENT)" in ledger.job(quiet).history[-2][3]
        finally:
            dispatch.stop()


def test_webhook_400_is_dead_lettered_with_the_reason(tmp_path: Path) -> None:
    hook = Hook([400])
    config = _config(tmp_path, {"pager": {"type": "webhook", "url": hook.url}})
    with Ledger(config.storage.ledger) as ledger:
        dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config)
        try:
            job = notified_job(ledger, config.storage.spool, "1.2.826.0.9.503", "STAT", ["pager"])
            dispatch.enqueue_outputs(ledger.job(job), ())
            dispatch.dispatch_due()
            (item,) = ledger.outbox(job_id=job)
            assert item.state == "DEAD" and item.attempts == 0
            assert "HTTP 400" in item.last_error and "unknown field accession" in item.last_error
            assert ledger.job(job).state is JobState.FAILED
            assert len(hook.received) == 1
        finally:
            dispatch.stop()
            hook.close()


def test_webhook_without_a_listener_is_retried(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    config = _config(tmp_path, {"pager": {"type": "webhook", "url": f"http://127.0.0.1:{port}/"}})
    with Ledger(config.storage.ledger) as ledger:
        dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config)
        try:
            job = notified_job(ledger, config.storage.spool, "1.2.826.0.9.504", "STAT", ["pager"])
            dispatch.enqueue_outputs(ledger.job(job), ())
            dispatch.dispatch_due()
            (item,) = ledger.outbox(job_id=job)
            assert item.state == "PENDING" and item.attempts == 1 and "cannot POST" in item.last_error
        finally:
            dispatch.stop()


@pytest.mark.parametrize("code", ["AA", "AE"])
def test_hl7_oru_over_mllp_sent_on_aa_dead_lettered_on_ae(tmp_path: Path, code: str) -> None:
    listener = MLLPListener(code, "PID-3 unknown" if code == "AE" else "")
    config = _config(
        tmp_path,
        {
            "ris": {
                "type": "hl7",
                "host": "127.0.0.1",
                "port": listener.port,
                "sending_facility": "CTLAB",
                "receiving_application": "RIS",
            }
        },
    )
    with Ledger(config.storage.ledger) as ledger:
        dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config)
        try:
            job = notified_job(ledger, config.storage.spool, "1.2.826.0.9.505", "STAT", ["ris"])
            dispatch.enqueue_outputs(ledger.job(job), ())
            dispatch.dispatch_due()
            (msg,) = listener.messages
            msh, pid, obr = msg.segment("MSH"), msg.segment("PID"), msg.segment("OBR")
            assert str(msh[9]) == "ORU^R01^ORU_R01" and str(msh[3]) == "TRIAGED" and str(msh[4]) == "CTLAB"
            assert str(msh[5]) == "RIS" and str(msh[12]) == "2.5.1"
            assert str(pid[3]) == "PID-42" and str(pid[5][0][0]) == "Doe" and "Jane" in str(pid[5])
            assert str(obr[3]) == "ACC\\S\\7" and str(obr[20]) == "1.2.826.0.9.505"
            obx = {str(s[3][0][0]): str(s[5]) for s in msg.segments("OBX")}
            assert obx["PRIORITY"] == "STAT" and obx["CTGRADE"] == "CT2"
            assert obx["PCOVID"] == "P(COVID-19) 0.87" and float(obx["AFFECTED"]) == pytest.approx(35.0)
            assert "not for diagnosis" in obx["NOTE"]
            (item,) = ledger.outbox(job_id=job)
            if code == "AA":
                assert item.state == "SENT" and ledger.job(job).state is JobState.DONE
            else:
                assert (
                    item.state == "DEAD"
                    and "ACK AE" in item.last_error
                    and "PID-3 unknown" in item.last_error
                )
                assert ledger.job(job).state is JobState.FAILED
        finally:
            dispatch.stop()
            listener.close()


def test_destination_types_are_checked_with_path_and_line() -> None:
    from triaged.config import parse_config
    from triaged.errors import ConfigError

    text = (
        "destinations:\n"
        "  a: {type: pager, url: x}\n"
        "  b: {type: webhook, url: 'ftp://x', headers: {Authorization: {env: TRIAGED_NO_SUCH_VAR}}}\n"
        "  c: {type: hl7, host: h}\n"
        "  d: {type: stow-rs, url: 'http://h/dw', username: u}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "cfg.yaml")
    problems = str(caught.value)
    assert "cfg.yaml:2: destinations.a.type: unknown destination type 'pager'" in problems
    assert "cfg.yaml:3: destinations.b.url: 'ftp://x' is not an http:// or https:// URL" in problems
    assert "cfg.yaml:4: destinations.c.port: Field required" in problems
    assert "cfg.yaml:5: destinations.d: username and password go together" in problems
    # Secrets are checked once the entries are valid: a variable that is not set is named with its path.
    with pytest.raises(ConfigError) as caught:
        parse_config(
            "destinations:\n  e:\n    type: webhook\n    url: 'http://h/'\n"
            "    headers: {Authorization: {env: TRIAGED_NO_SUCH_VAR}}\n",
            "cfg.yaml",
        )
    assert (
        "cfg.yaml:5: destinations.e.headers.Authorization.env: environment variable TRIAGED_NO_SUCH_VAR is not set"
        in str(caught.value)
    )
    # An entry without a type is a DICOM peer, as before.
    assert (
        parse_config("destinations:\n  p: {ae_title: P, host: h, port: 104}\n").destinations["p"].type
        == "dicom"
    )


def _outbox_cli(config_path: Path) -> str:
    """``triaged outbox`` as a real subprocess (from the repository root: the test registry imports)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "triaged.cli", "outbox", "--config", str(config_path)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _outbox_line(table: str, destination: str) -> str:
    (line,) = [row for row in table.splitlines() if f" {destination} " in row]
    return line


def test_outbox_statuses_read_in_each_destinations_terms_in_the_cli_and_the_json_api(
    tmp_path: Path,
) -> None:
    """DIMSE status for DICOM, HTTP status for webhooks, the HL7 ACK code; also once a destination is gone."""
    import urllib.request

    import yaml

    from tests.conftest import config_data, free_port
    from tests.integration.conftest import dispatching_job, start_storescp
    from triaged.config import parse_config
    from triaged.daemon import Node

    storescp, pacs_port, _received = start_storescp(tmp_path)
    hook, refusing_hook = Hook([200]), Hook([400])
    accepting, refusing = MLLPListener("AA"), MLLPListener("AE", "PID-3 unknown")
    destinations: dict[str, dict[str, object]] = {
        "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
        "pager": {"type": "webhook", "url": hook.url},
        "strict-pager": {"type": "webhook", "url": refusing_hook.url},
        "ris": {"type": "hl7", "host": "127.0.0.1", "port": accepting.port},
        "strict-ris": {"type": "hl7", "host": "127.0.0.1", "port": refusing.port},
    }
    data = config_data(
        tmp_path,
        destinations=destinations,
        dispatch={"base_delay_seconds": 0.5, "max_delay_seconds": 1, "timeout_seconds": 5},
        worklist={"http_port": free_port()},
    )
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(data))
    config = parse_config(config_path.read_text(), str(config_path), base_dir=tmp_path)
    try:
        with Ledger(config.storage.ledger) as ledger:
            dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config)
            try:
                notifying = [d for d in destinations if d != "pacs"]
                job = notified_job(ledger, config.storage.spool, "1.2.826.0.9.511", "STAT", notifying)
                dispatch.enqueue_outputs(ledger.job(job), ())
                header = next(config.storage.spool.rglob("*.dcm"))
                stored, outputs = dispatching_job(
                    ledger, config.storage.spool, "1.2.826.0.9.512", [header], ["pacs"]
                )
                dispatch.enqueue_outputs(ledger.job(stored), outputs)
                dispatch.dispatch_due()
                states = {i.destination: i.state for i in ledger.outbox()}
                assert states == {
                    "pacs": "SENT",
                    "pager": "SENT",
                    "ris": "SENT",
                    "strict-pager": "DEAD",
                    "strict-ris": "DEAD",
                }
            finally:
                dispatch.stop()
        table = _outbox_cli(config_path)
        assert "0x0000" in _outbox_line(table, "pacs")
        assert "HTTP 200" in _outbox_line(table, "pager") and "HTTP 400" in _outbox_line(
            table, "strict-pager"
        )
        assert "ACK AA" in _outbox_line(table, "ris") and "ACK AE" in _outbox_line(table, "strict-ris")
        assert "0x00C8" not in table and "0x0190" not in table
        # The same through the running node's JSON API: the dead letters, then every item of the job.
        node = Node(config)
        node.start()
        try:
            assert node.http is not None
            base = "http://{}:{}".format(*node.http.address)
            with urllib.request.urlopen(base + "/api/outbox", timeout=10) as rsp:  # noqa: S310 - loopback
                problems = {p["destination"]: p["last_status"] for p in json.loads(rsp.read())["problems"]}
            assert problems == {"strict-pager": "HTTP 400", "strict-ris": "ACK AE"}
            with urllib.request.urlopen(f"{base}/api/jobs/{job}", timeout=10) as rsp:  # noqa: S310 - loopback
                results = {r["destination"]: r["last_status"] for r in json.loads(rsp.read())["results"]}
            with urllib.request.urlopen(f"{base}/api/jobs/{stored}", timeout=10) as rsp:  # noqa: S310
                assert [r["last_status"] for r in json.loads(rsp.read())["results"]] == ["0x0000"]
            assert results == {
                "pager": "HTTP 200",
                "strict-pager": "HTTP 400",
                "ris": "ACK AA",
                "strict-ris": "ACK AE",
            }
            with urllib.request.urlopen(f"{base}/jobs/{job}", timeout=10) as rsp:  # noqa: S310 - loopback
                page = rsp.read().decode()
            assert "HTTP 200" in page and "ACK AA" in page and "ACK AE" in page and "0x00C8" not in page
        finally:
            node.stop(drain_seconds=2)
        # Destinations no longer configured: the rows themselves say what kind of peer answered.
        data["destinations"] = {}
        config_path.write_text(yaml.safe_dump(data))
        table = _outbox_cli(config_path)
        assert "0x0000" in _outbox_line(table, "pacs") and "HTTP 200" in _outbox_line(table, "pager")
        assert "ACK AA" in _outbox_line(table, "ris") and "ACK AE" in _outbox_line(table, "strict-ris")
        assert "HTTP 400" in _outbox_line(table, "strict-pager")
    finally:
        storescp.terminate()
        storescp.wait()
        for server in (hook, refusing_hook, accepting, refusing):
            server.close()
