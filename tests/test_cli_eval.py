"""``triaged eval`` on real labelled sets: MedSeg slices and a volume manifest of real series (issue 11).

Small real subsets (3 slices, the two short LIDC stacks) keep each test at a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REAL_DATA
from triaged.cli import RESEARCH_NOTE, main

DOCTOR = REAL_DATA / "medseg-covid-slices" / "doctor-label"
LIDC = REAL_DATA / "lidc-idri-small"
#: The non-learned pipelines only (no torch import: keeps the tests at seconds).
NONLEARNED = ["--registry", "triaged.analysis.pipeline:default_registry"]


def _rows(out: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown rows whose first cell is ``first_cell``."""
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_eval_on_three_real_doctor_labelled_slices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not DOCTOR.is_dir():
        pytest.skip(f"real data folder {DOCTOR} is absent (only on development machines)")
    report = tmp_path / "r.json"
    args = ["eval", str(DOCTOR), "--limit", "3", "-p", "threshold,classical", "-q", *NONLEARNED, "--json", str(report)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"slice set {DOCTOR}: 3 image(s)")
    # the MedSeg slices are stored transposed (lungs above and below each other): the set is turned for the
    # non-learned lung segmentation, which looks for the lungs left and right of the midline
    assert "orientation: 3 of 3 slice(s) show the lungs above and below each other: transposed" in out
    assert ("| method | images (with lesion) | Dice | sensitivity | specificity | reference lesion in lung mask "
            "| affected % − reference, pp: mean (mean \\|·\\|), ρ | failed |") in out
    assert "Per volume" not in out  # one slice per source: no volumes
    data = json.loads(report.read_text(encoding="utf-8"))
    assert data["kind"] == "slice set" and [s["name"] for s in data["slices"]] == [
        "doctor-label/0", "doctor-label/1", "doctor-label/2"]
    for name in ("threshold", "classical"):
        (row,) = _rows(out, name)
        assert row[1] == "3 (3)" and row[-1] == "0"  # every slice has a lesion; none failed
        dice_, sens, spec = (float(v) for v in row[2:5])
        # the table is the mean of the per-slice figures in the JSON (3 decimals)
        per = data["slices"]
        assert dice_ == pytest.approx(np.mean([s[name]["dice"] for s in per]), abs=6e-4)
        assert sens == pytest.approx(np.mean([s[name]["sensitivity"] for s in per]), abs=6e-4)
        assert spec == pytest.approx(np.mean([s[name]["specificity"] for s in per]), abs=6e-4)
        assert 0.0 <= dice_ <= 1.0 and spec > 0.8
        # both lungs are found, so the reference infection lies inside the lung mask (not transposed: 0.3)
        assert float(row[5]) >= 0.8
    assert out.rstrip().endswith(f"{RESEARCH_NOTE}\nJSON report in {report}")


def test_eval_split_refuses_a_set_without_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    for sub in ("images", "infection"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / sub / f"1.{'jpg' if sub == 'images' else 'png'}")
    assert main(["eval", str(tmp_path), "--split", "validation", "-p", "classical", "-q", *NONLEARNED]) == 2
    assert "no validation split is defined" in capsys.readouterr().err


def test_eval_of_held_out_pseudo_labelled_slices_sums_them_per_volume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pseudo = REAL_DATA / "medseg-covid-slices" / "pseudo-label"
    if not pseudo.is_dir():
        pytest.skip(f"real data folder {pseudo} is absent (only on development machines)")
    report = tmp_path / "r.json"
    args = ["eval", str(pseudo), "--split", "validation", "--limit", "3", "-p", "classical", "-q", *NONLEARNED]
    assert main([*args, "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "3 image(s), validation split" in out
    assert "Per volume (slices of one source summed), affected % of the lungs:" in out
    assert "| Data-1_coronacases_org_003 | 3 | " in out  # the first held-out volume
    (volume,) = json.loads(report.read_text(encoding="utf-8"))["volumes"]
    assert volume["source"] == "Data-1_coronacases_org_003" and volume["slices"] == 3
    assert volume["classical"]["reference_pct"] > 0


def test_eval_on_a_manifest_of_the_short_real_lidc_stacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not LIDC.is_dir():
        pytest.skip(f"real data folder {LIDC} is absent (only on development machines)")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "case_id,folder,diagnosis,note\n"
        "lidc-2,LIDC-IDRI-0002,normal,12 x 1.25 mm\n"
        "lidc-3,LIDC-IDRI-0003,normal,11 x 2.5 mm\n",
        encoding="utf-8",
    )
    report = tmp_path / "r.json"
    args = ["eval", str(manifest), "--root", str(LIDC), "-p", "threshold,classical", "-q", *NONLEARNED,
            "--json", str(report)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"volume manifest {manifest}: 2 case(s) under {LIDC}" in out
    assert "lidc-2: series 3000522 (no description): 12 axial slices × 1.25 mm" in out  # short stacks are read
    for case in ("lidc-2", "lidc-3"):
        rows = _rows(out, case)
        assert [r[2] for r in rows] == ["threshold", "classical"] and all(r[1] == "normal" for r in rows)
        for r in rows:
            right, left, whole = (float(v) for v in r[3:6])
            assert 0.0 <= min(right, left) <= whole <= max(right, left) <= 100.0
            assert r[6] in {"CT0", "CT1", "CT2", "CT3", "CT4"} and r[7] == "—"
    for name in ("threshold", "classical"):
        (row,) = _rows(out, name)
        # no COVID-19 case: both AUCs are undefined; the worst normal case is one of the two
        assert row[1] == "—" and row[3] == "—" and row[4].split()[0] in {"lidc-2", "lidc-3"}
        assert row[5:] == ["0/0/2", "0"]
    data = json.loads(report.read_text(encoding="utf-8"))
    assert data["kind"] == "volume manifest" and [c["case_id"] for c in data["cases"]] == ["lidc-2", "lidc-3"]
    assert data["cases"][0]["classical"]["ct_grade"] in range(5)


def test_eval_names_missing_data_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,folder,diagnosis\nx,gone,covid\n", encoding="utf-8")
    assert main(["eval", str(manifest), "--root", str(tmp_path), "-p", "classical", "-q", *NONLEARNED]) == 2
    assert f"m.csv:2: folder {tmp_path / 'gone'} of x does not exist" in capsys.readouterr().err
    assert main(["eval", str(manifest), "--root", str(tmp_path / "nope"), "-p", "classical", "-q", *NONLEARNED]) == 2
    assert f"data root {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "absent"), "-p", "classical", "-q", *NONLEARNED]) == 2
    assert f"triaged eval: {tmp_path / 'absent'} does not exist" in capsys.readouterr().err
