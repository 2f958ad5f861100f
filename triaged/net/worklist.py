"""The worklist for readers of the ledger: Study Root C-FIND (PS3.4 C.4.1) and a JSON endpoint.

Both serve the same rows in the same order (priority level, score, arrival).  The triage priority is
returned in Requested Procedure Priority (0040,1003): STAT, HIGH (our URGENT) or ROUTINE, and the
reasons in Study Comments (0032,4000), which always state P(COVID-19) of an analysed study, as
"P(COVID-19): not assessed" when the pipeline has no classifier validated on real data; see
``docs/conformance.md``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from triaged.domain import RESEARCH_NOTE, PriorityLevel, WorklistRow, p_covid_text

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
        return fnmatch.fnmatchcase(value.upper(), text.upper()) if keyword == "PatientName" else \
            fnmatch.fnmatchcase(value, text)
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
    """C-FIND handler; dependencies come in: the ordered rows and a header lookup."""

    def __init__(self, rows: Callable[[], list[WorklistRow]], headers: HeaderLookup) -> None:
        self._rows = rows
        self._headers = headers

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        try:
            query: Dataset = event.identifier
            level = str(query.get("QueryRetrieveLevel", "")).upper()
        except Exception as exc:  # noqa: BLE001 - an undecodable identifier
            log.warning("C-FIND with an undecodable identifier: %s", exc)
            yield 0xC300, None
            return
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
            header = self._headers(row.study_instance_uid) if any(
                k in requested for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyTime",
                                         "StudyID", "ReferringPhysicianName", "ModalitiesInStudy")) else None
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


class WorklistHTTP:
    """A read-only JSON view of the worklist: ``GET /worklist`` and ``GET /health``."""

    def __init__(self, rows: Callable[[], list[WorklistRow]], host: str, port: int) -> None:
        provider = rows

        class Handler(BaseHTTPRequestHandler):
            server_version = "triaged"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/health":
                    self._send(200, {"status": "ok"})
                elif path in ("/worklist", "/worklist.json"):
                    try:
                        self._send(200, [r.as_dict() for r in provider()])
                    except Exception as exc:  # noqa: BLE001
                        log.exception("HTTP worklist failed")
                        self._send(503, {"error": f"ledger unavailable: {type(exc).__name__}"})
                else:
                    self._send(404, {"error": f"no such resource {path}; try /worklist"})

            def do_POST(self) -> None:  # noqa: N802
                self._send(405, {"error": "read-only"})

            def _send(self, code: int, body: object) -> None:
                data = json.dumps(body, indent=1).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("http %s - %s", self.address_string(), format % args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return (str(host), int(port))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="worklist-http", daemon=True)
        self._thread.start()
        log.info("worklist JSON on http://%s:%s/worklist", *self.address)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
