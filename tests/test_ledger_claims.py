"""Several nodes on one ledger: claims in priority order, never twice; leases, heartbeats, take-over; the leader.

Each test runs on SQLite and on a real PostgreSQL cluster (``tests.pg``); two :class:`Ledger` objects (two
engines, two connection pools) stand for two nodes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from tests.pg import both_dialects
from triaged.domain import Findings, InstanceRecord, JobState, LungMeasures
from triaged.errors import StateError, StorageError, TriagedError
from triaged.ledger import Ledger, OutboxRequest
from triaged.routing import RouteDecision
from triaged.spool import SpoolLock

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
LEASE = 60.0


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    both_dialects(metafunc)


@pytest.fixture
def ledgers(ledger_location: Path | str) -> Iterator[tuple[Ledger, Ledger]]:
    """Two nodes' ledgers on the same database."""
    a = Ledger(ledger_location)
    b = Ledger(ledger_location)
    yield a, b
    b.close()
    a.close()


def queue(ledger: Ledger, n: int, level: str = "ROUTINE") -> int:
    """A new study with one instance, its job completed and QUEUED at ``level``; returns the job id."""
    study = f"1.2.826.0.9.{n}"
    ledger.record_instance(
        InstanceRecord(
            study_instance_uid=study,
            series_instance_uid=f"{study}.1",
            sop_instance_uid=f"{study}.1.1",
            sop_class_uid=CT,
            transfer_syntax_uid=EXPLICIT_LE,
            path=f"studies/{study}/1.dcm",
            size=10,
            sha256=f"sha{n}",
        ),
        association_id=None,
    )
    (job,) = ledger.jobs(study_uid=study)
    ledger.transition(job.id, JobState.RECEIVING, JobState.COMPLETE, "quiet")
    route = RouteDecision("default", ("ok",), (), 1.0, "both", analysis_priority=level)
    ledger.queue_job(job.id, route=route, pipeline="ok", series_instance_uid=f"{study}.1", detail=level)
    return job.id


def findings() -> Findings:
    from triaged.domain import CTGrade

    return Findings(
        pipeline="ok",
        pipeline_version="1",
        right=LungMeasures(2000.0, 20.0, 0.0),
        left=LungMeasures(1800.0, 10.0, 0.0),
        ct_grade=CTGrade.CT1,
        p_covid=None,
    )


# ------------------------------------------------------------------ jobs


def test_claims_come_stat_first_then_urgent_then_the_oldest_routine(ledgers: tuple[Ledger, Ledger]) -> None:
    a, b = ledgers
    routine_1, routine_2 = queue(a, 1), queue(a, 2)
    urgent, stat = queue(a, 3, "URGENT"), queue(b, 4, "STAT")
    order = [
        a.claim_job("a", LEASE),
        b.claim_job("b", LEASE),
        a.claim_job("a", LEASE),
        b.claim_job("b", LEASE),
    ]
    assert order == [stat, urgent, routine_1, routine_2]
    assert a.claim_job("a", LEASE) is None
    job = b.job(stat)
    assert job.state is JobState.ANALYSING and job.history[-1][3] == "claimed by node a"


def test_a_routine_job_waiting_long_enough_goes_before_a_new_stat_job(ledgers: tuple[Ledger, Ledger]) -> None:
    a, b = ledgers
    routine = queue(a, 1)
    stat = queue(b, 2, "STAT")
    gap = (a.job(stat).updated_at - a.job(routine).updated_at).total_seconds()
    assert gap > 0
    # Two levels apart: aged by more than two levels (aging_seconds < gap / 2), the routine job goes first...
    assert a.claim_job("a", LEASE, aging_seconds=gap / 4) == routine
    # ...while with today's aging the STAT job would have (checked on a fresh pair).
    routine_2, stat_2 = queue(a, 3), queue(a, 4, "STAT")
    assert b.claim_job("b", LEASE, aging_seconds=600.0) == stat
    assert b.claim_job("b", LEASE, aging_seconds=600.0) == stat_2
    assert b.claim_job("b", LEASE, aging_seconds=600.0) == routine_2


def test_a_retry_that_is_not_due_is_not_claimed(ledgers: tuple[Ledger, Ledger]) -> None:
    a, _ = ledgers
    job = queue(a, 1)
    assert a.claim_job("a", LEASE) == job
    later = datetime.now(UTC) + timedelta(minutes=5)
    a.transition(job, JobState.ANALYSING, JobState.QUEUED, "transient", next_attempt_at=later, owner="a")
    assert a.claim_job("a", LEASE) is None
    assert a.claim_job("a", LEASE, now=later + timedelta(seconds=1)) == job


def test_two_nodes_claiming_at_once_never_claim_the_same_job(ledgers: tuple[Ledger, Ledger]) -> None:
    a, b = ledgers
    jobs = {queue(a, n, ("STAT", "URGENT", "ROUTINE")[n % 3]) for n in range(24)}
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker(ledger: Ledger, node: str) -> None:
        while (job := ledger.claim_job(node, LEASE)) is not None:
            with lock:
                claimed.append((node, job))

    threads = [threading.Thread(target=worker, args=(led, name)) for led, name in ((a, "a"), (b, "b")) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = [job for _, job in claimed]
    assert sorted(ids) == sorted(jobs)  # each job exactly once
    for node, job in claimed:
        row = a.job(job)
        assert row.state is JobState.ANALYSING
        assert [h[1:3] for h in row.history].count(("QUEUED", "ANALYSING")) == 1
        assert row.history[-1][3] == f"claimed by node {node}"


def test_an_expired_lease_is_taken_back_with_history_and_claimed_by_another_node(
    ledgers: tuple[Ledger, Ledger],
) -> None:
    a, b = ledgers
    job = queue(a, 1, "STAT")
    a.register_node("a", ["analyse"], version="test", lease_seconds=LEASE)
    b.register_node("b", ["complete", "analyse"], version="test", lease_seconds=LEASE)
    now = datetime.now(UTC)
    assert a.claim_job("a", LEASE, now=now) == job
    assert b.reclaim_expired("b", now=now + timedelta(seconds=LEASE - 1)) == ([], 0)
    # a beats half-way through: its lease now runs to now + 1.5 leases
    assert a.heartbeat("a", LEASE, now=now + timedelta(seconds=LEASE / 2)) == 1
    assert b.reclaim_expired("b", now=now + timedelta(seconds=LEASE + 1)) == ([], 0)
    (row_a,) = [n for n in b.nodes() if n.name == "a"]
    assert row_a.jobs == (job,) and row_a.alive(now + timedelta(seconds=LEASE / 2), LEASE)
    # a stops beating (it died): after its lease b's recovery takes the job back, with a history row naming a
    gone = now + timedelta(seconds=1.5 * LEASE + 1)
    assert b.reclaim_expired("b", now=gone) == ([job], 0)
    row = b.job(job)
    assert row.state is JobState.QUEUED
    assert row.history[-1][1:3] == ("ANALYSING", "QUEUED")
    assert "lease of node a expired" in row.history[-1][3] and "taken back by node b" in row.history[-1][3]
    assert b.claim_job("b", LEASE, now=gone) == job
    # a comes back to life with its old result: it no longer holds the job, nothing is recorded
    with pytest.raises(StateError, match="held by node b, not by node a"):
        a.record_analysis(job, findings(), priority=None, detail="late", owner="a")
    b.record_analysis(job, findings(), priority=None, detail="done", owner="b")
    assert b.job(job).state is JobState.ENCODING


def test_a_node_gives_back_only_its_own_jobs_at_start(ledgers: tuple[Ledger, Ledger]) -> None:
    a, b = ledgers
    mine, theirs = queue(a, 1), queue(a, 2)
    assert a.claim_job("a", LEASE) == mine
    assert b.claim_job("b", LEASE) == theirs
    assert a.release_jobs("a", reason="interrupted by a stop of node a") == [mine]
    assert (a.job(mine).state, a.job(theirs).state) == (JobState.QUEUED, JobState.ANALYSING)


def test_a_second_live_node_with_the_same_name_is_refused(ledgers: tuple[Ledger, Ledger]) -> None:
    a, b = ledgers
    a.register_node("n1", ["receive"], version="test", lease_seconds=LEASE, host="host-a", pid=100)
    with pytest.raises(TriagedError, match="node name 'n1' is in use by PID 100 on host-a"):
        b.register_node("n1", ["receive"], version="test", lease_seconds=LEASE, host="host-b", pid=200)
    a.node_stopped("n1")  # a clean stop frees the name at once
    b.register_node("n1", ["analyse"], version="test", lease_seconds=LEASE, host="host-b", pid=200)
    (row,) = a.nodes()
    assert (row.name, row.roles, row.host, row.pid, row.stopped_at) == (
        "n1",
        ("analyse",),
        "host-b",
        200,
        None,
    )


# ------------------------------------------------------------------ outbox


def outbox_rows(ledger: Ledger, count: int) -> int:
    job = queue(ledger, 99)
    ledger.enqueue_outbox(
        job, [OutboxRequest("pacs", "sr", f"work/{job}/{i}.dcm", "1.2", f"9.{i}") for i in range(count)]
    )
    return job


def test_two_nodes_claiming_outbox_rows_at_once_never_claim_the_same_row(
    ledgers: tuple[Ledger, Ledger],
) -> None:
    a, b = ledgers
    outbox_rows(a, 30)
    claimed: list[int] = []
    lock = threading.Lock()

    def sender(ledger: Ledger, node: str) -> None:
        while rows := ledger.claim_outbox(node, LEASE, limit=4):
            with lock:
                claimed.extend(r.id for r in rows)

    threads = [threading.Thread(target=sender, args=(led, name)) for led, name in ((a, "a"), (b, "b")) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(r.id for r in a.outbox())


def test_an_outbox_claim_lasts_until_sent_or_its_lease_runs_out(ledgers: tuple[Ledger, Ledger]) -> None:
    a, b = ledgers
    job = outbox_rows(a, 2)
    now = datetime.now(UTC)
    first, second = a.claim_outbox("a", LEASE, now=now)
    assert b.claim_outbox("b", LEASE, now=now) == []
    assert b.outbox_held_elsewhere(job, "b", now) and not a.outbox_held_elsewhere(job, "a", now)
    a.mark_sent(first.id, 0)  # the outcome gives the claim back; the other row stays a's until its lease ends
    assert b.claim_outbox("b", LEASE, now=now + timedelta(seconds=LEASE - 1)) == []
    assert b.reclaim_expired("b", now=now + timedelta(seconds=LEASE + 1)) == ([], 1)
    assert [r.id for r in b.claim_outbox("b", LEASE, now=now + timedelta(seconds=LEASE + 1))] == [second.id]
    assert b.release_outbox(node="b") == 1


# ------------------------------------------------------------------ leader


def test_one_leader_at_a_time_and_the_other_takes_over_when_it_goes(
    ledger_location: Path | str, ledgers: tuple[Ledger, Ledger]
) -> None:
    a, b = ledgers
    if isinstance(ledger_location, Path):  # SQLite: the one node on the file always leads
        assert a.is_leader() and b.is_leader()
        return
    assert a.is_leader()
    assert not b.is_leader()
    assert a.is_leader()  # still
    a.close()  # its connection closes: the server drops the lock
    assert b.is_leader()
    assert not a.is_leader()


def test_a_leader_that_loses_its_connection_is_no_longer_leader(
    ledger_location: Path | str, ledgers: tuple[Ledger, Ledger]
) -> None:
    if isinstance(ledger_location, Path):
        pytest.skip("SQLite has no server connection to lose")
    a, b = ledgers
    assert a.is_leader()
    with psycopg.connect(str(ledger_location), autocommit=True) as conn:
        conn.execute(
            # with a timeout (PostgreSQL >= 14) it returns once the backend has exited and its advisory lock is
            # gone; without one it only signals, and b could ask before the lock is released (a CI flake)
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_locks "
            "WHERE locktype = 'advisory' AND objid = 2 AND objsubid = 2"
        )
    assert b.is_leader()
    assert not a.is_leader()


# ------------------------------------------------------------------ the spool lock


def test_nodes_of_a_postgresql_ledger_share_the_spool_and_a_sqlite_node_is_kept_out(tmp_path: Path) -> None:
    first, second = SpoolLock(tmp_path, shared=True), SpoolLock(tmp_path, shared=True)
    with pytest.raises(StorageError, match="locked by triaged nodes of a PostgreSQL ledger"):
        SpoolLock(tmp_path)
    first.release()
    second.release()
    alone = SpoolLock(tmp_path)
    with pytest.raises(StorageError, match=r"locked by a triaged node on a SQLite ledger \(PID \d+\)"):
        SpoolLock(tmp_path, shared=True)
    alone.release()


# ------------------------------------------------------------------ migration


def test_jobs_waiting_when_the_ledger_is_upgraded_keep_their_level(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import text

    from triaged.ledger.ledger import _MIGRATIONS

    db = tmp_path / "ledger.sqlite"
    with Ledger(db) as ledger:
        routine, stat = queue(ledger, 1), queue(ledger, 2, "STAT")
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        with ledger._engine.begin() as conn:  # back to the schema before this migration
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0005")
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0005"
    with Ledger(db) as ledger:  # opening migrates it again
        assert ledger.claim_job("a", LEASE) == stat
        assert ledger.claim_job("a", LEASE) == routine
