"""Writing and reading synthetic studies: DICOM folders and the labelled NIfTI dataset."""

from __future__ import annotations

import csv
from dataclasses import replace
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread

from triaged.lab.datasets import (
    LABEL_COLUMNS,
    LABELS_FILE,
    MASKS,
    append_label,
    label_row,
    read_dataset,
    regenerate,
    write_case,
    write_dataset,
    write_demo_study,
    write_dicom_study,
)
from triaged.lab.phantom import Phantom, PhantomSpec, dataset_specs, generate, to_datasets

TINY = {"matrix": 96, "pixel_spacing": 4.0, "slice_thickness": 3.0, "slices": 100}


@cache
def covid() -> Phantom:
    return generate(PhantomSpec(kind="covid", severity=35.0, seed=5, **TINY))


def test_a_written_case_reads_back_with_identical_arrays_and_geometry(tmp_path: Path) -> None:
    ph = covid()
    write_case(ph, tmp_path, "c1")
    append_label(tmp_path, label_row("c1", ph.truth, ph.spec))
    (case,) = read_dataset(tmp_path)
    assert np.array_equal(case.hu(), ph.hu) and case.hu().dtype == np.int16
    for name in MASKS:
        assert np.array_equal(case.mask(name), getattr(ph.truth, name)), name
    spacing, affine = case.geometry()
    assert spacing == ph.spacing
    assert np.array_equal(affine, ph.affine)
    vol = case.volume()
    assert np.array_equal(vol.affine, ph.affine) and vol.spacing == ph.spacing
    truth = case.truth()
    assert truth.affected_pct_max == pytest.approx(ph.truth.affected_pct_max, abs=1e-4)
    assert truth.ct_grade == ph.truth.ct_grade and truth.label == "covid"


def test_nifti_files_are_oriented_for_viewers_with_the_left_lung_on_the_patients_left(tmp_path: Path) -> None:
    ph = covid()
    folder = write_case(ph, tmp_path, "c1")
    img = nib.load(str(folder / "image.nii.gz"))
    lungs = nib.load(str(folder / "lungs.nii.gz"))
    # voxel axes run to the patient's Left, Posterior, Superior (DICOM's layout), in a RAS header
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert np.array_equal(img.affine, lungs.affine)
    assert img.header.get_data_dtype() == np.int16
    data = np.asarray(lungs.dataobj)
    ijk = np.argwhere(data == 2).mean(axis=0), np.argwhere(data == 1).mean(axis=0)
    ras_left, ras_right = (img.affine @ np.append(p, 1.0) for p in ijk)
    assert ras_left[0] < ras_right[0]  # RAS +x is the patient's right
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1


def test_a_dataset_has_a_labels_row_per_case_in_the_documented_columns(tmp_path: Path) -> None:
    specs = [replace(s, **TINY) for s in dataset_specs(4, seed=2, matrix=96)]
    folders = write_dataset(specs, tmp_path, progress=False)
    assert [f.name for f in folders] == [f"case-{i:04d}-{s.kind}" for i, s in enumerate(specs)]
    with (tmp_path / LABELS_FILE).open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == LABEL_COLUMNS
        rows = list(reader)
    assert [r["label"] for r in rows] == ["covid", "healthy", "bacterial", "other"]
    cases = read_dataset(tmp_path)
    assert [c.case_id for c in cases] == [f.name for f in folders]
    for case, spec in zip(cases, specs, strict=True):
        assert case.spec == spec and case.seed == spec.seed
        assert case.affected_pct_max == pytest.approx(max(case.affected_pct_left, case.affected_pct_right))
        for name in MASKS:
            assert (case.directory / f"{name}.nii.gz").is_file()
    covid_case = cases[0]
    assert covid_case.ct_grade >= 1 and covid_case.affected_pct_max > 0
    assert cases[1].affected_pct_max == 0.0 and cases[1].ct_grade == 0
    # a case can be regenerated bit for bit from the spec stored with it
    assert np.array_equal(regenerate(cases[2]).hu, cases[2].hu())


def test_reading_a_dataset_with_a_missing_column_or_image_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / LABELS_FILE).write_text("case_id,label\nx,covid\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_dataset(tmp_path)
    header = ",".join(LABEL_COLUMNS)
    (tmp_path / LABELS_FILE).write_text(f"{header}\nx,covid,1,1,1,1,0,1,3,\n")
    with pytest.raises(FileNotFoundError, match="image.nii.gz"):
        read_dataset(tmp_path)


def test_a_dicom_study_is_written_one_folder_per_series(tmp_path: Path) -> None:
    ph = covid()
    ph = replace(ph, spec=replace(ph.spec, with_localizer=True, with_dose_report=True, feet_first=True))
    datasets = to_datasets(ph)
    paths = write_dicom_study(datasets, tmp_path)
    assert len(paths) == len(datasets) == ph.hu.shape[0] + 2
    assert {p.parent.name for p in paths} == {"S001", "S002", "S501"}
    again = dcmread(tmp_path / "S002" / "I00001.dcm")
    assert again.StudyInstanceUID == datasets[0].StudyInstanceUID and again.PatientPosition == "FFS"


def test_the_demo_writes_a_study_and_its_ground_truth(tmp_path: Path) -> None:
    spec = PhantomSpec(kind="covid", severity=40.0, seed=3, **TINY)
    demo = write_demo_study(spec, tmp_path)
    assert demo.dicom_dir == tmp_path / "dicom" and len(demo.dicom_files) == TINY["slices"]
    assert str(dcmread(demo.dicom_files[0]).PatientName) == "PHANTOM^COVID40"
    (case,) = read_dataset(demo.truth_dir)
    assert case.case_id == "covid40-seed3" and abs(case.affected_pct_max - 40.0) <= 2.0
    first = dcmread(demo.dicom_files[0])
    assert first.ImageComments.startswith("SYNTHETIC PHANTOM")
