"""Socket-level guards shared by the associations the node opens or accepts.

Options (TCP_NODELAY), and what keeps a slow, silent or greedy peer from holding the listener: the first
PDU of a connection read under a deadline, association sockets whose reads and writes cannot hang, and the
budget of connections still in their handshake (issue 12 item 2).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynetdicom.transport import AssociationSocket

if TYPE_CHECKING:
    from pynetdicom.association import Association

#: Slowest average rate a PDU may arrive at, in bytes per second, on top of ``network_timeout`` seconds of
#: grace: a 16 KiB PDU must be complete within ``network_timeout`` + 0.25 s of its first byte being asked
#: for, a 500 MiB one (``max_pdu: 0``) within ``network_timeout`` + 2 h 13 min.  0.5 Mbit/s is far below
#: any link a PACS or scanner sends over, far above a peer trickling a byte at a time to hold a slot.
MIN_PDU_RATE = 64 * 1024
#: A-ABORT PDU, source service-provider (2), without its reason/diagnostic byte (PS3.8 9.3.8).
_A_ABORT_PROVIDER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02"
#: A-ABORT reasons (PS3.8 9.3.8): not specified, invalid PDU parameter value.
ABORT_NOT_SPECIFIED = 0x00
ABORT_INVALID_PARAMETER = 0x06
_RECV_CHUNK = 64 * 1024


def set_nodelay(assoc: object) -> None:
    """Turn Nagle's algorithm off on a pynetdicom association's socket, if it has one.

    Nagle plus delayed ACK costs ~40 ms per small PDU exchange (one per C-STORE response), which makes
    transfers ~60× slower (measured with Debian's DCMTK, which leaves it on: run it with TCP_NODELAY=1).
    """
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def a_abort(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider with ``reason`` (PS3.8 9.3.8)."""
    return _A_ABORT_PROVIDER + bytes([reason])


class PduTooLongError(ConnectionError):
    """A PDU header declares more bytes than the reader accepts (its body is not read)."""

    def __init__(self, pdu_type: int, length: int, limit: int) -> None:
        super().__init__(f"PDU type 0x{pdu_type:02X} declares {length} bytes, more than the {limit} read")
        self.pdu_type = pdu_type


def read_pdu(sock: socket.socket, deadline: float, max_length: int) -> bytes:
    """Read one whole PDU, its 6-byte header (PS3.8 9.3.1) and its body, before ``deadline``.

    ``deadline`` is a :func:`time.monotonic` time; each ``recv`` waits at most until then, so a peer
    trickling a byte at a time gains nothing.  Raises :class:`TimeoutError` at the deadline,
    :class:`PduTooLongError` when the header declares more than ``max_length`` bytes (before reading
    them), :class:`ConnectionError` when the peer closes first, and what the socket raises (``ssl.SSLError``).
    """
    header = _read_exactly(sock, 6, deadline)
    pdu_type, _, length = struct.unpack(">BBL", header)
    if length > max_length:
        raise PduTooLongError(pdu_type, length, max_length)
    return bytes(header + _read_exactly(sock, length, deadline))


def _read_exactly(sock: socket.socket, nr_bytes: int, deadline: float) -> bytearray:
    data = bytearray()
    while len(data) < nr_bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{len(data)} of {nr_bytes} bytes by the deadline")
        sock.settimeout(remaining)
        chunk = sock.recv(min(nr_bytes - len(data), _RECV_CHUNK))
        if not chunk:
            raise ConnectionError("closed by the peer")
        data += chunk
    return data


def shut(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways without closing it: a thread blocked on it (a TLS handshake too) wakes.

    Calls the plain socket's ``shutdown`` on the descriptor (an :class:`ssl.SSLSocket`'s own would drop
    its TLS state under the thread using it).
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer


class GuardedSocket(AssociationSocket):
    """An accepted association's socket that a slow or silent peer cannot hold (pynetdicom's reads block).

    pynetdicom's DUL reads a PDU as two :meth:`recv` calls, the 6-byte header and then the body, each
    blocking until every byte has come, whatever its ARTIM and idle timers say.  Here each such read waits
    at most ``timeout`` seconds for any byte and must be complete within ``timeout`` + its length /
    :data:`MIN_PDU_RATE` seconds; one that is not cuts the connection (A-ABORT, then shutdown: the DUL sees
    the peer gone, Evt17) and ``report`` is told why.  Each send waits at most ``timeout`` seconds for the
    peer to take bytes.  Between PDUs pynetdicom's own idle timer (``network_timeout``) applies.

    ``prefix``: bytes read from the connection before the association existed (its A-ASSOCIATE-RQ),
    handed to the DUL first.
    """

    def __init__(
        self,
        assoc: Association,
        client_socket: socket.socket,
        *,
        prefix: bytes,
        timeout: float,
        report: Callable[[str, str], None] | None = None,
    ) -> None:
        self._prefix = bytearray(prefix)
        self._timeout = timeout
        self._cut = False
        #: ``report(cause, reason)``: told when this socket (or a reader limit on it) cuts the connection.
        self.report = report
        super().__init__(assoc, client_socket=client_socket)

    @property
    def ready(self) -> bool:
        if self._prefix and self.socket is not None:
            return True
        return super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        data = bytearray(self._prefix[:nr_bytes])
        del self._prefix[:nr_bytes]
        sock = self.socket
        if self._cut or sock is None:
            return data
        started = time.monotonic()
        deadline = started + self._timeout + (nr_bytes - len(data)) / MIN_PDU_RATE
        while len(data) < nr_bytes:
            wait = min(self._timeout, deadline - time.monotonic())
            try:
                if wait <= 0:
                    raise TimeoutError
                sock.settimeout(wait)
                chunk = sock.recv(min(nr_bytes - len(data), _RECV_CHUNK))
            except TimeoutError:
                silent = wait > 0 and wait >= self._timeout
                self.cut(
                    "stalled",
                    (
                        f"no byte for {self._timeout:g} s (listener.network_timeout) with {len(data)} of "
                        f"{nr_bytes} bytes read"
                        if silent
                        else f"{len(data)} of {nr_bytes} bytes after {time.monotonic() - started:.0f} s: slower than "
                        f"{MIN_PDU_RATE // 1024} KiB/s after {self._timeout:g} s of grace (listener.network_timeout)"
                    ),
                )
                return data
            except OSError:
                return data  # the peer is gone: the DUL sees a short read (Evt17)
            if not chunk:
                return data
            data += chunk
        return data

    def send(self, bytestream: bytes) -> None:
        if self.socket is not None:
            self.socket.settimeout(self._timeout)
        super().send(bytestream)

    def cut(self, cause: str, reason: str, abort_reason: int = ABORT_NOT_SPECIFIED) -> None:
        """Send an A-ABORT (service-provider, ``abort_reason``) and shut the connection.

        Later reads return nothing, which the DUL takes for a peer that closed (Evt17).
        """
        if self._cut:
            return
        self._cut = True
        if self.report is not None:
            self.report(cause, reason)
        sock = self.socket
        if sock is None:
            return
        try:
            sock.settimeout(1.0)  # the A-ABORT is a courtesy: a peer that does not read gets none
            sock.sendall(a_abort(abort_reason))
        except OSError:
            pass
        shut(sock)


@dataclass(eq=False)
class PendingConnection:
    """A connection accepted and not yet handed to an association (TLS handshake, A-ASSOCIATE-RQ)."""

    sock: socket.socket
    address: str
    port: int
    since: float
    handed_over: bool = False
    #: Why another thread closed it (evicted for a newcomer, listener stopping); empty while it is open.
    dropped: str = ""


class ConnectionBudget:
    """Connections still in their handshake, counted against a budget of their own, apart from associations.

    pynetdicom counts every accepted connection towards ``maximum_associations`` from the moment it is
    accepted; here a connection becomes an association only once its A-ASSOCIATE-RQ is complete, and until
    then it is one of at most ``max_pending`` pending ones.  A newcomer beyond that budget, or beyond
    ``max_per_address`` connections from its address, closes the oldest pending connection (from that
    address for the latter) instead of being refused: a real peer sends its request within milliseconds,
    a silent one is the oldest.  Only when every connection from the address is an association already is
    the newcomer refused.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[PendingConnection] = []

    def admit(
        self,
        sock: socket.socket,
        address: str,
        port: int,
        *,
        max_pending: int,
        max_per_address: int,
        associated: int,
    ) -> tuple[PendingConnection | None, list[PendingConnection]]:
        """Register a new connection: (its entry, or None when it is refused; the connections closed for it).

        ``associated``: associations from ``address`` now.  The closed connections are shut down here
        (their threads wake and end); the caller logs them.
        """
        dropped: list[PendingConnection] = []
        with self._lock:
            from_address = [p for p in self._pending if p.address == address]
            if associated + len(from_address) >= max_per_address:
                waiting = [p for p in from_address if not p.handed_over]
                if not waiting:
                    return None, []
                dropped.append(
                    self._drop(
                        waiting[0],
                        f"closed for a newer connection from {address}: "
                        f"{max_per_address} per address at most",
                    )
                )
            waiting = [p for p in self._pending if not p.handed_over]
            if len(waiting) >= max_pending:
                dropped.append(
                    self._drop(
                        waiting[0],
                        f"closed for a newer connection: {max_pending} "
                        "connections at most may be in their handshake",
                    )
                )
            entry = PendingConnection(sock, address, port, time.monotonic())
            self._pending.append(entry)
        return entry, dropped

    def _drop(self, entry: PendingConnection, why: str) -> PendingConnection:
        # Under the lock: the owner closes the socket only after finish() took it out of the list, so the
        # descriptor shut here cannot have been reused by another connection.
        self._pending.remove(entry)
        entry.dropped = why
        shut(entry.sock)
        return entry

    def replace_socket(self, entry: PendingConnection, sock: socket.socket) -> bool:
        """The connection's socket is now ``sock`` (TLS-wrapped); False: it was dropped meanwhile."""
        with self._lock:
            entry.sock = sock
            if entry.dropped:
                shut(sock)
                return False
            return True

    def hand_over(self, entry: PendingConnection) -> bool:
        """The connection is becoming an association; False: it was dropped meanwhile (do not use it)."""
        with self._lock:
            if entry.dropped:
                return False
            entry.handed_over = True
            return True

    def finish(self, entry: PendingConnection) -> None:
        """The connection is no longer pending (an association, or closed by its owner after this call)."""
        with self._lock:
            if entry in self._pending:
                self._pending.remove(entry)

    def drop_all(self, why: str) -> None:
        """Shut every pending connection (the listener stops)."""
        with self._lock:
            for entry in [p for p in self._pending if not p.handed_over]:
                self._drop(entry, why)

    def pending(self) -> int:
        with self._lock:
            return sum(1 for p in self._pending if not p.handed_over)
