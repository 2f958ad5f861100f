"""Issue 12 items 10 and 11: transient failures are retried, ``triaged reanalyze``, own results never re-open.

Real SQLite ledgers and spools under tmp_path, the phantom CT series, the stages composed as the daemon
composes them and the real command line; time is an injected clock.
"""

from __future__ import annotations

import dataclasses
import errno
import getpass
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import write_config
from triaged.cli import main
from triaged.config import load_config
from triaged.domain import CTGrade, Findings, InstanceRecord, JobState, LungMeasures, findings_to_json
from triaged.encode.uids import output_uids
from triaged.ledger import Ledger
from triaged.net.scp import instance_record
from triaged.spool import Spool
from triaged.stages import Analysis, Completion, Dispatch
from triaged.stages.analyse import (
    TRANSIENT_RETRIES,
    TRANSIENT_RETRY_MAX_SECONDS,
    retry_delay_seconds,
    transient_failure,
)
from triaged.worker import AnalysisTask, TaskOutcome, TaskQueue

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
#: What the worker reports when writing its results hits a full disk (``f"{stage}: {type}: {exc}"``).
DISK_FULL = f"write results: OSError: {OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/spool/work/1/masks.tmp.npz')}"
SR, SEG, SC = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.7"


class Clock:
    """The injected ``now``."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


class Stages:
    """Ledger, spool and the stages on one config file (the one the command line reads too)."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config = load_config(config_path)
        self.clock = Clock(T0)
        self.ledger = Ledger(self.config.storage.ledger)
        self.spool = Spool(self.config.storage.spool)
        dispatch = Dispatch(self.ledger, self.spool, lambda: self.config, now=self.clock)
        self.analysis = Analysis(self.ledger, self.spool, lambda: self.config, dispatch, now=self.clock)
        self.completion = Completion(
            self.ledger, self.spool, lambda: self.config, self.analysis, now=self.clock
        )

    def receive(self, files: list[Path]) -> str:
        """Spool and record files as the C-STORE handler does; returns the Study Instance UID."""
        study = ""
        for f in files:
            data = f.read_bytes()
            ds = dcmread(f, stop_before_pixels=True)
            rel = self.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            stored = self.spool.store_instance(rel, data)
            self.ledger.record_instance(
                instance_record(ds, path=rel, size=len(data), sha256=stored.sha256),
                association_id=None,
                now=self.clock(),
            )
            study = str(ds.StudyInstanceUID)
        return study

    def cli(self, *args: str) -> int:
        return main([*args, "--config", str(self.config_path)])

    def later(self, seconds: float = 3600.0) -> None:
        self.clock.at += timedelta(seconds=seconds)


@pytest.fixture
def stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stages]:
    monkeypatch.delenv("SUDO_USER", raising=False)  # the history names the login user
    s = Stages(write_config(tmp_path))
    yield s
    s.ledger.close()


def queued(stages: Stages, series: Path) -> tuple[str, int]:
    """Receive the series, complete and route it: ``(study UID, job id)`` of its QUEUED job."""
    study = stages.receive(sorted(series.glob("*.dcm")))
    stages.later(10)
    [job_id] = stages.completion.complete_quiet_studies()
    assert stages.ledger.job(job_id).state is JobState.QUEUED
    return study, job_id


def take(stages: Stages) -> AnalysisTask:
    """Submit what is due and start it as a worker would (QUEUED → ANALYSING)."""
    queue = TaskQueue()
    assert stages.analysis.submit_queued(queue, set()) == 1
    task = queue.get(timeout=0)
    assert task is not None and stages.analysis.start_analysis(task)
    return task


def ok(task: AnalysisTask) -> TaskOutcome:
    findings = Findings(
        pipeline=task.pipeline,
        pipeline_version="1",
        right=LungMeasures(2000.0, 200.0, 0.0),
        left=LungMeasures(1800.0, 100.0, 0.0),
        ct_grade=CTGrade.CT2,
    )
    return TaskOutcome(task.job_id, True, findings_to_json(findings))


def done(stages: Stages, series: Path) -> tuple[str, int]:
    """A study analysed to DONE (no destination configured)."""
    study, job_id = queued(stages, series)
    task = take(stages)
    stages.analysis.finish_analysis(task, ok(task))
    assert stages.ledger.job(job_id).state is JobState.DONE
    return study, job_id


# ------------------------------------------------------------------ item 10 (a): transient failures


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (DISK_FULL, True),
        (f"encode: OSError: {OSError(errno.EIO, os.strerror(errno.EIO))}", True),
        (f"write results: OSError: {OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))}", True),
        ("analysis: worker process crashed (exit code -9)", True),
        ("analysis: ValueError: no lungs found in this volume", False),
        ("analysis: timed out after 600 s", False),
        ("analysis: memory guard: 5000 MiB > limit 4096 MiB", False),
        (f"load: OSError: {OSError(errno.ENOENT, os.strerror(errno.ENOENT))}", False),
        ("analysis: cancelled, the job moved on (e.g. superseded by a late instance)", False),
    ],
)
def test_only_resource_failures_and_worker_deaths_count_as_transient(error: str, transient: bool) -> None:
    assert transient_failure(error) is transient


def test_a_disk_full_failure_is_retried_once_due_and_the_study_then_finishes(
    stages: Stages, phantom_ct_series: Path
) -> None:
    _study, job_id = queued(stages, phantom_ct_series)
    stages.analysis.finish_analysis(take(stages), TaskOutcome(job_id, False, error=DISK_FULL))
    job = stages.ledger.job(job_id)
    assert job.state is JobState.QUEUED, job.detail  # was FAILED for good
    assert job.next_attempt_at == T0 + timedelta(seconds=10 + retry_delay_seconds(0))
    assert f"retry 1 of {TRANSIENT_RETRIES}" in job.detail and "No space left on device" in job.detail
    assert stages.analysis.submit_queued(TaskQueue(), set()) == 0  # not before it is due
    stages.clock.at = job.next_attempt_at
    task = take(stages)  # space is back
    stages.analysis.finish_analysis(task, ok(task))
    job = stages.ledger.job(job_id)
    assert job.state is JobState.DONE
    assert [to for _, _, to, _ in job.history].count("ANALYSING") == 2


def test_transient_retries_back_off_up_to_a_cap_and_then_fail_for_good(
    stages: Stages, phantom_ct_series: Path
) -> None:
    _study, job_id = queued(stages, phantom_ct_series)
    delays = []
    for n in range(TRANSIENT_RETRIES):
        stages.analysis.finish_analysis(take(stages), TaskOutcome(job_id, False, error=DISK_FULL))
        job = stages.ledger.job(job_id)
        assert job.state is JobState.QUEUED and job.next_attempt_at is not None
        delays.append((job.next_attempt_at - stages.clock.at).total_seconds())
        assert f"retry {n + 1} of {TRANSIENT_RETRIES}" in job.detail
        stages.clock.at = job.next_attempt_at
    assert delays == [retry_delay_seconds(n) for n in range(TRANSIENT_RETRIES)]
    assert delays == sorted(delays) and delays[0] < delays[-1] == TRANSIENT_RETRY_MAX_SECONDS
    stages.analysis.finish_analysis(take(stages), TaskOutcome(job_id, False, error=DISK_FULL))
    job = stages.ledger.job(job_id)
    assert job.state is JobState.FAILED
    assert job.detail == f"{DISK_FULL} (transient; gave up after {TRANSIENT_RETRIES} retries)"


def test_a_failure_on_the_data_still_fails_at_once(stages: Stages, phantom_ct_series: Path) -> None:
    _study, job_id = queued(stages, phantom_ct_series)
    error = "analysis: ValueError: no lungs found in this volume"
    stages.analysis.finish_analysis(take(stages), TaskOutcome(job_id, False, error=error))
    assert (stages.ledger.job(job_id).state, stages.ledger.job(job_id).detail) == (JobState.FAILED, error)


# ------------------------------------------------------------------ item 10 (b): triaged reanalyze


def test_reanalyze_opens_an_audited_revision_that_the_next_sweep_routes_and_queues(
    stages: Stages, phantom_ct_series: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study, first = done(stages, phantom_ct_series)
    assert stages.cli("reanalyze", study, "--reason", "disk was full") == 0
    assert "revision 2" in capsys.readouterr().out
    new, old = stages.ledger.jobs(study_uid=study)
    assert (old.id, old.state) == (first, JobState.DONE)
    assert (new.revision, new.state) == (2, JobState.RECEIVING)
    assert (
        new.detail
        == f"re-analysis requested by {getpass.getuser()}: disk was full; supersedes job {first} (DONE)"
    )
    stages.later()
    assert stages.completion.complete_quiet_studies() == [new.id]
    queued_job = stages.ledger.job(new.id)
    assert (queued_job.state, queued_job.pipeline) == (JobState.QUEUED, "ok")


def test_reanalyze_by_job_id_with_another_pipeline_supersedes_a_job_not_yet_analysed(
    stages: Stages, phantom_ct_series: Path
) -> None:
    study, first = queued(stages, phantom_ct_series)
    assert stages.cli("reanalyze", str(first), "--pipeline", "sev:20:0.9") == 0
    new = stages.ledger.jobs(study_uid=study)[0]
    assert stages.ledger.job(first).state is JobState.SUPERSEDED
    assert new.detail == (
        f"re-analysis requested by {getpass.getuser()}; pipeline sev:20:0.9; supersedes job {first} (QUEUED)"
    )
    stages.later()
    assert stages.completion.complete_quiet_studies() == [new.id]
    task = take(stages)
    assert (task.job_id, task.pipeline) == (new.id, "sev:20:0.9")


def test_reanalyze_refuses_unknown_ids_a_study_still_receiving_and_a_pipeline_not_installed(
    stages: Stages, phantom_ct_series: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = stages.receive(sorted(phantom_ct_series.glob("*.dcm")))
    [receiving] = stages.ledger.jobs()
    cases = [
        (("1.2.3.4",), 1, "study 1.2.3.4 is not in the ledger"),
        (("999",), 1, "job 999 is not in the ledger"),
        (("1.2.x",), 2, "neither a job id nor a valid Study Instance UID"),
        ((study,), 1, f"study {study} is still receiving (job {receiving.id})"),
        ((study, "--pipeline", "not-installed"), 2, "pipeline 'not-installed' is not installed"),
    ]
    for args, rc, message in cases:
        assert stages.cli("reanalyze", *args) == rc, args
        assert message in capsys.readouterr().err, args
    assert [j.id for j in stages.ledger.jobs()] == [receiving.id]


# ------------------------------------------------------------------ item 11: own results


def test_the_nodes_own_results_are_stored_but_never_reopen_the_study(
    stages: Stages, phantom_ct_series: Path
) -> None:
    study, job_id = done(stages, phantom_ct_series)
    findings = stages.ledger.findings(job_id)
    assert findings is not None
    uids = output_uids(study, findings.pipeline, findings.pipeline_version, 1)
    ts = "1.2.840.10008.1.2.1"

    def own(series: str, sop: str, sop_class: str, sha: str) -> InstanceRecord:
        return InstanceRecord(
            study, series, sop, sop_class, ts, f"studies/{study}/{series}/{sop}.dcm", 100, sha
        )

    back = [
        own(uids.sr_series, uids.sr_instance, SR, "a" * 64),
        own(uids.seg_series, uids.seg_instance, SEG, "b" * 64),
        own(uids.sc_series, uids.sc_instance(0), SC, "c" * 64),
    ]
    instances = stages.ledger.studies()[0].instances
    for forward in range(2):  # the second forward: the PACS changed the bytes (REPLACED)
        for rec in back:
            stages.ledger.record_instance(
                rec if forward == 0 else dataclasses.replace(rec, sha256="d" * 64), association_id=None
            )
    assert [(j.id, j.state) for j in stages.ledger.jobs(study_uid=study)] == [(job_id, JobState.DONE)]
    assert stages.ledger.studies()[0].instances == instances + 3  # stored: they belong to the study
    # An SR of another origin in the same study is a late instance like any other.
    stages.ledger.record_instance(own("1.2.3.4.5", "1.2.3.4.5.1", SR, "e" * 64), association_id=None)
    new = stages.ledger.jobs(study_uid=study)[0]
    assert (new.revision, new.state) == (2, JobState.RECEIVING)
