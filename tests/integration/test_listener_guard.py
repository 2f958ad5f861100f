"""Slow, silent and disallowed peers do not lock real peers out (issue 12 item 2), over real sockets."""

from __future__ import annotations

import os
import select
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.conftest import make_config, require_tool
from tests.integration.conftest import storescu, wait_for
from triaged.config import Config
from triaged.daemon import Node
from triaged.ledger.rows import AuditEventRow

pytestmark = pytest.mark.integration

Address = tuple[str, int]


def _associate_rq(calling: str = "TESTSCU", called: str = "TRIAGED") -> bytes:
    """A complete A-ASSOCIATE-RQ PDU proposing Verification (PS3.8 9.3.2)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _connect(address: Address, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the node closes ``sock`` within ``seconds`` (whatever it sends first, an A-ABORT say)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            continue
        try:
            if not sock.recv(65536):
                return True
        except OSError:  # reset
            return True
    return False


@contextmanager
def _trickling(socks: list[socket.socket], interval: float) -> Iterator[None]:
    """Send one byte every ``interval`` seconds on each socket (errors ignored) while the block runs."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            for sock in socks:
                try:
                    sock.send(b"\0")
                except OSError:
                    pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _echo(
    address: Address, source: str = "127.0.0.1", tls: tuple[ssl.SSLContext, str] | None = None
) -> Association:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.connection_timeout = ae.network_timeout = 5
    return ae.associate(*address, ae_title="TRIAGED", bind_address=(source, 0), tls_args=tls)


def _events(node: Node, kind: str) -> list[AuditEventRow]:
    return [e for e in node.ledger.audit_events(kinds=["association"]) if e.kind == kind]


def _wait_for_events(node: Node, kind: str) -> list[AuditEventRow]:
    return cast(list[AuditEventRow], wait_for(lambda: _events(node, kind), 5, f"a {kind} audit row"))


def _run(args: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"}
    )
    return done, time.monotonic() - started


def test_silent_and_trickling_connections_do_not_lock_out_a_real_peer_and_are_closed_after_the_handshake_timeout(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    require_tool("echoscu")
    timeout = 3.0
    node = node_factory(
        make_config(tmp_path, listener={"max_associations": 4, "handshake_timeout_seconds": timeout})
    )
    address = node.listener.address
    silent = [_connect(address) for _ in range(20)]
    trickling = [_connect(address) for _ in range(20)]
    for sock in trickling:  # an A-ASSOCIATE-RQ header declaring 200 bytes, then a byte at a time
        sock.sendall(struct.pack(">BBL", 0x01, 0, 200))
    connected = time.monotonic()
    with _trickling(trickling, 0.5):
        echo, echo_took = _run(["echoscu", "-aet", "ECHOSCU", "-aec", "TRIAGED", *map(str, address)])
        started = time.monotonic()
        store = storescu(*address, sorted(phantom_ct_series.iterdir())[0])
        store_took = time.monotonic() - started
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert store.returncode == 0, store.stdout + store.stderr
        assert echo_took < 3 and store_took < 5, (echo_took, store_took)
        for sock in silent + trickling:
            assert _closed_within(sock, max(0.1, connected + timeout + 3 - time.monotonic()))
    assert node.ledger.studies()[0].instances == 1
    # The oldest were closed for newcomers at once, the last ones when their handshake time ran out.
    assert _events(node, "association.dropped") and _events(node, "association.timeout")
    assert "listener.handshake_timeout_seconds" in str(
        _events(node, "association.timeout")[0].detail["reason"]
    )
    for sock in silent + trickling:
        sock.close()


def test_a_disallowed_address_is_closed_at_accept_with_an_audit_row_while_an_allowed_one_works(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    node = node_factory(
        make_config(tmp_path, listener={"allowed_networks": ["127.0.0.2/32"], "max_associations": 2})
    )
    address = node.listener.address
    strangers = [_connect(address, "127.0.0.1") for _ in range(10)]
    for sock in strangers:  # closed at once, before it sends anything
        assert _closed_within(sock, 1.0)
        sock.close()
    [refused, *_] = _events(node, "association.refused")
    assert refused.peer.startswith("127.0.0.1:")
    assert "listener.allowed_networks" in str(refused.detail["reason"])
    assoc = _echo(address, "127.0.0.2")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_one_address_cannot_take_more_than_max_associations_per_address(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    node = node_factory(
        make_config(tmp_path, listener={"max_associations_per_address": 2, "max_associations": 8})
    )
    address = node.listener.address
    held = [_echo(address, "127.0.0.3") for _ in range(2)]
    assert all(a.is_established for a in held)
    third = _connect(address, "127.0.0.3")
    assert _closed_within(third, 1.0), "a third connection from the same address was accepted"
    third.close()
    refused = [e for e in _events(node, "association.refused") if e.peer.startswith("127.0.0.3:")]
    assert refused and "listener.max_associations_per_address" in str(refused[0].detail["reason"])
    other = _echo(address, "127.0.0.4")  # another address is not affected
    assert other.is_established and other.send_c_echo().Status == 0
    other.release()
    # Connections still in their handshake make room for a newcomer from their address: the oldest goes.
    waiting = [_connect(address, "127.0.0.5") for _ in range(6)]
    assert all(_closed_within(sock, 1.0) for sock in waiting[:4])
    assert not any(_closed_within(sock, 0.2) for sock in waiting[4:])
    for sock in waiting:
        sock.close()
    held[0].release()
    ours = node.listener.ae.active_associations
    wait_for(
        lambda: sum(a.is_established for a in ours if a.requestor.address == "127.0.0.3") < 2, 5, "release"
    )
    again = _echo(address, "127.0.0.3")
    assert again.is_established
    again.release()
    held[1].release()


def test_a_pdu_trickled_into_an_established_association_is_cut_after_network_timeout(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    node = node_factory(make_config(tmp_path, listener={"network_timeout": 2}))
    sock = _connect(node.listener.address)
    sock.settimeout(5)
    sock.sendall(_associate_rq())
    assert sock.recv(6)[0] == 0x02  # A-ASSOCIATE-AC
    sock.sendall(struct.pack(">BBL", 0x04, 0, 1000))  # a P-DATA-TF of 1000 bytes, sent a byte at a time
    started = time.monotonic()
    with _trickling([sock], 0.3):
        assert _closed_within(sock, 8), "a trickling peer kept its association"
    took = time.monotonic() - started
    assert 1.5 < took < 5, took
    sock.close()
    [aborted] = _wait_for_events(node, "association.aborted")
    assert aborted.detail["cause"] == "stalled" and "listener.network_timeout" in str(
        aborted.detail["reason"]
    )


def test_a_dataset_in_many_small_pdus_beyond_max_dataset_mb_is_aborted(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    node = node_factory(make_config(tmp_path, listener={"max_pdu": 16384, "max_dataset_mb": 1}))
    ds = dcmread(sorted(phantom_ct_series.iterdir())[0])
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1024, 1024, 16, 16, 15
    ds.PixelData = bytes(1024 * 1024 * 2)  # 2 MiB, in ~130 P-DATA-TF PDUs of 16 KiB
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(*node.listener.address, ae_title="TRIAGED")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assert "Status" not in status, "a dataset beyond max_dataset_mb was answered"
    wait_for(lambda: not assoc.is_established, 5, "the association to end")
    assert node.ledger.studies() == []
    [aborted] = _wait_for_events(node, "association.aborted")
    assert "listener.max_dataset_mb" in str(aborted.detail["reason"])
    # Still serving.
    again = _echo(node.listener.address)
    assert again.is_established
    again.release()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key, made by the ``openssl`` CLI."""
    require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_a_silent_tls_client_does_not_block_the_accept_loop(
    node_factory: Callable[[Config], Node], tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cert)
    timeout = 2.0
    node = node_factory(make_config(tmp_path, listener={"handshake_timeout_seconds": timeout}))
    server = node.listener._server
    assert server is not None
    server.ssl_context = server_ctx  # what listener.tls sets up; the test needs only the context
    address = node.listener.address
    silent = [_connect(address) for _ in range(3)]  # TCP only: never a ClientHello
    connected = time.monotonic()
    try:
        started = time.monotonic()
        assoc = _echo(address, tls=(client_ctx, "localhost"))
        assert assoc.is_established, "a TLS peer got no association while silent clients were connected"
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert time.monotonic() - started < 3
        plain = _echo(address)  # no TLS on a TLS listener: refused
        assert not plain.is_established
        for sock in silent:
            assert _closed_within(sock, max(0.1, connected + timeout + 3 - time.monotonic()))
    finally:
        for sock in silent:
            sock.close()
    timeouts = _events(node, "association.timeout")
    assert timeouts and "TLS handshake" in str(timeouts[0].detail["reason"])
    assert any(e.detail["cause"] == "tls" for e in _events(node, "association.refused"))
