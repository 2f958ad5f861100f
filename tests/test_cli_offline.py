"""The offline commands on phantoms: demo, analyze and eval (real files, real pipelines)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from triaged.cli import main
from triaged.datasets import read_dataset


def test_demo_analyze_writes_masks_findings_and_an_overview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--kind", "covid", "--severity", "30", "--matrix", "160", "--slice-thickness", "5",
                 "--seed", "5", "--out", str(tmp_path / "demo")]) == 0
    assert main(["analyze", str(tmp_path / "demo" / "dicom"), "--out", str(tmp_path / "out"), "-q",
                 "--pipeline", "classical"]) == 0
    out = capsys.readouterr().out
    assert "right lung" in out and "CT grade" in out and "Research use only" in out
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
