"""The node's bounded HTTP server: a small route table over ``http.server``, safe against slow clients.

Each connection gets ``timeout`` seconds to send its request line and headers (``max_request_bytes``
at most, else 431), read by one thread for all of them (``max_pending`` connections at most), so a
client that sends half a request holds no thread.  A complete request gets a thread of its own,
``max_requests`` of them at most; beyond that it is answered 503 (Service Unavailable) at once and a
WARNING is logged (at most once a second, with a count).  ``timeout`` also bounds each write.

The routes (:class:`Route`) are plain functions of the path match and the query; this module knows
nothing of the worklist, the dashboard or the metrics (:mod:`triaged.net.worklist` wires them).
"""

from __future__ import annotations

import io
import json
import logging
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from triaged.audit import EventRecorder, audit, peer_text

log = logging.getLogger("triaged.net.worklist")  # the name operators already filter on

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
        self,
        dispatch: Callable[[socket.socket, Any, bytes], None],
        close: Callable[[socket.socket], None],
        *,
        timeout: float,
        max_bytes: int,
        max_pending: int,
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
                        log.debug(
                            "http %s - no complete request within %g s: dropped",
                            pending.address[0],
                            self._timeout,
                        )
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
                self._busy.note(
                    "HTTP worklist: %d connections still sending their request, one from %s closed",
                    self._max_pending,
                    address[0],
                )
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
            _answer(
                sock,
                _raw_response(
                    431,
                    "Request Header Fields Too Large",
                    {"error": f"request line and headers over {self._max_bytes} bytes"},
                ),
            )
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
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        timeout: float,
        max_requests: int,
        max_request_bytes: int,
        max_pending: int,
    ) -> None:
        super().__init__(address, handler)
        self.request_timeout = timeout
        self.max_requests = max_requests
        self._slots = threading.BoundedSemaphore(max_requests)
        self._busy = ThrottledWarning(log)
        self._heads_lock = threading.Lock()
        self._heads: dict[int, bytes] = {}
        self._gatherer = _RequestGatherer(
            self._dispatch,
            self.shutdown_request,
            timeout=timeout,
            max_bytes=max_request_bytes,
            max_pending=max_pending,
        )

    def process_request(self, request: Any, client_address: Any) -> None:
        self._gatherer.add(request, client_address)  # the accepting thread never waits on a client

    def _dispatch(self, request: socket.socket, client_address: Any, head: bytes) -> None:
        if not self._slots.acquire(blocking=False):
            self._busy.note(
                "HTTP worklist busy: %d requests in progress, a request from %s answered 503",
                self.max_requests,
                client_address[0],
            )
            _answer(
                request,
                _raw_response(
                    503,
                    "Service Unavailable",
                    {"error": "busy: too many requests in progress; retry"},
                    "Retry-After: 1\r\n",
                ),
            )
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


@dataclass
class Response:
    """One answer: status, body and its type; ``rows`` (worklist rows returned) goes to the audit event."""

    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"
    rows: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, body: object, *, rows: int | None = None, **headers: str) -> Response:
    """``body`` as indented JSON."""
    return Response(status, json.dumps(body, indent=1).encode(), rows=rows, headers=dict(headers))


#: Query parameters, each with every value given (``?priority=STAT&priority=URGENT``).
Query = dict[str, list[str]]
#: A route's handler: the path's match (its groups are the path parameters) and the query.
RouteHandler = Callable[[re.Match[str], Query], Response]


@dataclass(frozen=True)
class Route:
    """``GET`` on a path matching ``pattern`` (whole path) is answered by ``handler``."""

    pattern: re.Pattern[str]
    handler: RouteHandler
    audited: bool = True  # False: a successful answer leaves no audit event (health probes, scrapes)


def route(pattern: str, handler: RouteHandler, *, audited: bool = True) -> Route:
    return Route(re.compile(pattern), handler, audited)


class BoundedHTTP:
    """A read-only HTTP server answering ``GET`` from a route table, bounded as the module says.

    Every answered request but a successful one on an unaudited route is an audit event
    ``worklist.http`` (a line on ``triaged.audit`` and, with ``recorder``, an ``audit_events`` row):
    method, path, client address, status and the number of worklist rows returned.
    """

    def __init__(
        self,
        routes: list[Route],
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        max_requests: int = HTTP_MAX_REQUESTS,
        max_request_bytes: int = HTTP_MAX_REQUEST_BYTES,
        max_pending: int = HTTP_MAX_PENDING,
        recorder: EventRecorder | None = None,
        not_found_hint: str = "/worklist",
    ) -> None:
        table = list(routes)

        def find(path: str) -> tuple[Route, re.Match[str]] | None:
            for r in table:
                if (m := r.pattern.fullmatch(path)) is not None:
                    return r, m
            return None

        class Handler(BaseHTTPRequestHandler):
            server_version = "triaged"
            rows_returned: int | None = None  # worklist rows in this request's answer, for the audit
            quiet = False  # a successful answer on an unaudited route

            def setup(self) -> None:
                super().setup()
                self.connection.settimeout(timeout)  # bounds each write to (and read from) a slow client
                self.rfile.close()
                self.rfile = io.BytesIO(cast(_BoundedHTTPServer, self.server).take_head(self.connection))

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                parts = urlsplit(self.path)
                found = find(parts.path)
                if found is None:
                    self._send(
                        json_response(404, {"error": f"no such resource {parts.path}; try {not_found_hint}"})
                    )
                    return
                r, match = found
                try:
                    response = r.handler(match, parse_qs(parts.query, keep_blank_values=True))
                except Exception as exc:  # noqa: BLE001 - one failing page must not take the server down
                    log.exception("HTTP %s failed", parts.path[:200])
                    response = json_response(503, {"error": f"unavailable: {type(exc).__name__}"})
                self.rows_returned = response.rows
                self.quiet = not r.audited and response.status == 200
                self._send(response)

            def do_POST(self) -> None:  # noqa: N802
                self._send(json_response(405, {"error": "read-only"}))

            def _send(self, response: Response) -> None:
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                self.send_header("Content-Length", str(len(response.body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(response.body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("http %s - %s", self.address_string(), format % args)

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                """Every response (send_response and send_error call this): the audit event."""
                path = str(getattr(self, "path", "") or "").split("?", 1)[0][:200]
                status = int(code) if isinstance(code, int) else str(code)
                if self.quiet:
                    return  # a monitor's probe or a scrape every few seconds: no trail
                client = peer_text(str(self.client_address[0]), int(self.client_address[1]))
                method = str(getattr(self, "command", "") or "")[:16]
                rows = self.rows_returned
                audit(
                    "worklist.http",
                    f"HTTP {method or '?'} {path or '?'} from {client}: {status}"
                    + (f", {rows} row(s)" if rows is not None else ""),
                    peer=client,
                    recorder=recorder,
                    method=method,
                    path=path,
                    status=status,
                    rows=rows,
                )

        self._server = _BoundedHTTPServer(
            (host, port),
            Handler,
            timeout=timeout,
            max_requests=max_requests,
            max_request_bytes=max_request_bytes,
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
        log.info(
            "worklist JSON on http://%s:%s/worklist, dashboard on http://%s:%s/", *self.address, *self.address
        )

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
