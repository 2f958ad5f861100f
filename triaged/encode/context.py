"""What every encoder needs besides the findings: the output context and the source image references.

:class:`OutputContext` carries the device identity, the analysis revision, the predecessor SR and the
triage priority.  :class:`SourceImages` maps each z index of a :class:`~triaged.domain.Volume` to the
source image (SOP instance and, for Enhanced CT, frame number) it came from, so that the SR and SEG can
reference the images the measurements were made on (PS3.3 C.7.6.1.1.3 Source Image Sequence, C.8.20.2
Derivation Image, PS3.16 TID 1500 image references).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from triaged.domain import Volume
from triaged.encode.uids import device_uid

#: Series description of each output; every one says "research use only" (ARCHITECTURE.md).
SR_SERIES_DESCRIPTION = "triaged COVID-19 triage report (research use only)"
SEG_SERIES_DESCRIPTION = "triaged lungs and lesions (research use only)"
SC_SERIES_DESCRIPTION = "triaged chest overview (research use only)"

#: The research-use statement carried by the SR and burned into every SC image.
RESEARCH_USE_TEXT = (
    "Research use only. These results were computed automatically by triaged, a research tool that is "
    "not a medical device; they are not for diagnosis and must not replace reading of the images."
)
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


@dataclass(frozen=True)
class OutputContext:
    """Who creates the outputs and how they relate to earlier ones.

    Attributes
    ----------
    software_version
        triaged's version (Software Versions, PS3.3 C.7.5.1).
    revision
        1 for the first analysis of a study, 2, 3, ... for re-analyses; part of every derived UID.
    predecessor_sr
        ``(study UID, series UID, SOP instance UID)`` of the SR this one supersedes (PS3.3 C.17.2,
        Predecessor Documents Sequence), or None.
    priority_level
        Triage priority to show ("STAT", "URGENT", "ROUTINE"), or None.
    institution
        Institution Name of the outputs, or None.
    manufacturer, device_name, device_serial_number
        General / Enhanced General Equipment (PS3.3 C.7.5.1, C.7.5.2) and the SR device observer
        (PS3.16 TID 1004).
    device_uid
        Device Observer UID; derived from the device name and manufacturer when None.
    sr_series_number, seg_series_number, sc_series_number
        Series Number of each output series.
    content_datetime
        Content Date/Time written to every object; None means "now".  A fixed value makes two
        encodings of the same analysis byte-identical apart from nothing (used by tests and re-sends).
    key_slice_images
        How many axial key-slice overlay images to add to the SC series (0: only the coronal overview).
    """

    software_version: str
    revision: int = 1
    predecessor_sr: tuple[str, str, str] | None = None
    priority_level: str | None = None
    institution: str | None = None
    manufacturer: str = "triaged project"
    device_name: str = "triaged"
    device_serial_number: str = "triaged-node"
    device_uid: str | None = None
    sr_series_number: int = 9901
    seg_series_number: int = 9902
    sc_series_number: int = 9903
    content_datetime: datetime | None = None
    key_slice_images: int = 1

    def __post_init__(self) -> None:
        if self.revision < 1:
            raise ValueError(f"revision must be >= 1, got {self.revision}")
        if self.key_slice_images < 0:
            raise ValueError("key_slice_images must be >= 0")

    @property
    def observer_uid(self) -> str:
        """Device Observer UID of this installation."""
        return self.device_uid or device_uid(self.device_name, self.manufacturer)

    def stamp(self) -> datetime:
        """Content date and time to record."""
        return self.content_datetime or datetime.now()

    def model_name(self, pipeline: str) -> str:
        """Manufacturer's Model Name of an output of ``pipeline``: device name and pipeline (LO, 64 chars)."""
        return f"{self.device_name} {pipeline}"[:64]


@dataclass(frozen=True)
class ImageRef:
    """One source image of a z index: SOP Class and Instance UID, and frame (1-based) when multi-frame."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None


@dataclass(frozen=True)
class SourceImages:
    """The source datasets of a volume and the image each z index came from.

    ``datasets`` holds each source instance once: one per z for single-frame CT in volume z order, or
    the Enhanced CT instance(s).  ``refs[z]`` is the image of slice z.
    """

    datasets: tuple[Dataset, ...]
    refs: tuple[ImageRef, ...]

    @property
    def multi_frame(self) -> bool:
        return any(r.frame_number is not None for r in self.refs)

    @property
    def first(self) -> Dataset:
        return self.datasets[0]


def map_source_images(volume: Volume, source: Sequence[Dataset]) -> SourceImages:
    """Match source datasets to the z indices of ``volume`` by SOP Instance UID.

    Parameters
    ----------
    volume
        The analysed volume (its ``sop_instance_uids`` and ``frame_numbers`` name each slice's image).
    source
        Headers (pixel data not needed) of the source instances, in any order; extra instances (for
        example duplicates the volume dropped) are ignored.

    Raises
    ------
    ValueError
        A slice's instance is missing from ``source``, or the sources are not of one study and series.
    """
    if not source:
        raise ValueError("no source datasets given")
    by_uid: dict[str, Dataset] = {}
    for ds in source:
        by_uid.setdefault(str(ds.SOPInstanceUID), ds)
    ordered: list[Dataset] = []
    seen: set[str] = set()
    refs: list[ImageRef] = []
    for z, uid in enumerate(volume.sop_instance_uids):
        found = by_uid.get(uid)
        if found is None:
            raise ValueError(f"slice {z}: source instance {uid} not among the {len(by_uid)} source datasets")
        ds = found
        frames = int(ds.get("NumberOfFrames") or 1)
        frame: int | None = None
        if frames > 1 or volume.frame_numbers:
            frame = volume.frame_numbers[z] if volume.frame_numbers else 1
            if frames == 1:
                frame = None  # a single-frame instance mixed into a multi-frame volume
        refs.append(ImageRef(str(ds.SOPClassUID), uid, frame))
        if uid not in seen:
            seen.add(uid)
            ordered.append(ds)
    studies = {str(ds.StudyInstanceUID) for ds in ordered}
    series = {str(ds.SeriesInstanceUID) for ds in ordered}
    if len(studies) != 1 or len(series) != 1:
        raise ValueError(f"source datasets span {len(studies)} studies and {len(series)} series, not one")
    return SourceImages(tuple(ordered), tuple(refs))


def set_content_datetime(ds: Dataset, when: datetime) -> None:
    """Overwrite the creation timestamps highdicom sets to "now" (PS3.3 C.7.6.1, C.12.1, C.8.6.1).

    Series Date/Time, Content Date/Time, Instance Creation Date/Time and (SC) Date/Time of Secondary
    Capture and the Contribution DateTime of the processing equipment all describe when the output
    was made, so one analysis gets one timestamp and a re-send of the same analysis encodes the same
    bytes.
    """
    date, time = DA(when.date()), TM(when.time().replace(microsecond=0))
    for date_kw, time_kw in (
        ("SeriesDate", "SeriesTime"),
        ("ContentDate", "ContentTime"),
        ("InstanceCreationDate", "InstanceCreationTime"),
        ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
    ):
        if date_kw in ds or time_kw in ds or date_kw in ("ContentDate", "SeriesDate"):
            setattr(ds, date_kw, date)
            setattr(ds, time_kw, time)
    # highdicom records itself as processing equipment with the current time (PS3.3 C.12.1.1.5).
    for item in ds.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when.replace(microsecond=0))


def body_part(source: Dataset) -> str:
    """Body Part Examined of the outputs: the source's value, CHEST when the source has none."""
    value = str(source.get("BodyPartExamined") or "").strip().upper()
    return value or "CHEST"


#: Patient and General Study attributes (PS3.3 C.7.1.1, C.7.2.1) highdicom copies from the first source
#: dataset; all are Type 2, so a source may lack them and the output must still have them (empty).
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def with_patient_study_defaults(ds: Dataset) -> Dataset:
    """A copy of ``ds`` in which every Type 2 Patient / General Study attribute is present.

    The copy is shallow at the top level (sequences are shared): only new top-level elements are added.
    """
    if all(kw in ds for kw in _TYPE2_PATIENT_STUDY):
        return ds
    out = Dataset()
    out.update(ds)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for kw in _TYPE2_PATIENT_STUDY:
        if kw not in out:
            setattr(out, kw, "")
    return out
