"""Read-only queries of the ledger: the audit trail, studies, jobs, instances, findings and the worklist.

Each runs in one deferred (read) transaction, so it sees one snapshot and never waits for the writer.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select

from triaged.domain import Findings, JobRow, JobState, StudyRow, WorklistRow, findings_from_json
from triaged.errors import TriagedError
from triaged.ledger.base import (
    LedgerBase,
    _associations,
    _findings,
    _instances,
    _jobs,
    _series,
    _studies,
    _transitions,
    _utc,
)
from triaged.ledger.rows import AssociationRow, InstanceRow, QuietJob, StudySource
from triaged.routing import RouteDecision


class ViewsMixin(LedgerBase):
    """Read-only part of the :class:`~triaged.ledger.Ledger`."""

    # ------------------------------------------------------------------ audit trail

    def associations(self, limit: int = 50) -> list[AssociationRow]:
        """The most recent associations, newest first.

        Parameters
        ----------
        limit
            How many to return at most.
        """
        a = _associations
        stmt = select(a).order_by(a.c.id.desc()).limit(limit)
        with self._read("associations") as conn:
            return [
                AssociationRow(
                    id=r.id,
                    calling_ae=r.calling_ae,
                    called_ae=r.called_ae,
                    peer_address=r.peer_address,
                    peer_port=r.peer_port,
                    started_at=r.started_at,
                    ended_at=r.ended_at,
                    accepted=bool(r.accepted),
                    reject_reason=r.reject_reason,
                    instances=r.instances,
                    bytes=r.bytes,
                    failures=r.failures,
                    aborted=bool(r.aborted),
                )
                for r in conn.execute(stmt)
            ]

    # ------------------------------------------------------------------ completion

    def quiet_jobs(self, older_than: datetime) -> list[QuietJob]:
        """RECEIVING jobs whose study received nothing since ``older_than``, quietest first.

        Parameters
        ----------
        older_than
            Aware cut-off time: a study whose last instance arrived strictly before it is quiet.

        Returns
        -------
        list of QuietJob
            ``(job_id, study_instance_uid)``.
        """
        older_than = _utc(older_than)
        j, st = _jobs, _studies
        stmt = (
            select(j.c.id, st.c.study_instance_uid)
            .join(st, st.c.id == j.c.study_id)
            .where(j.c.state == JobState.RECEIVING.value, st.c.last_seen < older_than)
            .order_by(st.c.last_seen, j.c.id)
        )
        with self._read("quiet_jobs") as conn:
            return [QuietJob(r.id, r.study_instance_uid) for r in conn.execute(stmt)]

    def study_instances(self, study_uid: str) -> list[InstanceRow]:
        """Every current instance of a study (empty when the study is unknown).

        Returns
        -------
        list of InstanceRow
            ``(path, sop_class_uid, series_instance_uid, sop_instance_uid)``, ordered by series, then
            SOP Instance UID.
        """
        st, se, ins = _studies, _series, _instances
        stmt = (
            select(ins.c.path, ins.c.sop_class_uid, se.c.series_instance_uid, ins.c.sop_instance_uid)
            .join(se, se.c.id == ins.c.series_id)
            .join(st, st.c.id == se.c.study_id)
            .where(st.c.study_instance_uid == study_uid)
            .order_by(se.c.series_instance_uid, ins.c.sop_instance_uid)
        )
        with self._read("study_instances") as conn:
            return [InstanceRow(r[0], r[1], r[2], r[3]) for r in conn.execute(stmt)]

    # ------------------------------------------------------------------ jobs and studies

    @staticmethod
    def _job_select() -> Select[Any]:
        j, st = _jobs, _studies
        return select(
            j.c.id,
            st.c.study_instance_uid,
            j.c.revision,
            j.c.state,
            j.c.detail,
            j.c.created_at,
            j.c.updated_at,
            j.c.series_instance_uid,
            j.c.next_attempt_at,
            j.c.attempts,
            j.c.pipeline,
            j.c.priority_level,
            j.c.priority_score,
            j.c.priority_reasons,
            j.c.result_at,
            j.c.route,
        ).join(st, st.c.id == j.c.study_id)

    @staticmethod
    def _job_row(r: Any, history: tuple[tuple[datetime, str, str, str], ...] = ()) -> JobRow:
        return JobRow(
            id=r.id,
            study_instance_uid=r.study_instance_uid,
            revision=r.revision,
            state=JobState(r.state),
            detail=r.detail,
            created_at=r.created_at,
            updated_at=r.updated_at,
            series_instance_uid=r.series_instance_uid,
            next_attempt_at=r.next_attempt_at,
            attempts=r.attempts,
            pipeline=r.pipeline,
            priority_level=r.priority_level,
            priority_score=r.priority_score,
            priority_reasons=r.priority_reasons or "",
            result_at=r.result_at,
            route=r.route or "",
            history=history,
        )

    @staticmethod
    def route_decision(job: JobRow) -> RouteDecision | None:
        """The routing decision a job was queued with (:meth:`queue_job`), or None before it was queued.

        Its ``explanation`` is empty: only the parts a job needs later are stored.
        """
        return RouteDecision.from_json(job.route) if job.route else None

    def job(self, job_id: int) -> JobRow:
        """One job with its history, oldest transition first.

        Returns
        -------
        JobRow
            ``history`` holds ``(at, from_state, to_state, detail)``; ``from_state`` is ``""`` for
            the job's creation.

        Raises
        ------
        TriagedError
            The job is unknown.
        """
        t = _transitions
        with self._read("job") as conn:
            row = conn.execute(self._job_select().where(_jobs.c.id == job_id)).first()
            if row is None:
                raise TriagedError(f"job {job_id} is not in the ledger")
            history = tuple(
                (h.at, h.from_state or "", h.to_state, h.detail)
                for h in conn.execute(
                    select(t.c.at, t.c.from_state, t.c.to_state, t.c.detail)
                    .where(t.c.job_id == job_id)
                    .order_by(t.c.id)
                )
            )
        return self._job_row(row, history)

    def jobs(
        self, *, states: Iterable[JobState] | None = None, study_uid: str | None = None, limit: int = 50
    ) -> list[JobRow]:
        """Jobs, newest first, optionally only those in ``states`` (without history; see :meth:`job`).

        Parameters
        ----------
        states
            Only jobs in one of these states; None for all.
        study_uid
            Only the jobs (revisions) of this study.
        limit
            How many to return at most.
        """
        stmt = self._job_select()
        if states is not None:
            stmt = stmt.where(_jobs.c.state.in_([JobState(s).value for s in states]))
        if study_uid is not None:
            stmt = stmt.where(_studies.c.study_instance_uid == study_uid)
        # By id, not created_at: ids follow commit order, while a caller's clock reading may precede
        # a wait for the write lock.
        stmt = stmt.order_by(_jobs.c.id.desc()).limit(limit)
        with self._read("jobs") as conn:
            return [self._job_row(r) for r in conn.execute(stmt)]

    def studies(self, limit: int = 50) -> list[StudyRow]:
        """Studies, most recently active first; ``state`` is that of the study's latest job.

        Parameters
        ----------
        limit
            How many to return at most.
        """
        st, se, j = _studies, _series, _jobs
        series_count = select(func.count()).where(se.c.study_id == st.c.id).scalar_subquery()
        latest_state = (
            select(j.c.state)
            .where(j.c.study_id == st.c.id)
            .order_by(j.c.revision.desc())
            .limit(1)
            .scalar_subquery()
        )
        stmt = (
            select(st, series_count.label("series"), func.coalesce(latest_state, "").label("state"))
            .order_by(st.c.last_seen.desc(), st.c.id.desc())
            .limit(limit)
        )
        with self._read("studies") as conn:
            return [
                StudyRow(
                    study_instance_uid=r.study_instance_uid,
                    first_seen=r.first_seen,
                    last_seen=r.last_seen,
                    instances=r.instance_count,
                    bytes=r.byte_count,
                    series=r.series,
                    state=r.state,
                    accession_number=r.accession_number,
                    study_date=r.study_date,
                    study_description=r.study_description,
                )
                for r in conn.execute(stmt)
            ]

    def queue_depth(self) -> dict[JobState, int]:
        """Number of jobs in each state; every state is present, zeros included."""
        j = _jobs
        depth = dict.fromkeys(JobState, 0)
        with self._read("queue_depth") as conn:
            for state, count in conn.execute(select(j.c.state, func.count()).group_by(j.c.state)):
                depth[JobState(state)] = int(count)
        return depth

    # ------------------------------------------------------------------ analysis results

    def findings(self, job_id: int) -> Findings | None:
        """The findings a job recorded, or None."""
        with self._read("findings") as conn:
            data = conn.execute(
                select(_findings.c.data).where(_findings.c.job_id == job_id)
            ).scalar_one_or_none()
        return findings_from_json(data) if data is not None else None

    def study_source(self, study_uid: str) -> StudySource | None:
        """(calling AE, called AE, peer address) of the association that last brought the study an instance."""
        a, ins, se, st = _associations, _instances, _series, _studies
        stmt = (
            select(a.c.calling_ae, a.c.called_ae, a.c.peer_address)
            .join(ins, ins.c.association_id == a.c.id)
            .join(se, se.c.id == ins.c.series_id)
            .join(st, st.c.id == se.c.study_id)
            .where(st.c.study_instance_uid == study_uid)
            .order_by(ins.c.received_at.desc())
            .limit(1)
        )
        with self._read("study_source") as conn:
            row = conn.execute(stmt).first()
        return StudySource(row.calling_ae, row.called_ae, row.peer_address) if row else None

    # ------------------------------------------------------------------ worklist

    def worklist(self) -> list[WorklistRow]:
        """Every study with its latest job and priority (unsorted: the caller applies the policy order)."""
        j, st, f = _jobs, _studies, _findings
        latest = (
            select(j.c.study_id, func.max(j.c.revision).label("revision")).group_by(j.c.study_id).subquery()
        )
        stmt = (
            select(
                st.c.study_instance_uid,
                st.c.accession_number,
                st.c.study_date,
                st.c.study_description,
                st.c.first_seen,
                j.c.id,
                j.c.state,
                j.c.priority_level,
                j.c.priority_score,
                j.c.priority_reasons,
                j.c.result_at,
                f.c.severity_pct,
                f.c.ct_grade,
                f.c.p_covid,
            )
            .join(latest, latest.c.study_id == st.c.id)
            .join(j, (j.c.study_id == st.c.id) & (j.c.revision == latest.c.revision))
            .outerjoin(f, f.c.job_id == j.c.id)
            # Not the studies retention purged (files deleted, nothing received since): see ledger/retention.py.
            .where(st.c.purged_at.is_(None) | (st.c.instance_count > 0))
        )
        with self._read("worklist") as conn:
            return [
                WorklistRow(
                    study_instance_uid=r.study_instance_uid,
                    accession_number=r.accession_number,
                    study_date=r.study_date,
                    study_description=r.study_description,
                    arrived=r.first_seen,
                    job_id=r.id,
                    state=r.state,
                    priority_level=r.priority_level,
                    priority_score=r.priority_score,
                    priority_reasons=r.priority_reasons or "",
                    result_at=r.result_at,
                    severity_pct=r.severity_pct,
                    ct_grade=r.ct_grade,
                    p_covid=r.p_covid,
                )
                for r in conn.execute(stmt)
            ]
