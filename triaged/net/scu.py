"""C-STORE sender (PS3.4 B.2) with a status per instance.

Used by ``triaged selftest`` and the bench to act as a modality, and by dispatch to return results.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from triaged.errors import DispatchError
from triaged.net.tcp import set_nodelay

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


def echo(host: str, port: int, called_ae: str, calling_ae: str = "TRIAGED_SCU", timeout: float = 10) -> int:
    """C-ECHO a peer; returns the status or raises :class:`DispatchError` when no association."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise DispatchError(f"no association with {called_ae}@{host}:{port}")
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
) -> list[SendResult]:
    """Send DICOM files on one association, proposing each file's own transfer syntax.

    Raises :class:`DispatchError` (retryable) when no association could be established.
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
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise DispatchError(f"no association with {called_ae}@{host}:{port} (rejected, aborted or unreachable)")
    set_nodelay(assoc)
    results: list[SendResult] = []
    try:
        for path, hdr in headers:
            sop = str(hdr.SOPInstanceUID)
            if not assoc.is_established:
                results.append(SendResult(str(path), sop, None, "association lost"))
                continue
            rsp = assoc.send_c_store(path)
            status = int(rsp.Status) if "Status" in rsp else None
            results.append(SendResult(str(path), sop, status, str(rsp.get("ErrorComment", ""))))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
