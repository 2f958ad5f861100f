"""The worklist for readers of the ledger: Study Root C-FIND (PS3.4 C.4.1) and the HTTP endpoint.

Both serve the same rows in the same order (priority level, score, arrival).  The triage priority is
returned in Requested Procedure Priority (0040,1003): STAT, HIGH (our URGENT) or ROUTINE, and the
reasons in Study Comments (0032,4000), which always state P(COVID-19) of an analysed study, as
"P(COVID-19): not assessed" when the pipeline has no classifier validated on real data; see
``docs/conformance.md``.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from triaged.audit import EventRecorder, audit, peer_text
from triaged.domain import RESEARCH_NOTE, JobState, PriorityLevel, WorklistRow, p_covid_text
from triaged.net.dashboard import (
    DashboardSource,
    OutboxHealth,
    dashboard_page,
    job_dict,
    job_page,
    not_found_page,
)
from triaged.net.http import (
    HTTP_MAX_PENDING,
    HTTP_MAX_REQUEST_BYTES,
    HTTP_MAX_REQUESTS,
    BoundedHTTP,
    Query,
    Response,
    Route,
    ThrottledWarning,
    json_response,
    route,
)

__all__ = [
    "DICOM_PRIORITY",
    "HTTP_MAX_PENDING",
    "HTTP_MAX_REQUEST_BYTES",
    "HTTP_MAX_REQUESTS",
    "HTTP_MAX_ROWS",
    "STUDY_ROOT_FIND",
    "QueryError",
    "ThrottledWarning",
    "WorklistFind",
    "WorklistHTTP",
    "filter_worklist",
    "row_attributes",
]

log = logging.getLogger(__name__)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
#: Our levels in Requested Procedure Priority's defined terms (PS3.3 C.4.11: STAT, HIGH, ROUTINE, MEDIUM, LOW).
DICOM_PRIORITY: dict[str, str] = {
    PriorityLevel.STAT: "STAT",
    PriorityLevel.URGENT: "HIGH",
    PriorityLevel.ROUTINE: "ROUTINE",
}

#: Patient-level attributes come from the study's first stored instance (the ledger keeps no names).
HeaderLookup = Callable[[str], Dataset | None]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _matches(value: str, key: Any, keyword: str) -> bool:
    """PS3.4 C.2.2.2: universal (empty), single value, wildcard (* ?), UID list, date range."""
    if key is None or key == "" or (isinstance(key, list | tuple) and not key):
        return True
    if keyword == "StudyInstanceUID":  # a list of UIDs (PS3.4 C.2.2.2.2)
        keys = key if isinstance(key, list | tuple) else str(key).split("\\")
        return value in [str(k) for k in keys]
    text = str(key)
    if keyword == "StudyDate" and "-" in text:
        lo, _, hi = text.partition("-")
        return (not lo or value >= lo) and (not hi or value <= hi)
    if "*" in text or "?" in text:
        return (
            fnmatch.fnmatchcase(value.upper(), text.upper())
            if keyword == "PatientName"
            else fnmatch.fnmatchcase(value, text)
        )
    return value == text


def row_attributes(row: WorklistRow, header: Dataset | None) -> dict[str, str]:
    """The attributes this SCP can return for one study, keyword → value."""
    h = header or Dataset()
    reasons = row.priority_reasons
    if row.ct_grade is not None and "P(COVID-19)" not in reasons:
        # A result whose reasons predate the "not assessed" wording: never leave P(COVID-19) unsaid.
        reasons = "; ".join(r for r in (reasons, p_covid_text(row.p_covid)) if r)
    comment = f"{reasons}. {RESEARCH_NOTE}" if reasons else RESEARCH_NOTE
    return {
        "StudyInstanceUID": row.study_instance_uid,
        "AccessionNumber": row.accession_number,
        "StudyDate": row.study_date,
        "StudyTime": _text(h.get("StudyTime")),
        "StudyDescription": row.study_description,
        "StudyID": _text(h.get("StudyID")),
        "PatientName": _text(h.get("PatientName")),
        "PatientID": _text(h.get("PatientID")),
        "PatientBirthDate": _text(h.get("PatientBirthDate")),
        "PatientSex": _text(h.get("PatientSex")),
        "ReferringPhysicianName": _text(h.get("ReferringPhysicianName")),
        "ModalitiesInStudy": _text(h.get("Modality")),
        "RequestedProcedurePriority": DICOM_PRIORITY.get(row.priority_level or "", ""),
        "StudyComments": comment[:10240],
    }


class WorklistFind:
    """C-FIND handler; dependencies come in: the ordered rows, a header lookup and the audit recorder.

    Every query answered or refused is an audit event ``find`` (a line on ``triaged.audit`` and, with
    ``recorder``, an ``audit_events`` row): calling AE title, peer, level, the keys queried (never their
    values: a query may name a patient), matches returned and the final status.
    """

    def __init__(
        self,
        rows: Callable[[], list[WorklistRow]],
        headers: HeaderLookup,
        *,
        recorder: EventRecorder | None = None,
    ) -> None:
        self._rows = rows
        self._headers = headers
        self._recorder = recorder

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """Answer one C-FIND (pending matches, then the final status) and audit it once answered."""
        state: dict[str, Any] = {"level": "", "keys": [], "matches": 0, "status": 0xFF00}
        audited = False
        try:
            for status, answer in self._answer(event, state):
                if status in (0xFF00, 0xFF01):
                    state["matches"] += 1
                else:  # the final status: audited before it goes out
                    state["status"], audited = status, True
                    self._audit(event, state)
                yield status, answer
        finally:
            if not audited:  # the association ended mid-answer: audited with the last status (pending)
                self._audit(event, state)

    def _audit(self, event: evt.Event, state: dict[str, Any]) -> None:
        rq = event.assoc.requestor
        calling = str(rq.ae_title).strip()
        status = int(state["status"])
        outcome = {0x0000: "answered", 0xFE00: "cancelled", 0xFF00: "interrupted", 0xFF01: "interrupted"}.get(
            status, "refused"
        )
        audit(
            "find",
            f"C-FIND from {calling}@{rq.address} at level {state['level'] or '?'} {outcome} "
            f"with 0x{status:04X}: {state['matches']} match(es); keys {', '.join(state['keys']) or '-'}",
            actor=calling,
            peer=peer_text(rq.address, rq.port),
            recorder=self._recorder,
            level=logging.INFO if outcome != "refused" else logging.WARNING,
            query_level=state["level"],
            keys=state["keys"],
            matches=state["matches"],
            status=f"0x{status:04X}",
        )

    def _answer(self, event: evt.Event, state: dict[str, Any]) -> Iterator[tuple[int, Dataset | None]]:
        try:
            query: Dataset = event.identifier
            level = str(query.get("QueryRetrieveLevel", "")).upper()
        except Exception as exc:  # noqa: BLE001 - an undecodable identifier
            log.warning("C-FIND with an undecodable identifier: %s", exc)
            yield 0xC300, None
            return
        state["level"] = level[:16]
        # Which keys were queried, never their values (a PatientName key may name a patient).
        state["keys"] = sorted({e.keyword or str(e.tag) for e in query if e.keyword != "QueryRetrieveLevel"})
        if level != "STUDY":
            log.info("C-FIND at level %r refused: only STUDY is supported", level)
            yield 0xA900, None  # Identifier does not match SOP Class
            return
        requested = [elem.keyword for elem in query if elem.keyword and elem.keyword != "QueryRetrieveLevel"]
        try:
            rows = self._rows()
        except Exception:  # noqa: BLE001 - the ledger is unavailable
            log.exception("C-FIND: cannot read the worklist")
            yield 0xA700, None
            return
        for row in rows:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            header = (
                self._headers(row.study_instance_uid)
                if any(
                    k in requested
                    for k in (
                        "PatientName",
                        "PatientID",
                        "PatientBirthDate",
                        "PatientSex",
                        "StudyTime",
                        "StudyID",
                        "ReferringPhysicianName",
                        "ModalitiesInStudy",
                    )
                )
                else None
            )
            attrs = row_attributes(row, header)
            if not all(_matches(attrs.get(k, ""), query.get(k), k) for k in requested if k in attrs):
                continue
            answer = Dataset()
            answer.QueryRetrieveLevel = "STUDY"
            if "SpecificCharacterSet" in query or header is not None:
                answer.SpecificCharacterSet = (header or Dataset()).get("SpecificCharacterSet", "ISO_IR 192")
            for keyword in requested:
                if keyword == "SpecificCharacterSet":
                    continue
                setattr(answer, keyword, attrs.get(keyword, ""))
            yield 0xFF00, answer
        yield 0x0000, None


#: Rows one ``GET /worklist`` returns at most (``limit``'s default and maximum); page with ``offset``.
HTTP_MAX_ROWS = 1000
#: The query parameters ``/worklist`` takes.
WORKLIST_PARAMETERS = ("priority", "state", "limit", "offset")


class QueryError(ValueError):
    """A bad query parameter: answered 400 with the valid values."""

    def __init__(self, parameter: str, message: str, valid: list[str]) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.valid = valid


def _choices(query: Query, name: str, valid: list[str]) -> set[str] | None:
    """``?name=A,B&name=C`` → {A, B, C} (case-insensitive), or None when not given."""
    if name not in query:
        return None
    chosen = {v.strip().upper() for value in query[name] for v in value.split(",") if v.strip()}
    unknown = sorted(chosen - set(valid))
    if unknown or not chosen:
        raise QueryError(name, f"{name}: unknown value(s) {', '.join(unknown) or '(empty)'}", valid)
    return chosen


def _count(query: Query, name: str, default: int, lo: int, hi: int) -> int:
    if name not in query:
        return default
    text = query[name][-1].strip()
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise QueryError(
            name, f"{name}: {text[:40]!r} is not a whole number from {lo} to {hi}", [f"{lo}..{hi}"]
        )
    return int(text)


def filter_worklist(rows: list[WorklistRow], query: Query) -> tuple[list[WorklistRow], int]:
    """The rows ``?priority=``, ``?state=``, ``?limit=`` and ``?offset=`` select, and how many matched.

    Raises
    ------
    QueryError
        An unknown parameter or value, or a limit or offset out of range.
    """
    unknown = sorted(set(query) - set(WORKLIST_PARAMETERS))
    if unknown:
        raise QueryError(
            unknown[0], f"unknown query parameter(s) {', '.join(unknown)}", list(WORKLIST_PARAMETERS)
        )
    levels = _choices(query, "priority", [str(level) for level in PriorityLevel])
    states = _choices(query, "state", [str(s) for s in JobState])
    limit = _count(query, "limit", HTTP_MAX_ROWS, 1, HTTP_MAX_ROWS)
    offset = _count(query, "offset", 0, 0, 10**9)
    chosen = [
        r
        for r in rows
        if (levels is None or (r.priority_level or "") in levels)
        and (states is None or str(r.state) in states)
    ]
    return chosen[offset : offset + limit], len(chosen)


class WorklistHTTP(BoundedHTTP):
    """The node's read-only HTTP endpoint: the JSON worklist, the dashboard and ``/metrics``.

    ``GET /worklist`` (filters ``priority``, ``state``, ``limit``, ``offset``; a bad value is 400 with the
    valid values; ``X-Total-Count`` says how many matched), ``GET /health``; with ``dashboard`` the pages
    ``/`` (``/dashboard``), ``/jobs/<id>``, ``/jobs/<id>/overview.png`` and ``/api/jobs/<id>``,
    ``/api/outbox``; with ``metrics`` (a function returning the exposition and its content type)
    ``GET /metrics``.  With ``patient_data`` (``worklist.http_patient_data``) each worklist row also
    carries ``patient_id`` and ``patient_name`` from ``headers``, the values C-FIND returns.  Bounds and
    audit: :class:`triaged.net.http.BoundedHTTP`.
    """

    def __init__(
        self,
        rows: Callable[[], list[WorklistRow]],
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        max_requests: int = HTTP_MAX_REQUESTS,
        max_request_bytes: int = HTTP_MAX_REQUEST_BYTES,
        max_pending: int = HTTP_MAX_PENDING,
        recorder: EventRecorder | None = None,
        headers: HeaderLookup | None = None,
        patient_data: bool = False,
        dashboard: DashboardSource | None = None,
        metrics: Callable[[], tuple[bytes, str]] | None = None,
    ) -> None:
        with_patients = patient_data and headers is not None

        def worklist(_m: re.Match[str], query: Query) -> Response:
            try:
                chosen, total = filter_worklist(rows(), query)
            except QueryError as exc:
                return json_response(400, {"error": str(exc), "parameter": exc.parameter, "valid": exc.valid})
            data = []
            for r in chosen:
                item = r.as_dict()
                if with_patients and headers is not None:
                    attrs = row_attributes(r, headers(r.study_instance_uid))
                    item["patient_id"], item["patient_name"] = attrs["PatientID"], attrs["PatientName"]
                data.append(item)
            return json_response(200, data, rows=len(data), **{"X-Total-Count": str(total)})

        routes = [
            route("/health", lambda _m, _q: json_response(200, {"status": "ok"}), audited=False),
            route("/worklist(?:\\.json)?", worklist),
        ]
        if dashboard is not None:
            routes += _dashboard_routes(dashboard, with_patients)
        if metrics is not None:

            def scrape(_m: re.Match[str], _q: Query) -> Response:
                body, content_type = metrics()
                return Response(200, body, content_type)

            routes.append(route("/metrics", scrape, audited=False))
        super().__init__(
            routes,
            host,
            port,
            timeout=timeout,
            max_requests=max_requests,
            max_request_bytes=max_request_bytes,
            max_pending=max_pending,
            recorder=recorder,
        )


def _dashboard_routes(source: DashboardSource, patient_data: bool) -> list[Route]:
    html_type = "text/html; charset=utf-8"

    def front(_m: re.Match[str], _q: Query) -> Response:
        return Response(200, dashboard_page(source, patient_data=patient_data), html_type)

    def job_html(m: re.Match[str], _q: Query) -> Response:
        job = source.job(int(m.group(1)))
        if job is None:
            return Response(404, not_found_page(f"No job {m.group(1)}."), html_type)
        return Response(200, job_page(source, job, patient_data=patient_data), html_type)

    def overview(m: re.Match[str], _q: Query) -> Response:
        png = source.overview_png(int(m.group(1)))
        if png is None:
            return json_response(404, {"error": f"no overview image for job {m.group(1)}"})
        return Response(200, png, "image/png")

    def job_json(m: re.Match[str], _q: Query) -> Response:
        job = source.job(int(m.group(1)))
        if job is None:
            return json_response(404, {"error": f"no job {m.group(1)}"})
        return json_response(200, job_dict(job, source.outbox(job_id=job.id)))

    def outbox_json(_m: re.Match[str], _q: Query) -> Response:
        health = OutboxHealth.of(source.outbox(unsent_only=True))
        return json_response(200, {**health.as_dict(), "note": "research use only - not for diagnosis"})

    return [
        route("/(?:dashboard)?", front),
        route("/jobs/([0-9]{1,12})", job_html),
        route("/jobs/([0-9]{1,12})/overview\\.png", overview),
        route("/api/jobs/([0-9]{1,12})", job_json),
        route("/api/outbox", outbox_json),
    ]
