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
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from copy import deepcopy
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
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from triaged.audit import audit, peer_text
from triaged.config import ListenerConfig, sop_class_uids
from triaged.domain import CT_SOP_CLASSES, InstanceRecord, StoreOutcome, validate_uid
from triaged.errors import InvalidDatasetError, StorageError
from triaged.net.tcp import (
    ABORT_INVALID_PARAMETER,
    ABORT_NOT_SPECIFIED,
    ConnectionBudget,
    GuardedSocket,
    PduTooLongError,
    PendingConnection,
    a_abort,
    read_pdu,
    set_nodelay,
    shut,
)
from triaged.net.tls import server_context
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
_A_ASSOCIATE_RQ = 0x01
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
    def record_event(self, kind: str, *, actor: str = ..., peer: str = ..., study_uid: str | None = ...,
                     detail: Mapping[str, object] | None = ...) -> int: ...


@dataclass
class _AssocStats:
    ledger_id: int | None
    calling_ae: str = ""
    peer: str = ""  # address:port
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
    on_stored
        Called with the Study Instance UID after each instance is stored and recorded (the study's
        completion timer); it must be cheap and not raise.
    """

    def __init__(self, spool: InstanceStore, ledger: InstanceRecorder, config: ListenerConfig, *,
                 on_stored: Callable[[str], None] | None = None) -> None:
        self.spool = spool
        self.ledger = ledger
        self._config = config
        self._on_stored = on_stored
        self._ae_title = config.ae_title  # the listener's AE title: the one called AE title accepted
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self._limit_refusals = ThrottledWarning(log)  # a flood at the association limit: a line a second

    def reload(self, config: ListenerConfig) -> None:
        self._config = config

    @property
    def config(self) -> ListenerConfig:
        """The listener section in force (the connection guards read it for every new connection)."""
        return self._config

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
            rq = assoc.requestor
            audit(
                "find.refused",
                f"C-FIND from {calling_ae}@{rq.address} refused: "
                "calling AE title not in listener.find_allowed_aes",
                actor=calling_ae, peer=peer_text(rq.address, rq.port), recorder=self.ledger,
                level=logging.WARNING,
                reason="calling AE title not in listener.find_allowed_aes",
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
        audit(
            "association.refused",
            f"association from {rq.address}:{rq.port} ({calling} -> {called}) rejected: {reason}",
            actor=calling, peer=peer_text(rq.address, rq.port), level=logging.WARNING,
            called_ae=called, reason=reason,
        )  # the row is the associations row below
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
            audit(
                "association.refused",
                f"association from {rq.address}:{rq.port} ({calling} -> {called}) {reason}",
                actor=calling, peer=peer_text(rq.address, rq.port), level=logging.WARNING,
                called_ae=called, reason=reason,
            )
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
            self._stats[id(assoc)] = _AssocStats(
                ledger_id, rq.ae_title.strip(), peer_text(rq.address, rq.port)
            )
        audit(
            "association.accepted",
            f"association {ledger_id} from {rq.ae_title.strip()}@{rq.address}:{rq.port} accepted",
            actor=rq.ae_title.strip(), peer=peer_text(rq.address, rq.port),
            called_ae=assoc.acceptor.ae_title.strip(), association=ledger_id,
        )

    def on_ended(self, event: evt.Event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        aborted = event.event is evt.EVT_ABORTED
        elapsed = time.monotonic() - stats.started
        audit(
            "association.ended",
            f"association {stats.ledger_id} {'aborted' if aborted else 'released'}: {stats.instances} stored "
            f"({stats.bytes / 1e6:.1f} MB), {stats.failures} refused, {elapsed:.1f} s",
            actor=stats.calling_ae, peer=stats.peer, association=stats.ledger_id, aborted=aborted,
            instances=stats.instances, bytes=stats.bytes, refused=stats.failures, seconds=round(elapsed, 1),
        )  # the row is the associations row, closed below
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
            self._audit_refusal(event, STATUS_OUT_OF_RESOURCES, f"out of resources: {exc}", record)
            return self._count_failure(stats, _status(STATUS_OUT_OF_RESOURCES, _COMMENT_OUT_OF_RESOURCES))
        except InvalidDatasetError as exc:
            # A conflicting instance recorded by a concurrent association since the check: the file
            # just written belongs to no ledger row (its path holds the conflicting UIDs), so it goes.
            self.spool.absolute(record.path).unlink(missing_ok=True)
            return self._refuse(stats, raw, _conflict(str(exc)), event)
        except Exception as exc:  # noqa: BLE001 - the sender must get an answer and keep its copy
            log.exception("cannot record %s", record.sop_instance_uid)
            self._audit_refusal(event, STATUS_OUT_OF_RESOURCES, f"ledger: {type(exc).__name__}", record)
            return self._count_failure(stats, _status(STATUS_OUT_OF_RESOURCES, _COMMENT_OUT_OF_RESOURCES))
        if outcome is not StoreOutcome.NEW:
            log.info("instance %s received again: %s", record.sop_instance_uid, outcome.value)
        if self._on_stored is not None:
            self._on_stored(record.study_instance_uid)
        if stats is not None:
            stats.instances += 1
            stats.bytes += len(raw)
        rq = event.assoc.requestor
        audit(
            "store",
            f"stored {record.sop_instance_uid} (series {record.series_instance_uid}) from "
            f"{rq.ae_title.strip()}@{rq.address}: {len(raw)} bytes, status 0x0000 ({outcome.value})",
            actor=rq.ae_title.strip(), peer=peer_text(rq.address, rq.port),
            study_uid=record.study_instance_uid,
            sop_instance_uid=record.sop_instance_uid, series_instance_uid=record.series_instance_uid,
            sop_class_uid=record.sop_class_uid, bytes=len(raw), status="0x0000", outcome=outcome.value,
            association=stats.ledger_id if stats else None,
        )  # the row is the instances row
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
        self._audit_refusal(event, ref.status, ref.detail, quarantined=where.name if where else None)
        return self._count_failure(stats, _status(ref.status, ref.comment))

    def _audit_refusal(
        self, event: evt.Event, status: int, reason: str, record: InstanceRecord | None = None,
        quarantined: str | None = None,
    ) -> None:
        """A ``store.refused`` line and row: a refused C-STORE has no row of its own."""
        rq = event.assoc.requestor
        try:
            sop = str(cast(C_STORE, event.request).AffectedSOPInstanceUID or "").strip("\x00 ")[:64]
        except Exception:  # noqa: BLE001 - a request without the UID is still audited
            sop = ""
        with self._lock:
            stats = self._stats.get(id(event.assoc))
        audit(
            "store.refused",
            f"C-STORE of {sop or 'an instance'} from {rq.ae_title.strip()}@{rq.address} refused with "
            f"0x{status:04X}: {reason}",
            actor=rq.ae_title.strip(), peer=peer_text(rq.address, rq.port),
            study_uid=record.study_instance_uid if record else None, recorder=self.ledger,
            level=logging.WARNING,
            status=f"0x{status:04X}", reason=reason, sop_instance_uid=sop,
            association=stats.ledger_id if stats else None, quarantined=quarantined,
        )

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
    """A bound ``recv`` for one :class:`~pynetdicom.transport.AssociationSocket`: refuses oversize PDUs and messages.

    pynetdicom's DUL (``DULServiceProvider._read_pdu_data``, pynetdicom 3.0) reads a PDU as two
    ``recv`` calls on the association socket: the 6-byte header (type, reserved, 4-byte length), then
    ``length`` bytes into memory, whatever the length says.  This wrapper sees each header first; when
    the declared length exceeds the limit for its type it sends an A-ABORT (source service provider,
    invalid PDU parameter value, PS3.8 9.3.8), shuts the connection and answers every read with no
    bytes, which the DUL takes for a peer that closed (Evt17): nothing of the body is read.

    Each P-DATA-TF body is then walked item by item (PS3.8 9.3.5.1): the fragments of one message add
    up in pynetdicom's buffer until its last fragment, however small each PDU is, so a running total
    per message is kept (command and data set apart) and a message whose data set passes
    ``max_dataset_bytes`` (its command :data:`MAX_ASSOCIATE_PDU`) is aborted the same way.
    """

    def __init__(
        self, sock: AssociationSocket, p_data_limit: int, max_dataset_bytes: int | None = None
    ) -> None:
        self._sock = sock
        self._recv = sock.recv
        self._p_data_limit = p_data_limit
        self._max_dataset = max_dataset_bytes
        self._body: int | None = None  # the length of the body the next read is for
        self._body_is_p_data = False
        self._command_bytes = 0  # of the message being received: fragments so far
        self._dataset_bytes = 0
        self._refused = False

    def __call__(self, nr_bytes: int) -> bytearray:
        if self._refused:
            return bytearray()
        if self._body is not None and nr_bytes == self._body:
            self._body = None
            data = self._recv(nr_bytes)
            if self._body_is_p_data and self._max_dataset is not None and len(data) == nr_bytes:
                over = self._count_fragments(data)
                if over:
                    self._refuse("message too large", over)
                    return bytearray()
            return data
        self._body = None
        data = self._recv(nr_bytes)
        if nr_bytes == _PDU_HEADER and len(data) == _PDU_HEADER:
            pdu_type, _, length = struct.unpack(">BBL", data)
            limit = self._p_data_limit if pdu_type == _P_DATA_TF else MAX_ASSOCIATE_PDU
            if length > limit:
                self._refuse(
                    "PDU too large",
                    f"PDU type 0x{pdu_type:02X} declares {length} bytes, more than the {limit} read",
                )
                return bytearray()
            self._body = length
            self._body_is_p_data = pdu_type == _P_DATA_TF
        return data

    def _count_fragments(self, body: bytearray) -> str:
        """Add a P-DATA-TF body's fragments to the running totals; why the message is refused, or ""."""
        pos, end = 0, len(body)
        while pos + 6 <= end:
            item_length = int.from_bytes(body[pos : pos + 4], "big")
            if item_length < 2:
                return ""  # a malformed item: pynetdicom's decoder refuses the PDU
            control = body[pos + 5]
            size = min(item_length, end - pos - 4) - 2
            if control & 0x01:  # command fragment
                self._command_bytes += size
                if self._command_bytes > MAX_ASSOCIATE_PDU:
                    return f"a command set of more than {MAX_ASSOCIATE_PDU} bytes"
                if control & 0x02:
                    self._command_bytes = 0
            else:
                assert self._max_dataset is not None
                self._dataset_bytes += size
                if self._dataset_bytes > self._max_dataset:
                    return (
                        f"a data set of more than {self._max_dataset} bytes in fragments "
                        f"({self._dataset_bytes} so far; listener.max_dataset_mb)"
                    )
                if control & 0x02:
                    self._dataset_bytes = 0
            pos += 4 + item_length
        return ""

    def _refuse(self, cause: str, reason: str) -> None:
        self._refused = True
        assoc = self._sock.assoc
        if isinstance(self._sock, GuardedSocket) and self._sock.report is not None:
            self._sock.cut(cause, reason, ABORT_INVALID_PARAMETER)  # logs and audits, A-ABORT, shutdown
            return
        log.warning(
            "connection from %s:%s cut off: %s", assoc.requestor.address, assoc.requestor.port, reason
        )
        raw = self._sock.socket
        if raw is None:
            return
        try:
            raw.sendall(a_abort(ABORT_INVALID_PARAMETER))
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer is gone already


def limit_pdu_reads(assoc: Association, max_dataset_bytes: int) -> None:
    """Refuse, before reading them, PDUs of ``assoc`` longer than we accept (see :class:`_PduReadLimit`).

    Called on EVT_CONN_OPEN, which pynetdicom triggers after the socket is set and before the DUL
    reactor starts reading.  The P-DATA-TF limit is the maximum PDU length we advertise
    (``listener.max_pdu``) plus the header; with 0 (unlimited) a peer may send a whole dataset in one
    PDU, so the limit is ``max_dataset_bytes`` plus 64 KiB for the command and item headers.  A message's
    data set, however many PDUs it comes in, is limited to ``max_dataset_bytes``.
    """
    sock = assoc.dul.socket
    if sock is None:
        return
    advertised = assoc.acceptor.maximum_length or 0
    p_data_limit = advertised + _PDU_HEADER if advertised else max_dataset_bytes + 64 * 1024
    sock.recv = _PduReadLimit(sock, p_data_limit, max_dataset_bytes)  # type: ignore[method-assign]


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


def _address_allowed(networks: list[str], address: str) -> bool:
    """Whether ``address`` is in one of ``networks`` (CIDR); an empty list allows every address.

    An IPv4-mapped IPv6 address (``::ffff:10.1.2.3``, what a dual-stack socket reports) is matched as IPv4.
    """
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


#: What the trail says of a connection, by audit event.
_TRAIL_VERBS = {
    "association.refused": "refused",
    "association.dropped": "closed",
    "association.timeout": "closed",
    "association.aborted": "aborted",
}
#: Distinct (event, address, cause) keys the trail remembers; past it, the stale ones are forgotten.
_TRAIL_KEYS = 4096


class _ConnectionTrail:
    """Log and audit what the listener does to connections before (or beside) an association.

    One WARNING line on ``triaged.audit`` and one ``audit_events`` row per (event, source address, cause)
    a second at most, each with ``events``: how many such events there were since the previous one (a
    flood of connections must flood neither the log nor the ledger).  The ``associations`` table has no
    row for these connections: they never got as far as an A-ASSOCIATE-RQ, or their association's row
    records only that it was aborted.
    """

    def __init__(self, recorder: InstanceRecorder | None, interval: float = 1.0) -> None:
        self._recorder = recorder
        self._interval = interval
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}

    def note(self, kind: str, address: str, port: int, cause: str, reason: str) -> None:
        key = (kind, address, cause)
        now = time.monotonic()
        with self._lock:
            last, count = self._seen.get(key, (-self._interval, 0))
            count += 1
            if now - last < self._interval:
                self._seen[key] = (last, count)
                return
            self._seen[key] = (now, 0)
            if len(self._seen) > _TRAIL_KEYS:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._interval}
        peer = peer_text(address, port)
        more = f" ({count} such events since the last line)" if count > 1 else ""
        audit(
            kind,
            f"connection from {peer} {_TRAIL_VERBS.get(kind, kind)}: {reason}{more}",
            peer=peer,
            recorder=self._recorder,
            level=logging.WARNING,
            cause=cause,
            reason=reason,
            events=count,
        )


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server, guarded against slow, silent and disallowed peers.

    What pynetdicom 3.0 does not (issue 12 item 2):

    - the accept thread only accepts: an address outside ``listener.allowed_networks`` is closed there and
      then (no thread, no slot), and the TLS handshake, which pynetdicom does in the accept thread (one
      silent TLS client would stop every accept), happens in the connection's own thread;
    - a connection is an association (counted towards ``listener.max_associations``) only once its
      A-ASSOCIATE-RQ is complete; until then it is pending, one of at most
      ``listener.max_pending_connections``, and it has ``listener.handshake_timeout_seconds`` for its TLS
      handshake and its whole A-ASSOCIATE-RQ (:func:`~triaged.net.tcp.read_pdu`);
    - one source address has at most ``listener.max_associations_per_address`` connections
      (:class:`~triaged.net.tcp.ConnectionBudget`: a newcomer closes the oldest pending one first);
    - an association's reads and writes cannot hang (:class:`~triaged.net.tcp.GuardedSocket`).

    Every refusal, eviction, timeout and cut is logged and audited (:class:`_ConnectionTrail`).  The
    limits are read from ``service.config`` for each new connection, so SIGHUP changes them.
    """

    daemon_threads = True  # a pending connection's thread never holds the process or the stop up
    block_on_close = False
    #: The kernel's queue of connections not yet accepted (pynetdicom: 5): a burst beyond it waits for a
    #: SYN retransmission (a second).
    request_queue_size = 64

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        service: StoreService,
        listen_socket: socket.socket | None = None,
    ) -> None:
        self.service = service
        #: A listening socket made by another process (:mod:`triaged.net.receivers`): served, never bound.
        self._shared = listen_socket
        self.budget = ConnectionBudget()
        self.trail = _ConnectionTrail(service.ledger)
        self._admitted: dict[socket.socket, PendingConnection] = {}
        self._admitted_lock = threading.Lock()
        super().__init__(
            ae, address, ae_title, contexts, ssl_context, evt_handlers, request_handler=_GuardedRequestHandler
        )

    @classmethod
    def start(
        cls,
        ae: AE,
        address: tuple[str, int],
        evt_handlers: list[Any],
        service: StoreService,
        *,
        ssl_context: ssl.SSLContext | None = None,
        listen_socket: socket.socket | None = None,
    ) -> GuardedAssociationServer:
        """Bind, listen and serve in a daemon thread: ``AE.start_server(block=False)`` with this class.

        ``listen_socket``: a socket already bound and listening, shared with other processes (each accepts
        from it); it is served instead of binding ``address``, and stopping never shuts it down.
        """
        server = cast(
            GuardedAssociationServer,
            ae.make_server(
                address, ssl_context=ssl_context, evt_handlers=evt_handlers, server_class=cls, service=service,
                listen_socket=listen_socket,
            ),
        )
        thread = threading.Thread(
            target=make_target(server.serve_forever), name=f"AcceptorServer@{address[1]}", daemon=True
        )
        thread.start()
        ae._servers.append(server)  # as start_server does: AE.shutdown() and server.shutdown() use the list
        return server

    def server_bind(self) -> None:
        if self._shared is None:
            super().server_bind()
            return
        cast(socket.socket, self.socket).close()  # the one socketserver made: the shared one is used instead
        # Non-blocking: every process sharing the socket is woken for a connection and only one gets it;
        # the others' accept() raises BlockingIOError, which socketserver ignores.
        self._shared.setblocking(False)
        self.socket = self._shared
        self.server_address = self._shared.getsockname()

    def server_activate(self) -> None:
        if self._shared is None:
            super().server_activate()  # a shared socket listens already

    def server_close(self) -> None:
        if self._shared is None:
            super().server_close()
            return
        # close() only: shutdown() of a listening socket would stop it for every process sharing it
        cast(socket.socket, self.socket).close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; no TLS here (see the class docstring)."""
        listening = cast(socket.socket, self.socket)
        conn, address = listening.accept()
        if self._shared is not None:
            conn.setblocking(True)  # as from a blocking listening socket: the handshake sets its timeouts
        return conn, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit or refuse a connection just accepted, in the accept thread: no I/O with the peer."""
        try:
            return self._admit(request, client_address)
        except Exception:  # noqa: BLE001 - an exception here would end the accept loop (socketserver)
            log.exception("cannot admit the connection from %s; closed", client_address)
            return False

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            entry = self.claim(request)  # no thread: the budget must not keep counting it
            if entry is not None:
                self.budget.finish(entry)
            raise

    def _admit(self, request: socket.socket, client_address: Any) -> bool:
        address, port = str(client_address[0]), int(client_address[1])
        cfg = self.service.config
        if not _address_allowed(cfg.allowed_networks, address):
            self.trail.note(
                "association.refused",
                address,
                port,
                "address",
                "source address not in listener.allowed_networks",
            )
            return False
        entry, dropped = self.budget.admit(
            request,
            address,
            port,
            max_pending=cfg.max_pending_connections,
            max_per_address=cfg.max_associations_per_address,
            associated=self._associated_from(address),
        )
        for old in dropped:
            self.trail.note("association.dropped", old.address, old.port, "evicted", old.dropped)
        if entry is None:
            self.trail.note(
                "association.refused",
                address,
                port,
                "per-address",
                f"{cfg.max_associations_per_address} associations from this address already "
                "(listener.max_associations_per_address)",
            )
            return False
        with self._admitted_lock:
            self._admitted[request] = entry
        return True

    def claim(self, request: socket.socket) -> PendingConnection | None:
        """The budget entry :meth:`verify_request` made for ``request`` (once)."""
        with self._admitted_lock:
            return self._admitted.pop(request, None)

    def _associated_from(self, address: str) -> int:
        """Associations from ``address`` still open (a released one's thread may linger a moment)."""
        return sum(
            1
            for a in self.active_associations
            if a.requestor.address == address and not (a.is_released or a.is_aborted or a.is_rejected)
        )

    def shutdown(self) -> None:
        super().shutdown()
        self.budget.drop_all("the listener is stopping")


class _GuardedRequestHandler(RequestHandler):
    """One accepted connection: TLS handshake and A-ASSOCIATE-RQ under a deadline, then the association."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        server = self.server
        entry = server.claim(self.request)
        if entry is None:
            return
        first: bytes | None = None
        try:
            first = self._handshake(entry)
        finally:
            if first is None or not server.budget.hand_over(entry):
                server.budget.finish(entry)
                _close(entry.sock)  # the TLS-wrapped socket when there is one
                first = None
        if first is None:
            return
        sock = entry.sock
        try:
            self.request = sock
            assoc = self._create_guarded_association(sock, first, entry)
            # pynetdicom's handle(): the trigger follows the binding of the handlers
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
        except BaseException:
            _close(sock)
            raise
        finally:
            server.budget.finish(entry)

    def _handshake(self, entry: PendingConnection) -> bytes | None:
        """The A-ASSOCIATE-RQ PDU, or None: the connection is to be closed (``entry.sock``: TLS-wrapped)."""
        server = self.server
        trail = server.trail
        timeout = server.service.config.handshake_timeout_seconds
        deadline = entry.since + timeout
        sock = entry.sock
        stage = "A-ASSOCIATE-RQ"
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            context = server.ssl_context
            if context is not None:
                stage = "TLS handshake"
                sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                if not server.budget.replace_socket(entry, sock):
                    return None
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                cast(ssl.SSLSocket, sock).do_handshake()
                stage = "A-ASSOCIATE-RQ"
            first = read_pdu(sock, deadline, MAX_ASSOCIATE_PDU)
        except TimeoutError:
            if not entry.dropped:
                trail.note(
                    "association.timeout",
                    entry.address,
                    entry.port,
                    "handshake",
                    f"no complete {stage} within {timeout:g} s (listener.handshake_timeout_seconds)",
                )
            return None
        except PduTooLongError as exc:
            _send_quietly(sock, a_abort(ABORT_INVALID_PARAMETER))
            trail.note("association.refused", entry.address, entry.port, "pdu-length", str(exc))
            return None
        except ssl.SSLError as exc:
            if not entry.dropped:
                why = (exc.reason or str(exc)).replace("_", " ").lower()
                trail.note(
                    "association.refused", entry.address, entry.port, "tls", f"TLS handshake failed: {why}"
                )
            return None
        except OSError as exc:  # closed or reset by the peer (or by the budget: entry.dropped)
            if not entry.dropped:
                log.debug(
                    "connection from %s closed before its %s: %s",
                    peer_text(entry.address, entry.port),
                    stage,
                    exc,
                )
            return None
        if first[0] != _A_ASSOCIATE_RQ:
            _send_quietly(sock, a_abort(ABORT_NOT_SPECIFIED))
            trail.note(
                "association.refused",
                entry.address,
                entry.port,
                "first-pdu",
                f"first PDU is of type 0x{first[0]:02X}, not an A-ASSOCIATE-RQ",
            )
            return None
        return first

    def _create_guarded_association(
        self, sock: socket.socket, first: bytes, entry: PendingConnection
    ) -> Association:
        """pynetdicom's ``RequestHandler._create_association`` with a :class:`~triaged.net.tcp.GuardedSocket`."""
        server = self.server
        ae = server.ae
        assoc = Association(ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        trail, address, port = server.trail, entry.address, entry.port

        def report(cause: str, reason: str) -> None:
            trail.note("association.aborted", address, port, cause, reason)

        timeout = float(ae.network_timeout) if ae.network_timeout is not None else 60.0
        assoc.set_socket(GuardedSocket(assoc, sock, prefix=first, timeout=timeout, report=report))
        assoc.acceptor.maximum_length = ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list[tuple[Any, Any]], handlers):
                    assoc.bind(event, handler[0], handler[1])
        return assoc


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(1.0)
        sock.sendall(data)
    except OSError:
        pass  # the peer is gone or does not read: it gets no A-ABORT


def _close(sock: socket.socket) -> None:
    shut(sock)
    try:
        sock.close()
    except OSError:
        pass


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
        self._server: GuardedAssociationServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when the config asked for port 0."""
        if self._server is None:
            return (self.config.bind_address, self.config.port)
        host, port = self._server.server_address[:2]
        return (str(host), int(port))

    def start(self, port: int | None = None, *, listen_socket: socket.socket | None = None) -> None:
        """Bind and serve; ``listen_socket``: serve this socket, bound and listening, shared with other
        receiver processes (:mod:`triaged.net.receivers`), instead of binding one."""
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
        tls = self.config.tls if self.config.tls is not None and self.config.tls.enabled else None
        # with listener.tls the server wraps every connection: TLS only, a plain association gets nothing
        ssl_context = server_context(tls) if tls is not None else None
        server = GuardedAssociationServer.start(
            self.ae, bind, handlers, self.service, ssl_context=ssl_context, listen_socket=listen_socket
        )
        self._server = server
        log.log(logging.INFO if listen_socket is None else logging.DEBUG,  # a pool says it once for all
                "listening as %s on %s:%s%s", self.config.ae_title, *self.address,
                " (DICOM TLS only)" if tls is not None else "")

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
