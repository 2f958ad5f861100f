"""Frozen value types shared by every layer: studies, series headers, volumes and the job state machine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt

# DICOM SOP Class UIDs the node treats as analysable CT (PS3.4 Annex B.5).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
CT_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE})


class JobState(enum.StrEnum):
    """States of one analysis job (ARCHITECTURE.md, "One study through it")."""

    RECEIVING = "RECEIVING"
    COMPLETE = "COMPLETE"
    QUEUED = "QUEUED"
    ANALYSING = "ANALYSING"
    ENCODING = "ENCODING"
    DISPATCHING = "DISPATCHING"
    RETRY_WAIT = "RETRY_WAIT"
    DONE = "DONE"
    IGNORED = "IGNORED"
    FAILED = "FAILED"
    SUPERSEDED = "SUPERSEDED"


#: States from which a job never moves again.
TERMINAL_STATES = frozenset({JobState.DONE, JobState.IGNORED, JobState.FAILED, JobState.SUPERSEDED})

#: Allowed transitions; the ledger refuses anything else.  FAILED is reachable from every live state
#: (a stage boundary catches the error); SUPERSEDED marks a job whose study was re-opened by a late
#: instance before the job reached a terminal state, so its results must not be sent.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.RECEIVING: frozenset({JobState.COMPLETE, JobState.FAILED}),
    JobState.COMPLETE: frozenset({JobState.QUEUED, JobState.IGNORED, JobState.FAILED, JobState.SUPERSEDED}),
    JobState.QUEUED: frozenset({JobState.ANALYSING, JobState.FAILED, JobState.SUPERSEDED}),
    JobState.ANALYSING: frozenset({JobState.ENCODING, JobState.QUEUED, JobState.FAILED, JobState.SUPERSEDED}),
    JobState.ENCODING: frozenset({JobState.DISPATCHING, JobState.FAILED, JobState.SUPERSEDED}),
    JobState.DISPATCHING: frozenset({JobState.DONE, JobState.RETRY_WAIT, JobState.FAILED}),
    JobState.RETRY_WAIT: frozenset({JobState.DISPATCHING, JobState.FAILED}),
    JobState.DONE: frozenset(),
    JobState.IGNORED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.SUPERSEDED: frozenset(),
}


class StoreOutcome(enum.StrEnum):
    """What recording one received instance did (see README, "Duplicate SOP Instance UIDs")."""

    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, identical bytes: acknowledged, nothing changes
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: the new copy replaces the old


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance as the ledger records it (written by the C-STORE handler)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str  # relative to the spool root
    size: int
    sha256: str
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    study_date: str = ""
    study_description: str = ""
    accession_number: str = ""


@dataclass(frozen=True)
class InstanceHeader:
    """Header fields of one stored instance that series choice needs (no pixel data)."""

    path: str
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str
    image_type: tuple[str, ...] = ()
    series_description: str = ""
    series_number: int | None = None
    image_orientation: tuple[float, ...] | None = None  # ImageOrientationPatient, 6 values
    image_position: tuple[float, float, float] | None = None  # ImagePositionPatient
    pixel_spacing: tuple[float, float] | None = None  # (row spacing, column spacing) mm
    rows: int | None = None
    columns: int | None = None
    slice_thickness: float | None = None
    convolution_kernel: str = ""
    number_of_frames: int = 1


@dataclass(frozen=True)
class SeriesChoice:
    """The series chosen for analysis, or why none could be (``series_uid`` is None then)."""

    series_uid: str | None
    reason: str
    instances: tuple[InstanceHeader, ...] = ()
    candidates: tuple[str, ...] = ()  # one line per series considered, for the job detail


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units, axes (z, y, x), z sorted along the slice normal.

    ``affine`` maps voxel indices (x, y, z order as in ITK/NIfTI, i.e. column, row, slice) to LPS mm.
    """

    hu: npt.NDArray[np.int16]
    spacing: tuple[float, float, float]  # (z, y, x) mm
    affine: npt.NDArray[np.float64]  # 4x4, index (col, row, slice, 1) -> LPS mm
    sop_instance_uids: tuple[str, ...]  # one per z index (Enhanced CT: the same UID for every frame)
    series_instance_uid: str
    study_instance_uid: str
    warnings: tuple[str, ...] = ()
    frame_numbers: tuple[int, ...] = ()  # 1-based frame per z index for multi-frame sources


@dataclass(frozen=True)
class StudyRow:
    """A study as the CLI and worklist show it."""

    study_instance_uid: str
    first_seen: datetime
    last_seen: datetime
    instances: int
    bytes: int
    series: int
    state: str
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""


@dataclass(frozen=True)
class JobRow:
    """A job as the CLI shows it."""

    id: int
    study_instance_uid: str
    revision: int
    state: JobState
    detail: str
    created_at: datetime
    updated_at: datetime
    series_instance_uid: str | None = None
    next_attempt_at: datetime | None = None
    attempts: int = 0
    history: tuple[tuple[datetime, str, str, str], ...] = field(default=())  # (at, from, to, detail)
