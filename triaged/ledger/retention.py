"""Retention: which studies are finished and how old, marking a study's files deleted, pruning old rows.

The policy itself (ages, the size limit) is :mod:`triaged.stages.retention`; these are its queries and
its writes.  A study is *purged* once :meth:`RetentionMixin.mark_purged` has run: ``purged_at`` is set,
its series and instance rows are gone and its counts are zero, while the study row, its jobs, their
history, findings and outbox rows stay (the worklist leaves it out) until :meth:`prune_ledger` removes
them after ``retention.keep_ledger_days``.  An instance received later counts again (``instance_count``
rises), so a study re-sent by the PACS is alive again and analysed as a new revision.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import ColumnElement, Table, and_, delete, exists, func, select, update

from triaged.domain import OutboxState
from triaged.ledger.base import (
    LedgerBase,
    _associations,
    _instances,
    _jobs,
    _outbox,
    _series,
    _studies,
    _utc,
    log,
)
from triaged.ledger.schema import AuditEvent

_events = cast(Table, AuditEvent.__table__)
_st = _studies

#: A study whose files retention deleted and that received nothing since (see the module docstring).
PURGED: ColumnElement[bool] = and_(_st.c.purged_at.is_not(None), _st.c.instance_count == 0)


@dataclass(frozen=True)
class RetentionCandidate:
    """One study that still has files, with what retention decides on (:meth:`RetentionMixin.retention_candidates`).

    ``latest_state`` is the state of its newest job (None: no job); ``finished_at`` that job's last state
    change; ``pending`` whether any result object of any of its jobs is still PENDING; ``dead`` whether
    one of the newest job's objects was dead-lettered.  ``bytes`` and ``instances`` count the received
    instances (not the work folders of ``job_ids``).
    """

    study_instance_uid: str
    last_seen: datetime
    instances: int
    bytes: int
    latest_job_id: int | None
    latest_state: str | None
    finished_at: datetime | None
    pending: bool
    dead: bool
    job_ids: tuple[int, ...]


@dataclass(frozen=True)
class PurgeMark:
    """What :meth:`RetentionMixin.mark_purged` recorded: the study's files to delete now.

    ``paths`` are the instance files (spool-relative) whose rows were deleted; ``job_ids`` the jobs whose
    work folders go (every job created before ``purged_at``).
    """

    study_instance_uid: str
    purged_at: datetime
    paths: tuple[str, ...]
    job_ids: tuple[int, ...]


@dataclass(frozen=True)
class LedgerPrune:
    """Rows :meth:`RetentionMixin.prune_ledger` deleted (or would delete)."""

    studies: int
    associations: int
    audit_events: int

    @property
    def total(self) -> int:
        return self.studies + self.associations + self.audit_events


class RetentionMixin(LedgerBase):
    """Retention part of the :class:`~triaged.ledger.Ledger`."""

    def retention_candidates(self) -> list[RetentionCandidate]:
        """Every study that is not purged, with its newest job and outbox state, oldest activity first."""
        st, j, o = _studies, _jobs, _outbox
        latest = (
            select(j.c.study_id, func.max(j.c.revision).label("revision")).group_by(j.c.study_id).subquery()
        )
        study_jobs = select(j.c.id).where(j.c.study_id == st.c.id)
        pending = exists().where(o.c.job_id.in_(study_jobs), o.c.state == OutboxState.PENDING.value)
        dead = exists().where(o.c.job_id == j.c.id, o.c.state == OutboxState.DEAD.value)
        stmt = (
            select(
                st.c.id.label("study_id"),
                st.c.study_instance_uid,
                st.c.last_seen,
                st.c.instance_count,
                st.c.byte_count,
                j.c.id.label("job_id"),
                j.c.state,
                j.c.updated_at,
                pending.label("pending"),
                dead.label("dead"),
            )
            .select_from(st)
            .outerjoin(latest, latest.c.study_id == st.c.id)
            .outerjoin(j, (j.c.study_id == st.c.id) & (j.c.revision == latest.c.revision))
            .where(~PURGED)
            .order_by(st.c.last_seen, st.c.id)
        )
        with self._read("retention_candidates") as conn:
            rows = conn.execute(stmt).all()
            jobs: dict[int, list[int]] = {}
            for study_id, job_id in conn.execute(select(j.c.study_id, j.c.id).order_by(j.c.id)):
                jobs.setdefault(study_id, []).append(job_id)
        return [
            RetentionCandidate(
                study_instance_uid=r.study_instance_uid,
                last_seen=r.last_seen,
                instances=r.instance_count,
                bytes=r.byte_count,
                latest_job_id=r.job_id,
                latest_state=r.state,
                finished_at=r.updated_at,
                pending=bool(r.pending),
                dead=bool(r.dead),
                job_ids=tuple(jobs.get(r.study_id, ())),
            )
            for r in rows
        ]

    def mark_purged(
        self,
        study_uid: str,
        *,
        latest_job_id: int,
        last_seen: datetime,
        finished_states: Iterable[str],
        now: datetime | None = None,
    ) -> PurgeMark | None:
        """Mark a finished study purged before its files are deleted (one ``BEGIN IMMEDIATE`` transaction).

        The study must still be as the caller chose it: its newest job ``latest_job_id`` in one of
        ``finished_states``, no result object PENDING and nothing received since ``last_seen``;
        otherwise nothing is written and None is returned.  Its series and instance rows are deleted,
        its counts set to zero and ``purged_at`` to ``now``, so from the commit on the start-up reconcile
        treats its remaining files as leftovers of this deletion, never as a new study.

        Returns
        -------
        PurgeMark or None
            The files and work folders to delete now.
        """
        now = _utc(now)
        st, se, ins, j, o = _studies, _series, _instances, _jobs, _outbox
        with self._write("mark_purged") as conn:
            study = conn.execute(
                select(st.c.id, st.c.last_seen).where(st.c.study_instance_uid == study_uid)
            ).first()
            if study is None or study.last_seen != _utc(last_seen):
                return None
            newest = conn.execute(
                select(j.c.id, j.c.state)
                .where(j.c.study_id == study.id)
                .order_by(j.c.revision.desc())
                .limit(1)
            ).first()
            if newest is None or newest.id != latest_job_id or newest.state not in set(finished_states):
                return None
            job_ids = tuple(
                conn.execute(select(j.c.id).where(j.c.study_id == study.id).order_by(j.c.id)).scalars()
            )
            if conn.execute(
                select(exists().where(o.c.job_id.in_(job_ids), o.c.state == OutboxState.PENDING.value))
            ).scalar():
                return None
            series_ids = select(se.c.id).where(se.c.study_id == study.id)
            paths = tuple(conn.execute(select(ins.c.path).where(ins.c.series_id.in_(series_ids))).scalars())
            conn.execute(delete(ins).where(ins.c.series_id.in_(series_ids)))
            conn.execute(delete(se).where(se.c.study_id == study.id))
            conn.execute(
                update(st).where(st.c.id == study.id).values(purged_at=now, instance_count=0, byte_count=0)
            )
        log.info("study %s: marked purged (%d instance rows deleted)", study_uid, len(paths))
        return PurgeMark(study_uid, now, paths, job_ids)

    def purge_marks(self) -> dict[str, tuple[datetime, tuple[int, ...]]]:
        """Every study retention ever marked: its ``purged_at`` and the jobs created before it.

        Whatever of theirs is still on disk and older than the mark (a deletion a crash interrupted) is
        a leftover: the start-up reconcile must not record it and retention deletes it.
        """
        st, j = _studies, _jobs
        stmt = (
            select(st.c.study_instance_uid, st.c.purged_at, j.c.id)
            .outerjoin(j, (j.c.study_id == st.c.id) & (j.c.created_at < st.c.purged_at))
            .where(st.c.purged_at.is_not(None))
            .order_by(st.c.id, j.c.id)
        )
        marks: dict[str, tuple[datetime, list[int]]] = {}
        with self._read("purge_marks") as conn:
            for r in conn.execute(stmt):
                _, jobs = marks.setdefault(r.study_instance_uid, (r.purged_at, []))
                if r.id is not None:
                    jobs.append(r.id)
        return {uid: (at, tuple(jobs)) for uid, (at, jobs) in marks.items()}

    def purged_at(self, study_uid: str) -> datetime | None:
        """When retention deleted the study's files, or None when it is not purged (or unknown)."""
        st = _studies
        with self._read("purged_at") as conn:
            value = conn.execute(
                select(st.c.purged_at).where(st.c.study_instance_uid == study_uid, PURGED)
            ).scalar_one_or_none()
        return cast("datetime | None", value)

    def purged_studies(self) -> dict[str, datetime]:
        """Every purged study (files deleted, nothing received since) with when it was purged."""
        st = _studies
        with self._read("purged_studies") as conn:
            return {
                r[0]: r[1]
                for r in conn.execute(select(st.c.study_instance_uid, st.c.purged_at).where(PURGED))
            }

    def study_instance_paths(self, study_uid: str) -> set[str]:
        """The instance files the ledger records for a study now (spool-relative)."""
        st, se, ins = _studies, _series, _instances
        stmt = (
            select(ins.c.path)
            .join(se, se.c.id == ins.c.series_id)
            .join(st, st.c.id == se.c.study_id)
            .where(st.c.study_instance_uid == study_uid)
        )
        with self._read("study_instance_paths") as conn:
            return set(conn.execute(stmt).scalars())

    def prune_ledger(self, older_than: datetime, *, dry_run: bool = False) -> LedgerPrune:
        """Delete the rows retention keeps no longer, all older than ``older_than``, in one transaction.

        The rows of studies purged before ``older_than`` (their jobs, history, findings and outbox rows
        go by cascade), associations that ended (or began, when never closed) before it and audit events
        recorded before it; instances keep their rows when their association's goes.  Nothing younger
        is touched.  ``dry_run`` only counts.
        """
        cutoff = _utc(older_than)
        st, a, ev = _studies, _associations, _events
        old_studies = and_(PURGED, st.c.purged_at < cutoff)
        old_associations = func.coalesce(a.c.ended_at, a.c.started_at) < cutoff
        old_events = ev.c.at < cutoff
        with (self._read if dry_run else self._write)("prune_ledger") as conn:
            counts = LedgerPrune(
                *(
                    int(conn.execute(select(func.count()).select_from(t).where(w)).scalar_one())
                    for t, w in ((st, old_studies), (a, old_associations), (ev, old_events))
                )
            )
            if not dry_run and counts.total:
                conn.execute(delete(st).where(old_studies))
                conn.execute(delete(a).where(old_associations))
                conn.execute(delete(ev).where(old_events))
        return counts
