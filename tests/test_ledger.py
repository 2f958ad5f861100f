"""The ledger against a real SQLite file: schema and migrations, receive semantics, the state machine."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from tests.conftest import make_config
from tests.pg import both_dialects
from triaged.config.ledger_url import LedgerURL, parse_ledger_location
from triaged.domain import TRANSITIONS, InstanceRecord, JobState, StoreOutcome
from triaged.errors import InvalidDatasetError, StateError, StorageError, TriagedError
from triaged.ledger import Ledger
from triaged.ledger.schema import Base
from triaged.routing import RouteDecision

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
STUDY = "1.2.826.0.1.1"
SERIES = "1.2.826.0.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

#: How to drive a fresh RECEIVING job into each state through allowed transitions only.
PATH_TO: dict[JobState, list[JobState]] = {
    JobState.RECEIVING: [],
    JobState.COMPLETE: [JobState.COMPLETE],
    JobState.QUEUED: [JobState.COMPLETE, JobState.QUEUED],
    JobState.ANALYSING: [JobState.COMPLETE, JobState.QUEUED, JobState.ANALYSING],
    JobState.ENCODING: [JobState.COMPLETE, JobState.QUEUED, JobState.ANALYSING, JobState.ENCODING],
    JobState.DISPATCHING: [
        JobState.COMPLETE,
        JobState.QUEUED,
        JobState.ANALYSING,
        JobState.ENCODING,
        JobState.DISPATCHING,
    ],
    JobState.RETRY_WAIT: [
        JobState.COMPLETE,
        JobState.QUEUED,
        JobState.ANALYSING,
        JobState.ENCODING,
        JobState.DISPATCHING,
        JobState.RETRY_WAIT,
    ],
    JobState.DONE: [
        JobState.COMPLETE,
        JobState.QUEUED,
        JobState.ANALYSING,
        JobState.ENCODING,
        JobState.DISPATCHING,
        JobState.DONE,
    ],
    JobState.IGNORED: [JobState.COMPLETE, JobState.IGNORED],
    JobState.FAILED: [JobState.COMPLETE, JobState.FAILED],
    JobState.SUPERSEDED: [JobState.COMPLETE, JobState.SUPERSEDED],
}


def instance(
    sop: str,
    *,
    study: str = STUDY,
    series: str = SERIES,
    size: int = 1000,
    sha: str | None = None,
    **fields: object,
) -> InstanceRecord:
    return InstanceRecord(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=CT,
        transfer_syntax_uid=EXPLICIT_LE,
        path=f"incoming/{study}/{series}/{sop}.dcm",
        size=size,
        sha256=sha if sha is not None else f"sha-of-{sop}",
        **fields,  # type: ignore[arg-type]
    )


def drive(ledger: Ledger, job_id: int, target: JobState) -> None:
    state = JobState.RECEIVING
    for nxt in PATH_TO[target]:
        ledger.transition(job_id, state, nxt, f"to {nxt}")
        state = nxt


def raw(path: Path | Ledger, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Read the file with plain sqlite3 (or a ledger of either dialect), to check what the API does not expose."""
    if isinstance(
        path, Ledger
    ):  # either dialect: through the ledger's own engine, positional args unsupported
        assert not args
        with path._engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    con = sqlite3.connect(path)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "var" / "ledger.sqlite"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests that read the SQLite file itself (``db``) run on SQLite only; the rest on both dialects.
    both_dialects(metafunc, sqlite_only_with=("db",))


@pytest.fixture
def ledger(ledger_location: Path | str) -> Iterator[Ledger]:
    led = Ledger(ledger_location)
    yield led
    led.close()


# ------------------------------------------------------------------ schema and migrations


def test_opening_a_fresh_file_creates_the_schema_in_wal_mode(ledger: Ledger, db: Path) -> None:
    tables = {r[0] for r in raw(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"studies", "series", "instances", "associations", "jobs", "job_transitions"} <= tables
    assert raw(db, "SELECT version_num FROM alembic_version") == [(_head(),)]
    assert raw(db, "PRAGMA journal_mode") == [("wal",)]


def test_reopening_a_migrated_ledger_is_idempotent(db: Path) -> None:
    Ledger(db).close()
    schema = raw(db, "SELECT type, name, sql FROM sqlite_master ORDER BY name")
    for _ in range(2):
        Ledger(db).close()
    assert raw(db, "SELECT type, name, sql FROM sqlite_master ORDER BY name") == schema
    assert raw(db, "SELECT version_num FROM alembic_version") == [(_head(),)]


def test_the_models_match_the_migration(ledger: Ledger, db: Path) -> None:
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_the_partial_index_is_in_the_schema(ledger: Ledger, db: Path) -> None:
    # compare_metadata does not look at index WHERE clauses, so check the one that matters directly.
    (sql,) = raw(db, "SELECT sql FROM sqlite_master WHERE name = 'uq_jobs_study_id_receiving'")[0]
    assert "UNIQUE" in str(sql) and "WHERE state = 'RECEIVING'" in str(sql)


def test_a_ledger_from_a_newer_version_is_refused_with_a_clear_error(db: Path) -> None:
    Ledger(db).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE alembic_version SET version_num = '9999'")
    con.commit()
    con.close()
    with pytest.raises(TriagedError, match="cannot migrate the ledger"):
        Ledger(db)


def test_a_writer_waits_for_the_lock_instead_of_failing(ledger: Ledger, db: Path) -> None:
    # Another process holds the write lock for a moment (a CLI, a backup); the C-STORE path must wait
    # under busy_timeout rather than answer the sender with a failure.
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, other.execute, args=("COMMIT",))
    release.start()
    started = time.monotonic()
    try:
        assert ledger.record_instance(instance("1"), association_id=None) is StoreOutcome.NEW
        assert time.monotonic() - started >= 0.2
    finally:
        release.join()
        other.close()
    assert ledger.studies()[0].instances == 1


def test_a_closed_ledger_refuses_to_work(db: Path) -> None:
    led = Ledger(db)
    led.close()
    with pytest.raises(TriagedError, match="closed"):
        led.jobs()


def test_naive_datetimes_are_refused(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="naive"):
        ledger.record_instance(instance("1"), association_id=None, now=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        ledger.quiet_jobs(datetime(2026, 1, 1))


# ------------------------------------------------------------------ receive


def test_a_new_instance_creates_its_study_series_and_a_receiving_job(ledger: Ledger) -> None:
    rec = instance("1", accession_number="ACC1", study_date="20260301", modality="CT", series_number=3)
    assert ledger.record_instance(rec, association_id=None, now=T0) is StoreOutcome.NEW

    (study,) = ledger.studies()
    assert (study.study_instance_uid, study.instances, study.bytes, study.series) == (STUDY, 1, 1000, 1)
    assert study.first_seen == study.last_seen == T0
    assert study.last_seen.tzinfo is UTC
    assert (study.accession_number, study.study_date, study.state) == ("ACC1", "20260301", "RECEIVING")
    (job,) = ledger.jobs()
    assert (job.revision, job.state, job.detail) == (1, JobState.RECEIVING, "first instance received")
    assert ledger.job(job.id).history == ((T0, "", "RECEIVING", "first instance received"),)
    assert ledger.study_instances(STUDY) == [(rec.path, CT, SERIES, "1")]


def test_an_identical_copy_is_a_duplicate_that_changes_nothing_but_its_count(
    ledger: Ledger, db: Path
) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    later = T0 + timedelta(minutes=5)
    assert ledger.record_instance(instance("1"), association_id=None, now=later) is StoreOutcome.DUPLICATE

    (study,) = ledger.studies()
    assert (study.instances, study.bytes, study.last_seen) == (1, 1000, T0)
    assert raw(db, "SELECT duplicate_count FROM instances") == [(1,)]
    assert len(ledger.jobs()) == 1


def test_a_different_copy_replaces_the_instance_and_adjusts_the_byte_counts(ledger: Ledger, db: Path) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    ledger.record_instance(instance("2"), association_id=None, now=T0)
    later = T0 + timedelta(minutes=5)
    replacement = instance("1", size=1500, sha="other-bytes")
    assert ledger.record_instance(replacement, association_id=None, now=later) is StoreOutcome.REPLACED

    (study,) = ledger.studies()
    assert (study.instances, study.bytes, study.last_seen) == (2, 2500, later)
    assert raw(db, "SELECT instance_count, byte_count FROM series") == [(2, 2500)]
    assert raw(db, "SELECT size, sha256 FROM instances WHERE sop_instance_uid = '1'") == [
        (1500, "other-bytes")
    ]
    assert len(ledger.jobs()) == 1


def test_counts_add_up_over_studies_and_series(ledger: Ledger) -> None:
    for i in range(5):
        ledger.record_instance(instance(f"a{i}", series="1.1"), association_id=None, now=T0)
    for i in range(3):
        ledger.record_instance(instance(f"b{i}", series="1.2", size=10), association_id=None, now=T0)
    ledger.record_instance(instance("c", study="2.0", series="2.1"), association_id=None, now=T0)
    rows = {s.study_instance_uid: s for s in ledger.studies()}
    assert (rows[STUDY].instances, rows[STUDY].bytes, rows[STUDY].series) == (8, 5030, 2)
    assert (rows["2.0"].instances, rows["2.0"].series) == (1, 1)
    assert len(ledger.study_instances(STUDY)) == 8
    assert ledger.study_instances("9.9.9") == []


def test_descriptive_fields_are_kept_when_a_later_instance_leaves_them_empty(ledger: Ledger) -> None:
    ledger.record_instance(instance("1", study_description="CT CHEST"), association_id=None, now=T0)
    ledger.record_instance(instance("2"), association_id=None, now=T0)
    assert ledger.studies()[0].study_description == "CT CHEST"
    ledger.record_instance(instance("3", study_description="CT THORAX"), association_id=None, now=T0)
    assert ledger.studies()[0].study_description == "CT THORAX"


def test_a_series_recorded_under_another_study_is_refused_and_nothing_changes(ledger: Ledger) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    with pytest.raises(InvalidDatasetError, match="another study"):
        ledger.record_instance(instance("2", study="9.9"), association_id=None, now=T0)
    assert [s.study_instance_uid for s in ledger.studies()] == [STUDY]
    assert ledger.studies()[0].instances == 1


def test_instance_paths_lists_every_recorded_path(ledger: Ledger) -> None:
    recs = [instance(str(i)) for i in range(4)]
    for rec in recs:
        ledger.record_instance(rec, association_id=None, now=T0)
    assert ledger.instance_paths() == {r.path for r in recs}


# ------------------------------------------------------------------ re-opening


def test_a_late_instance_reopens_a_completed_study(ledger: Ledger) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    (first,) = ledger.jobs()
    ledger.transition(first.id, JobState.RECEIVING, JobState.COMPLETE, "quiet for 30 s")

    late = T0 + timedelta(minutes=10)
    assert ledger.record_instance(instance("2"), association_id=None, now=late) is StoreOutcome.NEW

    second, old = ledger.jobs()
    assert (second.revision, second.state) == (2, JobState.RECEIVING)
    assert second.detail == f"re-opened by a late instance; supersedes job {first.id} (COMPLETE)"
    assert old.state is JobState.SUPERSEDED
    assert ledger.job(old.id).history[-1] == (
        late,
        "COMPLETE",
        "SUPERSEDED",
        f"re-opened by a late instance; job {second.id} supersedes it",
    )
    assert ledger.studies()[0].state == "RECEIVING"
    assert ledger.studies()[0].last_seen == late


@pytest.mark.parametrize("state", [JobState.COMPLETE, JobState.QUEUED, JobState.ANALYSING, JobState.ENCODING])
def test_a_late_instance_supersedes_a_job_whose_results_are_not_sent_yet(
    ledger: Ledger, state: JobState
) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    (first,) = ledger.jobs()
    drive(ledger, first.id, state)
    ledger.record_instance(instance("2"), association_id=None, now=T0)
    assert ledger.job(first.id).state is JobState.SUPERSEDED
    # The worker that held it can no longer move it on.
    with pytest.raises(StateError):
        ledger.transition(first.id, state, next(iter(TRANSITIONS[state] - {JobState.SUPERSEDED})))


@pytest.mark.parametrize(
    "state", [JobState.DISPATCHING, JobState.RETRY_WAIT, JobState.DONE, JobState.IGNORED, JobState.FAILED]
)
def test_a_late_instance_leaves_a_sending_or_finished_job_alone(ledger: Ledger, state: JobState) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    (first,) = ledger.jobs()
    drive(ledger, first.id, state)
    ledger.record_instance(instance("2"), association_id=None, now=T0)
    second, old = ledger.jobs()
    assert old.state is state
    assert (second.revision, second.state) == (2, JobState.RECEIVING)
    assert second.detail == f"re-opened by a late instance; supersedes job {first.id} ({state})"


def test_a_duplicate_does_not_reopen_a_finished_study(ledger: Ledger) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    (first,) = ledger.jobs()
    drive(ledger, first.id, JobState.DONE)
    ledger.record_instance(instance("1"), association_id=None, now=T0 + timedelta(hours=1))
    assert [j.id for j in ledger.jobs()] == [first.id]


def test_a_replaced_instance_reopens_a_finished_study(ledger: Ledger) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    (first,) = ledger.jobs()
    drive(ledger, first.id, JobState.DONE)
    outcome = ledger.record_instance(instance("1", sha="corrected"), association_id=None, now=T0)
    assert outcome is StoreOutcome.REPLACED
    assert [(j.revision, j.state) for j in ledger.jobs()] == [(2, JobState.RECEIVING), (1, JobState.DONE)]


def test_concurrent_instances_leave_one_receiving_job_and_exact_counts(ledger: Ledger) -> None:
    threads, per_thread = 8, 40
    errors: list[BaseException] = []
    stop = threading.Event()
    start = threading.Barrier(threads + 1)

    def receive(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                # Two series, and every fifth instance is sent twice (a duplicate).
                rec = instance(f"{t}.{i}", series=f"{SERIES}.{i % 2}", size=100 + t)
                ledger.record_instance(rec, association_id=None)
                if i % 5 == 0:
                    assert ledger.record_instance(rec, association_id=None) is StoreOutcome.DUPLICATE
        except BaseException as exc:  # noqa: B036 - reported by the main thread
            errors.append(exc)

    def complete() -> None:
        # Keeps closing the RECEIVING job, so instances keep re-opening the study concurrently.
        try:
            start.wait()
            while not stop.is_set():
                for job_id, _ in ledger.quiet_jobs(datetime.now(UTC) + timedelta(hours=1)):
                    ledger.transition(job_id, JobState.RECEIVING, JobState.COMPLETE)
        except BaseException as exc:  # noqa: B036
            errors.append(exc)

    workers = [threading.Thread(target=receive, args=(t,)) for t in range(threads)]
    closer = threading.Thread(target=complete)
    for w in [*workers, closer]:
        w.start()
    for w in workers:
        w.join(timeout=60)
    stop.set()
    closer.join(timeout=60)

    assert errors == []
    (study,) = ledger.studies()
    assert study.instances == threads * per_thread
    assert study.bytes == sum((100 + t) * per_thread for t in range(threads))
    assert raw(ledger, "SELECT SUM(instance_count), SUM(byte_count) FROM series") == [
        (study.instances, study.bytes)
    ]
    assert raw(ledger, "SELECT SUM(duplicate_count) FROM instances") == [(threads * per_thread // 5,)]
    jobs = ledger.jobs(limit=100_000)
    print(f"{len(jobs)} revisions")
    assert sum(j.state is JobState.RECEIVING for j in jobs) <= 1
    assert sorted(j.revision for j in jobs) == list(range(1, len(jobs) + 1))
    # Every job but the newest was closed and then superseded by the next revision.
    assert all(j.state is JobState.SUPERSEDED for j in jobs[1:])


# ------------------------------------------------------------------ the state machine


def test_a_transition_from_the_wrong_state_is_refused_and_names_both_states(ledger: Ledger) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    (job,) = ledger.jobs()
    with pytest.raises(StateError, match=rf"job {job.id}: expected state COMPLETE, but it is in RECEIVING"):
        ledger.transition(job.id, JobState.COMPLETE, JobState.QUEUED)
    assert ledger.job(job.id).state is JobState.RECEIVING
    assert len(ledger.job(job.id).history) == 1


def test_a_transition_the_state_machine_does_not_allow_is_refused(ledger: Ledger) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    (job,) = ledger.jobs()
    with pytest.raises(StateError, match="RECEIVING -> DONE is not an allowed transition"):
        ledger.transition(job.id, JobState.RECEIVING, JobState.DONE)
    assert ledger.job(job.id).state is JobState.RECEIVING


def test_a_transition_of_an_unknown_job_is_refused(ledger: Ledger) -> None:
    with pytest.raises(StateError, match="job 42 does not exist"):
        ledger.transition(42, JobState.RECEIVING, JobState.COMPLETE)
    with pytest.raises(TriagedError, match="job 42"):
        ledger.job(42)


def test_transitions_are_recorded_in_the_history_oldest_first(ledger: Ledger, db: Path) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    (job,) = ledger.jobs()
    ledger.transition(job.id, JobState.RECEIVING, JobState.COMPLETE, "quiet")
    ledger.transition(job.id, JobState.COMPLETE, JobState.QUEUED, "route chest", series_instance_uid=SERIES)
    ledger.transition(job.id, JobState.QUEUED, JobState.ANALYSING)
    ledger.transition(job.id, JobState.ANALYSING, JobState.ENCODING)
    ledger.transition(job.id, JobState.ENCODING, JobState.DISPATCHING)
    retry_at = datetime.now(UTC) + timedelta(minutes=2)
    ledger.transition(
        job.id, JobState.DISPATCHING, JobState.RETRY_WAIT, "peer down", next_attempt_at=retry_at
    )
    ledger.transition(job.id, JobState.RETRY_WAIT, JobState.DISPATCHING)

    row = ledger.job(job.id)
    assert [(h[1], h[2]) for h in row.history] == [
        ("", "RECEIVING"),
        ("RECEIVING", "COMPLETE"),
        ("COMPLETE", "QUEUED"),
        ("QUEUED", "ANALYSING"),
        ("ANALYSING", "ENCODING"),
        ("ENCODING", "DISPATCHING"),
        ("DISPATCHING", "RETRY_WAIT"),
        ("RETRY_WAIT", "DISPATCHING"),
    ]
    assert row.history[2][3] == "route chest"
    times = [h[0] for h in row.history]
    assert times == sorted(times)
    assert row.series_instance_uid == SERIES
    assert row.updated_at >= row.created_at
    assert raw(db, "SELECT attempts FROM jobs") == [(2,)]


def test_quiet_jobs_lists_only_receiving_studies_quiet_for_long_enough(ledger: Ledger) -> None:
    ledger.record_instance(instance("a", study="1.1", series="1.1.1"), association_id=None, now=T0)
    ledger.record_instance(instance("b", study="1.2", series="1.2.1"), association_id=None, now=T0)
    ledger.record_instance(
        instance("c", study="1.3", series="1.3.1"), association_id=None, now=T0 + timedelta(seconds=20)
    )
    done = {j.study_instance_uid: j for j in ledger.jobs()}
    ledger.transition(done["1.2"].id, JobState.RECEIVING, JobState.COMPLETE)

    assert ledger.quiet_jobs(T0) == []
    assert ledger.quiet_jobs(T0 + timedelta(seconds=10)) == [(done["1.1"].id, "1.1")]
    assert {uid for _, uid in ledger.quiet_jobs(T0 + timedelta(seconds=30))} == {"1.1", "1.3"}


def test_queue_depth_counts_jobs_in_every_state_zeros_included(ledger: Ledger) -> None:
    assert ledger.queue_depth() == dict.fromkeys(JobState, 0)
    for n, target in enumerate([JobState.QUEUED, JobState.QUEUED, JobState.DONE, JobState.RECEIVING]):
        ledger.record_instance(
            instance(f"{n}", study=f"1.{n}", series=f"1.{n}.1"), association_id=None, now=T0
        )
        drive(ledger, ledger.jobs(limit=1)[0].id, target)
    depth = ledger.queue_depth()
    assert set(depth) == set(JobState)
    assert (depth[JobState.QUEUED], depth[JobState.DONE], depth[JobState.RECEIVING]) == (2, 1, 1)
    assert sum(depth.values()) == 4
    assert [j.state for j in ledger.jobs(states=[JobState.QUEUED])] == [JobState.QUEUED] * 2


def test_studies_are_listed_most_recently_active_first_with_their_latest_job_state(ledger: Ledger) -> None:
    ledger.record_instance(instance("a", study="1.1", series="1.1.1"), association_id=None, now=T0)
    ledger.record_instance(
        instance("b", study="1.2", series="1.2.1"), association_id=None, now=T0 + timedelta(minutes=1)
    )
    drive(ledger, ledger.jobs(limit=1)[0].id, JobState.QUEUED)
    rows = ledger.studies()
    assert [(s.study_instance_uid, s.state) for s in rows] == [("1.2", "QUEUED"), ("1.1", "RECEIVING")]
    assert len(ledger.studies(limit=1)) == 1


# ------------------------------------------------------------------ audit trail and persistence


def test_associations_are_audited_newest_first(ledger: Ledger) -> None:
    first = ledger.open_association(
        calling_ae="CT1", called_ae="TRIAGED", peer_address="10.0.0.5", peer_port=4001
    )
    ledger.record_instance(instance("1"), association_id=first, now=T0)
    ledger.close_association(first, instances=1, bytes=1000, failures=0, aborted=False)
    rejected = ledger.open_association(
        calling_ae="ROGUE",
        called_ae="TRIAGED",
        peer_address="10.9.9.9",
        peer_port=5000,
        accepted=False,
        reject_reason="calling AE not allowed",
    )

    newest, oldest = ledger.associations()
    assert newest.id == rejected and not newest.accepted
    assert newest.reject_reason == "calling AE not allowed" and newest.ended_at is not None
    assert (oldest.id, oldest.calling_ae, oldest.peer_port) == (first, "CT1", 4001)
    assert (oldest.instances, oldest.bytes, oldest.failures, oldest.aborted) == (1, 1000, 0, False)
    assert oldest.ended_at is not None and oldest.ended_at >= oldest.started_at
    assert len(ledger.associations(limit=1)) == 1
    with pytest.raises(TriagedError, match="association 999"):
        ledger.close_association(999, instances=0, bytes=0, failures=0, aborted=True)


def test_everything_survives_close_and_reopen(db: Path) -> None:
    led = Ledger(db)
    assoc = led.open_association(calling_ae="CT1", called_ae="TRIAGED", peer_address="::1", peer_port=1)
    led.record_instance(instance("1", accession_number="A7"), association_id=assoc, now=T0)
    job_id = led.jobs()[0].id
    led.transition(job_id, JobState.RECEIVING, JobState.COMPLETE, "quiet")
    before = (led.studies(), led.job(job_id), led.associations(), led.instance_paths())
    led.close()

    again = Ledger(db)
    try:
        assert (again.studies(), again.job(job_id), again.associations(), again.instance_paths()) == before
        assert again.record_instance(instance("1"), association_id=None) is StoreOutcome.DUPLICATE
    finally:
        again.close()


# ------------------------------------------------------------------ compare-and-set writes


def test_queue_job_writes_route_pipeline_series_and_the_transition_together(ledger: Ledger, db: Path) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    (job,) = ledger.jobs()
    drive(ledger, job.id, JobState.COMPLETE)
    decision = RouteDecision("default", ("ok",), (), 1.0, "both")
    ledger.queue_job(
        job.id, route=decision, pipeline="ok", series_instance_uid=SERIES, detail="route 'default'"
    )
    queued = ledger.job(job.id)
    assert (queued.state, queued.route, queued.pipeline, queued.series_instance_uid, queued.detail) == (
        JobState.QUEUED,
        decision.to_json(),
        "ok",
        SERIES,
        "route 'default'",
    )
    assert ledger.route_decision(queued) == decision
    assert queued.history[-1][1:] == ("COMPLETE", "QUEUED", "route 'default'")


def test_queue_job_on_a_superseded_job_writes_nothing_and_says_why(ledger: Ledger, db: Path) -> None:
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    (job,) = ledger.jobs()
    drive(ledger, job.id, JobState.COMPLETE)
    ledger.record_instance(instance("2"), association_id=None, now=T0)  # a late instance supersedes it
    with pytest.raises(StateError, match="expected state COMPLETE, but it is in SUPERSEDED"):
        ledger.queue_job(
            job.id,
            route=RouteDecision("default", ("ok",), (), 1.0, "both"),
            pipeline="ok",
            series_instance_uid=SERIES,
            detail="too late",
        )
    old = ledger.job(job.id)
    assert (old.state, old.route, old.pipeline, old.series_instance_uid) == (
        JobState.SUPERSEDED,
        "",
        None,
        None,
    )
    assert raw(db, "SELECT route, pipeline FROM jobs WHERE id = ?", job.id) == [(None, None)]


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


def test_hierarchy_conflict_names_what_record_instance_would_refuse_before_anything_is_written(
    ledger: Ledger,
) -> None:
    # Issue 12 item 1: the C-STORE handler asks this before it spools a file.
    ledger.record_instance(instance("1"), association_id=None, now=T0)
    assert ledger.hierarchy_conflict(STUDY, SERIES, "1") is None  # a re-send or a replacement
    assert ledger.hierarchy_conflict(STUDY, SERIES, "2") is None  # a new instance
    assert ledger.hierarchy_conflict("7.7", "7.7.1", "3") is None  # a new study
    series_conflict = ledger.hierarchy_conflict("9.9", SERIES, "2")
    assert series_conflict is not None and f"under study {STUDY}, not 9.9" in series_conflict
    sop_conflict = ledger.hierarchy_conflict(STUDY, "1.2.826.0.1.1.2", "1")
    assert sop_conflict is not None and f"in series {SERIES}" in sop_conflict
    # Each is what record_instance itself refuses.
    for rec in (instance("2", study="9.9"), instance("1", series="1.2.826.0.1.1.2", sha="other bytes")):
        with pytest.raises(InvalidDatasetError, match="another"):
            ledger.record_instance(rec, association_id=None, now=T0)


# ------------------------------------------------------------------ the ledger's location


def test_a_postgresql_url_is_normalised_to_psycopg_and_never_shows_its_password() -> None:
    url = LedgerURL("postgresql://node:s3cr%2Ft@db.example:6543/triage?sslmode=require")
    assert url.url == "postgresql+psycopg://node:s3cr%2Ft@db.example:6543/triage?sslmode=require"
    assert (
        str(url) == repr(url)[11:-2] == "postgresql+psycopg://node:***@db.example:6543/triage?sslmode=require"
    )
    assert (url.server, url.user) == ("db.example:6543/triage", "node")
    assert url.mask("failed for s3cr/t and s3cr%2Ft") == "failed for *** and ***"
    assert parse_ledger_location("sqlite:///var/l.sqlite") == Path("var/l.sqlite")
    assert parse_ledger_location("var/l.sqlite") == Path("var/l.sqlite")
    with pytest.raises(ValueError, match="unsupported ledger URL scheme 'mysql'"):
        parse_ledger_location("mysql://u:pw@h/db")
    with pytest.raises(ValueError, match="names no database"):
        parse_ledger_location("postgresql://u:pw@h:5432/")


def test_an_unreachable_postgresql_ledger_is_one_line_naming_the_server_without_the_password() -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(StorageError) as err:
            Ledger(f"postgresql://node:hunter2@127.0.0.1:{port}/triage")
    message = str(err.value)
    assert message.startswith(f"cannot reach the PostgreSQL ledger at 127.0.0.1:{port}/triage as node: ")
    assert "\n" not in message and "hunter2" not in message


def test_the_config_accepts_a_postgresql_ledger_and_keeps_it_unresolved(tmp_path: Path) -> None:
    config = make_config(tmp_path, storage={"ledger": "postgresql://node:pw@db:5432/triage"})
    assert config.storage.ledger == LedgerURL("postgresql+psycopg://node:pw@db:5432/triage")
    assert "pw" not in config.model_dump_json()
    relative = make_config(tmp_path, storage={"ledger": "sqlite:///var/l.sqlite"})
    assert relative.storage.ledger == (tmp_path / "var/l.sqlite").resolve()
