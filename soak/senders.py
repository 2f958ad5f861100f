"""Phantom studies as files and pynetdicom senders that remember exactly which instances got Success."""

from __future__ import annotations

import copy
import hashlib
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from soak.node import NODE_AE

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

# The files' dataset bytes go on the wire as written, so the spool copy can be compared byte for byte.
_config.STORE_SEND_CHUNKED_DATASET = True


def dataset_body(raw: bytes) -> bytes:
    """The dataset bytes of a DICOM file (after the preamble and the File Meta group)."""
    if raw[128:132] != b"DICM":
        return raw
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length :]


def body_sha256(raw: bytes) -> str:
    return hashlib.sha256(dataset_body(raw)).hexdigest()


@dataclass(frozen=True)
class Instance:
    """One instance a sender has to deliver, and the digest of the dataset bytes it sends."""

    sop_uid: str
    study_uid: str
    series_uid: str
    path: Path
    sha256: str


def phantom_datasets(seed: int, matrix: int = 64, slices: int = 30) -> list[Dataset]:
    """One small axial chest CT series from the project's phantom generator (~1-2 s)."""
    from triaged.lab.phantom import PhantomSpec, generate, to_datasets

    spec = PhantomSpec(
        kind="covid",
        severity=30.0,
        seed=seed,
        matrix=matrix,
        slice_thickness=2.0,
        slice_spacing=6.0,
        slices=slices,
    )
    return [ds for ds in to_datasets(generate(spec, workers=1)) if ds.Modality == "CT"]


def write_study(template: list[Dataset], folder: Path, tag: str) -> list[Instance]:
    """``template`` as a new study (new Study, Series and SOP Instance UIDs) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(entropy_srcs=[tag, "study"]), generate_uid(entropy_srcs=[tag, "series"])
    out = []
    for i, src in enumerate(template):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(Instance(ds.SOPInstanceUID, study, series, path, body_sha256(path.read_bytes())))
    return out


class Sender(threading.Thread):
    """A PACS-like C-STORE SCU: sends its studies, re-sends whatever was not answered Success.

    A refused instance (any status but Success) and an association that is cut are retried after
    ``pause`` seconds on a new association, until ``deadline`` (monotonic) passes.
    """

    def __init__(
        self,
        name: str,
        port: int,
        studies: list[list[Instance]],
        *,
        deadline: float,
        pause: float = 0.3,
        between_studies: float = 0.0,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.port = port
        self.studies = studies
        self.deadline = deadline
        self.pause = pause
        self.between_studies = between_studies
        self.acked: dict[str, Instance] = {}
        self.statuses: Counter[int] = Counter()
        self.cut = 0
        self.stop_event = threading.Event()
        self._ae = AE(ae_title=name[:16])
        self._ae.add_requested_context(CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])
        self._ae.acse_timeout = self._ae.network_timeout = self._ae.connection_timeout = 10
        self._ae.dimse_timeout = 30

    @property
    def pending(self) -> int:
        return sum(len(s) for s in self.studies) - len(self.acked)

    def run(self) -> None:
        for study in self.studies:
            todo = list(study)
            while todo and time.monotonic() < self.deadline and not self.stop_event.is_set():
                todo = self._send(todo)
                if todo:
                    time.sleep(self.pause)
            if self.between_studies:
                self.stop_event.wait(self.between_studies)

    def _send(self, todo: list[Instance]) -> list[Instance]:
        """One association for ``todo``; what is still unacknowledged afterwards."""
        assoc = self._ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
        if not assoc.is_established:
            return todo
        left: list[Instance] = []
        try:
            for n, inst in enumerate(todo):
                if self.stop_event.is_set():
                    return left + todo[n:]
                rsp = assoc.send_c_store(inst.path)
                status = int(rsp.Status) if rsp and "Status" in rsp else None
                if status is None:  # association cut (a kill -9): all the rest is unacknowledged
                    self.cut += 1
                    return left + todo[n:]
                self.statuses[status] += 1
                if status == 0:
                    self.acked[inst.sop_uid] = inst
                else:
                    left.append(inst)
        finally:
            if assoc.is_established:
                assoc.release()
        return left
