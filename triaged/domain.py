"""Frozen value types shared by every layer: studies, series headers, volumes and the job state machine."""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt

from triaged.errors import InvalidDatasetError

#: The one disclaimer every human-visible output carries (CLI, worklist, overviews, logs).
RESEARCH_NOTE = "Research use only - not for diagnosis."
#: PS3.5 9.1 UID syntax: digits and dots (leading zeros tolerated, as seen in the wild). Shared with
#: :mod:`triaged.config` (``listener.extra_storage_sop_classes``). ``\Z``, not ``$``: ``$`` also matches
#: before a trailing newline, so ``UID_RE.match("1.2\n")`` would pass.
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*\Z")


def validate_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a UID string or raise :class:`InvalidDatasetError` naming ``keyword``.

    Parameters
    ----------
    value : object
        The element value as pydicom gives it (``str``/``UID``, or ``None`` when absent).
    keyword : str
        The DICOM keyword, for the error message (e.g. ``"SOPInstanceUID"``).
    """
    if value is None or value == "":
        raise InvalidDatasetError(f"{keyword} is missing")
    text = str(value).strip("\x00 ")
    # PS3.5 9.1: digits and dots, 64 characters at most; anything else would let a peer choose file names
    if len(text) > 64 or not UID_RE.fullmatch(text):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InvalidDatasetError(f"{keyword} {shown!r} is not a valid UID (PS3.5 9.1)")
    return text


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


#: States in which a job waits for nothing (only `triaged resend` moves DONE and FAILED jobs again).
TERMINAL_STATES = frozenset({JobState.DONE, JobState.IGNORED, JobState.FAILED, JobState.SUPERSEDED})

#: Allowed transitions; the ledger refuses anything else.  FAILED is reachable from every live state
#: (a stage boundary catches the error); SUPERSEDED marks a job whose study was re-opened by a late
#: instance before the job reached a terminal state, so its results must not be sent.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.RECEIVING: frozenset({JobState.COMPLETE, JobState.FAILED}),
    JobState.COMPLETE: frozenset({JobState.QUEUED, JobState.IGNORED, JobState.FAILED, JobState.SUPERSEDED}),
    JobState.QUEUED: frozenset({JobState.ANALYSING, JobState.FAILED, JobState.SUPERSEDED}),
    JobState.ANALYSING: frozenset({JobState.ENCODING, JobState.QUEUED, JobState.FAILED, JobState.SUPERSEDED}),
    # ENCODING -> QUEUED: encoding interrupted by a stop is re-run at the next start.
    JobState.ENCODING: frozenset({JobState.DISPATCHING, JobState.QUEUED, JobState.FAILED, JobState.SUPERSEDED}),
    JobState.DISPATCHING: frozenset({JobState.DONE, JobState.RETRY_WAIT, JobState.FAILED}),
    JobState.RETRY_WAIT: frozenset({JobState.DISPATCHING, JobState.FAILED}),
    # `triaged resend`: a delivered or dead-lettered job's outbox is sent again.
    JobState.DONE: frozenset({JobState.DISPATCHING}),
    JobState.IGNORED: frozenset(),
    JobState.FAILED: frozenset({JobState.DISPATCHING}),
    JobState.SUPERSEDED: frozenset(),
}


class OutboxState(enum.StrEnum):
    """States of one outbox item (one result object for one destination), stored as these strings."""

    PENDING = "PENDING"  # waiting for its next attempt (``next_attempt_at``)
    SENT = "SENT"  # the destination stored it
    DEAD = "DEAD"  # dead-lettered; ``triaged resend`` puts it back to PENDING


class StoreOutcome(enum.StrEnum):
    """What recording one received instance did (see README, "Duplicate SOP Instance UIDs")."""

    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, identical bytes: acknowledged, nothing changes
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: the new copy replaces the old


class PriorityLevel(enum.StrEnum):
    """Triage levels of the worklist and the analysis queue, most urgent first.

    The values are what ``config.yaml`` (``analysis_priority``, ``escalate[].level``), the ledger and every
    output spell; :attr:`rank` orders them.
    """

    STAT = "STAT"
    URGENT = "URGENT"
    ROUTINE = "ROUTINE"

    @property
    def rank(self) -> int:
        """Sort rank, lower first: STAT 0, URGENT 1, ROUTINE 2 (the definition order)."""
        return tuple(PriorityLevel).index(self)


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
    pipeline: str | None = None
    priority_level: str | None = None
    priority_score: float | None = None
    priority_reasons: str = ""
    result_at: datetime | None = None
    route: str = ""  # JSON of the routing decision (rule, pipelines, destinations, policy)
    history: tuple[tuple[datetime, str, str, str], ...] = field(default=())  # (at, from, to, detail)


#: The smallest finding that makes a study CT1 (below it: CT0, "no findings"). Both must hold: the worse
#: lung at least this affected, in percent...
CT1_MIN_PCT = 1.0
#: ...and at least this much lesion volume in both lungs together, in mL. Measured (issue 11): after
#: the classical pipeline's non-pneumonia filters, real no-pneumonia series measure 0–0.95 % and healthy
#: or other-pathology phantoms 0.25–0.8 % (vessels at thick slices), while the mildest COVID-19
#: phantom (2.5 % requested) measures 1.1 % and the RICORD COVID-19 series about 14 %; the volume floor
#: keeps a few mL from grading a short stack, whose partial lungs are small.
CT1_MIN_ML = 5.0


#: The affected percentages (worse lung) where the CT grade changes: CT0 below 1 %, CT1 up to 25 %
#: inclusive, CT2 up to 50 % inclusive, CT3 below 75 %, CT4 from 75 %.
GRADE_EDGES_PCT: tuple[float, ...] = (CT1_MIN_PCT, 25.0, 50.0, 75.0)


def pct_text(pct: float) -> str:
    """An affected percentage as people read it, without the unit: one decimal, but never rounded onto a
    grade edge (:data:`GRADE_EDGES_PCT`) it is not on. 0.95 % is CT0 and reads "0.95", not "1.0" beside
    "CT0"; 0.999 reads "0.99"; 25.03 (CT2) reads "25.03", not "25.0"."""
    text = f"{pct:.1f}"
    for edge in GRADE_EDGES_PCT:
        if float(text) == edge and pct != edge:
            two = round(pct, 2)
            if two == edge:  # still on it: the last hundredth on the value's own side
                two = (math.floor(pct * 100) if pct < edge else math.ceil(pct * 100)) / 100
            return f"{two:.2f}"
    return text


class CTGrade(enum.IntEnum):
    """Russian visual CT severity scale used by seed 004 (METHODS.md, "Common vocabulary").

    CT0 is explicit: a study is CT0 when its worse lung is less than :data:`CT1_MIN_PCT` % affected or
    its lesions total less than :data:`CT1_MIN_ML` mL (:meth:`from_affected_pct`, :meth:`reason`).
    """

    CT0 = 0  # no findings: < CT1_MIN_PCT % of the worse lung or < CT1_MIN_ML mL of lesion
    CT1 = 1  # <= 25 % of a lung affected
    CT2 = 2  # 25-50 %
    CT3 = 3  # 50-75 % (hospitalise)
    CT4 = 4  # >= 75 % (intensive care)

    @classmethod
    def from_affected_pct(cls, pct: float, lesion_ml: float | None = None) -> CTGrade:
        """Grade from the affected percentage of the worse lung (seed 004) and, when known, the total
        lesion volume in mL (both lungs): below :data:`CT1_MIN_PCT` % or :data:`CT1_MIN_ML` mL is CT0."""
        if pct < CT1_MIN_PCT or (lesion_ml is not None and lesion_ml < CT1_MIN_ML):
            return cls.CT0
        if pct <= 25:
            return cls.CT1
        if pct <= 50:
            return cls.CT2
        if pct < 75:
            return cls.CT3
        return cls.CT4

    @classmethod
    def reason(cls, pct: float, lesion_ml: float | None = None) -> str:
        """Why :meth:`from_affected_pct` gives its grade, in words (e.g. for the provenance)."""
        grade = cls.from_affected_pct(pct, lesion_ml)
        if grade == cls.CT0:
            total = "" if lesion_ml is None else f", {lesion_ml:.1f} mL in both lungs"
            return (f"CT0: no opacity reaching {CT1_MIN_PCT:g} % of a lung and {CT1_MIN_ML:g} mL "
                    f"(worse lung {pct:.2f} %{total})")
        bounds = {cls.CT1: f"{CT1_MIN_PCT:g}-25 %", cls.CT2: "25-50 %", cls.CT3: "50-75 %",
                  cls.CT4: ">= 75 %"}
        return f"{grade.name}: worse lung {pct_text(pct)} % affected ({bounds[grade]})"


@dataclass(frozen=True)
class LungMeasures:
    """Volumes of one lung (or both) in mL and the affected percentage (lesion / lung x 100)."""

    lung_ml: float
    lesion_ml: float
    consolidation_ml: float

    @property
    def affected_pct(self) -> float:
        return 100.0 * self.lesion_ml / self.lung_ml if self.lung_ml > 0 else 0.0

    @property
    def consolidation_pct(self) -> float:
        return 100.0 * self.consolidation_ml / self.lung_ml if self.lung_ml > 0 else 0.0


#: CT severity score bands (Chung et al. 2020; Pan et al. 2020): a lobe scores 0 when nothing of it is
#: affected, 1 below 5 %, 2 for 5–25 %, 3 for 25–50 %, 4 for 50–75 %, 5 above 75 % (upper bounds inclusive).
CTSS_BANDS: tuple[float, ...] = (5.0, 25.0, 50.0, 75.0)


@dataclass(frozen=True)
class LobeMeasures:
    """One lobe's volume, lesion volume (mL) and CT severity score (0–5).

    ``label`` as :class:`Masks` ``lobes``: 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL.
    """

    label: int
    lobe_ml: float
    lesion_ml: float
    score: int

    @property
    def affected_pct(self) -> float:
        return 100.0 * self.lesion_ml / self.lobe_ml if self.lobe_ml > 0 else 0.0


@dataclass(frozen=True)
class LesionBox:
    """A lesion's bounding box on one slice (the slice where the lesion is largest).

    ``z`` indexes the volume; ``sop_instance_uid``/``frame_number`` name the source image; the box is
    in pixel coordinates of that image: rows ``row_min..row_max`` and columns ``col_min..col_max``
    inclusive.
    """

    z: int
    sop_instance_uid: str
    row_min: int
    col_min: int
    row_max: int
    col_max: int
    volume_ml: float
    side: str  # "left" | "right"
    frame_number: int | None = None


@dataclass(frozen=True)
class SaliencyBox:
    """A box around a region a classifier's saliency points at (seed 003: integrated gradients at three
    scales → Gaussian → Isodata → components), on one slice.

    Coordinates as :class:`LesionBox` (pixels of the source image, inclusive).  ``label`` is the class
    the saliency explains (``"covid"`` or ``"cap"``), ``score`` the box's mean normalised saliency (0–1).
    Unlike a lesion box it has no volume: it marks where the classifier looked, not a segmented lesion.
    """

    z: int
    sop_instance_uid: str
    row_min: int
    col_min: int
    row_max: int
    col_max: int
    label: str
    score: float
    frame_number: int | None = None


@dataclass(frozen=True)
class Masks:
    """Masks on the analysed volume's grid, (z, y, x).

    ``lungs``: 0 background, 1 right lung, 2 left lung.  ``lobes`` (optional): 0 background, 1 RUL,
    2 RML, 3 RLL, 4 LUL, 5 LLL.  ``lesions`` and ``consolidation``: boolean.
    """

    lungs: npt.NDArray[np.uint8]
    lesions: npt.NDArray[np.bool_]
    consolidation: npt.NDArray[np.bool_]
    lobes: npt.NDArray[np.uint8] | None = None


@dataclass(frozen=True)
class Findings:
    """What a pipeline measured on one study (ARCHITECTURE.md; METHODS.md for each figure).

    ``severity_pct`` is the affected percentage of the worse lung (seed 004), ``whole_lung_pct`` the
    affected share of both lungs together (seed 001), ``consolidation_pct`` consolidation volume over
    lung volume (seed 001's consolidation score, in percent).
    """

    pipeline: str
    pipeline_version: str
    right: LungMeasures
    left: LungMeasures
    ct_grade: CTGrade
    key_slices: tuple[int, ...] = ()  # z indices, highest lesion burden first
    lesion_boxes: tuple[LesionBox, ...] = ()
    p_covid: float | None = None
    class_probabilities: tuple[tuple[str, float], ...] = ()  # e.g. (("covid", 0.9), ("healthy", 0.05), ...)
    model_sha256: str | None = None  # of the weights used, for the model card link
    provenance: tuple[tuple[str, str], ...] = ()  # (key, value): thresholds, device, timings
    warnings: tuple[str, ...] = ()
    lobes: tuple[LobeMeasures, ...] = ()  # per lobe, when the pipeline segmented lobes
    #: P(severe) of a severe / non-severe classifier (seed 000's hierarchical MIL); None when the
    #: pipeline has none.  What it was validated on is in ``provenance`` (``p_severe_validated_on``).
    p_severe: float | None = None
    saliency_boxes: tuple[SaliencyBox, ...] = ()  # seed 003's localisation, highest score first

    @property
    def ct_severity_score(self) -> int | None:
        """CT severity score 0–25 (sum of the lobes' 0–5 scores); None when there are no lobes."""
        return sum(lobe.score for lobe in self.lobes) if self.lobes else None

    @property
    def both(self) -> LungMeasures:
        return LungMeasures(
            self.right.lung_ml + self.left.lung_ml,
            self.right.lesion_ml + self.left.lesion_ml,
            self.right.consolidation_ml + self.left.consolidation_ml,
        )

    @property
    def severity_pct(self) -> float:
        return max(self.right.affected_pct, self.left.affected_pct)

    @property
    def whole_lung_pct(self) -> float:
        return self.both.affected_pct

    @property
    def consolidation_pct(self) -> float:
        return self.both.consolidation_pct


@dataclass(frozen=True)
class AnalysisResult:
    """A pipeline's output: the findings and the masks they were measured from."""

    findings: Findings
    masks: Masks


def findings_to_json(findings: Findings) -> str:
    """Serialise Findings for the ledger (stable keys; numbers as JSON numbers)."""
    import json
    from dataclasses import asdict

    data = asdict(findings)
    data["ct_grade"] = int(findings.ct_grade)
    for key in ("lobes", "p_severe", "saliency_boxes"):
        if not data[key] and data[key] != 0:
            del data[key]  # findings without them are stored exactly as before these fields existed
    return json.dumps(data, sort_keys=True)


def findings_from_json(text: str) -> Findings:
    """Inverse of :func:`findings_to_json`."""
    import json

    d = json.loads(text)
    return Findings(
        pipeline=d["pipeline"],
        pipeline_version=d["pipeline_version"],
        right=LungMeasures(**d["right"]),
        left=LungMeasures(**d["left"]),
        ct_grade=CTGrade(d["ct_grade"]),
        key_slices=tuple(d.get("key_slices", ())),
        lesion_boxes=tuple(LesionBox(**b) for b in d.get("lesion_boxes", ())),
        p_covid=d.get("p_covid"),
        class_probabilities=tuple((str(k), float(v)) for k, v in d.get("class_probabilities", ())),
        model_sha256=d.get("model_sha256"),
        provenance=tuple((str(k), str(v)) for k, v in d.get("provenance", ())),
        warnings=tuple(d.get("warnings", ())),
        lobes=tuple(LobeMeasures(**lobe) for lobe in d.get("lobes", ())),
        p_severe=d.get("p_severe"),
        saliency_boxes=tuple(SaliencyBox(**b) for b in d.get("saliency_boxes", ())),
    )


@dataclass(frozen=True)
class OutboxEntry:
    """A result object waiting for, or delivered to, one destination."""

    id: int
    job_id: int
    destination: str
    kind: str  # "sr" | "seg" | "sc"
    path: str  # relative to the spool root
    sop_class_uid: str
    sop_instance_uid: str
    state: OutboxState
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    sent_at: datetime | None = None
    last_status: int | None = None
    last_error: str = ""
    #: The destination's type (``dicom``, ``stow-rs``, ``webhook``, ``hl7``) as configured when the item is
    #: shown; "" when unknown (the ledger does not store it): :func:`outbox_status_text` then reads the row.
    destination_type: str = ""


#: A status as dispatch writes it into an outbox item's ``last_error`` ("pacs: 0xA700 ...", "ris refused
#: notify with ACK AE ...", "pager: HTTP 503 ..."): the row's own record of what the peer answered.
_STATUS_IN_ERROR = re.compile(
    r"(?:(?:^|last error: )[^:\s]+: | with )(HTTP [0-9]{3}|ACK [A-Z]{2}|0x[0-9A-F]{4})\b"
)


#: The outbox kind of a notification (webhook, HL7) as opposed to a result object (``sr``, ``seg``, ``sc``).
NOTIFY_KIND = "notify"


def outbox_status_text(entry: OutboxEntry) -> str:
    """An outbox item's last status in its destination's own terms; "" when there is none.

    ``0x0000`` (a DIMSE status, PS3.7 Annex C) for ``dicom``, ``HTTP 200`` for ``stow-rs`` and ``webhook``,
    ``ACK AA`` / ``ACK AE`` (HL7 v2 MSA-1) for ``hl7``.  ``last_status`` holds only an integer (an HL7
    acceptance is stored as 0), so the type comes from ``entry.destination_type``; a status named in
    ``last_error`` (dispatch writes it there for every refusal) is taken as it is.  For a destination no
    longer configured the row decides: a notification item (kind ``notify``) is HL7 when its status is 0,
    else HTTP; a DICOM object with a status from 200 to 260 is STOW-RS (HTTP 2xx: PS3.7 defines no DIMSE
    status from 0x0002 to 0x0104), anything else a DIMSE status.
    """
    return status_text(entry.last_status, entry.last_error, entry.kind, entry.destination_type)


def status_text(
    last_status: int | None, last_error: str = "", kind: str = "", destination_type: str = ""
) -> str:
    """:func:`outbox_status_text` from an outbox row's columns (``kind`` is the outbox item's kind)."""
    named = _STATUS_IN_ERROR.search(last_error)
    if named:
        return named[1]
    status = last_status
    if status is None:
        return ""
    kind_of_peer = destination_type
    if not kind_of_peer:
        if kind == NOTIFY_KIND:
            kind_of_peer = "hl7" if status == 0 else "webhook"
        else:
            kind_of_peer = "stow-rs" if 200 <= status <= 0x0104 else "dicom"
    if kind_of_peer in ("stow-rs", "webhook"):
        return f"HTTP {status}"
    if kind_of_peer == "hl7":
        return "ACK AA" if status == 0 else str(status)
    return f"0x{status:04X}"


#: What every human-visible output says when a study has no P(COVID-19) that means something (the
#: pipeline has no classifier validated on real data, ``Findings.p_covid`` is None).
P_COVID_NOT_ASSESSED = "P(COVID-19): not assessed"


def p_covid_text(p_covid: float | None) -> str:
    """``"P(COVID-19) 0.87"``, or :data:`P_COVID_NOT_ASSESSED` when ``p_covid`` is None or not a number."""
    if p_covid is None or not math.isfinite(p_covid):
        return P_COVID_NOT_ASSESSED
    return f"P(COVID-19) {p_covid:.2f}"


@dataclass(frozen=True)
class WorklistRow:
    """One study on the radiology worklist: its latest job, triage priority and why."""

    study_instance_uid: str
    accession_number: str
    study_date: str
    study_description: str
    arrived: datetime
    job_id: int
    state: str
    priority_level: str | None
    priority_score: float | None
    priority_reasons: str
    result_at: datetime | None
    severity_pct: float | None = None
    ct_grade: int | None = None
    p_covid: float | None = None
    overdue: bool = False

    def as_dict(self) -> dict[str, object]:
        """The row as JSON-ready data (the same for ``triaged worklist --json`` and the HTTP endpoint)."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "accession_number": self.accession_number,
            "study_date": self.study_date,
            "study_description": self.study_description,
            "arrived": self.arrived.isoformat(),
            "job_id": self.job_id,
            "state": self.state,
            "priority_level": self.priority_level,
            "priority_score": self.priority_score,
            "priority_reasons": self.priority_reasons,
            "result_at": self.result_at.isoformat() if self.result_at else None,
            "minutes_to_result": round((self.result_at - self.arrived).total_seconds() / 60, 2)
            if self.result_at else None,
            "severity_pct": self.severity_pct,
            "ct_grade": f"CT{self.ct_grade}" if self.ct_grade is not None else None,
            "p_covid": self.p_covid,
            # In words, so that a reader of the JSON/CSV never takes a missing value for 0.00.
            "p_covid_text": p_covid_text(self.p_covid) if self.ct_grade is not None else None,
            "overdue": self.overdue,
            "note": "research use only - not for diagnosis",
        }
