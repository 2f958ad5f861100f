"""The receiver's memory stays bounded before and after association (issue 12 item 3), over real sockets."""

from __future__ import annotations

import socket
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.conftest import make_config
from triaged.config import Config
from triaged.daemon import Node
from triaged.net.scp import STATUS_DATASET_TOO_LARGE

pytestmark = pytest.mark.integration

_MIB = 1024 * 1024


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS (the node under test runs in it) and return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    return _status_bytes("VmRSS")


def _peak_rss() -> int:
    """The highest resident set size since :func:`_reset_peak_rss`, in bytes."""
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def _flood(address: tuple[str, int], header: bytes, total: int) -> tuple[int, bool]:
    """Send ``header`` then up to ``total`` zero bytes; (bytes sent, whether the node closed the connection)."""
    chunk = bytes(_MIB)
    sent = 0
    with socket.create_connection(address, timeout=5) as conn:
        try:
            conn.sendall(header)
            while sent < total:
                conn.sendall(chunk)
                sent += len(chunk)
        except OSError:  # reset or broken pipe: the node hung up while we were sending
            return sent, True
        try:
            while conn.recv(65536):  # an A-ABORT may come first, then the end of the stream
                pass
        except TimeoutError:
            return sent, False  # still open, still reading our zeros
        except OSError:
            return sent, True
        return sent, True


def test_an_associate_request_declaring_4_gb_is_cut_off_before_its_body_is_read(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    node = node_factory(make_config(tmp_path))
    before = _reset_peak_rss()
    # A-ASSOCIATE-RQ (type 0x01) declaring 0xFFFFFFFF bytes, then 128 MiB of zeros.
    _sent, closed = _flood(node.listener.address, struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF), 128 * _MIB)
    grown = _peak_rss() - before
    assert grown < 50 * _MIB, f"peak RSS grew by {grown / _MIB:.0f} MiB"
    assert closed, "the node kept reading an A-ASSOCIATE-RQ declaring 4 GB"
    # A P-DATA-TF above the advertised maximum PDU is cut off as well (here before any association).
    assert _flood(node.listener.address, struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF), 8 * _MIB)[1]
    # Still serving.
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(*node.listener.address, ae_title="TRIAGED")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def _deflated_file(path: Path, ds: Dataset, pixel_bytes: int) -> Path:
    """``ds`` plus ``pixel_bytes`` of zero Pixel Data, Deflated Explicit VR LE, written without holding it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [
        deflater.compress(body.getvalue() + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<L", pixel_bytes))
    ]
    zeros = bytes(_MIB)
    for start in range(0, pixel_bytes, _MIB):
        parts.append(deflater.compress(zeros[: min(_MIB, pixel_bytes - start)]))
    parts.append(deflater.flush())
    path.write_bytes(b"\0" * 128 + b"DICM" + head.getvalue() + b"".join(parts))
    return path


def _ct_header(phantom_ct_series: Path, rows: int, cols: int) -> Dataset:
    ds = dcmread(sorted(phantom_ct_series.iterdir())[0], stop_before_pixels=True)
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = rows, cols, 16, 1
    ds.pop("NumberOfFrames", None)
    return ds


def _store_files(node: Node, files: list[Path], syntax: str) -> list[int]:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate(*node.listener.address, ae_title="TRIAGED")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True  # the bytes go as written, not re-encoded by pynetdicom
    try:
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()


def test_a_deflate_bomb_is_refused_without_inflating_it_and_only_its_head_is_quarantined(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    node = node_factory(make_config(tmp_path, listener={"max_dataset_mb": 8}))
    # 256 MiB of Pixel Data deflate to ~250 KiB; 4096 × 32768 × 16 bits declares exactly that.
    bomb = _deflated_file(tmp_path / "bomb.dcm", _ct_header(phantom_ct_series, 4096, 32768), 256 * _MIB)
    assert bomb.stat().st_size < _MIB
    before = _reset_peak_rss()
    started = time.monotonic()
    statuses = _store_files(node, [bomb], DeflatedExplicitVRLittleEndian)
    grown = _peak_rss() - before
    assert grown < 64 * _MIB, f"peak RSS grew by {grown / _MIB:.0f} MiB"
    assert statuses == [STATUS_DATASET_TOO_LARGE]
    assert time.monotonic() - started < 30
    [(path, reason)] = list(node.spool.quarantined())
    assert "0xC217" in reason and "max_dataset_mb" in reason
    assert path.stat().st_size <= 64 * 1024
    assert node.ledger.studies() == []


def test_ordinary_stores_pass_the_limits(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> None:
    # A small advertised PDU (the P-DATA-TF limit follows it) and a small dataset limit.
    node = node_factory(make_config(tmp_path, listener={"max_pdu": 16384, "max_dataset_mb": 8}))
    rows, cols = 512, 512
    deflated = _deflated_file(tmp_path / "ok.dcm", _ct_header(phantom_ct_series, rows, cols), rows * cols * 2)
    assert _store_files(node, [deflated], DeflatedExplicitVRLittleEndian) == [0]
    native = dcmread(sorted(phantom_ct_series.iterdir())[1])
    native.SOPInstanceUID = generate_uid()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(*node.listener.address, ae_title="TRIAGED")
    assert assoc.is_established
    assert assoc.send_c_store(native).Status == 0
    assoc.release()
    assert node.ledger.studies()[0].instances == 2
    assert list(node.spool.quarantined()) == []
