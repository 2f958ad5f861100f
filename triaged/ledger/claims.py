"""Several nodes on one ledger: node identity and heartbeats, leased claims of jobs and outbox rows, the leader.

A node registers itself (:meth:`ClaimsMixin.register_node`) and beats (:meth:`ClaimsMixin.heartbeat`) every
``node.heartbeat_seconds``; each beat extends the leases of the jobs (ANALYSING, ENCODING) and outbox rows
(PENDING, being sent) it claimed, by ``node.lease_seconds``.  Work is taken by claims, never by a plain read:

* :meth:`ClaimsMixin.claim_job`: the best QUEUED job (STAT first, then URGENT, then ROUTINE; waiting
  ``aging_seconds`` is worth one level, as :class:`triaged.worker.TaskQueue` orders it), QUEUED → ANALYSING
  with ``claimed_by`` and ``lease_until``, in one write transaction.  The best job is among the oldest
  few of each level, so only those candidates are read (``FOR UPDATE SKIP LOCKED`` on PostgreSQL: a
  concurrent claimer takes other rows instead of waiting; SQLite: ``BEGIN IMMEDIATE`` admits one claimer).
* :meth:`ClaimsMixin.claim_outbox`: due PENDING rows not leased by a live node, marked ``claimed_by`` the
  same way; the outcome (:meth:`~triaged.ledger.outbox.OutboxMixin.mark_sent` and the others) clears it.

A node that stops beating loses its leases ``lease_seconds`` later; the leader's
:meth:`ClaimsMixin.reclaim_expired` then puts its jobs back to QUEUED (a history row names the node) and
frees its outbox rows, and any node claims them again.  The leader (:meth:`ClaimsMixin.is_leader`) is the
node holding a session-level PostgreSQL advisory lock on a connection of its own (named after the node, so
:meth:`ClaimsMixin.leader` can tell ``triaged status`` who leads); on SQLite the one node is always the
leader (the spool lock keeps a second node off a SQLite ledger).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, func, or_, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from triaged.domain import JobState, OutboxEntry, OutboxState, PriorityLevel
from triaged.errors import StateError, TriagedError
from triaged.ledger.base import ADVISORY_NAMESPACE, _jobs, _outbox, _utc, log
from triaged.ledger.jobs import JobsMixin
from triaged.ledger.outbox import OutboxMixin
from triaged.ledger.schema import NodeRecord

_nodes = cast(Table, NodeRecord.__table__)

#: Second key of the session-level advisory lock the leader holds (first key: ``ADVISORY_NAMESPACE``).
ADVISORY_LEADER = 2
#: Candidates read per level by :meth:`ClaimsMixin.claim_job` (the oldest of each level).
_CANDIDATES_PER_LEVEL = 8
#: States in which a job is held by the node that claimed it.
HELD_STATES = (JobState.ANALYSING.value, JobState.ENCODING.value)
#: ``application_name`` of the leader's connection is this plus the node's name (:meth:`ClaimsMixin.leader`).
LEADER_APPLICATION = "triaged leader "


@dataclass(frozen=True)
class NodeRow:
    """One node as ``triaged status`` shows it: identity, roles, liveness and what it holds now."""

    name: str
    roles: tuple[str, ...]
    pid: int
    host: str
    version: str
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    #: Jobs it holds (ANALYSING, ENCODING with its name), and outbox rows it is sending.
    jobs: tuple[int, ...]
    outbox_rows: int

    def alive(self, now: datetime, lease_seconds: float) -> bool:
        """Running and beating: not stopped, and a heartbeat within ``lease_seconds`` of ``now``."""
        return self.stopped_at is None and now - self.heartbeat_at <= timedelta(seconds=lease_seconds)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ClaimsMixin(JobsMixin):
    """Nodes, leases, claims and leadership of the :class:`~triaged.ledger.Ledger`."""

    #: The dedicated connection holding the leader's advisory lock (PostgreSQL), None when not leader.
    _leader_conn: Any = None
    _leader_lock: threading.Lock | None = None
    #: The node that registered on this ledger (its name marks the leader's connection).
    _node_name: str | None = None

    # ------------------------------------------------------------------ nodes

    def register_node(
        self,
        name: str,
        roles: Iterable[str],
        *,
        version: str,
        lease_seconds: float,
        host: str | None = None,
        pid: int | None = None,
        now: datetime | None = None,
    ) -> None:
        """Record (or re-record) node ``name`` as started now; called by a node at start.

        Raises
        ------
        TriagedError
            Another running process already uses the name: a node of another host, or a live process of
            this host, beat within ``lease_seconds`` (give each node its own ``node.name``).
        """
        now = _utc(now)
        host = host or os.uname().nodename
        pid = os.getpid() if pid is None else pid
        values = {
            "roles": ",".join(roles),
            "pid": pid,
            "host": host[:255],
            "started_at": now,
            "heartbeat_at": now,
            "version": version[:32],
            "stopped_at": None,
        }
        with self._write("register_node") as conn:
            row = conn.execute(select(_nodes).where(_nodes.c.name == name)).one_or_none()
            if row is not None and row.stopped_at is None and (row.host, row.pid) != (host, pid):
                recent = now - row.heartbeat_at <= timedelta(seconds=lease_seconds)
                if recent and (row.host != host or _pid_alive(row.pid)):
                    raise TriagedError(
                        f"node name {name!r} is in use by PID {row.pid} on {row.host} (heartbeat "
                        f"{(now - row.heartbeat_at).total_seconds():.0f} s ago): give each node its own "
                        "node.name in config.yaml"
                    )
            stmt = self._insert(_nodes).values(name=name, **values)
            conn.execute(stmt.on_conflict_do_update(index_elements=[_nodes.c.name], set_=values))
        if self._node_name is None:  # the first registration through a ledger is its own node's
            self._node_name = name
        log.info("node %s registered (%s)", name, values["roles"])

    def node_stopped(self, name: str, now: datetime | None = None) -> None:
        """Record a clean stop of node ``name`` (its leases were given back by then)."""
        with self._write("node_stopped") as conn:
            conn.execute(update(_nodes).where(_nodes.c.name == name).values(stopped_at=_utc(now)))

    def heartbeat(self, name: str, lease_seconds: float, now: datetime | None = None) -> int:
        """Node ``name`` is alive: record it and extend its leases to ``now + lease_seconds``.

        Returns how many leases (jobs and outbox rows) were extended.
        """
        now = _utc(now)
        until = now + timedelta(seconds=lease_seconds)
        with self._write("heartbeat") as conn:
            conn.execute(update(_nodes).where(_nodes.c.name == name).values(heartbeat_at=now))
            held = (
                conn.execute(
                    update(_jobs)
                    .where(_jobs.c.claimed_by == name, _jobs.c.state.in_(HELD_STATES))
                    .values(lease_until=until)
                ).rowcount
                or 0
            )
            held += (
                conn.execute(
                    update(_outbox)
                    .where(_outbox.c.claimed_by == name, _outbox.c.state == OutboxState.PENDING.value)
                    .values(lease_until=until)
                ).rowcount
                or 0
            )
        return int(held)

    def nodes(self) -> list[NodeRow]:
        """Every node that ever opened the ledger, by name, with the jobs and outbox rows it holds now."""
        with self._read("nodes") as conn:
            rows = conn.execute(select(_nodes).order_by(_nodes.c.name)).all()
            held: dict[str, list[int]] = {}
            for job_id, owner in conn.execute(
                select(_jobs.c.id, _jobs.c.claimed_by)
                .where(_jobs.c.claimed_by.is_not(None), _jobs.c.state.in_(HELD_STATES))
                .order_by(_jobs.c.id)
            ):
                held.setdefault(owner, []).append(job_id)
            sending: dict[str, int] = {
                str(owner): int(count)
                for owner, count in conn.execute(
                    select(_outbox.c.claimed_by, func.count())
                    .where(_outbox.c.claimed_by.is_not(None), _outbox.c.state == OutboxState.PENDING.value)
                    .group_by(_outbox.c.claimed_by)
                )
            }
        return [
            NodeRow(
                name=r.name,
                roles=tuple(x for x in r.roles.split(",") if x),
                pid=r.pid,
                host=r.host,
                version=r.version,
                started_at=r.started_at,
                heartbeat_at=r.heartbeat_at,
                stopped_at=r.stopped_at,
                jobs=tuple(held.get(r.name, ())),
                outbox_rows=int(sending.get(r.name, 0)),
            )
            for r in rows
        ]

    # ------------------------------------------------------------------ jobs

    def claim_job(
        self,
        node: str,
        lease_seconds: float,
        *,
        aging_seconds: float = 600.0,
        now: datetime | None = None,
        detail: str = "",
    ) -> int | None:
        """Claim the most urgent due QUEUED job for ``node``: QUEUED → ANALYSING with a lease; its id, or None.

        Order as the worker queue's: ``rank(level) - waited / aging_seconds``, then the oldest; the level is
        the job's route's ``analysis_priority`` (``queue_level``; none: ROUTINE) and ``waited`` counts from
        when it was queued, or from when its retry came due.  A job whose retry is not due yet is left.
        Two nodes (or threads) claiming at once never get the same job.
        """
        now = _utc(now)
        j = _jobs
        levels = [level.value for level in PriorityLevel]
        groups = [j.c.queue_level == level for level in levels]
        groups.append(or_(j.c.queue_level.is_(None), j.c.queue_level.not_in(levels)))
        due = and_(
            j.c.state == JobState.QUEUED.value, or_(j.c.next_attempt_at.is_(None), j.c.next_attempt_at <= now)
        )
        with self._read("claim_job") as conn:  # an idle worker polls: a read never waits for the writer
            if conn.execute(select(j.c.id).where(due).limit(1)).first() is None:
                return None
        with self._write("claim_job") as conn:
            candidates: list[Any] = []
            for group in groups:
                stmt = (
                    select(j.c.id, j.c.queue_level, j.c.updated_at, j.c.next_attempt_at)
                    .where(due, group)
                    .order_by(j.c.updated_at, j.c.id)
                    .limit(_CANDIDATES_PER_LEVEL)
                )
                if self._postgres:
                    stmt = stmt.with_for_update(skip_locked=True)
                candidates += conn.execute(stmt).all()
            if not candidates:
                return None

            def standing(r: Any) -> tuple[float, int]:
                try:
                    rank = PriorityLevel(r.queue_level).rank
                except ValueError:
                    rank = PriorityLevel.ROUTINE.rank
                since = max(r.updated_at, r.next_attempt_at or r.updated_at)
                return rank - (now - since).total_seconds() / aging_seconds, r.id

            for r in sorted(candidates, key=standing):
                try:
                    self._move(
                        conn,
                        r.id,
                        JobState.QUEUED,
                        JobState.ANALYSING,
                        detail or f"claimed by node {node}",
                        now,
                        extra={"claimed_by": node, "lease_until": now + timedelta(seconds=lease_seconds)},
                    )
                except StateError:  # taken meanwhile (SQLite cannot skip locked rows: they are never locked)
                    continue
                log.info(
                    "job %d: %s -> %s claimed by node %s", r.id, JobState.QUEUED, JobState.ANALYSING, node
                )
                return int(r.id)
        return None

    def job_owner(self, job_id: int) -> tuple[JobState, str | None]:
        """A job's state and the node holding it (None: no node claimed it)."""
        with self._read("job_owner") as conn:
            row = conn.execute(
                select(_jobs.c.state, _jobs.c.claimed_by).where(_jobs.c.id == job_id)
            ).one_or_none()
        if row is None:
            raise StateError(f"job {job_id} does not exist")
        return JobState(row.state), row.claimed_by

    def release_jobs(self, node: str, *, reason: str, now: datetime | None = None) -> list[int]:
        """Put every job ``node`` holds (ANALYSING, ENCODING) back to QUEUED; returns their ids.

        A node calls it for its own name at start (what a stop or crash of the same node interrupted).
        """
        return self._requeue(_jobs.c.claimed_by == node, lambda owner: reason, _utc(now))

    def release_unclaimed_jobs(self, *, reason: str, now: datetime | None = None) -> list[int]:
        """Put ANALYSING and ENCODING jobs that no node claimed (older triaged, or the single-node path) back
        to QUEUED; returns their ids."""
        return self._requeue(_jobs.c.claimed_by.is_(None), lambda owner: reason, _utc(now))

    def _requeue(self, which: Any, why: Any, now: datetime) -> list[int]:
        j = _jobs
        done: list[int] = []
        with self._write("requeue held jobs") as conn:
            stmt = select(j.c.id, j.c.state, j.c.claimed_by, j.c.lease_until).where(
                which, j.c.state.in_(HELD_STATES)
            )
            if self._postgres:
                stmt = stmt.with_for_update(skip_locked=True)
            for r in conn.execute(stmt).all():
                try:
                    self._move(conn, r.id, JobState(r.state), JobState.QUEUED, why(r), now)
                except StateError:
                    continue
                done.append(int(r.id))
        for job_id in done:
            log.info("job %d: back to %s", job_id, JobState.QUEUED)
        return done

    def reclaim_expired(self, by: str, now: datetime | None = None) -> tuple[list[int], int]:
        """Take back the work of nodes whose leases ran out (the leader's duty): their jobs go back to QUEUED
        with a history row naming the node, their outbox rows are freed for any node to send.

        Returns the re-queued job ids and how many outbox rows were freed.
        """
        now = _utc(now)

        def why(r: Any) -> str:
            return (
                f"lease of node {r.claimed_by} expired at {r.lease_until:%Y-%m-%d %H:%M:%S} UTC "
                f"(no heartbeat); {JobState(r.state).value.lower()} taken back by node {by}"
            )

        jobs = self._requeue(and_(_jobs.c.lease_until.is_not(None), _jobs.c.lease_until < now), why, now)
        o = _outbox
        with self._write("reclaim_expired outbox") as conn:
            freed = (
                conn.execute(
                    update(o)
                    .where(o.c.state == OutboxState.PENDING.value, o.c.lease_until < now)
                    .values(claimed_by=None, lease_until=None)
                ).rowcount
                or 0
            )
        if jobs or freed:
            log.warning(
                "node %s took back %d job(s) and %d outbox row(s) of nodes whose leases expired",
                by,
                len(jobs),
                freed,
            )
        return jobs, int(freed)

    # ------------------------------------------------------------------ outbox

    def claim_outbox(
        self,
        node: str,
        lease_seconds: float,
        *,
        now: datetime | None = None,
        job_id: int | None = None,
        only: str | None = None,
        exclude: Iterable[str] = (),
        limit: int = 10000,
    ) -> list[OutboxEntry]:
        """Claim due PENDING outbox rows for ``node`` to send (oldest first); the rows stay PENDING.

        A row another node leases (its lease not yet run out) is left, so two nodes never send the same
        row.  ``job_id``: only that job's rows; ``only``: only that destination's; ``exclude``: not these
        destinations (their sender is busy).  The outcome (``mark_sent``, ``mark_attempt_failed``,
        ``mark_dead``) or :meth:`release_outbox` gives the claim back.
        """
        now = _utc(now)
        o = _outbox
        stmt = (
            select(o)
            .where(
                o.c.state == OutboxState.PENDING.value,
                o.c.next_attempt_at <= now,
                or_(o.c.lease_until.is_(None), o.c.lease_until < now),
            )
            .order_by(o.c.id)
            .limit(limit)
        )
        if job_id is not None:
            stmt = stmt.where(o.c.job_id == job_id)
        if only is not None:
            stmt = stmt.where(o.c.destination == only)
        excluded = list(exclude)
        if excluded:
            stmt = stmt.where(o.c.destination.not_in(excluded))
        if self._postgres:
            stmt = stmt.with_for_update(skip_locked=True)
        until = now + timedelta(seconds=lease_seconds)
        with self._write("claim_outbox") as conn:
            rows = conn.execute(stmt).all()
            ids = [r.id for r in rows]
            for chunk in range(0, len(ids), 500):
                conn.execute(
                    update(o)
                    .where(o.c.id.in_(ids[chunk : chunk + 500]))
                    .values(claimed_by=node, lease_until=until)
                )
        return [OutboxMixin._outbox_row(r) for r in rows]

    def release_outbox(self, item_ids: Iterable[int] | None = None, *, node: str | None = None) -> int:
        """Give claimed outbox rows back unsent: these ``item_ids``, or every row ``node`` holds."""
        o = _outbox
        stmt = update(o).where(o.c.state == OutboxState.PENDING.value, o.c.claimed_by.is_not(None))
        if item_ids is not None:
            ids = list(item_ids)
            if not ids:
                return 0
            stmt = stmt.where(o.c.id.in_(ids))
        if node is not None:
            stmt = stmt.where(o.c.claimed_by == node)
        with self._write("release_outbox") as conn:
            return int(conn.execute(stmt.values(claimed_by=None, lease_until=None)).rowcount or 0)

    def outbox_held_elsewhere(self, job_id: int, node: str, now: datetime | None = None) -> bool:
        """Whether another node holds a live lease on a PENDING row of ``job_id`` (it settles the job then)."""
        now = _utc(now)
        o = _outbox
        with self._read("outbox_held_elsewhere") as conn:
            return (
                conn.execute(
                    select(func.count()).where(
                        o.c.job_id == job_id,
                        o.c.state == OutboxState.PENDING.value,
                        o.c.claimed_by.is_not(None),
                        o.c.claimed_by != node,
                        o.c.lease_until >= now,
                    )
                ).scalar_one()
                > 0
            )

    # ------------------------------------------------------------------ leader

    def is_leader(self) -> bool:
        """Whether this ledger's node is the leader now (runs the completion sweep, retention, lease recovery).

        SQLite: always.  PostgreSQL: the node holding the session-level advisory lock
        ``(ADVISORY_NAMESPACE, ADVISORY_LEADER)`` on a connection of its own; the first call that finds it
        free takes it, and every call checks that the connection still works (a lost connection is no
        longer leader, and the server has dropped the lock for another node to take).
        """
        if not self._postgres:
            return True
        if self._leader_lock is None:
            self._leader_lock = threading.Lock()
        with self._leader_lock:
            if self._closed.is_set():
                return False
            conn = self._leader_conn
            if conn is not None:
                try:
                    conn.execute(text("SELECT 1"))
                    return True
                except SQLAlchemyError as exc:
                    log.warning(
                        "ledger: lost the leader's connection, no longer leader: %s",
                        self._mask(str(exc).splitlines()[0]),
                    )
                    self._drop_leader_conn()
            try:
                conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                conn.detach()  # closing it closes the session (and its lock) rather than pooling it
                got = bool(
                    conn.execute(
                        text("SELECT pg_try_advisory_lock(:ns, :key)"),
                        {"ns": ADVISORY_NAMESPACE, "key": ADVISORY_LEADER},
                    ).scalar_one()
                )
            except SQLAlchemyError as exc:
                log.warning("ledger: cannot try the leader's lock: %s", self._mask(str(exc).splitlines()[0]))
                return False
            if not got:
                conn.close()
                return False
            if self._node_name is not None:  # what leader() reads: the lock's holder names itself
                try:
                    conn.execute(
                        text("SELECT set_config('application_name', :name, false)"),
                        {"name": (LEADER_APPLICATION + self._node_name)[:63]},
                    )
                except SQLAlchemyError as exc:
                    log.warning("ledger: cannot name the leader's connection: %s", self._mask(str(exc)))
            self._leader_conn = conn
            log.info("ledger: this node is now the leader")
            return True

    def leader(self) -> str | None:
        """The name of the node that leads now, as the database knows it; None when none is known.

        PostgreSQL: the ``application_name`` of the session holding the leader's advisory lock (a lock
        dies with its session, so a crashed leader is never named).  SQLite: None: the one running node
        with the ``complete`` role leads (:meth:`is_leader`), which only the caller can tell.
        """
        if not self._postgres:
            return None
        with self._read("leader") as conn:
            names = conn.execute(
                text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
                    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                    "AND l.classid = CAST(:ns AS oid) AND l.objid = CAST(:key AS oid)"
                ),
                {"ns": ADVISORY_NAMESPACE, "key": ADVISORY_LEADER},
            ).scalars()
            for name in names:
                if name and str(name).startswith(LEADER_APPLICATION):
                    return str(name)[len(LEADER_APPLICATION) :]
        return None

    def resign_leadership(self) -> None:
        """Give the leader's lock back (closing its connection); a no-op when not leader or on SQLite."""
        lock = self._leader_lock
        if lock is None:
            return
        with lock:
            self._drop_leader_conn()

    def _drop_leader_conn(self) -> None:
        conn, self._leader_conn = self._leader_conn, None
        if conn is not None:
            try:
                conn.close()
            except SQLAlchemyError:  # already broken: the server has dropped the lock with the session
                pass
