"""Warm the encoders of a new worker process: SR, SEG and SC of a tiny synthetic study, built and discarded.

highdicom loads its IOD and module tables (JSON) and pydicom, PIL and matplotlib build their lookup
tables on first use; in a fresh worker the first study's encoding paid ~2 s for it (300-slice phantom,
``classical``: SR + SEG + SC 4.3 s on the first study of a process, 2.3 s on the second).  The warm-up
pays it at start instead, on a 6-slice, 48 x 48 study made here (no patient data, nothing written or sent).

Research use only - not for diagnosis.
"""

from __future__ import annotations

import time

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from triaged.analysis.severity import findings_from_masks
from triaged.domain import RESEARCH_NOTE, Masks, Volume

#: Slices, rows/columns, slice spacing and pixel size (mm) of the synthetic study.
_NZ, _N, _DZ, _PIXEL = 6, 48, 2.0, 5.0


def _uid(*parts: str) -> str:
    return str(generate_uid(prefix=None, entropy_srcs=["triaged-warm-up", *parts]))


def synthetic_study() -> tuple[Volume, list[Dataset], Masks]:
    """A 6-slice synthetic chest (two lungs, one lesion of ~10 mL, lobes), its CT headers and masks."""
    study, series, frame = _uid("study"), _uid("series"), _uid("frame")
    sops = tuple(_uid("sop", str(z)) for z in range(_NZ))
    hu = np.full((_NZ, _N, _N), 40, dtype=np.int16)
    lungs = np.zeros(hu.shape, dtype=np.uint8)
    lungs[:, 14:34, 6:20] = 1  # right lung on the image's left (radiological view)
    lungs[:, 14:34, 28:42] = 2
    hu[lungs > 0] = -850
    lesions = np.zeros(hu.shape, dtype=bool)
    lesions[:, 20:28, 8:14] = True
    hu[lesions] = -400
    consolidation = np.zeros(hu.shape, dtype=bool)
    consolidation[:, 22:24, 9:11] = True
    lobes = np.where(lungs == 1, 3, np.where(lungs == 2, 5, 0)).astype(np.uint8)
    lobes[:, 14:20][lungs[:, 14:20] == 1] = 1
    lobes[:, 14:22][lungs[:, 14:22] == 2] = 4
    affine = np.diag([_PIXEL, _PIXEL, _DZ, 1.0])
    affine[:3, 3] = (-120.0, -120.0, 0.0)
    volume = Volume(hu, (_DZ, _PIXEL, _PIXEL), affine, sops, series, study)
    source = []
    for z, sop in enumerate(sops):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "CT"
        ds.PatientName = "WARM^UP"
        ds.PatientID = "triaged-warm-up"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = "20260101"
        ds.StudyTime = "000000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber = 1
        ds.InstanceNumber = z + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-120.0, -120.0, z * _DZ]
        ds.PixelSpacing = [_PIXEL, _PIXEL]
        ds.SliceThickness = _DZ
        ds.Rows = ds.Columns = _N
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.ImageComments = RESEARCH_NOTE
        source.append(ds)
    return volume, source, Masks(lungs, lesions, consolidation, lobes=lobes)


def warm_encoders() -> float:
    """Build (and drop) the SR, SEG and SC of :func:`synthetic_study`; the seconds it took."""
    from triaged.encode import OutputContext, build_outputs

    t0 = time.perf_counter()
    volume, source, masks = synthetic_study()
    findings = findings_from_masks(volume, masks, pipeline="warm-up", version="0")
    build_outputs(findings, masks, volume, source, OutputContext(software_version="warm-up"))
    return time.perf_counter() - t0
