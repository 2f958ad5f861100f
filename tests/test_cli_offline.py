"""The offline commands on phantoms: demo, analyze and eval (real files, real pipelines)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

from triaged.cli import main
from triaged.lab.datasets import read_dataset


def test_demo_analyze_writes_masks_findings_and_an_overview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--kind", "covid", "--severity", "30", "--matrix", "160", "--slice-thickness", "5",
                 "--seed", "5", "--out", str(tmp_path / "demo")]) == 0
    assert main(["analyze", str(tmp_path / "demo" / "dicom"), "--out", str(tmp_path / "out"), "-q",
                 "--pipeline", "classical"]) == 0
    out = capsys.readouterr().out
    assert "right lung" in out and "CT grade" in out and "Research use only" in out
    # classical has no classifier validated on real data: no number, and no silence either.
    assert "P(COVID-19): not assessed" in out and "P(COVID-19) 0" not in out
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    [truth] = read_dataset(tmp_path / "demo" / "truth")
    worse = max(findings["right"]["lesion_ml"] / findings["right"]["lung_ml"],
                findings["left"]["lesion_ml"] / findings["left"]["lung_ml"]) * 100
    assert abs(worse - truth.affected_pct_max) < 10
    for name in ("lungs", "lesions", "consolidation"):
        assert (tmp_path / "out" / f"{name}.nii.gz").stat().st_size > 0
    overview = np.asarray(Image.open(tmp_path / "out" / "overview.png"))
    assert overview.ndim == 3 and overview.shape[2] == 3
    # The NIfTI input path gives the same answer as the DICOM folder.
    case_image = truth.directory / "image.nii.gz"
    assert main(["analyze", str(case_image), "--out", str(tmp_path / "out2"), "-q", "--pipeline", "classical"]) == 0
    again = json.loads((tmp_path / "out2" / "findings.json").read_text())
    assert again["right"]["lesion_ml"] == pytest.approx(findings["right"]["lesion_ml"], rel=0.02)


def test_eval_prints_one_table_row_per_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dataset", "4", "--matrix", "128", "--seed", "9", "--out", str(tmp_path / "ds"), "-q"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ds"), "--pipelines", "threshold,classical", "-q"]) == 0
    out = capsys.readouterr().out
    assert "| method | ROC AUC vs healthy | ROC AUC vs all others | Spearman ρ | lesion Dice |" in out
    assert out.count("| threshold |") == 1 and out.count("| classical |") == 1
    assert main(["eval", str(tmp_path / "ds"), "--pipelines", "nope"]) == 2
    assert "unknown or not installed pipeline(s) nope" in capsys.readouterr().err


def test_analyze_says_clearly_what_is_wrong_with_its_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty"), "-q"]) == 1
    assert "no DICOM image found" in capsys.readouterr().err


def _slices_with_uids(
    src: Path, tmp_path: Path, edit: Callable[[int, Dataset], None], count: int = 25
) -> Path:
    """The first ``count`` slices of ``src`` (the session's phantom series: 2 mm every 6 mm) copied to
    ``tmp_path/dicom`` after ``edit(index, dataset)``."""
    dest = tmp_path / "dicom"
    dest.mkdir()
    for i, path in enumerate(sorted(src.glob("*.dcm"))[:count]):
        ds = dcmread(path)
        edit(i, ds)
        ds.save_as(dest / path.name)
    return dest


def _blank_or_break(i: int, ds: Dataset) -> None:
    if i % 3 == 0:
        ds.SOPInstanceUID = ""
    elif i % 3 == 1:
        ds.SeriesInstanceUID = ""
    else:
        ds.SOPInstanceUID = "1.2.3.abc"  # letters: not a UID (PS3.5 9.1)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(
    ("edit", "example"),
    [
        (lambda i, ds: setattr(ds, "SOPInstanceUID", ""), "no SOPInstanceUID"),
        (lambda i, ds: setattr(ds, "SeriesInstanceUID", ""), "no SeriesInstanceUID"),
        (_blank_or_break, "no SOPInstanceUID"),
    ],
)
def test_analyze_says_when_no_file_has_usable_uids(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: Callable[[int, Dataset], None],
    example: str,
    phantom_ct_series: Path,
) -> None:
    folder = _slices_with_uids(phantom_ct_series, tmp_path, edit)
    assert main(["analyze", str(folder), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"triaged analyze: 25 DICOM file(s) in {folder} have no or invalid SeriesInstanceUID/SOPInstanceUID (e.g. "
    ), err
    assert example in err and err.rstrip().endswith("; no series can be assembled")
    assert "no DICOM image found" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_analyze_names_an_invalid_uid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], phantom_ct_series: Path
) -> None:
    folder = _slices_with_uids(
        phantom_ct_series, tmp_path, lambda i, ds: setattr(ds, "SeriesInstanceUID", "1.2.x"), count=20
    )
    assert main(["analyze", str(folder), "-q"]) == 2
    err = capsys.readouterr().err
    assert "20 DICOM file(s)" in err and "SeriesInstanceUID '1.2.x' is not a valid UID (PS3.5 9.1)" in err


def test_files_with_bad_uids_are_counted_next_to_the_usable_ones(
    tmp_path: Path, phantom_ct_series: Path
) -> None:
    from triaged.config import SeriesSelectionConfig
    from triaged.errors import AssemblyError
    from triaged.volume import load_series_folder

    folder = _slices_with_uids(
        phantom_ct_series, tmp_path, lambda i, ds: setattr(ds, "SOPInstanceUID", "") if i < 5 else None
    )
    # 20 usable slices 6 mm apart (114 mm) are too short for the default rules; the refusal counts the rest.
    with pytest.raises(AssemblyError, match="5 file\\(s\\) without valid SeriesInstanceUID/SOPInstanceUID skipped"):
        load_series_folder(folder, SeriesSelectionConfig())


def test_train_says_which_data_it_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["train", "multitask", "--out", str(tmp_path / "run")]) == 2
    assert "give --real-slices DIR" in capsys.readouterr().err
    assert main(["train", "multitask", "--out", str(tmp_path / "run"), "--real-slices", str(tmp_path / "no")]) == 2
    assert f"{tmp_path / 'no'} is not the medseg-covid-slices folder" in capsys.readouterr().err
    # a folder that exists but holds no labelled slices: a clear error, not a traceback
    (tmp_path / "slices").mkdir()
    assert main(["train", "consolidation-em", "--out", str(tmp_path / "run"),
                 "--real-slices", str(tmp_path / "slices"), "--epochs", "1", "--quiet"]) == 2
    assert "no pseudo-label/images or doctor-label/images in it" in capsys.readouterr().err
    # --init-from names a model folder: anything else is refused before training starts
    (tmp_path / "slices" / "doctor-label" / "images").mkdir(parents=True)
    no_model = tmp_path / "nomodel"
    assert main(["train", "multitask", "--out", str(tmp_path / "run"), "--real-slices", str(tmp_path / "slices"),
                 "--init-from", str(no_model), "--quiet"]) == 2
    assert f"{no_model} is not a model folder (no manifest.yaml in it)" in capsys.readouterr().err
    # --real-volumes: a bad manifest is refused with its file and line before training starts
    (tmp_path / "real").mkdir()
    monkeypatch.setenv("TRIAGED_REAL_DATA", str(tmp_path / "real"))
    bad = tmp_path / "volumes.csv"
    bad.write_text("case_id,folder,diagnosis\nx,missing,covid\n", encoding="utf-8")
    assert main(["train", "consolidation-em", "--out", str(tmp_path / "run"), "--real-slices", str(tmp_path / "slices"),
                 "--real-volumes", str(bad), "--epochs", "1", "--quiet"]) == 1
    assert f"triaged: {bad}:2:" in capsys.readouterr().err
