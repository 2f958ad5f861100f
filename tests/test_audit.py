"""The audit trail's core: ``audit_events`` rows in a real SQLite ledger and the structured log line."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from triaged.audit import audit
from triaged.config import LoggingConfig
from triaged.daemon import configure_logging
from triaged.ledger import Ledger


def test_events_are_rows_filtered_by_time_and_kind(tmp_path: Path) -> None:
    t0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        a = ledger.record_event("find", actor="RIS", peer="10.0.0.7:4000", detail={"matches": 3}, at=t0)
        ledger.record_event(
            "find.refused", actor="STRANGER", peer="10.0.0.8:4001", at=t0 + timedelta(seconds=1)
        )
        ledger.record_event("finder", actor="X", at=t0 + timedelta(seconds=2))  # not a sub-event of find
        ledger.record_event("config.reloaded", actor="node", at=t0 + timedelta(seconds=3))
        rows = ledger.audit_events(kinds=["find"])
        assert [r.kind for r in rows] == ["find", "find.refused"]
        assert rows[0].id == a and rows[0].detail == {"matches": 3} and rows[0].peer == "10.0.0.7:4000"
        assert rows[0].at == t0
        assert [r.kind for r in ledger.audit_events(since=t0 + timedelta(seconds=2))] == [
            "finder",
            "config.reloaded",
        ]
        assert [r.kind for r in ledger.audit_events(until=t0 + timedelta(seconds=1))] == ["find"]
        assert len(ledger.audit_events(limit=2)) == 2


def test_audit_logs_structured_fields_and_writes_the_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(LoggingConfig(format="json"))
        with Ledger(tmp_path / "ledger.sqlite") as ledger:
            audit(
                "find",
                "C-FIND from RIS answered with 2 studies",
                actor="RIS",
                peer="127.0.0.1:5000",
                recorder=ledger,
                matches=2,
            )
            (row,) = ledger.audit_events()
        lines = [json.loads(x) for x in capsys.readouterr().err.strip().splitlines()]
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    (line,) = [x for x in lines if x["logger"] == "triaged.audit"]
    assert line["event"] == "find" and line["matches"] == 2
    assert line["actor"] == "RIS" and line["peer"] == "127.0.0.1:5000"
    assert line["message"] == "C-FIND from RIS answered with 2 studies"
    assert (row.kind, row.actor, row.detail) == ("find", "RIS", {"matches": 2})


def test_a_failing_row_write_does_not_fail_the_caller(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.close()  # every write now raises
    audit("config.reloaded", "config reloaded", actor="node", recorder=ledger)  # logged, not raised
