"""The C-STORE path's cheaper ledger and spool writes keep what the SQLAlchemy path and the old spool wrote."""

from __future__ import annotations

import os
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert

from triaged.domain import InstanceRecord, StoreOutcome
from triaged.ledger import Ledger
from triaged.ledger.base import _studies
from triaged.spool import Spool

T0 = datetime(2026, 3, 1, 8, 0, 0, 123456, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"


def _record(sop: str, *, study: str = "1.2.3", series: str = "1.2.3.4", sha: str = "ab") -> InstanceRecord:
    return InstanceRecord(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=CT,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"studies/{study}/{series}/{sop}.dcm",
        size=10,
        sha256=sha,
        modality="CT",
        series_number=None,
        series_description="",
        study_date="20260301",
        study_description="",
        accession_number="",
    )


def test_driver_path_stores_the_same_text_as_sqlalchemy(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        assert ledger.record_instance(_record("1.2.3.4.1"), association_id=None, now=T0) is StoreOutcome.NEW
        # The same time written through SQLAlchemy's own statement, for comparison.
        with ledger._write("reference") as conn:
            conn.execute(
                insert(_studies).values(
                    study_instance_uid="9.9",
                    first_seen=T0,
                    last_seen=T0,
                    instance_count=0,
                    byte_count=0,
                    accession_number="",
                    study_date="",
                    study_description="",
                )
            )
    finally:
        ledger.close()
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    try:
        rows = dict(db.execute("SELECT study_instance_uid, last_seen FROM studies").fetchall())
        received = db.execute("SELECT received_at, duplicate_count, association_id FROM instances").fetchone()
        jobs = db.execute("SELECT state, revision FROM jobs").fetchall()
    finally:
        db.close()
    assert rows["1.2.3"] == rows["9.9"] == "2026-03-01 08:00:00.123456"
    assert received == ("2026-03-01 08:00:00.123456", 0, None)
    assert jobs == [("RECEIVING", 1)]


def test_driver_path_keeps_one_transaction_on_a_conflict(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        ledger.record_instance(_record("1.2.3.4.1"), association_id=None, now=T0)
        assert ledger.hierarchy_conflict("1.2.9", "1.2.3.4", "1.2.3.4.2") is not None
        try:
            ledger.record_instance(_record("1.2.3.4.2", study="1.2.9"), association_id=None, now=T0)
        except Exception as exc:  # noqa: BLE001 - the type is checked below
            assert type(exc).__name__ == "InvalidDatasetError"
        else:
            raise AssertionError("a series under another study was recorded")
        assert ledger.record_instance(_record("1.2.3.4.1"), association_id=None) is StoreOutcome.DUPLICATE
        assert (
            ledger.record_instance(_record("1.2.3.4.1", sha="cd"), association_id=None)
            is StoreOutcome.REPLACED
        )
        study = {s.study_instance_uid: s for s in ledger.studies(limit=10)}
    finally:
        ledger.close()
    # The refused instance's study upsert was rolled back with it.
    assert "1.2.9" not in study
    assert study["1.2.3"].instances == 1


def test_spool_creates_folders_only_when_missing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.store_instance("studies/1.2/1.2.3/1.2.3.4.dcm", b"one")
    shutil.rmtree(tmp_path / "spool" / "studies" / "1.2")  # retention removed the study meanwhile
    second = spool.store_instance("studies/1.2/1.2.3/1.2.3.5.dcm", b"two")
    again = spool.store_instance("studies/1.2/1.2.3/1.2.3.5.dcm", b"two")
    assert not first.already_present and not second.already_present and again.already_present
    assert (tmp_path / "spool" / "studies/1.2/1.2.3/1.2.3.5.dcm").read_bytes() == b"two"
    assert not (tmp_path / "spool" / "studies/1.2/1.2.3/1.2.3.4.dcm").exists()
    assert os.listdir(tmp_path / "spool" / "tmp") == []
