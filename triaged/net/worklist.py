"""The worklist for readers of the ledger: Study Root C-FIND (PS3.4 C.4.1) and a JSON endpoint.

Both serve the same rows in the same order (priority level, score, arrival).  The triage priority is
returned in Requested Procedure Priority (0040,1003): STAT, HIGH (our URGENT) or ROUTINE, and the
reasons in Study Comments (0032,4000), which always state P(COVID-19) of an analysed study, as
"P(COVID-19): not assessed" when the pipeline has no classifier validated on real data; see
``docs/conformance.md``.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt

from triaged.audit import EventRecorder, audit, peer_text
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
            actor=calling, peer=peer_text(rq.address, rq.port), recorder=self._recorder,
            level=logging.INFO if outcome != "refused" else logging.WARNING,
            query_level=state["level"], keys=state["keys"], matches=state["matches"],
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


#: Concurrent HTTP requests served, a thread each; a complete request beyond them is answered 503 at once.
HTTP_MAX_REQUESTS = 16
#: Connections still sending their request, held by one reader thread (no thread each); beyond them a new
#: connection is closed at once.
HTTP_MAX_PENDING = 256
#: The request line and headers of one HTTP request, in bytes at most (the worklist takes no body).
HTTP_MAX_REQUEST_BYTES = 16 * 1024


class ThrottledWarning:
    """A WARNING at most once per ``interval`` seconds, with the count of events since the last line.

    For floods (refused connections): each event is counted, one line a second says how many there were.
    """

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self._log = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._last = -interval
        self._count = 0

    def note(self, message: str, *args: object) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self._interval:
                return
            count, self._count, self._last = self._count, 0, now
        self._log.warning(message + " (%d time(s) since the last such line)", *args, count)


def _raw_response(code: int, reason: str, body: object, extra: str = "") -> bytes:
    """A complete HTTP/1.0 response, for connections answered before a handler runs."""
    data = json.dumps(body).encode()
    head = (
        f"HTTP/1.0 {code} {reason}\r\nServer: triaged\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\nCache-Control: no-store\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + data


def _end_of_head(buf: bytes | bytearray) -> int:
    """Index just past the blank line ending the request line and headers, or -1."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := buf.find(sep)) >= 0]
    return min(ends, default=-1)


@dataclass
class _Pending:
    address: Any
    deadline: float
    buffer: bytearray


class _RequestGatherer:
    """One thread reading the requests of all connections not yet complete, without blocking on any.

    A connection gets ``timeout`` seconds to send its request line and headers (``max_bytes`` at most);
    only a complete request is handed to ``dispatch`` and so gets a thread.  A client that sends half a
    request and stops (slowloris) costs a socket until its deadline, never a thread.
    """

    def __init__(
        self, dispatch: Callable[[socket.socket, Any, bytes], None], close: Callable[[socket.socket], None], *,
        timeout: float, max_bytes: int, max_pending: int,
    ) -> None:
        self._dispatch = dispatch
        self._close = close
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._max_pending = max_pending
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._incoming: list[tuple[socket.socket, Any]] = []
        self._pending: dict[socket.socket, _Pending] = {}
        self._stopped = False
        self._busy = ThrottledWarning(log)
        self._thread = threading.Thread(target=self._run, name="worklist-http-read", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, address: Any) -> None:
        with self._lock:
            self._incoming.append((sock, address))
        self._wake()

    def stop(self) -> None:
        self._stopped = True
        self._wake()
        self._thread.join(timeout=5)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # a wake-up is already pending (buffer full) or we are stopping

    def _run(self) -> None:
        try:
            while not self._stopped:
                now = time.monotonic()
                first = min((p.deadline for p in self._pending.values()), default=now + 1.0)
                for key, _ in self._selector.select(max(0.0, first - now)):
                    if key.fileobj is self._wake_r:
                        self._take_incoming()
                        continue
                    sock = cast(socket.socket, key.fileobj)
                    try:
                        self._read(sock)
                    except Exception:  # noqa: BLE001 - one connection must not stop the endpoint
                        log.exception("HTTP worklist: a connection failed")
                        if sock in self._pending:
                            self._drop(sock)
                        else:
                            self._close(sock)
                now = time.monotonic()
                for sock, pending in list(self._pending.items()):
                    if pending.deadline <= now:
                        log.debug("http %s - no complete request within %g s: dropped", pending.address[0],
                                  self._timeout)
                        self._drop(sock)
        finally:
            for sock in list(self._pending):
                self._drop(sock)
            with self._lock:
                incoming, self._incoming = self._incoming, []
            for sock, _ in incoming:
                self._close(sock)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _take_incoming(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for sock, address in incoming:
            if len(self._pending) >= self._max_pending:
                self._busy.note("HTTP worklist: %d connections still sending their request, one from %s closed",
                                self._max_pending, address[0])
                self._close(sock)
                continue
            try:
                sock.setblocking(False)
                self._selector.register(sock, selectors.EVENT_READ)
            except (OSError, ValueError):
                self._close(sock)  # closed by the peer in the meantime
                continue
            self._pending[sock] = _Pending(address, time.monotonic() + self._timeout, bytearray())

    def _read(self, sock: socket.socket) -> None:
        pending = self._pending.get(sock)
        if pending is None:
            return
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        pending.buffer += data
        end = _end_of_head(pending.buffer)
        if 0 <= end <= self._max_bytes:
            self._forget(sock)
            sock.setblocking(True)
            self._dispatch(sock, pending.address, bytes(pending.buffer))
        elif len(pending.buffer) > self._max_bytes:
            log.info("HTTP request from %s refused: over %d bytes", pending.address[0], self._max_bytes)
            self._forget(sock)
            _answer(sock, _raw_response(
                431, "Request Header Fields Too Large",
                {"error": f"request line and headers over {self._max_bytes} bytes"},
            ))
            self._close(sock)

    def _forget(self, sock: socket.socket) -> None:
        del self._pending[sock]
        self._selector.unregister(sock)

    def _drop(self, sock: socket.socket) -> None:
        self._forget(sock)
        self._close(sock)


def _answer(sock: socket.socket, response: bytes) -> None:
    """Send a short refusal without waiting: it fits a fresh connection's send buffer, or is cut short."""
    try:
        sock.setblocking(False)
        sock.send(response)
    except OSError:
        pass


class _BoundedHTTPServer(ThreadingHTTPServer):
    """Complete requests only get a thread, ``max_requests`` of them at most; beyond them 503."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of connections is accepted, not left to retry SYNs

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, timeout: float,
        max_requests: int, max_request_bytes: int, max_pending: int,
    ) -> None:
        super().__init__(address, handler)
        self.request_timeout = timeout
        self.max_requests = max_requests
        self._slots = threading.BoundedSemaphore(max_requests)
        self._busy = ThrottledWarning(log)
        self._heads_lock = threading.Lock()
        self._heads: dict[int, bytes] = {}
        self._gatherer = _RequestGatherer(
            self._dispatch, self.shutdown_request, timeout=timeout, max_bytes=max_request_bytes,
            max_pending=max_pending,
        )

    def process_request(self, request: Any, client_address: Any) -> None:
        self._gatherer.add(request, client_address)  # the accepting thread never waits on a client

    def _dispatch(self, request: socket.socket, client_address: Any, head: bytes) -> None:
        if not self._slots.acquire(blocking=False):
            self._busy.note(
                "HTTP worklist busy: %d requests in progress, a request from %s answered 503",
                self.max_requests, client_address[0],
            )
            _answer(request, _raw_response(
                503, "Service Unavailable", {"error": "busy: too many requests in progress; retry"},
                "Retry-After: 1\r\n",
            ))
            self.shutdown_request(request)
            return
        with self._heads_lock:
            self._heads[id(request)] = head
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.take_head(request)
            self._slots.release()
            self.shutdown_request(request)
            raise

    def take_head(self, request: socket.socket) -> bytes:
        """The request line and headers already read from ``request`` (once)."""
        with self._heads_lock:
            return self._heads.pop(id(request), b"")

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        self._gatherer.stop()


class WorklistHTTP:
    """A read-only JSON view of the worklist: ``GET /worklist`` and ``GET /health``.

    Each connection gets ``timeout`` seconds to send its request line and headers (``max_request_bytes``
    at most, else 431), read by one thread for all of them (``max_pending`` connections at most), so a
    client that sends half a request holds no thread.  A complete request gets a thread of its own,
    ``max_requests`` of them at most; beyond that it is answered 503 (Service Unavailable) at once and a
    WARNING is logged (at most once a second, with a count).  ``timeout`` also bounds each write.

    Every answered request but a successful ``/health`` is an audit event ``worklist.http`` (a line on
    ``triaged.audit`` and, with ``recorder``, an ``audit_events`` row): method, path, client address,
    status and the number of worklist rows returned.
    """

    def __init__(
        self, rows: Callable[[], list[WorklistRow]], host: str, port: int, *, timeout: float = 10.0,
        max_requests: int = HTTP_MAX_REQUESTS, max_request_bytes: int = HTTP_MAX_REQUEST_BYTES,
        max_pending: int = HTTP_MAX_PENDING, recorder: EventRecorder | None = None,
    ) -> None:
        provider = rows

        class Handler(BaseHTTPRequestHandler):
            server_version = "triaged"
            rows_returned: int | None = None  # worklist rows in this request's answer, for the audit

            def setup(self) -> None:
                super().setup()
                self.connection.settimeout(timeout)  # bounds each write to (and read from) a slow client
                self.rfile.close()
                self.rfile = io.BytesIO(cast(_BoundedHTTPServer, self.server).take_head(self.connection))

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/health":
                    self._send(200, {"status": "ok"})
                elif path in ("/worklist", "/worklist.json"):
                    try:
                        data = [r.as_dict() for r in provider()]
                        self.rows_returned = len(data)
                        self._send(200, data)
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

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                """Every response (send_response and send_error call this): the audit event."""
                path = str(getattr(self, "path", "") or "").split("?", 1)[0][:200]
                status = int(code) if isinstance(code, int) else str(code)
                if path == "/health" and status == 200:
                    return  # a monitor's probe every few seconds: no trail
                client = peer_text(str(self.client_address[0]), int(self.client_address[1]))
                method = str(getattr(self, "command", "") or "")[:16]
                rows = self.rows_returned
                audit(
                    "worklist.http",
                    f"HTTP {method or '?'} {path or '?'} from {client}: {status}"
                    + (f", {rows} row(s)" if rows is not None else ""),
                    peer=client, recorder=recorder, method=method, path=path, status=status, rows=rows,
                )

        self._server = _BoundedHTTPServer(
            (host, port), Handler, timeout=timeout, max_requests=max_requests, max_request_bytes=max_request_bytes,
            max_pending=max_pending,
        )
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
