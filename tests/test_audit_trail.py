"""The audit trail a security officer reads: one merged, read-only trail and the events of dispatch and the CLI.

Real SQLite ledgers under tmp_path, the real dispatch stage (its network peer scripted, as in
``tests/test_stages_dispatch.py``) and the real command line.  The node-level events (associations, stores,
queries, reloads) are proven against a running node in ``tests/integration/test_audit_events.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.test_stages_dispatch import CT, Peer, dispatching
from triaged.audit import peer_text
from triaged.cli import main
from triaged.cli.records import when
from triaged.config import load_config
from triaged.domain import RESEARCH_NOTE, InstanceRecord, JobState
from triaged.errors import StorageError
from triaged.ledger import Ledger
from triaged.ledger.audit import AuditTrailReader, kind_wanted
from triaged.spool import Spool
from triaged.stages import Dispatch


def _store(ledger: Ledger, calling_ae: str, sop: str) -> int:
    """One association from ``calling_ae`` that stores instance ``sop`` of study 1.2.3 (series 1.2.3.4)."""
    assoc = ledger.open_association(calling_ae=calling_ae, called_ae="TRIAGED", peer_address="10.0.0.5",
                                    peer_port=4100)  # fmt: skip
    rec = InstanceRecord("1.2.3", "1.2.3.4", sop, CT, "1.2.840.10008.1.2.1", f"studies/1.2.3/1.2.3.4/{sop}.dcm",
                         1000, "0" * 64)  # fmt: skip
    ledger.record_instance(rec, association_id=assoc)
    ledger.close_association(assoc, instances=1, bytes=1000, failures=0, aborted=False)
    return assoc


def test_one_trail_merges_associations_events_stores_and_sent_results_in_time_order(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        before = datetime.now(UTC)
        _store(ledger, "CT01", "1.2.3.4.1")
        ledger.open_association(calling_ae="STRANGER", called_ae="TRIAGED", peer_address="::1", peer_port=99,
                                accepted=False, reject_reason="calling AE title 'STRANGER' is not allowed")  # fmt: skip
        ledger.record_event(
            "find", actor="READER", peer="10.0.0.9:5000", detail={"matches": 2, "keys": ["PatientID"]}
        )
        ledger.record_event("find.refused", actor="CT01", peer="10.0.0.5:4101")
        (job,) = ledger.jobs()
        ledger.transition(job.id, JobState.RECEIVING, JobState.COMPLETE)
        ledger.enqueue_outbox(job.id, [("pacs", "sr", "work/1/sr.dcm", CT, "1.2.9.1")])
        ledger.enqueue_outbox(job.id, [("web", "seg", "work/1/seg.dcm", CT, "1.2.9.2")])
        item, stowed = ledger.outbox(job_id=job.id)
        ledger.mark_sent(item.id, 0)
        ledger.mark_sent(stowed.id, 200)  # a STOW-RS destination: HTTP 200
        middle = datetime.now(UTC)
        ledger.record_event("config.reloaded", actor="node", detail={"config_sha256": "ab" * 32})

        trail = ledger.audit_trail()
        assert [e.kind for e in trail] == [
            "association.accepted", "association.refused", "find", "find.refused", "config.reloaded",
        ]  # fmt: skip
        accepted, refused = trail[0], trail[1]
        assert (accepted.actor, accepted.peer, accepted.source) == ("CT01", "10.0.0.5:4100", "associations")
        assert (accepted.detail["instances"], accepted.detail["called_ae"]) == (1, "TRIAGED")
        assert (refused.actor, refused.peer) == ("STRANGER", "[::1]:99")
        assert refused.detail["reason"] == "calling AE title 'STRANGER' is not allowed"
        assert trail[2].detail == {"matches": 2, "keys": ["PatientID"]}

        everything = ledger.audit_trail(stores=True)
        assert [e.kind for e in everything] == [
            "association.accepted", "store", "association.refused", "find", "find.refused", "result.sent",
            "result.sent", "config.reloaded",
        ]  # fmt: skip
        store, sent, web = everything[1], everything[5], everything[6]
        assert (store.actor, store.peer, store.study_uid) == ("CT01", "10.0.0.5:4100", "1.2.3")
        assert store.detail["sop_instance_uid"] == "1.2.3.4.1" and store.detail["bytes"] == 1000
        assert (sent.actor, sent.study_uid, sent.source) == ("node", "1.2.3", "outbox")
        assert sent.detail["destination"] == "pacs" and sent.detail["status"] == "0x0000"
        # in the peer's own terms, as `triaged outbox` shows it (this printed "0x00C8")
        assert web.detail["destination"] == "web" and web.detail["status"] == "HTTP 200"
        assert [e.at for e in everything] == sorted(e.at for e in everything)

        # A kind keeps its sub-events; naming "store" or "result" brings their own tables' rows in.
        assert [e.kind for e in ledger.audit_trail(kinds=["find"])] == ["find", "find.refused"]
        assert [e.kind for e in ledger.audit_trail(kinds=["association.refused"])] == ["association.refused"]
        assert [e.kind for e in ledger.audit_trail(kinds=["store", "result"])] == [
            "store", "result.sent", "result.sent",
        ]  # fmt: skip
        assert [e.kind for e in ledger.audit_trail(since=middle)] == ["config.reloaded"]
        assert ledger.audit_trail(until=before) == []


def test_kind_selection_and_peer_text() -> None:
    assert kind_wanted("find.refused", ["find"]) and kind_wanted("find", [])
    assert not kind_wanted("finder", ["find"]) and not kind_wanted("store", ["store.refused"])
    assert peer_text("10.0.0.1", 104) == "10.0.0.1:104" and peer_text("fe80::1", 104) == "[fe80::1]:104"


def test_the_reader_is_read_only_and_reads_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        _store(ledger, "CT01", "1.2.3.4.1")
        ledger.record_event("find", actor="READER")
        # The running node in the middle of a write transaction (BEGIN IMMEDIATE holds the write lock).
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            with AuditTrailReader(path) as reader:
                assert [e.kind for e in reader.audit_trail()] == ["association.accepted", "find"]
                with pytest.raises(StorageError, match="readonly"):
                    reader.record_event("find", actor="X")
            assert time.monotonic() - started < 5  # not the 10 s busy timeout of a writer
        finally:
            writer.execute("ROLLBACK")
            writer.close()
    with pytest.raises(StorageError):
        AuditTrailReader(tmp_path / "missing.sqlite")


def test_a_ledger_without_the_audit_table_still_lists_its_associations(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        _store(ledger, "CT01", "1.2.3.4.1")
    with sqlite3.connect(path) as conn:  # as a ledger written before migration 0004 looks
        conn.execute("DROP TABLE audit_events")
    with AuditTrailReader(path) as reader:
        assert [e.kind for e in reader.audit_trail()] == ["association.accepted"]


def test_since_and_until_take_durations_and_iso_times() -> None:
    now = datetime.now(UTC)
    assert abs(when("24h") - (now - timedelta(hours=24))) < timedelta(seconds=5)
    assert abs(when("90m") - (now - timedelta(minutes=90))) < timedelta(seconds=5)
    assert abs(when("2w") - (now - timedelta(days=14))) < timedelta(seconds=5)
    assert when("2026-11-30") == datetime(2026, 11, 30, tzinfo=UTC)
    assert when("2026-11-30T08:00:00Z") == datetime(2026, 11, 30, 8, tzinfo=UTC)
    assert when("2026-11-30T09:00+01:00") == datetime(2026, 11, 30, 8, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError):
        when("yesterday")


def test_triaged_audit_prints_columns_or_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    config = load_config(cfg)
    assert main(["audit", "--config", str(cfg)]) == 1  # no ledger yet: said so, nothing created
    assert "no ledger" in capsys.readouterr().err and not config.storage.ledger.exists()
    with Ledger(config.storage.ledger) as ledger:
        _store(ledger, "CT01", "1.2.3.4.1")
        ledger.record_event(
            "config.refused", actor="node", detail={"errors": ["x.yaml:3: bad"], "config_sha256": "c"}
        )
    digest = hashlib.sha256(config.storage.ledger.read_bytes()).hexdigest()
    assert main(["audit", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["at", "(UTC)", "event", "who", "from", "study", "detail"]
    assert out[2].split()[2:4] == ["association.accepted", "CT01"]
    assert "errors=x.yaml:3: bad" in out[3] and out[-1] == f"2 event(s). {RESEARCH_NOTE}"
    assert main(["audit", "--config", str(cfg), "--json", "--stores", "--since", "1h"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["event"] for x in lines] == ["association.accepted", "store", "config.refused"]
    assert lines[2]["errors"] == ["x.yaml:3: bad"] and lines[2]["actor"] == "node"
    assert lines[1]["sop_instance_uid"] == "1.2.3.4.1" and lines[1]["peer"] == "10.0.0.5:4100"
    assert main(["audit", "--config", str(cfg), "--json", "--until", "2000-01-01"]) == 0
    assert capsys.readouterr().out == ""
    assert hashlib.sha256(config.storage.ledger.read_bytes()).hexdigest() == digest  # read, never written
    with pytest.raises(SystemExit):
        main(["audit", "--config", str(cfg), "--since", "yesterday"])


def test_results_sent_are_logged_dead_letters_and_resends_are_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, destinations={"pacs": {"ae_title": "PACS", "host": "10.1.1.1", "port": 104}})
    config = load_config(cfg)
    with Ledger(config.storage.ledger) as ledger, caplog.at_level(logging.INFO, logger="triaged.audit"):
        dispatch = Dispatch(
            ledger, Spool(config.storage.spool), lambda: config, destination=Peer(0x0000, 0xA900)
        )
        job_id = dispatching(ledger, dispatch)
        assert dispatch.dispatch_due() == 1
        (dead,) = ledger.audit_events(kinds=["result"])
        assert (dead.kind, dead.actor, dead.peer) == ("result.dead", "node", "10.1.1.1:104")
        assert dead.detail["destination"] == "pacs" and dead.detail["status"] == "0xA900"
        assert dead.detail["job"] == job_id and dead.detail["sop_instance_uid"] == "1.2.9.2"
        assert "refused sc with 0xA900" in str(dead.detail["reason"])
        assert ledger.job(job_id).state is JobState.FAILED
    sent = [r for r in caplog.records if getattr(r, "audit", {}).get("event") == "result.sent"]
    assert len(sent) == 1  # a log line: the outbox row (SENT) is its row
    fields = sent[0].audit  # type: ignore[attr-defined]
    assert (fields["destination"], fields["output"], fields["sop_instance_uid"]) == ("pacs", "sr", "1.2.9.1")
    assert fields["peer"] == "10.1.1.1:104" and fields["status"] == "0x0000"
    # The administrator puts the dead letter back: an audit row by "admin".
    assert main(["resend", str(job_id), "--config", str(cfg)]) == 0
    capsys.readouterr()
    with Ledger(config.storage.ledger) as ledger:
        (resend,) = ledger.audit_events(kinds=["resend"])
    assert (resend.actor, resend.detail["job"], resend.detail["objects"]) == (
        "admin",
        job_id,
        2,
    )  # both again


def test_reanalyze_is_an_audit_row_by_admin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    config = load_config(cfg)
    with Ledger(config.storage.ledger) as ledger:
        _store(ledger, "CT01", "1.2.3.4.1")
        (job,) = ledger.jobs()
        ledger.transition(job.id, JobState.RECEIVING, JobState.COMPLETE)
    assert main(["reanalyze", "1.2.3", "--config", str(cfg), "--reason", "new kernel"]) == 0
    assert main(["reanalyze", "9.9.9", "--config", str(cfg)]) == 1  # not in the ledger: refused, no row
    capsys.readouterr()
    with Ledger(config.storage.ledger) as ledger:
        (row,) = ledger.audit_events()
        new_job = max(j.id for j in ledger.jobs())
    assert (row.kind, row.actor, row.study_uid) == ("reanalyze", "admin", "1.2.3")
    assert (
        row.detail["reason"] == "new kernel" and row.detail["job"] == new_job and row.detail["revision"] == 2
    )
    assert row.detail["requested_by"]
