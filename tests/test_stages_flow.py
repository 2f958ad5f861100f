"""Completion, series choice, analysis recording and start-up recovery on real CT files and a real ledger.

The spooled files are the session's phantom CT series (``phantom_ct_series`` in ``tests/conftest.py``),
copied into the test's own spool under tmp_path, so these run without the real data; the record builder
also reads the real Lung-PET-CT-Dx headers when they are there. Time is an injected clock.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import make_config
from triaged.config import Config
from triaged.domain import CTGrade, Findings, InstanceRecord, JobState, LungMeasures, findings_to_json
from triaged.ledger import Ledger
from triaged.net.scp import instance_record
from triaged.spool import Spool
from triaged.stages import Analysis, Completion, CompletionTimers, Dispatch, Recovery
from triaged.stages.recovery import record_from_file
from triaged.worker import AnalysisTask, EncodingStarted, TaskOutcome, TaskQueue

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


class Clock:
    """The injected ``now``."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


class Node:
    """The stages composed as the daemon composes them, on one ledger and spool."""

    def __init__(self, config: Config, clock: Clock) -> None:
        self.config = config
        self.ledger = Ledger(config.storage.ledger)
        self.spool = Spool(config.storage.spool)
        self.dispatch = Dispatch(self.ledger, self.spool, lambda: config, now=clock)
        self.analysis = Analysis(self.ledger, self.spool, lambda: config, self.dispatch)
        self.completion = Completion(self.ledger, self.spool, lambda: config, self.analysis, now=clock)
        self.recovery = Recovery(self.ledger, self.spool, lambda: config, self.analysis)

    def receive(self, files: list[Path], at: datetime = T0) -> str:
        """Spool and record files as the C-STORE handler does; returns the Study Instance UID."""
        study = ""
        for f in files:
            data = f.read_bytes()
            ds = dcmread(f, stop_before_pixels=True)
            rel = self.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            stored = self.spool.store_instance(rel, data)
            self.ledger.record_instance(instance_record(ds, path=rel, size=len(data), sha256=stored.sha256),
                                        association_id=None, now=at)
            study = str(ds.StudyInstanceUID)
        return study


def make_node(tmp_path: Path, **sections: dict[str, object]) -> Iterator[Node]:
    node = Node(make_config(tmp_path, **sections), Clock(T0))
    yield node
    node.ledger.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    yield from make_node(tmp_path, destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11112}})


@pytest.fixture
def ct_series(phantom_ct_series: Path) -> Path:
    """The CT files these tests spool: the session's phantom series (no real data needed)."""
    return phantom_ct_series


def series(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def findings() -> Findings:
    return Findings(pipeline="ok", pipeline_version="1", right=LungMeasures(2000.0, 200.0, 0.0),
                    left=LungMeasures(1800.0, 100.0, 0.0), ct_grade=CTGrade.CT2, p_covid=0.7)


# ------------------------------------------------------------------ completion


@pytest.mark.parametrize(("modality", "waits"), [("CT", True), ("MR", False)])
def test_a_route_with_a_longer_completion_delay_waits_for_it(
    tmp_path: Path, ct_series: Path, modality: str, waits: bool
) -> None:
    rule = {"name": "slow", "match": {"series": {"Modality": modality}}, "action": {"completion_delay_seconds": 300}}
    for node in make_node(tmp_path, routing={"rules": [rule]}):
        node.receive(series(ct_series))
        (job,) = node.ledger.jobs()
        assert node.completion.complete_quiet_studies(T0 + timedelta(seconds=0.5)) == []  # the default is 1 s
        node.completion._now.at = T0 + timedelta(seconds=10)  # type: ignore[attr-defined]
        assert node.completion.complete_quiet_studies() == ([] if waits else [job.id])
        later = node.completion.complete_quiet_studies(T0 + timedelta(seconds=301))
        assert later == ([job.id] if waits else [])
        completed = [h for h in node.ledger.job(job.id).history if h[2] == "COMPLETE"]
        assert len(completed) == 1
        expected = "no instance for 300 s; route 'slow'" if waits else "no instance for 1 s; route 'default'"
        assert completed[0][3] == expected


def test_a_completed_series_is_queued_with_route_pipeline_and_series_in_one_step(
    node: Node, ct_series: Path
) -> None:
    study = node.receive(series(ct_series))
    (job,) = node.ledger.jobs()
    assert node.completion.complete_quiet_studies(T0 + timedelta(seconds=2)) == [job.id]
    queued = node.ledger.job(job.id)
    assert queued.state is JobState.QUEUED, queued.detail
    assert queued.series_instance_uid == str(dcmread(series(ct_series)[0]).SeriesInstanceUID)
    assert queued.pipeline == "ok"
    assert json.loads(queued.route)["destinations"][0]["name"] == "pacs"
    assert [h[1:3] for h in queued.history][-2:] == [("RECEIVING", "COMPLETE"), ("COMPLETE", "QUEUED")]
    task = node.analysis.analysis_task(queued)
    assert (task.study_uid, len(task.instance_paths), task.encode) == (study, len(series(ct_series)), True)


def test_a_superseded_job_gets_no_route_and_no_pipeline(node: Node, ct_series: Path) -> None:
    files = series(ct_series)
    study = node.receive(files[:-1])
    (job,) = node.ledger.jobs()
    node.ledger.transition(job.id, JobState.RECEIVING, JobState.COMPLETE, "quiet")
    node.receive(files[-1:], at=T0 + timedelta(seconds=5))  # the late slice supersedes the job
    node.analysis.choose_series(job.id, study)
    old = node.ledger.job(job.id)
    assert (old.state, old.route, old.pipeline, old.series_instance_uid) == (JobState.SUPERSEDED, "", None, None)


# ------------------------------------------------------------------ analysis outcome


def analysing(node: Node, folder: Path, keep_back: int = 0) -> tuple[AnalysisTask, int]:
    files = series(folder)
    node.receive(files[:len(files) - keep_back])
    (job,) = node.ledger.jobs()
    node.completion.complete_quiet_studies(T0 + timedelta(seconds=2))
    task = node.analysis.analysis_task(node.ledger.job(job.id))
    assert node.analysis.start_analysis(task)
    return task, job.id


def test_a_finished_analysis_records_findings_and_priority_then_goes_to_the_outbox(
    node: Node, ct_series: Path
) -> None:
    task, job_id = analysing(node, ct_series)
    out = (("sr", f"work/{job_id}/outputs/sr-1.2.9.1.dcm", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.9.1"),)
    node.analysis.finish_analysis(task, TaskOutcome(job_id, True, findings_to_json(findings()), outputs=out,
                                                    priority=(0.6, "URGENT", "p_covid 0.70")))
    job = node.ledger.job(job_id)
    assert (job.state, job.priority_level, job.priority_score) == (JobState.DISPATCHING, "URGENT", 0.6)
    assert [h[2] for h in job.history][-2:] == ["ENCODING", "DISPATCHING"]
    assert node.ledger.findings(job_id) == findings()
    assert [(i.destination, i.kind) for i in node.ledger.outbox(job_id=job_id)] == [("pacs", "sr")]


def test_an_analysis_finishing_after_its_job_was_superseded_records_nothing(node: Node, ct_series: Path) -> None:
    task, job_id = analysing(node, ct_series, keep_back=1)
    node.receive(series(ct_series)[-1:], at=T0 + timedelta(seconds=60))  # a late slice while it runs
    assert not node.analysis.analysis_wanted(job_id)
    node.analysis.finish_analysis(task, TaskOutcome(job_id, True, findings_to_json(findings()),
                                                    priority=(0.6, "URGENT", "p_covid 0.70")))
    job = node.ledger.job(job_id)
    assert (job.state, job.priority_level, job.priority_score) == (JobState.SUPERSEDED, None, None)
    assert node.ledger.findings(job_id) is None
    assert node.ledger.outbox(job_id=job_id) == []


def test_findings_and_priority_are_recorded_when_encoding_starts_and_outputs_queued_when_it_ends(
    node: Node, ct_series: Path
) -> None:
    task, job_id = analysing(node, ct_series)
    started = EncodingStarted(job_id, findings_to_json(findings()), (0.6, "URGENT", "p_covid 0.70"), seconds=4.0,
                              peak_rss_mb=300.0)
    assert node.analysis.start_encoding(task, started)
    job = node.ledger.job(job_id)
    assert (job.state, job.priority_level) == (JobState.ENCODING, "URGENT")
    assert job.detail == "ok 1: CT2, worse lung 10.0 %, whole lung 7.9 % (4.0 s, peak 300 MiB)"
    assert node.ledger.findings(job_id) == findings()
    assert node.analysis.analysis_wanted(job_id)  # encoding is part of the work: not cancelled
    out = (("sr", f"work/{job_id}/outputs/sr-1.2.9.1.dcm", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.9.1"),)
    node.analysis.finish_analysis(task, TaskOutcome(job_id, True, started.findings_json, outputs=out,
                                                    priority=started.priority))
    job = node.ledger.job(job_id)
    assert job.state is JobState.DISPATCHING
    assert [h[2] for h in job.history].count("ENCODING") == 1


def test_an_encoding_that_fails_fails_the_job_from_encoding(node: Node, ct_series: Path) -> None:
    task, job_id = analysing(node, ct_series)
    assert node.analysis.start_encoding(task, EncodingStarted(job_id, findings_to_json(findings())))
    node.analysis.finish_analysis(task, TaskOutcome(job_id, False, error="encode: ValueError: bad mask"))
    job = node.ledger.job(job_id)
    assert (job.state, job.detail, job.history[-1][1]) == (JobState.FAILED, "encode: ValueError: bad mask", "ENCODING")


def test_encoding_of_a_superseded_job_is_refused(node: Node, ct_series: Path) -> None:
    task, job_id = analysing(node, ct_series, keep_back=1)
    node.receive(series(ct_series)[-1:], at=T0 + timedelta(seconds=60))
    assert not node.analysis.start_encoding(task, EncodingStarted(job_id, findings_to_json(findings()), (0.6, "URGENT", "")))
    job = node.ledger.job(job_id)
    assert (job.state, job.priority_level) == (JobState.SUPERSEDED, None)
    assert node.ledger.findings(job_id) is None


def test_a_failed_analysis_fails_the_job_with_its_stage_and_reason(node: Node, ct_series: Path) -> None:
    task, job_id = analysing(node, ct_series)
    node.analysis.finish_analysis(task, TaskOutcome(job_id, False, error="analysis: timed out after 600 s"))
    job = node.ledger.job(job_id)
    assert (job.state, job.detail) == (JobState.FAILED, "analysis: timed out after 600 s")


# ------------------------------------------------------------------ recovery


def test_resume_requeues_an_interrupted_analysis_and_routes_a_completed_study(node: Node, ct_series: Path) -> None:
    _task, job_id = analysing(node, ct_series)
    node.recovery.resume_interrupted()
    job = node.ledger.job(job_id)
    assert (job.state, job.detail) == (JobState.QUEUED, "analysis interrupted by a stop")


def test_resume_chooses_the_series_of_a_job_stopped_after_completion(node: Node, ct_series: Path) -> None:
    node.receive(series(ct_series))
    (job,) = node.ledger.jobs()
    node.ledger.transition(job.id, JobState.RECEIVING, JobState.COMPLETE, "quiet")
    node.recovery.resume_interrupted()
    assert node.ledger.job(job.id).state is JobState.QUEUED


def test_resume_reruns_a_job_whose_encoding_was_interrupted(node: Node, ct_series: Path) -> None:
    _task, job_id = analysing(node, ct_series)
    node.ledger.record_analysis(job_id, findings(), priority=None, detail="analysed; encoding")
    node.recovery.resume_interrupted()
    job = node.ledger.job(job_id)
    assert (job.state, job.detail) == (JobState.QUEUED, "encoding interrupted by a stop")


def test_reconcile_records_a_spooled_file_whose_ledger_row_is_missing_with_every_field(
    node: Node, ct_series: Path
) -> None:
    source = series(ct_series)[0]
    ds = dcmread(source, stop_before_pixels=True)
    rel = node.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    node.spool.store_instance(rel, source.read_bytes())  # fsynced, then power lost before the ledger commit
    junk = node.spool.root / "studies" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not DICOM")  # a torn file where an instance belongs
    assert node.recovery.reconcile_spool() == 1
    assert rel in node.ledger.instance_paths()
    assert not junk.exists()  # quarantined, not recorded
    (study,) = node.ledger.studies()
    assert (study.study_description, study.accession_number, study.study_date) == (
        str(ds.StudyDescription), str(ds.get("AccessionNumber", "")), str(ds.StudyDate))
    con = sqlite3.connect(node.config.storage.ledger)
    try:
        rows = con.execute("SELECT series_number, modality FROM series").fetchall()
    finally:
        con.close()
    assert rows == [(int(ds.SeriesNumber), "CT")]
    assert node.ledger.jobs()[0].state is JobState.RECEIVING
    assert node.recovery.reconcile_spool() == 0


@pytest.mark.parametrize("fixture", ["ct_series", "pet_ct_dx"], ids=["phantom", "real"])
def test_the_record_builder_reads_every_field_of_a_header(
    request: pytest.FixtureRequest, fixture: str
) -> None:
    source = series(request.getfixturevalue(fixture))[0]  # and a real export's header, where it is present
    ds = dcmread(source, stop_before_pixels=True)
    data = source.read_bytes()
    record = record_from_file(source, "studies/a/b/c.dcm")
    assert record == InstanceRecord(
        study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path="studies/a/b/c.dcm", size=len(data),
        sha256=hashlib.sha256(data).hexdigest(), modality="CT", series_number=int(ds.SeriesNumber),
        series_description=str(ds.get("SeriesDescription", "")), study_date=str(ds.StudyDate),
        study_description=str(ds.StudyDescription), accession_number=str(ds.get("AccessionNumber", "")),
    )
    assert record.series_number is not None and record.study_description  # the two the old copy dropped


def test_reconcile_quarantines_a_spooled_file_that_conflicts_and_records_the_rest(
    node: Node, ct_series: Path
) -> None:
    # Issue 12 item 1: a file the ledger refuses (its series recorded under another study) used to
    # make reconcile_spool raise, so every start of the node failed.
    files = series(ct_series)
    study = node.receive(files[:1])
    conflicting = dcmread(files[1])
    conflicting.StudyInstanceUID = "1.2.826.0.1.3680043.99.1"  # same series, another study
    rel = node.spool.instance_path(
        conflicting.StudyInstanceUID, conflicting.SeriesInstanceUID, conflicting.SOPInstanceUID
    )
    (node.spool.root / rel).parent.mkdir(parents=True)
    conflicting.save_as(node.spool.root / rel)
    late = files[2]  # and a good file spooled but unrecorded: still recorded
    ds = dcmread(late, stop_before_pixels=True)
    good = node.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    node.spool.store_instance(good, late.read_bytes())

    assert node.recovery.reconcile_spool() == 1
    assert not (node.spool.root / rel).exists()
    [(_, reason)] = node.spool.quarantined()
    assert rel in reason and "already recorded under another study" in reason
    [row] = node.ledger.studies()
    assert (row.study_instance_uid, row.instances) == (study, 2)
    assert node.recovery.reconcile_spool() == 0


# ------------------------------------------------------------------ event-driven completion


class Monotonic:
    """The timers' injected monotonic clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_study_has_its_own_deadline_rearmed_by_every_instance() -> None:
    clock = Monotonic()
    fired: list[str] = []
    timers = CompletionTimers(lambda study: fired.append(study) or None, lambda: 1.0, clock=clock)
    timers.note("a")
    clock.now = 0.5
    timers.note("b")
    timers.note("a")  # a late instance of a: its deadline moves to 1.5
    clock.now = 1.2
    assert timers.run_due() == [] and fired == []
    clock.now = 1.5
    assert timers.run_due() == ["a", "b"]
    assert timers.pending() == {}
    assert timers.run_due() == []  # fired once


def test_a_deadline_whose_route_wants_longer_is_armed_again_for_the_rest() -> None:
    clock = Monotonic()
    answers = [29.0, None]
    timers = CompletionTimers(lambda study: answers.pop(0), lambda: 1.0, clock=clock)
    timers.note("a")
    clock.now = 1.0
    assert timers.run_due() == ["a"] and timers.pending() == {"a": 30.0}
    clock.now = 30.0
    assert timers.run_due() == ["a"] and timers.pending() == {}


def test_a_studys_deadline_completes_and_queues_it_at_once_and_the_sweep_after_it_does_nothing(
    tmp_path: Path, ct_series: Path
) -> None:
    for node in make_node(tmp_path):
        queued: list[int] = []
        node.analysis._on_queued = queued.append  # type: ignore[attr-defined]  # as the daemon wires it
        study = node.receive(series(ct_series))
        (job,) = node.ledger.jobs()
        assert node.completion.complete_study(study, T0 + timedelta(seconds=0.5)) is None  # not quiet: nothing
        assert node.ledger.job(job.id).state is JobState.RECEIVING
        assert node.completion.complete_study(study, T0 + timedelta(seconds=2)) is None
        assert node.ledger.job(job.id).state is JobState.QUEUED and queued == [job.id]
        # The safety net running beside it (or late) finds nothing left to do.
        assert node.completion.complete_quiet_studies(T0 + timedelta(seconds=3)) == []
        assert node.completion.complete_study(study, T0 + timedelta(seconds=3)) is None
        assert queued == [job.id]
        assert [h[2] for h in node.ledger.job(job.id).history].count("COMPLETE") == 1


def test_complete_study_says_how_much_longer_a_slow_route_waits(tmp_path: Path, ct_series: Path) -> None:
    rule = {"name": "slow", "match": {"series": {"Modality": "CT"}}, "action": {"completion_delay_seconds": 300}}
    for node in make_node(tmp_path, routing={"rules": [rule]}):
        study = node.receive(series(ct_series))
        assert node.completion.complete_study(study, T0 + timedelta(seconds=2)) == 299.0
        assert node.completion.complete_study(study, T0 + timedelta(seconds=301)) is None
        assert node.ledger.jobs()[0].state is JobState.QUEUED


def test_submitting_from_several_threads_puts_each_queued_job_once(node: Node, ct_series: Path) -> None:
    node.receive(series(ct_series))
    assert node.completion.complete_quiet_studies(T0 + timedelta(seconds=2))
    queue = TaskQueue()
    threads = [threading.Thread(target=node.analysis.submit_queued, args=(queue, set())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(queue.job_ids()) == 1
    assert queue.get(timeout=0) is not None and queue.get(timeout=0) is None
