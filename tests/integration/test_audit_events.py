"""The audit trail of a real node: DCMTK peers, a real ledger, JSON log lines and ``triaged audit`` as a process.

Issue 12 ("Audit trail"): every association accepted or refused (who, from where, why), every store and
query, each refusal, reloads and the node's start and stop are log lines on ``triaged.audit`` (JSON keys
with ``logging.format: json``) and, where no other table has a row for them, ``audit_events`` rows; one
``triaged audit`` lists them all, read-only, while the node runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import config_data, free_port, require_tool
from tests.integration.conftest import storescu
from triaged.cli import main
from triaged.config import parse_config
from triaged.daemon import Node, configure_logging
from triaged.domain import RESEARCH_NOTE
from triaged.ledger import Ledger
from triaged.net.scp import STATUS_TRUNCATED_PIXELS

pytestmark = pytest.mark.integration


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers: put the test runner's back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def _audit_cli(cfg: Path) -> list[dict[str, object]]:
    """``triaged audit --json`` as its own process (it opens the ledger read-only beside the running node)."""
    proc = subprocess.run(
        [sys.executable, "-m", "triaged.cli", "audit", "--config", str(cfg), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _one(lines: list[dict[str, object]], event: str, **fields: object) -> dict[str, object]:
    found = [x for x in lines if x["event"] == event and all(x.get(k) == v for k, v in fields.items())]
    assert len(found) == 1, (event, fields, [x for x in lines if x["event"] == event])
    return found[0]


def test_who_did_what_from_where_is_in_the_ledger_the_cli_and_the_json_log(
    tmp_path: Path, phantom_ct_series: Path, restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    require_tool("storescu")
    require_tool("findscu")
    log_file = tmp_path / "node.log"
    http_port = free_port()
    data = config_data(
        tmp_path,
        listener={"allowed_calling_aes": ["STORESCU", "READER"], "find_allowed_aes": ["READER"]},
        worklist={"http_port": http_port, "http_bind_address": "127.0.0.1"},
        logging={"format": "json", "file": str(log_file)},
    )
    cfg = tmp_path / "config.yaml"
    text = yaml.safe_dump(data)
    cfg.write_text(text)
    config = parse_config(text, str(cfg), base_dir=tmp_path)
    configure_logging(config.logging)
    first = sorted(phantom_ct_series.iterdir())[0]
    header = dcmread(first, stop_before_pixels=True)
    phi = [str(header.PatientName), str(header.PatientID), str(header.PatientBirthDate)]
    assert all(phi)

    node = Node(config, cfg, text)
    node.start()
    try:
        host, port = node.listener.address
        # An accepted store, then a refused association (a calling AE title not allowed).
        assert storescu(host, port, first).returncode == 0
        assert storescu(host, port, first, aet="STRANGER").returncode != 0
        # A refused store: pixel data cut in half (0xC213).
        broken = dcmread(first)
        broken.SOPInstanceUID = generate_uid()
        broken.PixelData = broken.PixelData[: len(broken.PixelData) // 2]
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate(host, port, ae_title="TRIAGED")
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(broken).Status) == STATUS_TRUNCATED_PIXELS
        finally:
            assoc.release()

        # C-FIND: STORESCU may associate but not query; READER queries by patient name.
        def findscu(aet: str) -> int:
            keys = ["QueryRetrieveLevel=STUDY", f"PatientName={phi[0]}", "PatientID", "StudyInstanceUID"]
            args = ["findscu", "-S", "-aet", aet, "-aec", "TRIAGED", *[a for k in keys for a in ("-k", k)]]
            return subprocess.run([*args, host, str(port)], capture_output=True, timeout=60).returncode

        assert findscu("STORESCU") != 0
        assert findscu("READER") == 0
        # The HTTP worklist: one read, one probe of a path that does not exist.
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/worklist", timeout=10) as rsp:  # noqa: S310
            assert len(json.load(rsp)) == 1
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/admin", timeout=10)  # noqa: S310

        # A reload, then a refused one (the node keeps the config it has); the good file goes back.
        data["completion"]["delay_seconds"] = 2
        good = yaml.safe_dump(data)
        cfg.write_text(good)
        assert node.reload() is True
        bad = good.replace("delay_seconds: 2", "delay_seconds: -5")
        cfg.write_text(bad)
        assert node.reload() is False
        cfg.write_text(good)

        lines = _audit_cli(cfg)
        started = _one(lines, "node.started", actor="node")
        assert started["version"] and started["config_sha256"] == hashlib.sha256(text.encode()).hexdigest()
        accepted = [x for x in lines if x["event"] == "association.accepted" and x["actor"] == "STORESCU"]
        assert len(accepted) >= 2  # storescu and the broken store (and findscu's, if DCMTK went on)
        assert all(str(x["peer"]).startswith("127.0.0.1:") and x["called_ae"] == "TRIAGED" for x in accepted)
        refused = _one(lines, "association.refused", actor="STRANGER")
        assert "listener.allowed_calling_aes" in str(refused["reason"])
        assert str(refused["peer"]).startswith("127.0.0.1:")
        store_refused = _one(lines, "store.refused", actor="STORESCU")
        assert store_refused["status"] == "0xC213" and "pixel data" in str(store_refused["reason"])
        assert store_refused["sop_instance_uid"] == broken.SOPInstanceUID
        find_refused = _one(lines, "find.refused", actor="STORESCU")
        assert "find_allowed_aes" in str(find_refused["reason"]) and str(find_refused["peer"]).startswith(
            "127."
        )
        find = _one(lines, "find", actor="READER")
        assert (find["query_level"], find["matches"], find["status"]) == ("STUDY", 1, "0x0000")
        assert find["keys"] == ["PatientID", "PatientName", "StudyInstanceUID"]
        http = [x for x in lines if x["event"] == "worklist.http"]
        assert [(x["path"], x["status"], x["rows"]) for x in http] == [
            ("/worklist", 200, 1),
            ("/admin", 404, None),
        ]
        assert all(str(x["peer"]).startswith("127.0.0.1:") for x in http)
        reloaded = _one(lines, "config.reloaded")
        assert reloaded["config_sha256"] == hashlib.sha256(good.encode()).hexdigest()
        refused_reload = _one(lines, "config.refused")
        assert refused_reload["config_sha256"] == hashlib.sha256(bad.encode()).hexdigest()
        assert any("delay_seconds" in e for e in refused_reload["errors"])  # type: ignore[attr-defined]
        # One chronological trail; no patient name, ID or birth date anywhere in it.
        assert [x["at"] for x in lines] == sorted(x["at"] for x in lines)  # type: ignore[type-var]
        assert not any(p in json.dumps(lines) for p in phi)
        # Stores on request, filtered by kind (in-process: the same command).
        assert main(["audit", "--config", str(cfg), "--json", "--kind", "store", "--stores"]) == 0
        trail = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [x["event"] for x in trail] == ["store", "store.refused"]
        assert (trail[0]["actor"], trail[0]["sop_instance_uid"]) == ("STORESCU", header.SOPInstanceUID)
        assert trail[0]["study_uid"] == header.StudyInstanceUID and trail[0]["source"] == "instances"
        assert main(["audit", "--config", str(cfg), "--json", "--kind", "config"]) == 0
        trail = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [x["event"] for x in trail] == ["config.reloaded", "config.refused"]

        # The same events as rows of audit_events (those without a row of their own elsewhere).
        kinds = [e.kind for e in node.ledger.audit_events()]
        for kind in ("node.started", "store.refused", "find.refused", "find", "worklist.http", "config.reloaded",
                     "config.refused"):  # fmt: skip
            assert kind in kinds, kinds
        assert "store" not in kinds and "association.accepted" not in kinds  # rows of their own tables
    finally:
        node.stop(drain_seconds=2)

    # The node's stop, and the JSON log lines on triaged.audit with their fields as keys.
    with Ledger(config.storage.ledger) as ledger:
        (stopped,) = ledger.audit_events(kinds=["node.stopped"])
    assert stopped.detail["version"] and stopped.actor == "node"
    log_lines = [json.loads(x) for x in log_file.read_text().splitlines()]
    audit_lines = [x for x in log_lines if x["logger"] == "triaged.audit"]
    store = _one(audit_lines, "store")
    assert (store["actor"], store["status"], store["sop_instance_uid"]) == (
        "STORESCU",
        "0x0000",
        header.SOPInstanceUID,
    )
    assert (
        store["study_uid"] == header.StudyInstanceUID
        and store["series_instance_uid"] == header.SeriesInstanceUID
    )
    assert isinstance(store["bytes"], int) and store["bytes"] > 100_000  # a 320 x 320 CT slice
    assert _one(audit_lines, "association.refused")["level"] == "WARNING"
    assert _one(audit_lines, "find", actor="READER")["matches"] == 1
    ended = [x for x in audit_lines if x["event"] == "association.ended"]
    assert any(x["instances"] == 1 and x["actor"] == "STORESCU" for x in ended)
    assert {"node.started", "node.stopped", "config.reloaded", "config.refused"} <= {
        x["event"] for x in audit_lines
    }
    assert not any(p in json.dumps(audit_lines) for p in phi)

    # The text form: aligned columns, newest last, and the research-use line.
    assert main(["audit", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["at", "(UTC)", "event", "who", "from", "study", "detail"]
    assert re.search(r"association\.refused\s+STRANGER\s+127\.0\.0\.1:\d+", out) and RESEARCH_NOTE in out
