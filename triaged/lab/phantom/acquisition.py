"""Encode a phantom as a DICOM study the way CT scanners send one (PS3.3 A.3 CT Image IOD).

The axial series follows the conventions of the vendor style chosen in the spec (PS3.3 C.7.6.3 and
C.11.1 pixel representation and rescale):

========  ==================  =========  ===========  ==========================================
style     PixelRepresentation  BitsStored  intercept    outside the reconstruction circle
========  ==================  =========  ===========  ==========================================
siemens   0 (unsigned)         12          −1024        stored 0 (reads as −1024 HU)
ge        1 (signed)           16          −1024        stored −2000 = PixelPaddingValue (−3024 HU)
philips   0 (unsigned)         12          −1000        stored 0 (−1000 HU; air clips at −1000)
canon     1 (signed)           16          0            stored −2048 = PixelPaddingValue
========  ==================  =========  ===========  ==========================================

Head-first supine images have rows along +x (image columns run from the patient's right to left) and
columns along +y. Feet-first supine images are written as reconstructed in the gantry frame, mirrored:
row direction (−1, 0, 0) and the first column at the patient's left (PS3.3 C.7.6.2.1.1). Some
scanners flip FFS images back to the radiological layout instead; the mirrored form is the one a
reader can get wrong, so it is the one produced. Instance numbers run cranio-caudally (number 1 at the
top) unless ``reversed_order``.

The study may also hold a localizer (an AP projection through the volume, ImageType
``ORIGINAL\\PRIMARY\\LOCALIZER``) and a dose screen: a secondary capture with the CTDIvol and DLP burned
in, as scanners send it. A CT Radiation Dose SR (TID 10011) is not produced: its required content tree
is large and a hand-made one is hard to keep dciodvfy-clean; the secondary capture exercises the same
thing (a non-axial, non-CT-image object in the study that series selection must ignore).

Every header says the images are synthetic and for research use only (SeriesDescription,
ImageComments, Manufacturer). The Synthetic Data attribute (0008,001C) is left out because the
dciodvfy release the tests use does not know it yet and reports it as an error. UIDs are 2.25 UIDs of name-based UUIDs of the spec, so the
same spec always gives the same UIDs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pydicom.valuerep import format_number_as_ds

from triaged import __version__
from triaged.domain import Volume
from triaged.lab.phantom.dosescreen import render_text
from triaged.lab.phantom.generate import fov_mask
from triaged.lab.phantom.spec import Phantom, PhantomSpec, Vendor

RESEARCH_NOTE: Final[str] = "SYNTHETIC PHANTOM - RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
_UNCOMPRESSED: Final[frozenset[str]] = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}
)


@dataclass(frozen=True)
class VendorStyle:
    """Pixel storage conventions of one vendor style."""

    pixel_representation: int
    bits_stored: int
    intercept: int
    padding_stored: int | None  # PixelPaddingValue (None: outside-FOV pixels stored as air, no tag)
    outside_stored: int
    kernel: str
    model: str


def vendor_style(vendor: Vendor) -> VendorStyle:
    """Storage conventions imitated for ``vendor`` (see the module docstring)."""
    if vendor == "siemens":
        return VendorStyle(0, 12, -1024, None, 0, "Br40d", "SIEMENS-STYLE SYNTHETIC")
    if vendor == "ge":
        return VendorStyle(1, 16, -1024, -2000, -2000, "STANDARD", "GE-STYLE SYNTHETIC")
    if vendor == "philips":
        return VendorStyle(0, 12, -1000, None, 0, "B", "PHILIPS-STYLE SYNTHETIC")
    return VendorStyle(1, 16, 0, -2048, -2048, "FC13", "CANON-STYLE SYNTHETIC")


#: Namespace of the name-based UUIDs behind phantom UIDs (any fixed UUID; this one is uuid5(OID, name)).
_UID_NAMESPACE: Final[uuid.UUID] = uuid.uuid5(uuid.NAMESPACE_OID, "triaged.lab.phantom")


def study_uid(spec: PhantomSpec, role: str = "study", index: int | None = None) -> str:
    """Deterministic UID of a study part (``study``, ``frame``, ``series-axial``, ``sop-axial``…).

    A 2.25 UID (PS3.5 B.2) made from a name-based SHA-1 UUID (RFC 4122 version 5) of the spec, the
    role and the index. ``pydicom.uid.generate_uid(prefix=None, ...)`` cannot be used for this: it
    ignores ``entropy_srcs`` and returns a random UUID.
    """
    name = "|".join([repr(spec), role] + ([] if index is None else [str(index)]))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _ds(x: float) -> str:
    return format_number_as_ds(float(x)) if abs(x) >= 1e-9 else "0"


def _study_date(spec: PhantomSpec) -> tuple[str, str]:
    d = date(2020, 3, 1) + timedelta(days=spec.seed % 700)
    seconds = 8 * 3600 + (spec.seed * 7919) % (10 * 3600)
    return d.strftime("%Y%m%d"), f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _common(
    phantom: Phantom,
    study_instance_uid: str,
    patient_name: str | None,
    patient_id: str | None,
    accession_number: str | None,
) -> Dataset:
    spec = phantom.spec
    day, time = _study_date(spec)
    sex, age = phantom.patient_sex, phantom.patient_age
    birth = date(int(day[:4]) - age, 1 + spec.seed % 12, 1 + spec.seed % 28)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient_name or f"PHANTOM^{spec.name}"
    ds.PatientID = patient_id or f"PHANTOM-{spec.seed}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = sex
    ds.PatientAge = f"{age:03d}Y"
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = day
    ds.StudyTime = time
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number if accession_number is not None else f"PH{spec.seed % 10**12:012d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST SYNTHETIC PHANTOM (RESEARCH)"
    ds.Manufacturer = "TRIAGED PHANTOM"
    ds.ManufacturerModelName = vendor_style(spec.vendor).model
    ds.SoftwareVersions = f"triaged {__version__}"
    ds.InstitutionName = "SYNTHETIC DATA"
    ds.DeviceSerialNumber = "0"
    ds.SeriesDate = day
    ds.SeriesTime = time
    ds.ContentDate = day
    ds.ContentTime = time
    return ds


def _finish(
    ds: Dataset, sop_class: str, sop_uid: str, pixels: npt.NDArray[np.integer], syntax: str
) -> Dataset:
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"TRIAGED_{__version__}"[:16]
    ds.file_meta = meta
    ds.Rows, ds.Columns = pixels.shape
    if syntax in _UNCOMPRESSED:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds["PixelData"].VR = "OW" if ds.BitsAllocated == 16 else "OB"
        meta.TransferSyntaxUID = UID(syntax)
    else:
        ds.compress(syntax, np.ascontiguousarray(pixels), generate_instance_uid=False)
    return ds


def _stored(
    hu: npt.NDArray[np.int16], style: VendorStyle, outside: npt.NDArray[np.bool_]
) -> npt.NDArray[np.integer]:
    """HU → stored values under a vendor style (clipped to its range; padding outside the circle)."""
    lo = 0 if style.pixel_representation == 0 else -(2 ** (style.bits_stored - 1))
    hi = 2**style.bits_stored - 1 if style.pixel_representation == 0 else 2 ** (style.bits_stored - 1) - 1
    stored = np.clip(hu.astype(np.int32) - style.intercept, lo, hi)
    stored[outside] = style.outside_stored
    return stored.astype(np.uint16 if style.pixel_representation == 0 else np.int16)


def _axial(phantom: Phantom, common: Dataset, frame_uid: str, syntax: str) -> list[Dataset]:
    spec = phantom.spec
    style = vendor_style(spec.vendor)
    hu = phantom.hu
    nz, ny, nx = hu.shape
    affine = phantom.affine
    pixel = float(affine[0, 0])
    dz = float(affine[2, 2])
    x0, y0, z0 = (float(c) for c in affine[:3, 3])
    outside = ~fov_mask(ny, nx, pixel, x0, y0)
    series_uid = study_uid(spec, "series-axial")
    ctdi = round(4.0 + 8.0 * (20.0 / max(phantom.noise_hu, 5.0)) ** 2 / 4.0, 2)
    out: list[Dataset] = []
    for i in range(nz):
        ds = Dataset()
        ds.update(common)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.SeriesDescription = f"SYNTHETIC RESEARCH ONLY CHEST {spec.thickness:g}MM"[:64]
        ds.ProtocolName = "SYNTHETIC CHEST"
        ds.BodyPartExamined = "CHEST"
        ds.PatientPosition = "FFS" if spec.feet_first else "HFS"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = (i + 1) if spec.reversed_order else (nz - i)
        ds.AcquisitionDate = common.StudyDate
        ds.AcquisitionTime = common.StudyTime
        z = z0 + i * dz
        if spec.feet_first:
            ds.ImageOrientationPatient = ["-1", "0", "0", "0", "1", "0"]
            ds.ImagePositionPatient = [_ds(x0 + (nx - 1) * pixel), _ds(y0), _ds(z)]
            pixels = hu[i][:, ::-1]
            mask = outside[:, ::-1]
        else:
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
            ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
            pixels = hu[i]
            mask = outside
        ds.PixelSpacing = [_ds(pixel), _ds(pixel)]
        ds.SliceThickness = _ds(spec.thickness)
        ds.SliceLocation = _ds(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = style.bits_stored
        ds.HighBit = style.bits_stored - 1
        ds.PixelRepresentation = style.pixel_representation
        ds.RescaleIntercept = str(style.intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        if style.padding_stored is not None:
            ds.add_new(0x00280120, "SS" if style.pixel_representation else "US", style.padding_stored)
        ds.WindowCenter = ["-600", "40"]
        ds.WindowWidth = ["1500", "400"]
        ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        ds.KVP = "120"
        ds.XRayTubeCurrent = 200
        ds.ExposureTime = 500
        ds.Exposure = 100
        ds.ConvolutionKernel = style.kernel
        ds.ReconstructionDiameter = _ds(phantom.reconstruction_diameter)
        ds.DataCollectionDiameter = "500"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ScanOptions = "HELICAL MODE"
        ds.CTDIvol = ctdi
        phantom_code = Dataset()
        phantom_code.CodeValue = "113691"
        phantom_code.CodingSchemeDesignator = "DCM"
        phantom_code.CodeMeaning = "IEC Body Dosimetry Phantom"
        ds.CTDIPhantomTypeCodeSequence = [phantom_code]
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.ImageComments = RESEARCH_NOTE
        out.append(
            _finish(ds, CTImageStorage, study_uid(spec, "sop-axial", i), _stored(pixels, style, mask), syntax)
        )
    out.sort(key=lambda d: int(d.InstanceNumber))
    return out


def _localizer(phantom: Phantom, common: Dataset, frame_uid: str, syntax: str) -> Dataset:
    """AP topogram: line integrals of attenuation through the volume, superior at the top."""
    from scipy import ndimage

    spec = phantom.spec
    affine = phantom.affine
    pixel = float(affine[0, 0])
    dz = float(affine[2, 2])
    x0, y0, z0 = (float(c) for c in affine[:3, 3])
    nz, ny, nx = phantom.hu.shape
    mu = np.clip(phantom.hu.astype(np.float32) + 1000.0, 0.0, None) * np.float32(0.019 / 1000.0 * pixel)
    integral = mu.sum(axis=1)  # (z, x)
    rows = max(2, int(round(nz * dz / pixel)))
    image = ndimage.zoom(integral[::-1], (rows / nz, 1.0), order=1)
    stored = np.clip(image * 600.0, 0, 4095).astype(np.uint16)
    row_spacing = nz * dz / rows
    ds = Dataset()
    ds.update(common)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.Modality = "CT"
    ds.SeriesInstanceUID = study_uid(spec, "series-localizer")
    ds.SeriesNumber = 1
    ds.SeriesDescription = "SYNTHETIC RESEARCH ONLY TOPOGRAM"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "FFS" if spec.feet_first else "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    top = z0 + (nz - 1) * dz + 0.5 * (dz - row_spacing)
    ds.ImagePositionPatient = [_ds(x0), "0", _ds(top)]
    ds.PixelSpacing = [_ds(row_spacing), _ds(pixel)]
    ds.SliceThickness = "1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.WindowCenter = "1400"
    ds.WindowWidth = "2800"
    ds.KVP = "120"
    ds.XRayTubeCurrent = 35
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageComments = RESEARCH_NOTE
    return _finish(ds, CTImageStorage, study_uid(spec, "sop-localizer"), stored, syntax)


def _dose_screen(phantom: Phantom, common: Dataset, syntax: str) -> Dataset:
    spec = phantom.spec
    nz = phantom.hu.shape[0]
    length_cm = nz * float(phantom.affine[2, 2]) / 10.0
    ctdi = round(4.0 + 8.0 * (20.0 / max(phantom.noise_hu, 5.0)) ** 2 / 4.0, 2)
    dlp = round(ctdi * length_cm, 1)
    lines = [
        "SYNTHETIC DOSE REPORT",
        "RESEARCH USE ONLY - NOT FOR DIAGNOSIS",
        "",
        f"PATIENT ID: {common.PatientID}",
        f"STUDY DATE: {common.StudyDate}",
        "",
        "SERIES  TYPE     KV   CTDIVOL  DLP",
        "                      (MGY)    (MGY*CM)",
        "1       TOPOGRAM 120  0.10     0.5",
        f"2       HELICAL  120  {ctdi:<8.2f} {dlp:.1f}",
        "",
        f"TOTAL DLP: {dlp + 0.5:.1f} MGY*CM",
    ]
    image = render_text(lines, 512)
    ds = Dataset()
    ds.update(common)
    ds.Modality = "CT"
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.SeriesInstanceUID = study_uid(spec, "series-dose")
    ds.SeriesNumber = 501
    ds.SeriesDescription = "SYNTHETIC RESEARCH ONLY DOSE REPORT"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "YES"
    ds.LossyImageCompression = "00"
    ds.ImageComments = f"{RESEARCH_NOTE}; CTDIvol {ctdi} mGy, DLP {dlp + 0.5:.1f} mGy*cm"
    return _finish(ds, SecondaryCaptureImageStorage, study_uid(spec, "sop-dose"), image, syntax)


def to_datasets(
    phantom: Phantom,
    *,
    study_instance_uid: str | None = None,
    patient_name: str | None = None,
    patient_id: str | None = None,
    accession_number: str | None = None,
) -> list[Dataset]:
    """The phantom as the instances a scanner would send: axial series (+ localizer, dose screen).

    Parameters
    ----------
    phantom : Phantom
        What to encode; its spec chooses vendor style, orientation, order, extra series and the
        transfer syntax.
    study_instance_uid, patient_name, patient_id, accession_number : str or None
        Overrides of the deterministic defaults (``PHANTOM^COVID40``, ``PHANTOM-<seed>``…).

    Returns
    -------
    list of pydicom.Dataset
        Localizer first (if any), then the axial images in instance-number order, then the dose
        screen (if any). Each has ``file_meta`` with its transfer syntax, ready to write or send.
    """
    spec = phantom.spec
    syntax = spec.transfer_syntax or ExplicitVRLittleEndian
    common = _common(
        phantom, study_instance_uid or study_uid(spec), patient_name, patient_id, accession_number
    )
    frame_uid = study_uid(spec, "frame")
    out: list[Dataset] = []
    if spec.with_localizer:
        out.append(_localizer(phantom, common, frame_uid, syntax))
    out.extend(_axial(phantom, common, frame_uid, syntax))
    if spec.with_dose_report:
        out.append(_dose_screen(phantom, common, syntax))
    return out


def to_volume(phantom: Phantom, *, study_instance_uid: str | None = None) -> Volume:
    """The phantom as the :class:`~triaged.domain.Volume` a reader of its axial series would build.

    The array is the canonical one (slices inferior → superior) and the SOP Instance UIDs are those
    :func:`to_datasets` gives each slice, so findings can reference the DICOM instances.
    """
    spec = phantom.spec
    nz = phantom.hu.shape[0]
    return Volume(
        hu=phantom.hu,
        spacing=phantom.spacing,
        affine=phantom.affine.copy(),
        sop_instance_uids=tuple(study_uid(spec, "sop-axial", i) for i in range(nz)),
        series_instance_uid=study_uid(spec, "series-axial"),
        study_instance_uid=study_instance_uid or study_uid(spec),
    )
