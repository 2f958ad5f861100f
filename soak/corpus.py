"""Malformed inputs and connection attacks, generated from a seed, sent over raw sockets.

Every case returns an outcome word: ``0xNNNN`` (the C-STORE status the node answered), ``A-ABORT``,
``A-ASSOCIATE-RJ``, ``closed`` (the node hung up), ``no answer`` (nothing within the read timeout) or
``accepted`` (an association request that was accepted, then released).
"""

from __future__ import annotations

import copy
import random
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

from soak.node import NODE_AE, VERIFICATION
from soak.senders import CT_IMAGE_STORAGE

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
DEFLATED, JPEG_LOSSLESS = "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.70"
#: Presentation context IDs of :func:`associate_rq` (odd numbers, PS3.8 9.3.2.2).
CX_EXPLICIT, CX_DEFLATED, CX_IMPLICIT, CX_JPEG, CX_ECHO = 1, 3, 5, 7, 9
CONTEXTS = [
    (CX_EXPLICIT, CT_IMAGE_STORAGE, EXPLICIT),
    (CX_DEFLATED, CT_IMAGE_STORAGE, DEFLATED),
    (CX_IMPLICIT, CT_IMAGE_STORAGE, IMPLICIT),
    (CX_JPEG, CT_IMAGE_STORAGE, JPEG_LOSSLESS),
    (CX_ECHO, VERIFICATION, IMPLICIT),
]
READ_TIMEOUT = 2.0
_MIB = 1024 * 1024


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(called: str = NODE_AE, calling: str = "SOAKRAW", max_pdu: int = 65536) -> bytes:
    """A valid A-ASSOCIATE-RQ proposing :data:`CONTEXTS`."""
    pcs = b"".join(
        _item(0x20, bytes([cid, 0, 0, 0]) + _item(0x30, syntax.encode()) + _item(0x40, ts.encode()))
        for cid, syntax, ts in CONTEXTS
    )
    user = _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    body = (
        struct.pack(">HH", 1, 0)
        + called.encode().ljust(16)
        + calling.encode().ljust(16)
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + pcs
        + user
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _element(group: int, elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", group, elem, len(value)) + value


def store_command(sop_class: str, sop_uid: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian, as PS3.7 requires)."""
    rest = (
        _element(0, 0x0002, sop_class.encode())
        + _element(0, 0x0100, struct.pack("<H", 1))
        + _element(0, 0x0110, struct.pack("<H", message_id))
        + _element(0, 0x0700, struct.pack("<H", 0))
        + _element(0, 0x0800, struct.pack("<H", 0))
        + _element(0, 0x1000, sop_uid.encode())
    )
    return _element(0, 0x0000, struct.pack("<I", len(rest))) + rest


def p_data(cid: int, payload: bytes, *, command: bool, max_pdv: int = 16000) -> bytes:
    """``payload`` as P-DATA-TF PDUs, one PDV each, the last fragment flagged."""
    out = []
    chunks = [payload[i : i + max_pdv] for i in range(0, len(payload), max_pdv)] or [b""]
    for n, chunk in enumerate(chunks):
        flags = (1 if command else 0) | (2 if n == len(chunks) - 1 else 0)
        pdv = struct.pack(">IBB", len(chunk) + 2, cid, flags) + chunk
        out.append(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
    return b"".join(out)


def encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    head = _read_exact(sock, 6)
    if head is None:
        return None
    kind, _, length = struct.unpack(">BBI", head)
    if length > 4 * _MIB:
        raise ValueError(f"node sent a PDU declaring {length} bytes")
    body = _read_exact(sock, length)
    return None if body is None else (kind, body)


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _status(body: bytes) -> int | None:
    """The Status (0000,0900) of a command set inside a P-DATA-TF body."""
    pos, payload = 0, b""
    while pos + 6 <= len(body):
        (length,) = struct.unpack(">I", body[pos : pos + 4])
        payload += body[pos + 6 : pos + 4 + length]
        pos += 4 + length
    i = 0
    while i + 8 <= len(payload):
        group, elem, length = struct.unpack("<HHI", payload[i : i + 8])
        if (group, elem) == (0, 0x0900):
            return int(struct.unpack("<H", payload[i + 8 : i + 10])[0])
        i += 8 + length
    return None


def _answer(sock: socket.socket) -> str:
    """The node's answer to what was just sent, as an outcome word."""
    try:
        while True:
            pdu = _read_pdu(sock)
            if pdu is None:
                return "closed"
            kind, body = pdu
            if kind == 0x02:
                return "accepted"
            if kind == 0x03:
                return "A-ASSOCIATE-RJ"
            if kind == 0x07:
                return "A-ABORT"
            if kind == 0x04:
                status = _status(body)
                if status is not None:
                    return f"0x{status:04X}"
            if kind == 0x06:
                return "released"
    except TimeoutError:
        return "no answer"
    except (ConnectionError, OSError, ValueError):
        return "closed"


def _connect(port: int, source: str | None = None) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(READ_TIMEOUT)
    if source:
        sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _release(sock: socket.socket) -> None:
    try:
        sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))
        _answer(sock)
    except OSError:
        pass


def raw_store(
    port: int,
    cid: int,
    sop_uid: str,
    body: bytes,
    *,
    command: bytes | None = None,
    stream: bytes | None = None,
    cut: int | None = None,
) -> str:
    """Associate, C-STORE ``body`` on context ``cid`` and return the outcome word.

    ``stream`` replaces the whole P-DATA byte stream (for mutated framing); ``cut`` sends only its first
    ``cut`` bytes, then closes the connection.
    """
    try:
        sock = _connect(port)
    except OSError:
        return "refused"
    with sock:
        try:
            sock.sendall(associate_rq())
            if (outcome := _answer(sock)) != "accepted":
                return outcome
            data = (
                stream
                if stream is not None
                else (
                    p_data(cid, command or store_command(CT_IMAGE_STORAGE, sop_uid), command=True)
                    + p_data(cid, body, command=False)
                )
            )
            if cut is not None:
                sock.sendall(data[:cut])
                return "cut"
            sock.sendall(data)
            outcome = _answer(sock)
            if outcome.startswith("0x"):
                _release(sock)
            return outcome
        except OSError:
            return "closed"


def raw_bytes(port: int, data: bytes, *, source: str | None = None, then_close: bool = False) -> str:
    """Send ``data`` on a fresh connection (optionally from ``source``) and return the outcome word."""
    try:
        sock = _connect(port, source)
    except OSError:
        return "refused"
    with sock:
        try:
            sock.sendall(data)
            if then_close:
                return "cut"
            outcome = _answer(sock)
            if outcome == "accepted":
                _release(sock)
            return outcome
        except OSError:
            return "closed"


def flood(port: int, header: bytes, total: int) -> str:
    """``header`` then up to ``total`` zero bytes: ``closed`` when the node hung up before the end."""
    try:
        sock = _connect(port)
    except OSError:
        return "refused"
    chunk = bytes(_MIB)
    with sock:
        try:
            sock.sendall(header)
            for _ in range(total // _MIB):
                sock.sendall(chunk)
        except OSError:
            return "closed"
        return _answer(sock)


def hold(port: int, count: int, *, data: bytes = b"", source: str | None = None) -> list[socket.socket]:
    """``count`` connections that send ``data`` (or nothing) and then wait; the caller closes them."""
    held = []
    for _ in range(count):
        try:
            sock = _connect(port, source)
            if data:
                sock.sendall(data)
            held.append(sock)
        except OSError:
            break
    return held


def closed_by_node(sock: socket.socket, within: float) -> bool:
    """Whether the node closes ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def deflate_bomb(ds: Dataset, pixel_bytes: int) -> bytes:
    """``ds`` with ``pixel_bytes`` of zero Pixel Data, deflated: a few hundred KiB that inflate hugely."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(encode(ds) + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<L", pixel_bytes))]
    zeros = bytes(_MIB)
    for start in range(0, pixel_bytes, _MIB):
        parts.append(deflater.compress(zeros[: min(_MIB, pixel_bytes - start)]))
    parts.append(deflater.flush())
    return b"".join(parts)


def mutate(data: bytes, rng: random.Random, start: int = 0) -> bytes:
    """``data`` with 1-8 random bytes (at or after ``start``) replaced by random values."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(start, len(out))] = rng.randrange(256)
    return bytes(out)


@dataclass
class Case:
    """One input: its category, whether it is a known-bad input that must never get Success, and how to send it."""

    category: str
    must_refuse: bool
    send: Callable[[int], str]
    #: For a store: the SOP Instance UID and the dataset bytes, to check a copy the node acknowledged.
    sop_uid: str = ""
    body: bytes = b""


def fresh(template: Dataset, tag: str, *, series: str | None = None) -> Dataset:
    """A copy of ``template`` with new UIDs derived from ``tag`` (its own study and series)."""
    ds = copy.deepcopy(template)
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[tag, "study"])
    ds.SeriesInstanceUID = series or generate_uid(entropy_srcs=[tag, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, "sop"])
    return ds


def uid_with_newline(ds: Dataset, tag: str) -> tuple[str, bytes]:
    """``ds`` encoded with a SOP Instance UID that ends in a line feed (the padding byte replaced)."""
    uid = str(generate_uid(entropy_srcs=[tag, "nl"]))
    if len(uid) % 2 == 0:
        uid = uid[:-1]
    ds.SOPInstanceUID = uid
    body = encode(ds)
    marker = (
        struct.pack("<HH", 0x0008, 0x0018) + b"UI" + struct.pack("<H", len(uid) + 1) + uid.encode() + b"\0"
    )
    return uid + "\n", body.replace(marker, marker[:-1] + b"\n", 1)


def build(template: Dataset, seed: int, mutations: int) -> list[Case]:
    """The deterministic corpus: the named attacks of issue 12, then ``mutations`` random mutations."""
    rng = random.Random(seed)
    cases: list[Case] = []
    n = iter(range(10**6))

    def tag() -> str:
        return f"soak-{seed}-{next(n)}"

    def store_case(
        category: str,
        cid: int,
        ds: Dataset,
        body: bytes | None = None,
        uid: str | None = None,
        must_refuse: bool = True,
    ) -> Case:
        data = encode(ds) if body is None else body
        sop = uid or str(ds.SOPInstanceUID)
        return Case(category, must_refuse, partial(raw_store, cid=cid, sop_uid=sop, body=data), sop, data)

    rq = associate_rq()
    for size in (0xFFFFFFFF, 0x7FFFFFFF):  # association PDUs declaring gigabytes, then 32 MiB of zeros
        head = struct.pack(">BBL", 0x01, 0, size)
        cases.append(Case("huge PDU length", True, partial(flood, header=head, total=32 * _MIB)))
    head = struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF)
    cases.append(Case("huge PDU length", True, partial(flood, header=head, total=8 * _MIB)))
    cases.append(
        Case(
            "huge PDU length",
            True,
            partial(
                raw_store,
                cid=CX_EXPLICIT,
                sop_uid="1.2.3",
                body=b"",
                stream=struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + bytes(_MIB),
            ),
        )
    )
    for _ in range(10):  # an association request cut anywhere, then the connection closed
        cut = rng.randrange(1, len(rq))
        cases.append(Case("truncated PDU", True, partial(raw_bytes, data=rq[:cut], then_close=True)))
    for _ in range(6):  # a store cut anywhere in its P-DATA, then the connection closed
        ds = fresh(template, tag())
        stream = p_data(
            CX_EXPLICIT, store_command(CT_IMAGE_STORAGE, ds.SOPInstanceUID), command=True
        ) + p_data(CX_EXPLICIT, encode(ds), command=False)
        cut = rng.randrange(1, len(stream))
        cases.append(
            Case(
                "truncated PDU",
                True,
                partial(raw_store, cid=CX_EXPLICIT, sop_uid="", body=b"", stream=stream, cut=cut),
            )
        )
    for _ in range(4):  # the dataset ends exactly at the Pixel Data tag
        ds = fresh(template, tag())
        body = encode(ds)
        cases.append(
            store_case("cut at Pixel Data", CX_EXPLICIT, ds, body[: body.index(b"\xe0\x7f\x10\x00")])
        )
    bomb_ds = fresh(template, tag())
    bomb_ds.Rows, bomb_ds.Columns = 4096, 8192  # 64 MiB of 16-bit pixels: beyond max_dataset_mb
    del bomb_ds.PixelData
    bomb = deflate_bomb(bomb_ds, 64 * _MIB)
    for _ in range(3):
        cases.append(store_case("Deflate bomb", CX_DEFLATED, bomb_ds, bomb))
    for _ in range(3):  # Implicit VR bytes on an Explicit VR context, Explicit bytes on a JPEG context
        ds = fresh(template, tag())
        cases.append(store_case("wrong transfer syntax bytes", CX_EXPLICIT, ds, encode(ds, implicit=True)))
        ds = fresh(template, tag())
        cases.append(store_case("wrong transfer syntax bytes", CX_JPEG, ds))
    for _ in range(4):
        ds = fresh(template, tag())
        uid, body = uid_with_newline(ds, tag())
        cases.append(store_case("UID with newline", CX_EXPLICIT, ds, body, uid))
    for _ in range(3):  # one SOP Instance UID in two series: the first is stored, the second refused
        first = fresh(template, tag())
        second = copy.deepcopy(first)
        second.SeriesInstanceUID = generate_uid(entropy_srcs=[tag(), "other-series"])
        cases.append(store_case("SOP UID in two series", CX_EXPLICIT, first, must_refuse=False))
        cases.append(store_case("SOP UID in two series", CX_EXPLICIT, second))
    for modality in ("MR", "SR", "PT"):  # not CT and no pixel data
        ds = fresh(template, tag())
        ds.Modality = modality
        del ds.PixelData
        cases.append(store_case("non-CT without pixel data", CX_EXPLICIT, ds))
    for source in ("127.0.0.2", "127.0.0.3", "127.9.9.9"):
        cases.append(Case("disallowed address", True, partial(raw_bytes, data=rq, source=source)))
    for _ in range(mutations):
        what = rng.random()
        if what < 0.3:  # the association request
            data = mutate(rq, rng)
            cases.append(Case("mutated A-ASSOCIATE-RQ", False, partial(raw_bytes, data=data)))
        elif what < 0.45:  # the command set (PDU and PDV headers intact)
            ds = fresh(template, tag())
            command = mutate(store_command(CT_IMAGE_STORAGE, ds.SOPInstanceUID), rng)
            data = encode(ds)
            cases.append(
                Case(
                    "mutated P-DATA command",
                    False,
                    partial(
                        raw_store, cid=CX_EXPLICIT, sop_uid=str(ds.SOPInstanceUID), body=data, command=command
                    ),
                )
            )
        elif what < 0.5:  # the P-DATA framing itself
            ds = fresh(template, tag())
            stream = p_data(
                CX_EXPLICIT, store_command(CT_IMAGE_STORAGE, ds.SOPInstanceUID), command=True
            ) + p_data(CX_EXPLICIT, encode(ds), command=False)
            stream = mutate(stream[:64], rng) + stream[64:]
            cases.append(
                Case(
                    "mutated P-DATA framing",
                    False,
                    partial(raw_store, cid=CX_EXPLICIT, sop_uid="", body=b"", stream=stream),
                )
            )
        else:  # the dataset bytes; the SOP Instance UID is kept so an accepted copy can be checked
            ds = fresh(template, tag())
            data = mutate(encode(ds), rng)
            cases.append(store_case("mutated dataset", CX_EXPLICIT, ds, data, must_refuse=False))
    return cases


def timed(fn: Callable[[], str]) -> tuple[str, float]:
    started = time.monotonic()
    return fn(), time.monotonic() - started
