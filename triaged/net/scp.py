"""The DICOM listener: C-ECHO and C-STORE (PS3.4 Annex A and B) on pynetdicom.

The C-STORE handler validates, writes the encoded dataset durably to the spool, records it in the
ledger and only then answers Success; anything slow (header parsing of whole studies, pixel decoding,
analysis) happens elsewhere.  Status codes are listed in ``docs/conformance.md``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.valuerep import VR
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from triaged.config import ListenerConfig, sop_class_uids
from triaged.domain import CT_SOP_CLASSES, InstanceRecord, StoreOutcome, validate_uid
from triaged.errors import InvalidDatasetError, StorageError
from triaged.net.tcp import set_nodelay
from triaged.net.worklist import STUDY_ROOT_FIND, ThrottledWarning, WorklistFind

log = logging.getLogger(__name__)

#: Transfer syntaxes accepted for storage; pixel data is decoded only when a volume is loaded.
STORAGE_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
]

# C-STORE status codes (PS3.4 B.2.3; the 0xC2xx values are ours within the "Cannot understand" range).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_INVALID_UID = 0xC210
STATUS_UNDECODABLE = 0xC211
STATUS_INSTANCE_MISMATCH = 0xC212
STATUS_TRUNCATED_PIXELS = 0xC213
STATUS_UID_CONFLICT = 0xC214
STATUS_MISSING_PIXELS = 0xC215
STATUS_ENCODING_MISMATCH = 0xC216
STATUS_DATASET_TOO_LARGE = 0xC217

#: Largest A-ASSOCIATE-RQ (or any PDU other than P-DATA-TF) read: presentation contexts and user
#: information only (128 contexts with a dozen transfer syntaxes each plus a user identity token stay
#: well under it); a peer declaring more is cut off before its bytes are read (PS3.8 9.3).
MAX_ASSOCIATE_PDU = 256 * 1024
_P_DATA_TF = 0x04
_PDU_HEADER = 6
#: How much of a refused oversize dataset the quarantine keeps (enough to see who sent what).
_QUARANTINE_HEAD = 64 * 1024
_INFLATE_CHUNK = 1 << 20

_UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_VRS = frozenset(v.value.encode("ascii") for v in VR)
_UNDEFINED_LENGTH = 0xFFFFFFFF

# Error Comments go to the peer: short and fixed, never a path, a UID of ours or a database message
# (the details go to our log and the quarantine's reason file).
_COMMENT_OUT_OF_RESOURCES = "cannot store now; retry later"


class InstanceStore(Protocol):
    """Where received bytes go (:class:`triaged.spool.Spool`); adapters do not import each other."""

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str: ...
    def absolute(self, rel_path: str) -> Path: ...
    def store_instance(self, rel_path: str, data: bytes) -> StoredFileLike: ...
    def quarantine(self, data: bytes, reason: str, origin: str) -> Path | None: ...


class StoredFileLike(Protocol):
    @property
    def sha256(self) -> str: ...


class InstanceRecorder(Protocol):
    """The ledger's part in receiving (:class:`triaged.ledger.Ledger`)."""

    def open_association(
        self, *, calling_ae: str, called_ae: str, peer_address: str, peer_port: int,
        accepted: bool = True, reject_reason: str = "",
    ) -> int: ...
    def close_association(self, association_id: int, *, instances: int, bytes: int, failures: int,
                          aborted: bool) -> None: ...
    def hierarchy_conflict(self, study_uid: str, series_uid: str, sop_uid: str) -> str | None: ...
    def record_instance(self, rec: InstanceRecord, *, association_id: int | None,
                        now: datetime | None = None) -> StoreOutcome: ...


@dataclass
class _AssocStats:
    ledger_id: int | None
    instances: int = 0
    bytes: int = 0
    failures: int = 0
    started: float = field(default_factory=time.monotonic)


class _Refusal(Exception):
    """A permanent refusal: ``comment`` goes to the peer, ``detail`` (default: the comment) to our log."""

    def __init__(self, status: int, comment: str, detail: str = "") -> None:
        super().__init__(detail or comment)
        self.status = status
        self.comment = comment
        self.detail = detail or comment


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds


class StoreService:
    """Event handlers of the listener; dependencies come in through the constructor.

    Parameters
    ----------
    spool, ledger
        Where instances are written and recorded.
    config
        The listener section; swapped by :meth:`reload` on SIGHUP (access rules take effect for new
        associations; the AE title and storage classes need a restart: the AE and its presentation
        contexts are fixed when the listener starts).
    """

    def __init__(self, spool: InstanceStore, ledger: InstanceRecorder, config: ListenerConfig) -> None:
        self.spool = spool
        self.ledger = ledger
        self._config = config
        self._ae_title = config.ae_title  # the listener's AE title: the one called AE title accepted
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self._limit_refusals = ThrottledWarning(log)  # a flood at the association limit: a line a second

    def reload(self, config: ListenerConfig) -> None:
        self._config = config

    # -- association level -------------------------------------------------------------------
    def on_conn_open(self, event: evt.Event) -> None:
        set_nodelay(event.assoc)
        limit_pdu_reads(event.assoc, self._config.max_dataset_mb * 1024 * 1024)

    def access_refusal(
        self, calling_ae: str, address: str, called_ae: str | None = None
    ) -> tuple[int, int, int, str] | None:
        """(result, source, diagnostic, reason) of an A-ASSOCIATE-RJ for a stranger, else None (PS3.8 9.3.4).

        ``called_ae`` is the AE title the peer called; None: not known (yet), not checked.
        """
        cfg = self._config
        if cfg.allowed_networks:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                ip = None
            if ip is None or not any(ip in ipaddress.ip_network(n, strict=False) for n in cfg.allowed_networks):
                # PS3.8 has no diagnostic for addresses: rejected-permanent, service-user, no reason given.
                return (0x01, 0x01, 0x01, f"source address {address} is not in listener.allowed_networks")
        if cfg.allowed_calling_aes and calling_ae not in cfg.allowed_calling_aes:
            return (0x01, 0x01, 0x03, f"calling AE title {calling_ae!r} is not in listener.allowed_calling_aes")
        if called_ae is not None and not cfg.accept_any_called_ae and called_ae != self._ae_title:
            # rejected-permanent, service-user, called-AE-title-not-recognized
            ours = self._ae_title
            reason = f"called AE title {called_ae!r} is not {ours!r} (listener.accept_any_called_ae is off)"
            return (0x01, 0x01, 0x07, reason)
        return None

    def find_allowed(self, calling_ae: str) -> bool:
        """Whether ``calling_ae`` may query the worklist (Study Root C-FIND): it is in find_allowed_aes."""
        return calling_ae in self._config.find_allowed_aes

    def _gate_find(self, assoc: Association, calling_ae: str) -> None:
        """Withdraw the Study Root FIND context from this association unless ``calling_ae`` may query.

        Negotiation follows EVT_REQUESTED: the peer sees the context rejected (abstract syntax not
        supported), so no query of its reaches the worklist; Verification and Storage stay available.
        """
        if self.find_allowed(calling_ae):
            return
        supported = assoc.acceptor.supported_contexts
        kept = [cx for cx in supported if cx.abstract_syntax != STUDY_ROOT_FIND]
        if len(kept) == len(supported):
            return  # the listener offers no C-FIND (worklist.c_find: false)
        assoc.acceptor.supported_contexts = kept
        primitive = assoc.requestor.primitive
        proposed = primitive.presentation_context_definition_list if primitive else []
        if any(cx.abstract_syntax == STUDY_ROOT_FIND for cx in proposed):
            log.warning(
                "C-FIND from %s@%s refused: calling AE title not in listener.find_allowed_aes",
                calling_ae, assoc.requestor.address,
            )

    def on_requested(self, event: evt.Event) -> None:
        assoc: Association = event.assoc
        rq = assoc.requestor
        primitive = rq.primitive
        calling = (primitive.calling_ae_title if primitive else "").strip()
        called = (primitive.called_ae_title if primitive else "").strip()
        refusal = self.access_refusal(calling, rq.address, called)
        if refusal is None:
            self._gate_find(assoc, calling)
            return
        result, source, diagnostic, reason = refusal
        log.warning("association from %s:%s (%s -> %s) rejected: %s", rq.address, rq.port, calling, called, reason)
        try:
            self.ledger.open_association(
                calling_ae=calling, called_ae=called, peer_address=rq.address, peer_port=rq.port,
                accepted=False, reject_reason=reason,
            )
        except Exception:  # noqa: BLE001 - the audit row must not keep a stranger connected
            log.exception("could not record a rejected association")
        assoc.acse.send_reject(result, source, diagnostic)
        assoc.kill()  # lets the DUL flush the A-ASSOCIATE-RJ before the socket closes

    def on_rejected(self, event: evt.Event) -> None:
        """pynetdicom rejected an association itself, after EVT_REQUESTED: audit it like our own refusals.

        The case this listener meets is ``listener.max_associations`` reached: A-ASSOCIATE-RJ
        rejected-transient, service-provider (presentation related), local-limit-exceeded (PS3.8 9.3.4).
        It is logged at most once a second with a count (a flood must not flood the log) and recorded
        in the ledger each time.
        """
        assoc: Association = event.assoc
        rq = assoc.requestor
        primitive = rq.primitive
        calling = (primitive.calling_ae_title if primitive else "").strip()
        called = (primitive.called_ae_title if primitive else "").strip()
        rj = assoc.acceptor.primitive
        code = (rj.result, rj.result_source, rj.diagnostic) if rj is not None else (None, None, None)
        if code == (0x02, 0x03, 0x02):
            reason = "association limit reached"
            self._limit_refusals.note(
                "association from %s:%s (%s -> %s) rejected: %s (listener.max_associations: %d)",
                rq.address, rq.port, calling, called, reason, self._config.max_associations,
            )
        else:
            reason = "rejected by the DICOM stack (result {}, source {}, diagnostic {})".format(*code)
            log.warning("association from %s:%s (%s -> %s) %s", rq.address, rq.port, calling, called, reason)
        try:
            self.ledger.open_association(
                calling_ae=calling, called_ae=called, peer_address=rq.address, peer_port=rq.port,
                accepted=False, reject_reason=reason,
            )
        except Exception:  # noqa: BLE001 - the audit row must not keep the refused peer waiting
            log.exception("could not record a rejected association")

    def on_established(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor
        try:
            ledger_id: int | None = self.ledger.open_association(
                calling_ae=rq.ae_title.strip(), called_ae=assoc.acceptor.ae_title.strip(),
                peer_address=rq.address, peer_port=rq.port,
            )
        except Exception:  # noqa: BLE001
            log.exception("could not record association from %s", rq.address)
            ledger_id = None
        with self._lock:
            self._stats[id(assoc)] = _AssocStats(ledger_id)
        log.info("association %s from %s@%s:%s", ledger_id, rq.ae_title.strip(), rq.address, rq.port)

    def on_ended(self, event: evt.Event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        aborted = event.event is evt.EVT_ABORTED
        elapsed = time.monotonic() - stats.started
        log.info(
            "association %s %s: %d stored (%.1f MB), %d refused, %.1f s",
            stats.ledger_id, "aborted" if aborted else "released", stats.instances, stats.bytes / 1e6,
            stats.failures, elapsed,
        )
        if stats.ledger_id is not None:
            try:
                self.ledger.close_association(
                    stats.ledger_id, instances=stats.instances, bytes=stats.bytes,
                    failures=stats.failures, aborted=aborted,
                )
            except Exception:  # noqa: BLE001
                log.exception("could not close association %s in the ledger", stats.ledger_id)

    # -- DIMSE --------------------------------------------------------------------------------
    def on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def on_store(self, event: evt.Event) -> Dataset | int:
        """Persist one instance, then answer; see the module docstring."""
        with self._lock:
            stats = self._stats.get(id(event.assoc))
        try:
            raw = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises several types for a bad stream
            return self._refuse(stats, b"", _undecodable(f"cannot encode received stream: {exc}"), event)
        if str(event.context.transfer_syntax) == DeflatedExplicitVRLittleEndian:
            limit = self._config.max_dataset_mb * 1024 * 1024
            if _inflates_beyond(raw, limit):
                # Before anything decodes it: pydicom would inflate the whole stream into memory.
                ref = _Refusal(
                    STATUS_DATASET_TOO_LARGE,
                    "dataset too large",
                    f"Deflated dataset of {len(raw)} bytes inflates beyond listener.max_dataset_mb "
                    f"({self._config.max_dataset_mb} MiB); first {_QUARANTINE_HEAD} bytes kept",
                )
                return self._refuse(stats, raw[:_QUARANTINE_HEAD], ref, event)
        try:
            record = self._validate(event, raw)
            self._check_hierarchy(record)
        except _Refusal as ref:
            return self._refuse(stats, raw, ref, event)
        try:
            stored = self.spool.store_instance(record.path, raw)
            outcome = self.ledger.record_instance(
                dataclasses.replace(record, sha256=stored.sha256),
                association_id=stats.ledger_id if stats else None,
            )
        except StorageError as exc:
            log.error("out of resources storing %s: %s", record.sop_instance_uid, exc)
            return self._count_failure(stats, _status(STATUS_OUT_OF_RESOURCES, _COMMENT_OUT_OF_RESOURCES))
        except InvalidDatasetError as exc:
            # A conflicting instance recorded by a concurrent association since the check: the file
            # just written belongs to no ledger row (its path holds the conflicting UIDs), so it goes.
            self.spool.absolute(record.path).unlink(missing_ok=True)
            return self._refuse(stats, raw, _conflict(str(exc)), event)
        except Exception:  # noqa: BLE001 - the sender must get an answer and keep its copy
            log.exception("cannot record %s", record.sop_instance_uid)
            return self._count_failure(stats, _status(STATUS_OUT_OF_RESOURCES, _COMMENT_OUT_OF_RESOURCES))
        if outcome is not StoreOutcome.NEW:
            log.info("instance %s received again: %s", record.sop_instance_uid, outcome.value)
        if stats is not None:
            stats.instances += 1
            stats.bytes += len(raw)
        return STATUS_SUCCESS

    def _validate(self, event: evt.Event, raw: bytes) -> InstanceRecord:
        try:
            ds = event.dataset
            _check_complete(ds)
            keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            values = [_uid_as_sent(ds, keyword) for keyword in keywords]
            sop_class = ds.get("SOPClassUID")
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a corrupt stream
            raise _undecodable(f"cannot decode dataset: {exc}") from exc
        uids = []
        for value, keyword in zip(values, keywords, strict=True):
            try:
                uids.append(validate_uid(value, keyword))
            except InvalidDatasetError as exc:
                raise _Refusal(STATUS_INVALID_UID, f"{keyword} missing or not a valid UID", str(exc)) from exc
        study, series, sop = uids
        rq = cast(C_STORE, event.request)
        if sop != str(rq.AffectedSOPInstanceUID).strip("\x00 "):
            raise _Refusal(STATUS_INSTANCE_MISMATCH, "SOPInstanceUID differs from the request's")
        if sop_class is not None and str(sop_class) != str(rq.AffectedSOPClassUID):
            raise _Refusal(
                STATUS_SOP_CLASS_MISMATCH, "SOPClassUID differs from the context's",
                f"SOPClassUID {sop_class} differs from the context's {rq.AffectedSOPClassUID}",
            )
        ts = str(event.context.transfer_syntax)
        try:
            _check_encoding(raw, ts)
            self._check_pixels(ds, ts, str(rq.AffectedSOPClassUID))
            record = instance_record(
                ds, path=self.spool.instance_path(study, series, sop), size=len(raw),
                sop_class_uid=str(rq.AffectedSOPClassUID), transfer_syntax_uid=ts,
            )
        except _Refusal:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _undecodable(f"cannot decode dataset: {exc}") from exc
        return record

    def _check_hierarchy(self, record: InstanceRecord) -> None:
        """Refuse, before anything is written, an instance the ledger would refuse (PS3.3 C.12.1.1.1)."""
        try:
            reason = self.ledger.hierarchy_conflict(
                record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid
            )
        except Exception:  # noqa: BLE001 - the ledger's own check in record_instance still applies
            log.exception("cannot check the hierarchy of %s", record.sop_instance_uid)
            return
        if reason is not None:
            raise _conflict(reason)

    @staticmethod
    def _check_pixels(ds: Dataset, ts: str, sop_class: str) -> None:
        present = [k for k in _PIXEL_KEYWORDS if k in ds]
        if not present:
            # Image Pixel module (PS3.3 C.7.6.3): Pixel Data is Type 1.  A stream cut exactly before
            # the Pixel Data tag parses as a complete dataset without it.
            if sop_class in CT_SOP_CLASSES or "Rows" in ds:
                raise _Refusal(STATUS_MISSING_PIXELS, "Pixel Data missing")
            return
        if "PixelData" not in ds:
            return
        elem = ds.get_item("PixelData")
        length = elem.length if isinstance(elem, RawDataElement) else (
            _UNDEFINED_LENGTH if elem.is_undefined_length else len(elem.value or b""))
        encapsulated = length == _UNDEFINED_LENGTH
        if encapsulated == (ts in _UNCOMPRESSED):
            # PS3.5 A.4: compressed syntaxes carry encapsulated fragments, native ones a defined length.
            what = "encapsulated" if encapsulated else "native"
            raise _Refusal(
                STATUS_ENCODING_MISMATCH, "encoding does not match the transfer syntax",
                f"{what} Pixel Data on a {ts} presentation context",
            )
        # A truncated stream usually still parses: check native pixel data against its declared size.
        if encapsulated:
            return
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        bits = int(ds.get("BitsAllocated", 0) or 0)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = rows * cols * spp * frames * bits // 8
        actual = len(ds.PixelData)
        if expected and actual < expected:
            raise _Refusal(
                STATUS_TRUNCATED_PIXELS, "Pixel Data shorter than declared",
                f"pixel data has {actual} bytes, {expected} expected",
            )

    def _refuse(self, stats: _AssocStats | None, raw: bytes, ref: _Refusal, event: evt.Event) -> Dataset:
        origin = f"from {event.assoc.requestor.ae_title.strip()}@{event.assoc.requestor.address}"
        where = self.spool.quarantine(raw, f"0x{ref.status:04X} {ref.detail}", origin) if raw else None
        log.warning(
            "C-STORE refused with 0x%04X (%s) %s; quarantined as %s", ref.status, ref.detail, origin, where
        )
        return self._count_failure(stats, _status(ref.status, ref.comment))

    @staticmethod
    def _count_failure(stats: _AssocStats | None, status: Dataset) -> Dataset:
        if stats is not None:
            stats.failures += 1
        return status


def _uid_as_sent(ds: Dataset, keyword: str) -> object:
    """A UID element's value as the peer sent it: pydicom strips any whitespace (a trailing newline too)."""
    elem = ds.get_item(keyword)
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        return elem.value.decode("ascii", "replace") if elem.value else None
    return elem.value


def _undecodable(detail: str) -> _Refusal:
    return _Refusal(STATUS_UNDECODABLE, "cannot decode dataset", detail)


def _conflict(reason: str) -> _Refusal:
    return _Refusal(STATUS_UID_CONFLICT, "UID conflict: Series/SOP Instance UID recorded elsewhere", reason)


def _check_encoding(raw: bytes, ts: str) -> None:
    """Refuse a dataset whose first element is not encoded as the presentation context says.

    pydicom reads Implicit VR bytes on an Explicit VR context (and the reverse) by switching with a
    warning; stored as received they would be a file whose meta names the wrong transfer syntax.
    ``raw`` is the dataset with the file meta pynetdicom adds (its group length locates the body).
    """
    if raw[128:132] != b"DICM" or raw[132:136] != b"\x02\x00\x00\x00" or len(raw) < 144:
        return
    body = raw[144 + int.from_bytes(raw[140:144], "little"):]
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body, 16)
        except zlib.error as exc:
            raise _undecodable(f"cannot inflate dataset: {exc}") from exc
    if len(body) < 8:
        return
    explicit = body[4:6] in _VRS
    if explicit != (ts != ImplicitVRLittleEndian):
        what = "Explicit" if explicit else "Implicit"
        raise _Refusal(
            STATUS_ENCODING_MISMATCH, "encoding does not match the transfer syntax",
            f"{what} VR dataset on a {ts} presentation context",
        )


def _inflates_beyond(raw: bytes, limit: int) -> bool:
    """Whether the Deflated body of ``raw`` (dataset with file meta) inflates to more than ``limit`` bytes.

    Inflates in bounded steps (``max_length``) and keeps none of the output, so a deflate bomb costs
    one step's memory.  A stream zlib cannot inflate is left to the decoder (it refuses it as undecodable).
    """
    if raw[128:132] != b"DICM" or raw[132:136] != b"\x02\x00\x00\x00" or len(raw) < 144:
        return False
    data = raw[144 + int.from_bytes(raw[140:144], "little") :]
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof:
            chunk = inflater.decompress(data, _INFLATE_CHUNK)
            total += len(chunk)
            if total > limit:
                return True
            data = inflater.unconsumed_tail
            if not chunk and not data:
                break  # all input consumed, no more output: a truncated stream
    except zlib.error:
        return False
    return False


class _PduReadLimit:
    """A bound ``recv`` for one :class:`~pynetdicom.transport.AssociationSocket`: refuses oversize PDUs.

    pynetdicom's DUL (``DULServiceProvider._read_pdu_data``, pynetdicom 3.0) reads a PDU as two
    ``recv`` calls on the association socket: the 6-byte header (type, reserved, 4-byte length), then
    ``length`` bytes into memory, whatever the length says.  This wrapper sees each header first; when
    the declared length exceeds the limit for its type it sends an A-ABORT (source service provider,
    invalid PDU parameter value, PS3.8 9.3.8), shuts the connection and answers every read with no
    bytes, which the DUL takes for a peer that closed (Evt17): nothing of the body is read.
    """

    def __init__(self, sock: AssociationSocket, p_data_limit: int) -> None:
        self._sock = sock
        self._recv = sock.recv
        self._p_data_limit = p_data_limit
        self._body: int | None = None  # the length of the body the next read is for
        self._refused = False

    def __call__(self, nr_bytes: int) -> bytearray:
        if self._refused:
            return bytearray()
        if self._body is not None and nr_bytes == self._body:
            self._body = None
            return self._recv(nr_bytes)
        self._body = None
        data = self._recv(nr_bytes)
        if nr_bytes == _PDU_HEADER and len(data) == _PDU_HEADER:
            pdu_type, _, length = struct.unpack(">BBL", data)
            limit = self._p_data_limit if pdu_type == _P_DATA_TF else MAX_ASSOCIATE_PDU
            if length > limit:
                self._refuse(pdu_type, length, limit)
                return bytearray()
            self._body = length
        return data

    def _refuse(self, pdu_type: int, length: int, limit: int) -> None:
        self._refused = True
        assoc = self._sock.assoc
        log.warning(
            "connection from %s:%s cut off: PDU type 0x%02X declares %d bytes, more than the %d read",
            assoc.requestor.address,
            assoc.requestor.port,
            pdu_type,
            length,
            limit,
        )
        raw = self._sock.socket
        if raw is None:
            return
        try:
            raw.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06")  # A-ABORT: provider, invalid value
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer is gone already


def limit_pdu_reads(assoc: Association, max_dataset_bytes: int) -> None:
    """Refuse, before reading them, PDUs of ``assoc`` longer than we accept (see :class:`_PduReadLimit`).

    Called on EVT_CONN_OPEN, which pynetdicom triggers after the socket is set and before the DUL
    reactor starts reading.  The P-DATA-TF limit is the maximum PDU length we advertise
    (``listener.max_pdu``) plus the header; with 0 (unlimited) a peer may send a whole dataset in one
    PDU, so the limit is ``max_dataset_bytes`` plus 64 KiB for the command and item headers.
    """
    sock = assoc.dul.socket
    if sock is None:
        return
    advertised = assoc.acceptor.maximum_length or 0
    p_data_limit = advertised + _PDU_HEADER if advertised else max_dataset_bytes + 64 * 1024
    sock.recv = _PduReadLimit(sock, p_data_limit)  # type: ignore[method-assign]


def _check_complete(ds: Dataset) -> None:
    """Raise if a top-level element holds fewer bytes than its declared length (a cut-off stream).

    pydicom parses leniently and would hand back a short value; the raw elements still carry the
    declared length, so the check costs no decoding.
    """
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF and raw.value is not None:
            if len(raw.value) < raw.length:
                raise ValueError(f"element {tag} declares {raw.length} bytes but the stream ends after {len(raw.value)}")


def instance_record(
    ds: Dataset, *, path: str, size: int, sop_class_uid: str | None = None, transfer_syntax_uid: str | None = None,
    sha256: str = "",
) -> InstanceRecord:
    """The ledger's record of one instance from its header: the C-STORE handler and the start-up reconcile.

    Parameters
    ----------
    ds
        The instance's dataset (pixel data not needed).
    path
        Where it lies, relative to the spool root.
    size
        Its encoded size in bytes.
    sop_class_uid, transfer_syntax_uid
        From the presentation context when received; None: from the dataset and its file meta.
    sha256
        Hex digest of the stored bytes ("" when the spool fills it in later).

    Raises
    ------
    InvalidDatasetError
        A Study, Series or SOP Instance UID is missing or malformed.
    """
    meta = getattr(ds, "file_meta", None) or Dataset()
    return InstanceRecord(
        study_instance_uid=validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_instance_uid=validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        sop_instance_uid=validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
        sop_class_uid=sop_class_uid if sop_class_uid is not None else str(ds.get("SOPClassUID", "") or ""),
        transfer_syntax_uid=(transfer_syntax_uid if transfer_syntax_uid is not None
                             else str(meta.get("TransferSyntaxUID", "") or "")),
        path=path, size=size, sha256=sha256,
        modality=str(ds.get("Modality", "") or ""),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""),
        accession_number=str(ds.get("AccessionNumber", "") or ""),
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def storage_sop_classes(config: ListenerConfig) -> list[str]:
    """CT, Enhanced CT and the configured extra storage SOP classes."""
    extra = sop_class_uids(config.extra_storage_sop_classes)
    return sorted(CT_SOP_CLASSES) + [u for u in extra if u not in CT_SOP_CLASSES]


class Listener:
    """The running DICOM listener (one pynetdicom server)."""

    def __init__(self, config: ListenerConfig, service: StoreService, find: WorklistFind | None = None) -> None:
        """``find``: a :class:`triaged.net.worklist.WorklistFind` to answer Study Root C-FIND, or None."""
        self.config = config
        self.service = service
        self.find = find
        ae = AE(ae_title=config.ae_title)
        ae.maximum_pdu_size = config.max_pdu
        ae.maximum_associations = config.max_associations
        ae.acse_timeout = config.acse_timeout
        ae.dimse_timeout = config.dimse_timeout
        ae.network_timeout = config.network_timeout
        ae.require_called_aet = False  # StoreService.on_requested checks it, with an audit row
        ae.add_supported_context(Verification)
        for uid in storage_sop_classes(config):
            ae.add_supported_context(uid, STORAGE_TRANSFER_SYNTAXES)
        if find is not None:
            ae.add_supported_context(STUDY_ROOT_FIND)
        self.ae = ae
        self._server: ThreadedAssociationServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when the config asked for port 0."""
        if self._server is None:
            return (self.config.bind_address, self.config.port)
        host, port = self._server.server_address[:2]
        return (str(host), int(port))

    def start(self, port: int | None = None) -> None:
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self.service.on_conn_open),
            (evt.EVT_REQUESTED, self.service.on_requested),
            (evt.EVT_ESTABLISHED, self.service.on_established),
            (evt.EVT_REJECTED, self.service.on_rejected),
            (evt.EVT_RELEASED, self.service.on_ended),
            (evt.EVT_ABORTED, self.service.on_ended),
            (evt.EVT_C_ECHO, self.service.on_echo),
            (evt.EVT_C_STORE, self.service.on_store),
        ]
        if self.find is not None:
            handlers.append((evt.EVT_C_FIND, self.find.on_find))
        bind = (self.config.bind_address, self.config.port if port is None else port)
        server = self.ae.start_server(bind, block=False, evt_handlers=handlers)
        self._server = server  # type: ignore[assignment]
        log.info("listening as %s on %s:%s", self.config.ae_title, *self.address)

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting, let in-flight associations finish for ``drain_seconds``, abort the rest."""
        if self._server is None:
            return
        server, self._server = self._server, None
        active = server.active_associations
        server.shutdown()  # closes the listening socket; running associations carry on
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline:
            # Only established associations can have stores in flight; a rejected one may linger
            # until its ARTIM timer expires and must not hold the stop up.
            active = [a for a in active if a.is_alive() and a.is_established]
            if not active:
                break
            time.sleep(0.05)
        for assoc in active:
            log.warning("aborting association from %s still open after %.0f s", assoc.requestor.address, drain_seconds)
            assoc.abort()
        log.info("listener stopped")
