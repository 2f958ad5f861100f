"""Reading headers and volumes from real and re-encoded CT files.

Real data lives outside the repository (``$TRIAGED_REAL_DATA``, or ``../shared/data/real`` next to the checkout); tests
that need it skip with a message when it is absent.  Copies and re-encodings are written to tmp dirs.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.conftest import REAL_DATA as REAL  # noqa: E402
from triaged.assembly import FramedInstanceHeader, select_series
from triaged.config import SeriesSelectionConfig
from triaged.domain import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, InstanceHeader, SeriesChoice, Volume
from triaged.errors import AssemblyError
from triaged.volume import load_volume, read_header, read_headers

CHEST = REAL / "chest-ct-lung-pet-ct-dx"
LIDC = REAL / "lidc-idri-small"
RULES = SeriesSelectionConfig()
SHORT_RULES = SeriesSelectionConfig(min_slices=10, min_coverage_mm=10)


def need(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(
            f"real CT data not available at {folder} (set TRIAGED_REAL_DATA to the folder holding it)"
        )
    return folder


def rel_files(root: Path, folder: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in folder.glob("*.dcm"))


def choose(root: Path, rels: list[str], rules: SeriesSelectionConfig = RULES) -> SeriesChoice:
    headers, problems = read_headers(root, rels)
    assert problems == []
    return select_series(headers, rules)


def load_folder(folder: Path, rules: SeriesSelectionConfig = RULES) -> Volume:
    choice = choose(folder, rel_files(folder, folder), rules)
    assert choice.series_uid is not None, choice.reason
    return load_volume(folder, choice, "1.2.826.0.1.3680043.10.1")


def copy_series(
    src: Path,
    dst: Path,
    edit: Callable[[Dataset, int], None] | None = None,
    *,
    order: list[int] | None = None,
) -> Path:
    """Copy a series, optionally editing each dataset (``index`` is the position in sorted file order)."""
    dst.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(src.glob("*.dcm"))):
        if edit is None:
            shutil.copy(f, dst / f.name)
            continue
        ds = dcmread(f)
        edit(ds, i)
        ds.save_as(dst / f.name, enforce_file_format=True)
    return dst


def ipp_by_sop(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in folder.glob("*.dcm"):
        ds = dcmread(f, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = np.asarray([float(v) for v in ds.ImagePositionPatient])
    return out


@pytest.fixture(scope="module")
def chest() -> Volume:
    return load_folder(need(CHEST))


# --- headers ----------------------------------------------------------------------------------------


def test_headers_of_the_real_series_carry_geometry_and_kernel() -> None:
    root = need(REAL)
    h = read_header(root, "chest-ct-lung-pet-ct-dx/1-01.dcm")
    assert h.path == "chest-ct-lung-pet-ct-dx/1-01.dcm"
    assert (h.modality, h.sop_class_uid, h.rows, h.columns) == ("CT", CT_IMAGE_STORAGE, 512, 512)
    assert h.image_type[:3] == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert h.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert h.image_position == pytest.approx((-173.1767578125, -294.1767578125, 312.0))
    assert h.pixel_spacing == pytest.approx((0.646484375, 0.646484375))
    assert (h.slice_thickness, h.convolution_kernel, h.series_number, h.number_of_frames) == (
        8.0,
        "B40f",
        3,
        1,
    )


def test_an_unreadable_file_is_a_problem_line_not_an_exception(tmp_path: Path) -> None:
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all" * 100)
    (tmp_path / "empty.dcm").write_bytes(b"")
    write_ct(tmp_path / "good.dcm", np.zeros((8, 8), np.uint16), z=0.0)
    headers, problems = read_headers(tmp_path, ["junk.dcm", "good.dcm", "missing.dcm", "empty.dcm"])
    assert [h.path for h in headers] == ["good.dcm"]
    assert len(problems) == 3
    assert problems[0].startswith("junk.dcm: ")
    assert problems[1] == "missing.dcm: file not found"
    assert problems[2].startswith("empty.dcm: ")


# --- the real series ---------------------------------------------------------------------------------


def test_the_real_series_has_the_right_geometry(chest: Volume) -> None:
    assert chest.hu.shape == (30, 512, 512) and chest.hu.dtype == np.int16
    assert chest.spacing == pytest.approx((8.0, 0.646484375, 0.646484375))
    ipp = ipp_by_sop(CHEST)
    # First along the normal (0, 0, 1) is the most inferior slice.
    assert chest.affine[:3, 3] == pytest.approx([-173.1767578125, -294.1767578125, 80.0])
    assert np.diag(chest.affine)[:3] == pytest.approx([0.646484375, 0.646484375, 8.0])
    for k, sop in enumerate(chest.sop_instance_uids):
        assert (chest.affine @ [0, 0, k, 1])[:3] == pytest.approx(ipp[sop])
    assert chest.warnings == () and chest.frame_numbers == ()


def test_the_real_series_has_plausible_hounsfield_units(chest: Volume) -> None:
    hu = chest.hu
    assert hu.min() >= -1024
    corners = hu[:, :40, :40]  # outside the body
    assert -1024 <= np.median(corners) <= -950
    # Two body populations: fat around -100 HU and soft tissue (muscle, blood, organs) at 0..100 HU.
    soft, edges = np.histogram(hu, bins=25, range=(-50, 200))
    assert 0 <= edges[np.argmax(soft)] <= 100
    fat, edges = np.histogram(hu, bins=20, range=(-200, -50))
    assert -150 <= edges[np.argmax(fat)] <= -60
    # Lung parenchyma exists: a clear population between -950 and -700 HU.
    assert np.mean((hu > -950) & (hu < -700)) > 0.05


def test_slices_are_sorted_whatever_the_file_order() -> None:
    root = need(CHEST)
    choice = choose(root, rel_files(root, root))
    forward = load_volume(root, choice, "1.2.3")
    shuffled = list(choice.instances)
    random.Random(7).shuffle(shuffled)
    for instances in (tuple(reversed(choice.instances)), tuple(shuffled)):
        vol = load_volume(root, replace(choice, instances=instances), "1.2.3")
        assert np.array_equal(vol.hu, forward.hu)
        assert vol.sop_instance_uids == forward.sop_instance_uids
        assert np.array_equal(vol.affine, forward.affine)


def test_a_feet_first_copy_runs_along_its_own_normal(tmp_path: Path, chest: Volume) -> None:
    def feet_first(ds: Dataset, _: int) -> None:
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        ds.PatientPosition = "FFS"

    folder = copy_series(need(CHEST), tmp_path / "ffs", feet_first)
    vol = load_folder(folder)
    ipp = ipp_by_sop(folder)
    # n = (-1,0,0) × (0,1,0) = (0,0,-1): the first slice is the most superior, z decreases along k.
    assert vol.affine[:3, 3] == pytest.approx([-173.1767578125, -294.1767578125, 312.0])
    assert vol.affine[:3, :3] == pytest.approx(np.diag([-0.646484375, 0.646484375, -8.0]))
    for k, sop in enumerate(vol.sop_instance_uids):
        assert (vol.affine @ [0, 0, k, 1])[:3] == pytest.approx(ipp[sop])
    assert np.array_equal(vol.hu, chest.hu[::-1])


# --- transfer syntaxes -----------------------------------------------------------------------------


def _dcmtk(tool: str, *args: str) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        subprocess.run([tool, *args, str(src), str(dst)], check=True, capture_output=True, timeout=60)

    encode.tool = tool  # type: ignore[attr-defined]
    return encode


def _pydicom(syntax: UID) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        ds = dcmread(src)
        if syntax.is_compressed:
            ds.compress(syntax, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(dst, enforce_file_format=True)

    return encode


# DCMTK where it has the encoder; pydicom (pylibjpeg-openjpeg) for JPEG 2000 and deflate.
ENCODINGS: dict[str, tuple[UID, Callable[[Path, Path], None]]] = {
    "JPEG-LS lossless (dcmcjpls)": (JPEGLSLossless, _dcmtk("dcmcjpls")),
    "JPEG lossless SV1 (dcmcjpeg +e1)": (JPEGLosslessSV1, _dcmtk("dcmcjpeg", "+e1")),
    "JPEG lossless process 14 (dcmcjpeg +el)": (JPEGLossless, _dcmtk("dcmcjpeg", "+el")),
    "RLE lossless (dcmcrle)": (RLELossless, _dcmtk("dcmcrle")),
    "JPEG 2000 lossless (pydicom + openjpeg)": (JPEG2000Lossless, _pydicom(JPEG2000Lossless)),
    "deflated explicit VR little endian (pydicom)": (
        DeflatedExplicitVRLittleEndian,
        _pydicom(DeflatedExplicitVRLittleEndian),
    ),
}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            syntax, encode = ENCODINGS[name]
            tool = getattr(encode, "tool", None)
            if tool is not None and shutil.which(tool) is None:
                pytest.skip(f"{tool} (DCMTK) not installed: no encoder for {syntax.name}")
            folder = tmp_path_factory.mktemp("enc")
            for f in sorted(need(CHEST).glob("*.dcm")):
                try:
                    encode(f, folder / f.name)
                except (RuntimeError, NotImplementedError) as exc:
                    pytest.skip(f"no encoder for {syntax.name}: {exc}")
            made[name] = folder
        return made[name]

    yield get


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_a_re_encoded_series_loads_to_the_same_hounsfield_units(
    name: str, encoded: Callable[[str], Path], chest: Volume
) -> None:
    folder = encoded(name)
    syntax = ENCODINGS[name][0]
    assert dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    vol = load_folder(folder)
    assert np.array_equal(vol.hu, chest.hu)
    assert vol.sop_instance_uids == chest.sop_instance_uids
    assert np.array_equal(vol.affine, chest.affine)


def test_a_lossy_jpeg_series_loads_close_to_the_original(tmp_path: Path, chest: Volume) -> None:
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmcjpeg (DCMTK) not installed: no JPEG extended encoder")
    src = need(CHEST)
    for f in sorted(src.glob("*.dcm"))[:3]:
        _dcmtk("dcmcjpeg", "+ee", "+q", "95")(f, tmp_path / f.name)
    headers, _ = read_headers(tmp_path, rel_files(tmp_path, tmp_path))
    # DCMTK marks lossy output DERIVED (PS3.3 C.7.6.1.1.2), so series choice would refuse it: load directly.
    assert all(h.image_type[0] == "DERIVED" for h in headers)
    vol = load_volume(tmp_path, SeriesChoice(headers[0].series_instance_uid, "test", tuple(headers)), "1.2")
    assert vol.hu.shape == (3, 512, 512)
    assert np.mean(np.abs(vol.hu.astype(np.int32) - chest.hu[-3:].astype(np.int32))) < 15


# --- duplicates and gaps ------------------------------------------------------------------------------


def _with_extra_copy(tmp_path: Path, change_pixels: bool) -> Path:
    folder = copy_series(need(CHEST), tmp_path / "dup")
    ds = dcmread(folder / "1-05.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.99"
    if change_pixels:
        arr = ds.pixel_array.copy()
        arr[200:300, 200:300] += 100
        ds.PixelData = arr.tobytes()
    ds.save_as(folder / "1-05-copy.dcm", enforce_file_format=True)
    return folder


def test_a_duplicate_slice_with_identical_pixels_is_kept_once_with_a_warning(
    tmp_path: Path, chest: Volume
) -> None:
    folder = _with_extra_copy(tmp_path, change_pixels=False)
    choice = choose(folder, rel_files(folder, folder))
    assert len(choice.instances) == 31
    vol = load_volume(folder, choice, "1.2.3")
    assert np.array_equal(vol.hu, chest.hu)
    assert "1.2.826.0.1.3680043.10.99" in vol.sop_instance_uids  # the lower UID of the pair is kept
    assert len(vol.warnings) == 1 and vol.warnings[0].startswith(
        "duplicate slice at 280.00 mm along the normal"
    )


def test_a_duplicate_position_with_different_pixels_is_refused(tmp_path: Path) -> None:
    folder = _with_extra_copy(tmp_path, change_pixels=True)
    choice = choose(folder, rel_files(folder, folder))
    with pytest.raises(
        AssemblyError, match=r"different images at the same position .*280.00 mm \(max \|ΔHU\| 100\)"
    ):
        load_volume(folder, choice, "1.2.3")


def test_missing_slices_are_a_gap_for_both_choice_and_load(tmp_path: Path) -> None:
    folder = copy_series(need(CHEST), tmp_path / "gap")
    (folder / "1-10.dcm").unlink()
    (folder / "1-11.dcm").unlink()
    headers, _ = read_headers(folder, rel_files(folder, folder))
    refused = select_series(headers, SeriesSelectionConfig(min_slices=10, min_coverage_mm=10))
    assert refused.series_uid is None
    assert "gap of 24.0 mm between 224.0 and 248.0 mm" in refused.reason
    forced = SeriesChoice(series_uid=headers[0].series_instance_uid, reason="test", instances=tuple(headers))
    with pytest.raises(
        AssemblyError, match=r"missing slices: gap of 24.0 mm between 224.0 and 248.0 mm .*2 slice"
    ):
        load_volume(folder, forced, "1.2.3")


def test_irregular_spacing_is_a_warning_with_the_positions(tmp_path: Path) -> None:
    def shift(ds: Dataset, i: int) -> None:
        if ds.InstanceNumber == 15:
            ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0

    vol = load_folder(copy_series(need(CHEST), tmp_path / "irr", shift))
    assert vol.spacing[0] == pytest.approx(8.0)
    assert len(vol.warnings) == 1
    assert "irregular slice spacing" in vol.warnings[0]
    assert "step 9.0 mm between 192.0 and 201.0 mm" in vol.warnings[0]


# --- Enhanced CT -------------------------------------------------------------------------------------------


def build_enhanced_ct(src: Path, dst: Path, frame_order: list[int]) -> None:
    """An Enhanced CT (PS3.3 A.38) instance whose frame i is the ``frame_order[i]``-th file of ``src``."""
    files = sorted(src.glob("*.dcm"))
    slices = [dcmread(files[i]) for i in frame_order]
    first = slices[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.SeriesNumber = 7
    ds.SeriesDescription = "Enhanced copy"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    for kw in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, kw, getattr(first, kw))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = len(slices)
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = first.PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = first.SliceThickness
    shared.CTReconstructionSequence = [Dataset()]
    shared.CTReconstructionSequence[0].ConvolutionKernel = first.ConvolutionKernel
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for s in slices:
        item = Dataset()
        item.PlanePositionSequence = [Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = s.ImagePositionPatient
        item.PixelValueTransformationSequence = [Dataset()]
        item.PixelValueTransformationSequence[0].RescaleSlope = s.RescaleSlope
        item.PixelValueTransformationSequence[0].RescaleIntercept = s.RescaleIntercept
        item.PixelValueTransformationSequence[0].RescaleType = "HU"
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = b"".join(s.PixelData for s in slices)
    ds.save_as(dst, enforce_file_format=True)


def test_an_enhanced_ct_built_from_the_real_slices_loads_frame_by_frame(
    tmp_path: Path, chest: Volume
) -> None:
    order = list(range(30))
    random.Random(3).shuffle(order)
    build_enhanced_ct(need(CHEST), tmp_path / "enhanced.dcm", order)

    header = read_header(tmp_path, "enhanced.dcm")
    assert isinstance(header, FramedInstanceHeader)
    assert (header.number_of_frames, len(header.frame_positions), header.convolution_kernel) == (
        30,
        30,
        "B40f",
    )
    assert header.pixel_spacing == pytest.approx((0.646484375, 0.646484375))

    choice = select_series([header], RULES)
    assert choice.series_uid is not None, choice.reason
    assert "30 axial slices × 8.0 mm" in choice.reason
    vol = load_volume(tmp_path, choice, "1.2.3")
    assert np.array_equal(vol.hu, chest.hu)
    assert np.array_equal(vol.affine, chest.affine)
    assert set(vol.sop_instance_uids) == {header.sop_instance_uid}
    # Files sort so that file i holds z = 312 - 8 i; volume slice k (z = 80 + 8 k) is file 29 - k.
    assert vol.frame_numbers == tuple(order.index(29 - k) + 1 for k in range(30))


def test_an_enhanced_header_without_frame_positions_is_completed_from_the_file(
    tmp_path: Path, chest: Volume
) -> None:
    build_enhanced_ct(need(CHEST), tmp_path / "enhanced.dcm", list(range(30)))
    framed = read_header(tmp_path, "enhanced.dcm")
    plain = InstanceHeader(**{k: getattr(framed, k) for k in InstanceHeader.__dataclass_fields__})
    vol = load_volume(tmp_path, SeriesChoice(plain.series_instance_uid, "test", (plain,)), "1.2.3")
    assert np.array_equal(vol.hu, chest.hu)


# --- LIDC (GE, signed storage, padding) ----------------------------------------------------------------


def test_the_short_lidc_stacks_are_refused_by_default_and_say_why() -> None:
    root = need(LIDC)
    rels = [str(p.relative_to(root)) for p in sorted(root.glob("LIDC-IDRI-*/*.dcm"))]
    choice = choose(root, rels)
    assert choice.series_uid is None
    assert choice.reason.startswith("no axial CT series with ≥ 20 slices and ≥ 150 mm coverage; found: ")
    for text in ("16 axial slices × 2.5 mm", "12 axial slices × 1.25 mm", "11 axial slices × 2.5 mm"):
        assert text in choice.reason
    assert choice.reason.count("too few slices") == 3
    accepted = choose(root, rels, SHORT_RULES)
    assert accepted.series_uid is not None
    assert "12 axial slices × 1.25 mm" in accepted.reason  # the thinnest wins
    assert len(accepted.candidates) == 3


@pytest.mark.parametrize(
    ("patient", "slices", "step"), [("0001", 16, 2.5), ("0002", 12, 1.25), ("0003", 11, 2.5)]
)
def test_a_lidc_stack_loads_with_padding_replaced_by_air(patient: str, slices: int, step: float) -> None:
    folder = need(LIDC) / f"LIDC-IDRI-{patient}"
    vol = load_folder(folder, SHORT_RULES)
    assert vol.hu.shape == (slices, 512, 512)
    assert vol.spacing[0] == pytest.approx(step)
    assert vol.hu.min() == -1024  # -2048 / -2000 padding outside the field of view became air
    assert vol.hu[:, 0, 0].tolist() == [-1024] * slices
    ipp = ipp_by_sop(folder)
    zs = [ipp[s][2] for s in vol.sop_instance_uids]
    assert zs == sorted(zs)
    assert vol.affine[:3, 3] == pytest.approx(ipp[vol.sop_instance_uids[0]])


# --- storage conventions (synthetic, no real data needed) -----------------------------------------------


def write_ct(
    path: Path,
    stored: np.ndarray,
    *,
    z: float,
    y: float = 0.0,
    intercept: float = -1024.0,
    slope: float = 1.0,
    padding: tuple[str, int] | None = None,
    series_uid: str = "1.2.826.0.1.3680043.10.5",
) -> None:
    """A minimal CT Image Storage file with ``stored`` as its pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = f"{series_uid}.{int(z * 10) + 10000}"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, y, z]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if padding is not None:
        ds.add_new(0x00280120, padding[0], padding[1])
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


HU = np.array([[-2048, -1100, -1000, -1024], [0, 40, 1000, 3070]], dtype=np.int16)
EXPECTED = np.array([[-1024, -1024, -1000, -1024], [0, 40, 1000, 3070]], dtype=np.int16)


@pytest.mark.parametrize(
    ("stored", "kwargs", "expected"),
    [
        ("unsigned, intercept -1024", {"intercept": -1024.0}, EXPECTED),
        ("signed, intercept 0", {"intercept": 0.0}, EXPECTED),
        ("signed, padding -2048 written as US 63488", {"intercept": 0.0, "padding": ("US", 63488)}, EXPECTED),
        (
            "signed, padding 40 as SS",
            {"intercept": 0.0, "padding": ("SS", 40)},
            np.where(HU == 40, -1024, EXPECTED),
        ),
        ("unsigned halves, slope 2", {"intercept": -1024.0, "slope": 2.0}, EXPECTED),
    ],
)
def test_storage_conventions_give_the_same_hounsfield_units(
    tmp_path: Path, stored: str, kwargs: dict[str, object], expected: np.ndarray
) -> None:
    hu = HU.astype(np.int32)
    if stored.startswith("unsigned halves"):
        pixels = ((np.maximum(hu, -1024) + 1024) // 2).astype(np.uint16)
    elif stored.startswith("unsigned"):
        pixels = np.maximum(hu + 1024, 0).astype(np.uint16)
    else:
        pixels = hu.astype(np.int16)
    for k in range(3):
        write_ct(tmp_path / f"{k}.dcm", pixels, z=float(k), **kwargs)  # type: ignore[arg-type]
    vol = load_folder(tmp_path, SeriesSelectionConfig(min_slices=3, min_coverage_mm=0))
    assert vol.hu.dtype == np.int16
    for k in range(3):
        assert vol.hu[k].tolist() == expected.tolist()


def test_a_slice_with_another_matrix_is_refused_at_load(tmp_path: Path) -> None:
    for k in range(3):
        write_ct(tmp_path / f"{k}.dcm", np.zeros((4, 4) if k else (4, 6), np.uint16), z=float(k))
    headers, _ = read_headers(tmp_path, ["0.dcm", "1.dcm", "2.dcm"])
    with pytest.raises(AssemblyError, match="differs from"):
        load_volume(tmp_path, SeriesChoice(headers[0].series_instance_uid, "test", tuple(headers)), "1.2")


def test_loading_a_refusal_raises_with_its_reason(tmp_path: Path) -> None:
    with pytest.raises(AssemblyError, match="no series to load: nothing here"):
        load_volume(tmp_path, SeriesChoice(None, "nothing here"), "1.2")


def test_a_sheared_stack_from_a_tilted_gantry_keeps_the_affine_on_the_slices(tmp_path: Path) -> None:
    for k in range(4):
        write_ct(tmp_path / f"{k}.dcm", np.zeros((4, 4), np.uint16), z=2.0 * k, y=0.5 * k)
    vol = load_folder(tmp_path, SeriesSelectionConfig(min_slices=4, min_coverage_mm=0))
    assert vol.spacing == pytest.approx((2.0, 0.5, 0.5))
    for k in range(4):
        assert (vol.affine @ [0, 0, k, 1])[:3] == pytest.approx([0.0, 0.5 * k, 2.0 * k])
    assert len(vol.warnings) == 1 and "sheared up to 1.50 mm" in vol.warnings[0]
