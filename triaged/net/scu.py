"""C-STORE sender (PS3.4 B.2) with a status per instance.

Used by ``triaged selftest`` and the bench to act as a modality, and by dispatch to return results.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from triaged.config.schema import DestinationTLSConfig
from triaged.errors import DispatchError
from triaged.net.tcp import set_nodelay
from triaged.net.tls import ClientContext, client_context, describe

log = logging.getLogger(__name__)

#: 128 KiB PDUs: pynetdicom's sweet spot on loopback and gigabit links.
SCU_MAX_PDU = 131072


@dataclass(frozen=True)
class SendResult:
    """What the peer answered for one instance (``status`` None: no answer, e.g. association lost)."""

    path: str
    sop_instance_uid: str
    status: int | None
    comment: str = ""

    @property
    def ok(self) -> bool:
        # PS3.4 B.2.3: 0xB000, 0xB007, 0xB006 are warnings, the instance was stored.
        return self.status is not None and (self.status == 0 or (self.status & 0xF000) == 0xB000)


class StopSignal:
    """A stop request shared between threads that also cuts the associations it watches.

    :func:`send_files` checks it between objects and registers its association with it as soon as the
    TCP connection is open; :meth:`set` then closes that connection, so a sender waiting for a peer that
    never answers (association negotiation or a C-STORE response) returns at once instead of after the
    ACSE/DIMSE timeout.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._open: set[Association] = set()

    def set(self) -> None:
        """Request the stop and cut every watched association."""
        with self._lock:
            self._event.set()
            cut = list(self._open)
        for assoc in cut:
            _cut(assoc)

    def is_set(self) -> bool:
        return self._event.is_set()

    def watch(self, assoc: Association) -> None:
        """Cut ``assoc`` when the stop is requested (at once if it already was)."""
        with self._lock:
            if not self._event.is_set():
                self._open.add(assoc)
                return
        _cut(assoc)

    def unwatch(self, assoc: Association) -> None:
        with self._lock:
            self._open.discard(assoc)


def _cut(assoc: Association) -> None:
    """Close the association's transport: pynetdicom then wakes whoever waits for the peer (A-P-ABORT)."""
    sock = assoc.dul.socket
    if sock is not None:
        log.info("stop requested: closing the association with %s", assoc.acceptor.ae_title)
        sock.close()


def _tls_args(
    tls: DestinationTLSConfig | None, host: str, port: int, called_ae: str
) -> tuple[ClientContext, str] | None:
    """pynetdicom's ``tls_args`` for ``tls`` (None: plain TCP); unusable files: a retryable DispatchError."""
    if tls is None or not tls.enabled:
        return None
    try:
        context = client_context(tls)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; an encrypted key a ValueError
        raise DispatchError(f"TLS setup for {called_ae}@{host}:{port} failed: {exc}") from exc
    return context, tls.server_hostname or host


def _not_established(
    tls: tuple[ClientContext, str] | None, host: str, port: int, called_ae: str
) -> DispatchError:
    """Why no association: the TLS handshake's own error when that is what failed."""
    if tls is not None and tls[0].handshake_error is not None:
        return DispatchError(
            f"TLS handshake with {called_ae}@{host}:{port} failed: {describe(tls[0].handshake_error)}"
        )
    return DispatchError(f"no association with {called_ae}@{host}:{port} (rejected, aborted or unreachable)")


def echo(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "TRIAGED_SCU",
    timeout: float = 10,
    *,
    tls: DestinationTLSConfig | None = None,
) -> int:
    """C-ECHO a peer (over TLS with ``tls``); returns the status or raises :class:`DispatchError`."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    tls_args = _tls_args(tls, host, port, called_ae)
    if tls_args is not None:
        ae.connection_timeout = timeout  # the TLS handshake runs inside connect()
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        raise _not_established(tls_args, host, port, called_ae)
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else -1
    finally:
        assoc.release()


def send_files(
    paths: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "TRIAGED",
    timeout: float = 30,
    *,
    on_result: Callable[[SendResult], None] | None = None,
    stop: StopSignal | None = None,
    tls: DestinationTLSConfig | None = None,
) -> list[SendResult]:
    """Send DICOM files on one association, proposing each file's own transfer syntax.

    ``on_result`` is called with each instance's :class:`SendResult` as soon as the peer answers it (or
    the association is found lost), before the next instance is sent, so a caller can record every
    acknowledgement durably as it comes.  ``stop``, when set, ends the association at once (see
    :class:`StopSignal`); instances not sent by then get no call and a ``None`` status in the list.
    ``tls`` (a destination's ``tls`` block) connects with DICOM TLS; ``timeout`` then bounds the handshake.

    Raises :class:`DispatchError` (retryable) when no association could be established; a failed TLS
    handshake says so, with OpenSSL's reason (``TLS handshake with PACS@host:port failed: certificate
    verify failed: ...``).
    """
    headers: list[tuple[Path, Dataset]] = [(p, dcmread(p, stop_before_pixels=True)) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = SCU_MAX_PDU
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in headers})
    if len(contexts) > 128:
        raise DispatchError("more than 128 presentation contexts needed", retryable=False)
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, [ts])
    handlers: list[tuple[evt.EventType, Callable[..., Any]] | tuple[evt.EventType, Callable[..., Any], list[Any]]]
    handlers = [(evt.EVT_CONN_OPEN, lambda event: stop.watch(event.assoc))] if stop is not None else []
    tls_args = _tls_args(tls, host, port, called_ae)
    if tls_args is not None:
        ae.connection_timeout = timeout  # the TLS handshake runs inside connect(): bound it too
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=handlers, tls_args=tls_args)
    try:
        if stop is not None and stop.is_set():
            raise DispatchError(f"stop requested while associating with {called_ae}@{host}:{port}")
        if not assoc.is_established:
            raise _not_established(tls_args, host, port, called_ae)
        set_nodelay(assoc)
        results: list[SendResult] = []
        for path, hdr in headers:
            sop = str(hdr.SOPInstanceUID)
            if stop is not None and stop.is_set():
                results.append(SendResult(str(path), sop, None, "stop requested"))
                continue
            if not assoc.is_established:
                result = SendResult(str(path), sop, None, "association lost")
            else:
                rsp = assoc.send_c_store(path)
                if stop is not None and stop.is_set() and "Status" not in rsp:
                    results.append(SendResult(str(path), sop, None, "stop requested"))
                    continue
                status = int(rsp.Status) if "Status" in rsp else None
                result = SendResult(str(path), sop, status, str(rsp.get("ErrorComment", "")))
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        if stop is not None:
            stop.unwatch(assoc)
        if assoc.is_established:
            assoc.release()
    return results
