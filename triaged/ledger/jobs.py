"""The job state machine: job creation, compare-and-set transitions with their history, queue and analysis."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from triaged.domain import TRANSITIONS, Findings, JobState, findings_to_json
from triaged.errors import StateError
from triaged.ledger.base import LedgerBase, _findings, _jobs, _transitions, _utc, log
from triaged.routing import RouteDecision


class JobsMixin(LedgerBase):
    """Jobs of the :class:`~triaged.ledger.Ledger`: every state change goes through :meth:`_move`."""

    def transition(
        self,
        job_id: int,
        from_state: JobState,
        to_state: JobState,
        detail: str = "",
        *,
        series_instance_uid: str | None = None,
        next_attempt_at: datetime | None = None,
        owner: str | None = None,
    ) -> None:
        """Move a job from ``from_state`` to ``to_state``, atomically, and record it in its history.

        Parameters
        ----------
        job_id
            The job.
        from_state
            The state the caller believes the job is in; the move happens only if it still is
            (compare-and-set), so two workers can never both take the same job.
        to_state
            Must be allowed by :data:`triaged.domain.TRANSITIONS` from ``from_state``.
        detail
            Why (an IGNORED reason, a FAILED stage and reason, a dispatch report); becomes the job's
            current detail.
        series_instance_uid
            The chosen series, when given.
        next_attempt_at
            When to retry (RETRY_WAIT), when given; aware.
        owner
            The node that claimed the job, when given: the move happens only if that node still holds it
            (its lease was not taken back and the job claimed by another node meanwhile).

        Raises
        ------
        StateError
            The job is unknown, not in ``from_state``, or the transition is not allowed.
        """
        now = datetime.now(UTC)
        if next_attempt_at is not None:
            _utc(next_attempt_at)
        with self._write("transition") as conn:
            self._move(
                conn,
                job_id,
                from_state,
                to_state,
                detail,
                now,
                series_instance_uid=series_instance_uid,
                next_attempt_at=next_attempt_at,
                owner=owner,
            )
        log.info("job %d: %s -> %s %s", job_id, from_state, to_state, detail)

    def _move(
        self,
        conn: Connection,
        job_id: int,
        from_state: JobState,
        to_state: JobState,
        detail: str,
        now: datetime,
        *,
        series_instance_uid: str | None = None,
        next_attempt_at: datetime | None = None,
        extra: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> None:
        """Compare-and-set the state and record the transition (inside the caller's transaction).

        ``extra`` holds further job columns written by the same guarded UPDATE (route, priority, ...),
        so they land only if the job is still in ``from_state``.
        """
        j = _jobs
        if to_state not in TRANSITIONS[from_state]:
            actual = self._state_of(conn, job_id)
            raise StateError(
                f"job {job_id}: {from_state} -> {to_state} is not an allowed transition (job is in {actual})"
            )
        values: dict[str, Any] = {
            **(extra or {}),
            "state": to_state.value,
            "detail": detail,
            "updated_at": now,
        }
        if series_instance_uid is not None:
            values["series_instance_uid"] = series_instance_uid
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        if to_state == JobState.DISPATCHING:
            values["attempts"] = j.c.attempts + 1
        if to_state not in (JobState.ANALYSING, JobState.ENCODING):
            values.setdefault("lease_until", None)  # held no more: nothing left to lease
        if to_state == JobState.QUEUED:
            values.setdefault("claimed_by", None)  # any node may claim it again
        guard = [j.c.id == job_id, j.c.state == from_state.value]
        if owner is not None:
            guard.append(j.c.claimed_by == owner)
        result = conn.execute(update(j).where(*guard).values(**values))
        if result.rowcount != 1:
            actual = self._state_of(conn, job_id)
            if owner is not None and actual == from_state.value:
                holder = conn.execute(select(j.c.claimed_by).where(j.c.id == job_id)).scalar_one_or_none()
                raise StateError(f"job {job_id}: held by node {holder or 'none'}, not by node {owner}")
            raise StateError(f"job {job_id}: expected state {from_state}, but it is in {actual}")
        conn.execute(
            insert(_transitions).values(
                job_id=job_id, at=now, from_state=from_state.value, to_state=to_state.value, detail=detail
            )
        )

    @staticmethod
    def _state_of(conn: Connection, job_id: int) -> str:
        state = conn.execute(select(_jobs.c.state).where(_jobs.c.id == job_id)).scalar_one_or_none()
        if state is None:
            raise StateError(f"job {job_id} does not exist")
        return str(state)

    @staticmethod
    def _insert_job(
        conn: Connection,
        study_id: int,
        revision: int,
        detail: str,
        now: datetime,
        *,
        pipeline: str | None = None,
    ) -> int:
        """A new RECEIVING job; ``pipeline``, when given, is the one the series choice queues it with."""
        result = conn.execute(
            insert(_jobs).values(
                study_id=study_id,
                revision=revision,
                state=JobState.RECEIVING.value,
                detail=detail,
                series_instance_uid=None,
                created_at=now,
                updated_at=now,
                next_attempt_at=None,
                attempts=0,
                pipeline=pipeline,
            )
        )
        pk = result.inserted_primary_key
        assert pk is not None
        job_id = int(pk[0])
        conn.execute(
            insert(_transitions).values(
                job_id=job_id, at=now, from_state=None, to_state=JobState.RECEIVING.value, detail=detail
            )
        )
        return job_id

    def queue_job(
        self, job_id: int, *, route: RouteDecision, pipeline: str, series_instance_uid: str, detail: str
    ) -> None:
        """COMPLETE → QUEUED with the route, pipeline and chosen series, in one compare-and-set transaction.

        Parameters
        ----------
        job_id
            The job.
        route
            The routing decision the job follows (stored as :meth:`RouteDecision.to_json`; read back with
            :meth:`route_decision`).
        pipeline
            The pipeline it runs.
        series_instance_uid
            The chosen series.
        detail
            Why (route and series choice), the job's new detail.

        Raises
        ------
        StateError
            The job is not COMPLETE (e.g. a late instance superseded it): nothing is written.
        """
        now = datetime.now(UTC)
        with self._write("queue_job") as conn:
            self._move(
                conn,
                job_id,
                JobState.COMPLETE,
                JobState.QUEUED,
                detail,
                now,
                series_instance_uid=series_instance_uid,
                extra={
                    "route": route.to_json(),
                    "pipeline": pipeline,
                    "queue_level": route.analysis_priority,
                },
            )
        log.info("job %d: %s -> %s %s", job_id, JobState.COMPLETE, JobState.QUEUED, detail)

    def record_analysis(
        self,
        job_id: int,
        findings: Findings,
        *,
        priority: tuple[float, str, str] | None,
        detail: str,
        owner: str | None = None,
    ) -> None:
        """ANALYSING → ENCODING with the findings and priority, in one compare-and-set transaction.

        Parameters
        ----------
        job_id
            The job.
        findings
            What the pipeline measured (replaces earlier findings of the same job).
        priority
            ``(score, level, reasons)`` from the route's policy, or None.
        detail
            The analysis summary, the job's new detail.
        owner
            The node that claimed the job, when given: nothing is written unless it still holds it.

        Raises
        ------
        StateError
            The job is no longer ANALYSING (e.g. superseded while it ran): neither findings nor
            priority are written.
        """
        now = datetime.now(UTC)
        extra: dict[str, Any] = {"result_at": now}
        if priority is not None:
            score, level, reasons = priority
            extra.update(priority_score=score, priority_level=level, priority_reasons=reasons)
        with self._write("record_analysis") as conn:
            self._move(
                conn, job_id, JobState.ANALYSING, JobState.ENCODING, detail, now, extra=extra, owner=owner
            )
            conn.execute(self._findings_upsert(job_id, findings, now))
        log.info("job %d: %s -> %s %s", job_id, JobState.ANALYSING, JobState.ENCODING, detail)

    def _findings_upsert(self, job_id: int, findings: Findings, now: datetime) -> Any:
        values = {
            "job_id": job_id,
            "pipeline": findings.pipeline,
            "pipeline_version": findings.pipeline_version,
            "created_at": now,
            "severity_pct": findings.severity_pct,
            "whole_lung_pct": findings.whole_lung_pct,
            "consolidation_pct": findings.consolidation_pct,
            "ct_grade": int(findings.ct_grade),
            "p_covid": findings.p_covid,
            "data": findings_to_json(findings),
        }
        stmt = self._insert(_findings).values(**values)
        return stmt.on_conflict_do_update(index_elements=[_findings.c.job_id], set_=values)
