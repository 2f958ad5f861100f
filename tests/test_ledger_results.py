"""Findings and priority in the ledger, and the 0001 -> 0002 migration of an existing ledger."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine

from tests.pg import both_dialects
from triaged.domain import (
    CTGrade,
    Findings,
    InstanceRecord,
    JobState,
    LesionBox,
    LungMeasures,
    findings_from_json,
    findings_to_json,
)
from triaged.errors import StateError
from triaged.ledger import Ledger
from triaged.ledger.ledger import _MIGRATIONS
from triaged.routing import RouteDecision


def _record(n: int = 1) -> InstanceRecord:
    return InstanceRecord(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_instance_uid=f"1.2.3.4.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"studies/1.2.3/1.2.3.4/1.2.3.4.{n}.dcm",
        size=10,
        sha256=f"{n:064d}",
    )


def _findings() -> Findings:
    return Findings(
        pipeline="threshold",
        pipeline_version="1.0",
        right=LungMeasures(lung_ml=2000.0, lesion_ml=1160.0, consolidation_ml=100.0),
        left=LungMeasures(lung_ml=1800.0, lesion_ml=300.0, consolidation_ml=0.0),
        ct_grade=CTGrade.CT3,
        key_slices=(12, 11, 30),
        p_covid=0.94,
        lesion_boxes=(LesionBox(12, "1.2.3.4.12", 10, 20, 30, 40, 55.5, "right"),),
        class_probabilities=(("covid", 0.94), ("healthy", 0.06)),
        provenance=(("threshold_hu", "-700..300"),),
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    both_dialects(metafunc)


def test_findings_round_trip_and_mark_the_result_time(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as ledger:
        job_id = _analysing(ledger)
        assert ledger.findings(job_id) is None
        findings = _findings()
        ledger.record_analysis(job_id, findings, priority=None, detail="analysed")
        assert ledger.findings(job_id) == findings
        assert findings.severity_pct == 58.0 and ledger.job(job_id).result_at is not None
        # A run resumed after a stop records again: it replaces, never duplicates.
        ledger.transition(job_id, JobState.ENCODING, JobState.QUEUED, "encoding interrupted by a stop")
        ledger.transition(job_id, JobState.QUEUED, JobState.ANALYSING)
        ledger.record_analysis(
            job_id,
            findings,
            priority=(0.9, "STAT", "CT3: 58 % of the right lung affected"),
            detail="analysed again",
        )
        assert ledger.findings(job_id) == findings
        row = ledger.job(job_id)
        assert (row.priority_level, row.priority_score, row.pipeline) == ("STAT", 0.9, "threshold")
        assert "58 %" in row.priority_reasons
    with sqlite3.connect(tmp_path / "l.sqlite") as raw:
        assert raw.execute("SELECT count(*) FROM findings").fetchall() == [(1,)]


def test_a_ledger_written_by_the_first_schema_is_upgraded_in_place_with_its_data(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    engine.dispose()
    with sqlite3.connect(db) as raw:
        raw.execute(
            "INSERT INTO studies VALUES (1, '1.2.3', '2026-01-01 00:00:00', '2026-01-01 00:00:00', 1, 10, '', '', '')"
        )
        raw.execute(
            "INSERT INTO jobs (id, study_id, revision, state, detail, created_at, updated_at, attempts) "
            "VALUES (1, 1, 1, 'QUEUED', 'old job', '2026-01-01 00:00:00', '2026-01-01 00:00:00', 0)"
        )
        assert raw.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
    with Ledger(db) as ledger:
        [job] = ledger.jobs()
        assert (job.state, job.detail, job.priority_level) == (JobState.QUEUED, "old job", None)
        ledger.transition(job.id, JobState.QUEUED, JobState.ANALYSING)
        ledger.record_analysis(job.id, _findings(), priority=(0.9, "STAT", "CT3"), detail="analysed")
        assert ledger.findings(job.id) == _findings()
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT version_num FROM alembic_version").fetchall() == [(_head(),)]


def _analysing(ledger: Ledger) -> int:
    ledger.record_instance(_record(1), association_id=None)
    (job,) = ledger.jobs()
    ledger.transition(job.id, JobState.RECEIVING, JobState.COMPLETE)
    ledger.queue_job(
        job.id,
        route=RouteDecision.from_json("{}"),
        pipeline="threshold",
        series_instance_uid="1.2.3.4",
        detail="",
    )
    ledger.transition(job.id, JobState.QUEUED, JobState.ANALYSING)
    return job.id


def test_record_analysis_writes_findings_priority_and_the_transition_together(
    ledger_location: Path | str,
) -> None:
    with Ledger(ledger_location) as ledger:
        job_id = _analysing(ledger)
        ledger.record_analysis(job_id, _findings(), priority=(0.8, "URGENT", "p_covid 0.94"), detail="CT3")
        job = ledger.job(job_id)
        assert (job.state, job.detail, job.priority_score, job.priority_level, job.priority_reasons) == (
            JobState.ENCODING,
            "CT3",
            0.8,
            "URGENT",
            "p_covid 0.94",
        )
        assert job.result_at is not None
        assert ledger.findings(job_id) == _findings()


def test_record_analysis_on_a_superseded_job_records_neither_findings_nor_priority(
    ledger_location: Path | str,
) -> None:
    with Ledger(ledger_location) as ledger:
        job_id = _analysing(ledger)
        ledger.record_instance(_record(2), association_id=None)  # a late instance supersedes the running job
        with pytest.raises(StateError, match="expected state ANALYSING, but it is in SUPERSEDED"):
            ledger.record_analysis(
                job_id, _findings(), priority=(0.8, "URGENT", "p_covid 0.94"), detail="CT3"
            )
        job = ledger.job(job_id)
        assert (job.state, job.priority_level, job.priority_score, job.result_at) == (
            JobState.SUPERSEDED,
            None,
            None,
            None,
        )
        assert ledger.findings(job_id) is None


def _head() -> str:
    """The newest migration revision shipped (so these tests need no edit per migration)."""
    from alembic.config import Config as _Cfg
    from alembic.script import ScriptDirectory

    from triaged.ledger.ledger import _MIGRATIONS as _M

    cfg = _Cfg()
    cfg.set_main_option("script_location", str(_M))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


#: Findings as the worker sends them and earlier versions stored them (``findings.data``).
OLD_FINDINGS_JSON = (
    '{"class_probabilities": [["covid", 0.94], ["healthy", 0.06]], "ct_grade": 3, "key_slices": [12, 11, 30], '
    '"left": {"consolidation_ml": 0.0, "lesion_ml": 300.0, "lung_ml": 1800.0}, "lesion_boxes": [{"col_max": 40, '
    '"col_min": 20, "frame_number": null, "row_max": 30, "row_min": 10, "side": "right", "sop_instance_uid": '
    '"1.2.3.4.12", "volume_ml": 55.5, "z": 12}], "model_sha256": null, "p_covid": 0.94, "pipeline": "threshold", '
    '"pipeline_version": "1.0", "provenance": [["threshold_hu", "-700..300"]], "right": {"consolidation_ml": '
    '100.0, "lesion_ml": 1160.0, "lung_ml": 2000.0}, "warnings": []}'
)


def test_findings_json_round_trips_and_the_ledger_stores_it_byte_for_byte(tmp_path: Path) -> None:
    findings = findings_from_json(OLD_FINDINGS_JSON)
    assert findings == _findings()
    assert findings_to_json(findings) == OLD_FINDINGS_JSON
    with Ledger(tmp_path / "l.sqlite") as ledger:
        job_id = _analysing(ledger)
        ledger.record_analysis(job_id, findings, priority=None, detail="analysed")
        assert ledger.findings(job_id) == findings
    with sqlite3.connect(tmp_path / "l.sqlite") as raw:
        assert raw.execute("SELECT data FROM findings").fetchall() == [(OLD_FINDINGS_JSON,)]


def test_a_queued_job_reads_back_its_typed_route(ledger_location: Path | str) -> None:
    with Ledger(ledger_location) as ledger:
        job_id = _analysing(ledger)
        job = ledger.job(job_id)
        empty = RouteDecision.from_json("{}")
        assert (job.route, ledger.route_decision(job)) == (empty.to_json(), empty)
        ledger.record_instance(_record(2), association_id=None)  # supersedes it; the new job is not queued
        assert ledger.route_decision(ledger.jobs()[0]) is None


def test_enqueue_outbox_counts_only_the_objects_it_added(ledger_location: Path | str) -> None:
    """The count the job history shows ("3 queued for pacs"): exact on both dialects, 0 for a resumed job."""
    with Ledger(ledger_location) as ledger:
        job_id = _analysing(ledger)
        items = [("pacs", kind, f"work/1/{kind}.dcm", "1.2.840.10008.5.1.4.1.1.88.34", f"1.2.3.9.{n}")
                 for n, kind in enumerate(("sr", "seg", "sc"))]
        assert ledger.enqueue_outbox(job_id, items) == 3
        assert ledger.enqueue_outbox(job_id, items) == 0  # idempotent: a resumed job adds nothing
        more = [("pacs", "sr", "work/1/sr2.dcm", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.9.7")]
        assert ledger.enqueue_outbox(job_id, items[:2] + more) == 1
        assert len(ledger.outbox(job_id=job_id)) == 4
