"""Issue 12 item 8: retention of spool studies, work folders and ledger rows.

Real SQLite ledgers and spools under tmp_path, real (small) DICOM files, the stages as the daemon builds
them and the real command line; time is the injected ``now`` of :meth:`Retention.run`.  Jobs finish at
the wall-clock time of their last transition, so the runs look days ahead of it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import UID, ExplicitVRLittleEndian

from tests.conftest import make_config, write_config
from tests.pg import both_dialects
from triaged.cli import main
from triaged.config import Config, load_config
from triaged.domain import InstanceRecord, JobState
from triaged.errors import StorageError
from triaged.ledger import Ledger
from triaged.spool import Spool, SpoolLock
from triaged.stages import Analysis, Dispatch, Recovery, Retention

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
ROOT = "1.2.826.0.1.3680043.8.498.777"
DAY = timedelta(days=1)
PATH_TO_DONE = (
    JobState.COMPLETE,
    JobState.QUEUED,
    JobState.ANALYSING,
    JobState.ENCODING,
    JobState.DISPATCHING,
)


def ct_bytes(study: str, series: str, sop: str) -> bytes:
    """A small but real DICOM file (no pixels: only headers are read on the paths retention touches)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CT)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CT, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "CT"
    ds.PatientID = "RET"
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


class Node:
    """Ledger, spool and the retention stage on one config."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ledger = Ledger(config.storage.ledger)
        self.spool = Spool(config.storage.spool)
        self.retention = Retention(self.ledger, self.spool, lambda: self.config)
        self.n = 0

    def receive(self, study: str, *, instances: int = 2, at: datetime | None = None) -> int:
        """Spool and record instances of a new series as the C-STORE handler does; returns the study's job."""
        self.n += 1
        series = f"{study}.{self.n}"
        for i in range(instances):
            sop = f"{series}.{i + 1}"
            data = ct_bytes(study, series, sop)
            rel = self.spool.instance_path(study, series, sop)
            stored = self.spool.store_instance(rel, data)
            self.ledger.record_instance(
                InstanceRecord(study, series, sop, CT, ExplicitVRLittleEndian, rel, len(data), stored.sha256),
                association_id=None,
                now=at,
            )
        return self.ledger.jobs(study_uid=study, limit=1)[0].id

    def advance(self, job_id: int, last: JobState, final: JobState | None = None) -> None:
        """Walk a job along the normal path up to ``last``, then to ``final`` when given."""
        path = [JobState.RECEIVING, *PATH_TO_DONE, JobState.DONE]
        state = self.ledger.job(job_id).state
        for nxt in path[path.index(state) + 1 : path.index(last) + 1]:
            self.ledger.transition(job_id, state, nxt, "test")
            state = nxt
        if final is not None:
            self.ledger.transition(job_id, state, final, "test")

    def work(self, job_id: int, size: int = 1000) -> Path:
        """A work folder with an encoded result, as the worker leaves it."""
        out = self.spool.work_dir(job_id) / "outputs"
        out.mkdir(parents=True)
        (out / "sr-1.dcm").write_bytes(b"\0" * size)
        return out.parent

    def files(self, study: str) -> list[Path]:
        return sorted((self.spool.root / "studies" / study).rglob("*.dcm"))

    def events(self, kind: str = "retention") -> list[dict[str, object]]:
        return [
            dict(e.detail, study_uid=e.study_uid, actor=e.actor)
            for e in self.ledger.audit_events(kinds=[kind])
        ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    both_dialects(metafunc)  # the tests on the node fixture run on SQLite and on PostgreSQL


@pytest.fixture
def node(tmp_path: Path, ledger_location: Path | str) -> Iterator[Node]:
    n = Node(
        make_config(tmp_path, storage={"spool": str(tmp_path / "spool"), "ledger": str(ledger_location)})
    )
    yield n
    n.ledger.close()


def now() -> datetime:
    return datetime.now(UTC)


def study_uid(n: int) -> str:
    return f"{ROOT}.{n}"


def done_study(node: Node, n: int, *, at: datetime | None = None, work: bool = True) -> tuple[str, int]:
    uid = study_uid(n)
    job = node.receive(uid, at=at)
    node.advance(job, JobState.DONE)
    if work:
        node.work(job)
    return uid, job


# ------------------------------------------------------------------ by age


def test_a_delivered_study_is_deleted_after_keep_done_days_and_audited(node: Node) -> None:
    uid, job = done_study(node, 1)
    size = sum(f.stat().st_size for f in node.files(uid)) + 1000

    early = node.retention.run(now=now() + 6 * DAY)
    assert early.deletions == [] and len(node.files(uid)) == 2

    report = node.retention.run(now=now() + 8 * DAY)
    [d] = report.deletions
    assert (d.study_instance_uid, d.outcome, d.category, d.files, d.bytes) == (
        uid,
        "deleted",
        "done",
        3,
        size,
    )
    assert "keep_done_days: 7" in d.reason
    assert not (node.spool.root / "studies" / uid).exists()
    assert not node.spool.work_dir(job).exists()
    # The study's history stays; it is marked purged, is off the worklist and has no instances left.
    assert node.ledger.purged_at(uid) is not None
    assert node.ledger.job(job).state is JobState.DONE
    assert node.ledger.study_instances(uid) == []
    assert uid not in [r.study_instance_uid for r in node.ledger.worklist()]
    [event] = node.events("retention.deleted")
    assert event["study_uid"] == uid and event["actor"] == "node"
    assert (event["files"], event["bytes"]) == (3, size)
    assert "keep_done_days" in str(event["reason"])


def test_a_failed_study_is_kept_for_keep_failed_days(node: Node) -> None:
    uid = study_uid(2)
    job = node.receive(uid)
    node.advance(job, JobState.QUEUED, JobState.FAILED)

    assert node.retention.run(now=now() + 8 * DAY).deletions == []
    [d] = node.retention.run(now=now() + 31 * DAY).deletions
    assert (d.study_instance_uid, d.category, d.outcome) == (uid, "failed", "deleted")
    assert node.files(uid) == []


def test_a_study_with_a_dead_lettered_result_counts_as_failed(node: Node) -> None:
    uid, job = done_study(node, 3)
    node.ledger.enqueue_outbox(job, [("pacs", "sr", f"work/{job}/outputs/sr-1.dcm", SR, f"{uid}.99")])
    [item] = node.ledger.outbox(job_id=job)
    node.ledger.mark_dead(item.id, "gave up")

    assert node.retention.run(now=now() + 8 * DAY).deletions == []
    [d] = node.retention.run(now=now() + 31 * DAY).deletions
    assert d.category == "failed"


def unfinished_studies(node: Node, old: datetime) -> list[str]:
    """One study in every unfinished situation, all received long ago."""
    uids = []
    receiving = study_uid(10)  # still inside its completion window, or never completed
    node.receive(receiving, at=old)
    uids.append(receiving)
    for n, state in enumerate((JobState.QUEUED, JobState.ANALYSING, JobState.DISPATCHING), start=11):
        uid = study_uid(n)
        node.advance(node.receive(uid, at=old), state)
        uids.append(uid)
    retrying = study_uid(14)
    job = node.receive(retrying, at=old)
    node.advance(job, JobState.DISPATCHING, JobState.RETRY_WAIT)
    uids.append(retrying)
    # Re-sent with `triaged resend`: DONE again... but one result object is still PENDING.
    pending = study_uid(15)
    job = node.receive(pending, at=old)
    node.advance(job, JobState.DONE)
    node.ledger.enqueue_outbox(job, [("pacs", "sr", f"work/{job}/outputs/sr-1.dcm", SR, f"{pending}.99")])
    uids.append(pending)
    return uids


def test_unfinished_studies_are_never_deleted_however_old_or_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = Node(make_config(tmp_path, retention={"keep_done_days": 1, "max_spool_gb": 1e-9}))
    try:
        uids = unfinished_studies(node, now() - 400 * DAY)
        caplog.set_level(logging.ERROR, logger="triaged.stages.retention")
        report = node.retention.run(now=now() + 400 * DAY)
        assert report.deletions == [] and report.over_limit
        for uid in uids:
            assert len(node.files(uid)) == 2, uid
            assert node.ledger.purged_at(uid) is None
        errors = [r for r in caplog.records if "every study left is unfinished" in r.getMessage()]
        assert len(errors) == 1
        node.retention.run(now=now() + 401 * DAY)  # still over: not logged again
        assert len([r for r in caplog.records if "every study left is unfinished" in r.getMessage()]) == 1
    finally:
        node.ledger.close()


# ------------------------------------------------------------------ by size


def test_over_max_spool_gb_the_oldest_finished_studies_go_first_and_never_unfinished(tmp_path: Path) -> None:
    node = Node(make_config(tmp_path, retention={"keep_done_days": None, "keep_failed_days": None}))
    try:
        t = now()
        old_receiving = study_uid(20)
        node.receive(old_receiving, at=t - 30 * DAY)  # the oldest of all, but unfinished
        # Finished one, two and three days from now (their last instance arrived then).
        first, _ = done_study(node, 21, at=t + 1 * DAY)
        second, _ = done_study(node, 22, at=t + 2 * DAY)
        third, _ = done_study(node, 23, at=t + 3 * DAY)
        sizes = {c.study_instance_uid: c.bytes for c in node.ledger.retention_candidates()}
        total = sum(sizes.values()) + 3 * 1000  # three work folders
        # Room for everything but one finished study (and its work folder).
        node.config = make_config(
            tmp_path, retention={"keep_done_days": None, "keep_failed_days": None,
                                 "max_spool_gb": (total - sizes[first] - 1000) / 2**30}
        )  # fmt: skip
        report = node.retention.run(now=t + 4 * DAY)
        assert [d.study_instance_uid for d in report.deletions] == [first]
        assert "over max_spool_gb" in report.deletions[0].reason
        assert not report.over_limit
        assert node.files(first) == [] and all(
            len(node.files(u)) == 2 for u in (second, third, old_receiving)
        )
        # Half the room: the finished ones go, oldest first; the unfinished one stays and it says so.
        node.config = make_config(tmp_path, retention={"max_spool_gb": sizes[old_receiving] / 2 / 2**30})
        report = node.retention.run(now=t + 4 * DAY)
        assert [d.study_instance_uid for d in report.deletions] == [second, third]
        assert report.over_limit and len(node.files(old_receiving)) == 2
    finally:
        node.ledger.close()


# ------------------------------------------------------------------ crash safety, re-arrival


def test_a_deletion_killed_after_the_mark_is_not_resurrected_at_start_and_is_finished_later(
    node: Node,
) -> None:
    uid, job = done_study(node, 30)
    [candidate] = node.ledger.retention_candidates()
    # The first step of a deletion, then the process dies: files and the work folder are still there.
    mark = node.ledger.mark_purged(
        uid, latest_job_id=job, last_seen=candidate.last_seen, finished_states={"DONE"}, now=now() + DAY
    )
    assert mark is not None and len(mark.paths) == 2
    assert len(node.files(uid)) == 2

    config = node.config
    dispatch = Dispatch(node.ledger, node.spool, lambda: config)
    recovery = Recovery(
        node.ledger, node.spool, lambda: config, Analysis(node.ledger, node.spool, lambda: config, dispatch)
    )
    assert recovery.reconcile_spool() == 0
    assert node.ledger.purged_at(uid) is not None  # not a study again
    assert node.ledger.study_instances(uid) == [] and [j.id for j in node.ledger.jobs(study_uid=uid)] == [job]

    report = node.retention.run(now=now() + 2 * DAY)
    [d] = report.deletions
    assert (d.study_instance_uid, d.category, d.files) == (uid, "leftover", 3)
    assert node.files(uid) == [] and not node.spool.work_dir(job).exists()
    assert [e["study_uid"] for e in node.events("retention.deleted")] == [uid]


def test_a_study_sent_again_after_its_deletion_is_a_live_study_again(node: Node) -> None:
    uid, job = done_study(node, 31)
    node.retention.run(now=now() + 8 * DAY)
    assert node.ledger.purged_at(uid) is not None

    new_job = node.receive(uid)
    assert new_job != job and node.ledger.job(new_job).state is JobState.RECEIVING
    assert node.ledger.purged_at(uid) is None
    assert len(node.ledger.study_instances(uid)) == 2
    assert uid in [r.study_instance_uid for r in node.ledger.worklist()]


def test_the_spool_refuses_a_studys_instances_while_it_is_being_deleted(node: Node) -> None:
    uid = study_uid(32)
    rel = node.spool.instance_path(uid, f"{uid}.1", f"{uid}.1.1")
    with node.spool.purging(uid), pytest.raises(StorageError, match="being deleted by retention") as err:
        node.spool.store_instance(rel, b"x")
    assert err.value.retryable
    node.spool.store_instance(rel, b"x")  # afterwards it is stored


def test_a_study_that_changed_since_it_was_chosen_is_kept(node: Node) -> None:
    uid, job = done_study(node, 33)
    [candidate] = node.ledger.retention_candidates()
    node.receive(uid)  # a late instance re-opens it between the choice and the mark
    assert (
        node.ledger.mark_purged(
            uid, latest_job_id=job, last_seen=candidate.last_seen, finished_states={"DONE"}, now=now()
        )
        is None
    )
    assert len(node.files(uid)) == 4


# ------------------------------------------------------------------ ledger rows


def test_ledger_rows_go_after_keep_ledger_days_and_nothing_younger(node: Node) -> None:
    uid, job = done_study(node, 40)
    young, _ = done_study(node, 41, at=now() + 300 * DAY)
    node.ledger.record_event("find", actor="OLD", at=now() - 10 * DAY)
    node.ledger.record_event("find", actor="YOUNG", at=now() + 300 * DAY)
    node.retention.run(now=now() + 8 * DAY)  # deletes the first study's files
    assert node.ledger.purged_at(uid) is not None

    # 364 days after the purge: nothing of the ledger goes.
    report = node.retention.run(now=now() + (8 + 364) * DAY)
    assert report.ledger.studies == 0
    report = node.retention.run(now=now() + (8 + 366) * DAY)
    assert report.ledger.studies == 1 and report.ledger.audit_events >= 1
    with pytest.raises(Exception, match="not in the ledger"):
        node.ledger.job(job)
    assert uid not in [s.study_instance_uid for s in node.ledger.studies()]
    assert young in [s.study_instance_uid for s in node.ledger.studies()]
    # Audit rows younger than the cut-off stay (the pruning is audited itself).
    finds = [e.actor for e in node.ledger.audit_events(kinds=["find"])]
    assert finds == ["YOUNG"]
    assert node.events("retention.ledger_pruned")[-1]["studies"] == 1


# ------------------------------------------------------------------ command line


#: keep_done_days of the command-line tests: 86 ms, so a study finished :data:`CLI_WAIT` seconds ago is due.
CLI_KEEP_DAYS = 1e-6
CLI_WAIT = 0.1


def due_done_study(node: Node, n: int) -> tuple[str, int]:
    """A delivered study already past the command-line tests' keep_done_days (whatever the machine's speed)."""
    out = done_study(node, n)
    time.sleep(CLI_WAIT)
    return out


@pytest.fixture
def cli_node(tmp_path: Path) -> Iterator[tuple[Path, Node]]:
    path = write_config(tmp_path, retention={"keep_done_days": CLI_KEEP_DAYS})
    n = Node(load_config(path))
    yield path, n
    n.ledger.close()


def test_dry_run_lists_what_is_due_and_touches_nothing_then_a_real_run_deletes_it(
    cli_node: tuple[Path, Node], capsys: pytest.CaptureFixture[str]
) -> None:
    path, node = cli_node
    uid, job = due_done_study(node, 50)
    unfinished = study_uid(51)
    node.receive(unfinished)
    capsys.readouterr()

    assert main(["retention", "--dry-run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert uid in out and unfinished not in out and "would be deleted" in out
    assert len(node.files(uid)) == 2 and node.spool.work_dir(job).exists()
    assert node.ledger.purged_at(uid) is None and node.events() == []

    assert main(["retention", "--json", "--config", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [d["study_instance_uid"] for d in report["deletions"]] == [uid]
    assert report["deletions"][0]["outcome"] == "deleted"
    assert node.files(uid) == [] and len(node.files(unfinished)) == 2
    [event] = node.events("retention.deleted")
    assert event["actor"] == "admin" and event["study_uid"] == uid


def test_retention_from_the_command_line_is_refused_while_the_node_holds_the_spool(
    cli_node: tuple[Path, Node], capsys: pytest.CaptureFixture[str]
) -> None:
    path, node = cli_node
    uid, _ = done_study(node, 52)
    lock = SpoolLock(node.spool.root)  # what `triaged serve` holds
    try:
        assert main(["retention", "--config", str(path)]) == 1
        err = capsys.readouterr().err
        assert "locked by another triaged node" in err and "applies retention itself" in err
        assert len(node.files(uid)) == 2
        assert main(["retention", "--dry-run", "--config", str(path)]) == 0  # reading is fine
    finally:
        lock.release()


def test_reanalyze_of_a_purged_study_fails_with_a_clear_message(
    cli_node: tuple[Path, Node], capsys: pytest.CaptureFixture[str]
) -> None:
    path, node = cli_node
    uid, job = due_done_study(node, 53)
    assert main(["retention", "--config", str(path)]) == 0
    capsys.readouterr()

    assert main(["reanalyze", uid, "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "retention deleted its files" in err and uid in err
    assert main(["reanalyze", str(job), "--config", str(path)]) == 1
    capsys.readouterr()
    assert main(["resend", str(job), "--config", str(path)]) != 0  # its result objects went with the files
    assert "retention deleted the files" in capsys.readouterr().err
    assert [j.id for j in node.ledger.jobs(study_uid=uid)] == [job]
    assert main(["studies", "--json", "--config", str(path)]) == 0
    assert '"state": "PURGED"' in capsys.readouterr().out


# ------------------------------------------------------------------ the node


def test_the_node_schedules_retention_and_a_reload_changes_its_interval(tmp_path: Path) -> None:
    from triaged.daemon import Node as Daemon

    path = write_config(tmp_path, retention={"interval_minutes": 30})
    daemon = Daemon(load_config(path), path, path.read_text())
    try:
        job = daemon.scheduler.get_job("retention")
        assert job is not None and job.trigger.interval == timedelta(minutes=30)
        path.write_text(path.read_text().replace("interval_minutes: 30", "interval_minutes: 5"))
        assert daemon.reload()
        assert daemon.scheduler.get_job("retention").trigger.interval == timedelta(minutes=5)
    finally:
        daemon.ledger.close()
