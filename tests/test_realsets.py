"""Real labelled evaluation sets (triaged.lab.realsets, triaged.analysis.realslice): reading the MedSeg slice
sets and volume manifests, their errors, and running real pipelines on real slices (issue 11)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REAL_DATA
from triaged.analysis.pipeline import default_registry
from triaged.analysis.realslice import (
    DOCTOR_VALIDATION,
    PSEUDO_VALIDATION,
    assumed_pixel_mm,
    lungs_stacked_vertically,
    slice_volume,
)
from triaged.lab.realsets import (
    ManifestError,
    RealSetError,
    default_data_root,
    detect_kind,
    evaluate_slice_set,
    read_manifest,
    read_slice_set,
)

SLICES = REAL_DATA / "medseg-covid-slices"
MANIFEST = Path(__file__).resolve().parents[1] / "eval" / "real-volumes.csv"


@pytest.fixture
def slices() -> Path:
    if not SLICES.is_dir():
        pytest.skip(f"real data folder {SLICES} is absent (only on development machines)")
    return SLICES


@pytest.fixture
def real_root() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} is absent (only on development machines)")
    return REAL_DATA


def test_detect_kind_tells_phantoms_slices_and_manifests_apart(tmp_path: Path, slices: Path) -> None:
    assert detect_kind(slices / "doctor-label") == "slices"
    assert detect_kind(slices / "multiclass") == "slices"
    assert detect_kind(MANIFEST) == "volumes"
    (tmp_path / "labels.csv").write_text("case_id\n", encoding="utf-8")
    assert detect_kind(tmp_path) == "phantoms"
    with pytest.raises(RealSetError, match="nowhere does not exist"):
        detect_kind(tmp_path / "nowhere")
    (tmp_path / "x").mkdir()
    with pytest.raises(RealSetError, match="is none of"):
        detect_kind(tmp_path / "x")


def test_doctor_label_set_reads_50_slices_and_its_15_held_out_ones(slices: Path) -> None:
    everything = read_slice_set(slices / "doctor-label")
    held = read_slice_set(slices / "doctor-label", split="validation")
    rest = read_slice_set(slices / "doctor-label", split="training")
    assert len(everything.refs) == 50 and len(held.refs) == 15 and len(rest.refs) == 35
    assert [r.name.split("/")[1] for r in held.refs] == list(DOCTOR_VALIDATION)
    assert [r.name for r in read_slice_set(slices / "doctor-label", limit=3).refs] == [
        "doctor-label/0",
        "doctor-label/1",
        "doctor-label/2",
    ]
    s = held.refs[0].load()
    assert s.grey.dtype == np.uint8 and s.lesion.shape == s.grey.shape and s.lesion.any()
    assert s.consolidation is None and not everything.multiclass


def test_multiclass_labels_give_lesions_and_consolidation(slices: Path) -> None:
    mc = read_slice_set(slices / "multiclass")
    assert mc.multiclass and len(mc.refs) == 50
    loaded = [r.load() for r in mc.refs[:10]]
    assert all(s.consolidation is not None for s in loaded)
    assert any(s.consolidation is not None and s.consolidation.any() for s in loaded)
    for s in loaded:  # consolidation (2) is part of the lesion (1 or 2)
        assert s.consolidation is not None and not np.any(s.consolidation & ~s.lesion)


def test_pseudo_label_slices_share_a_source_per_volume_and_hold_out_whole_volumes(slices: Path) -> None:
    ps = read_slice_set(slices / "pseudo-label", limit=5)
    assert {r.source for r in ps.refs} == {"Data-1_coronacases_org_001"}
    assert [int(r.name.rpartition("_")[2]) for r in ps.refs] == sorted(
        int(r.name.rpartition("_")[2]) for r in ps.refs
    )
    held = read_slice_set(slices / "pseudo-label", split="validation")
    rest = read_slice_set(slices / "pseudo-label", split="training")
    assert {r.source for r in held.refs} == set(PSEUDO_VALIDATION) and len(held.refs) == 286
    assert not {r.source for r in rest.refs} & set(PSEUDO_VALIDATION) and len(rest.refs) == 1600 - 286


def test_a_split_of_a_set_that_has_none_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    for sub in ("images", "infection"):
        (tmp_path / sub).mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "images" / "3.jpg")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "infection" / "3.png")
    assert len(read_slice_set(tmp_path).refs) == 1
    with pytest.raises(RealSetError, match="no validation split is defined for this set"):
        read_slice_set(tmp_path, split="validation")


def test_a_slice_without_its_mask_is_named(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "infection").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "images" / "3.jpg")
    with pytest.raises(RealSetError, match=r"infection/3\.png is missing"):
        read_slice_set(tmp_path)


def test_slice_volume_embeds_the_slice_in_a_body_and_crops_back_exactly() -> None:
    hu = np.full((40, 60), -850, np.int16)
    vol, crop = slice_volume(hu, assumed_pixel_mm(hu.shape))
    assert assumed_pixel_mm(hu.shape) == pytest.approx(320.0 / 60)
    assert vol.hu.shape[0] == 1 and np.array_equal(vol.hu[0][crop], hu)
    assert vol.hu[0, 0, 0] == -1000  # air outside the synthetic body
    r = crop[0].start - 1
    assert vol.hu[0, r, crop[1].start] == 40  # soft-tissue band around the slice
    assert vol.spacing[1] == vol.spacing[2] == pytest.approx(320.0 / 60)


def test_stacked_lungs_are_recognised_on_a_drawn_slice_and_on_the_stored_medseg_slices(slices: Path) -> None:
    chest = np.full((120, 160), 200, np.uint8)  # soft tissue
    chest[30:90, 15:70] = 40  # right lung
    chest[30:90, 90:145] = 40  # left lung: mediastinum between them in the middle columns
    assert not lungs_stacked_vertically(chest) and lungs_stacked_vertically(chest.T)
    stored = read_slice_set(slices / "doctor-label", split="validation", limit=3)
    greys = [ref.load().grey for ref in stored.refs]
    assert all(lungs_stacked_vertically(g) for g in greys)
    assert not any(lungs_stacked_vertically(g.T) for g in greys)


def test_non_learned_pipelines_analyse_real_slices_without_failing(slices: Path) -> None:
    sset = read_slice_set(slices / "doctor-label", split="validation", limit=2)
    pipelines = {n: default_registry().get(n) for n in ("threshold", "classical")}
    result = evaluate_slice_set(sset, pipelines)
    assert result.transposed and result.stacked == 2
    for name in pipelines:
        scores = result.scores[name]
        assert len(scores) == 2 and not any(s.failed for s in scores), [s.error for s in scores]
        for s in scores:
            assert 0.0 <= s.dice <= 1.0 and s.specificity is not None and s.specificity > 0.8
    w = result.windows["doctor-label/44"]
    assert w.lo_hu < -900 and w.hi_hu > -200  # a lung-type window was found, not garbage
    assert result.volume_severities() == {}  # one slice per source: no volumes
    for s in result.scores["classical"]:  # the slices are infected: both percentages are real numbers
        assert s.affected_pct is not None and s.reference_pct is not None and 0 < s.reference_pct < 100


def test_the_slices_of_a_pseudo_labelled_volume_are_summed_into_its_severity(slices: Path) -> None:
    sset = read_slice_set(slices / "pseudo-label", split="validation")
    one = [r for r in sset.refs if r.source == PSEUDO_VALIDATION[0]][30:33]
    result = evaluate_slice_set(
        replace(sset, refs=tuple(one)), {"classical": default_registry().get("classical")}
    )
    (v,) = result.volume_severities()["classical"]
    scores = result.scores["classical"]
    assert v.source == PSEUDO_VALIDATION[0] and v.n_slices == 3
    assert v.reference_pct == pytest.approx(
        100 * sum(s.reference_px for s in scores) / sum(s.reference_lung_px for s in scores)
    )
    assert v.reference_pct is not None and v.reference_pct > 1  # infected slices of a COVID-19 volume
    assert result.to_json()["volumes"][0]["classical"]["reference_pct"] == pytest.approx(
        v.reference_pct, abs=1e-3
    )


# ---- manifests ----------------------------------------------------------------------------------------
def test_the_shipped_manifest_lists_the_real_volumes(real_root: Path) -> None:
    entries = read_manifest(MANIFEST, real_root)
    by_id = {e.case_id: e for e in entries}
    assert by_id["ricord-1a-001012"].diagnosis == "covid"
    assert sorted(e.diagnosis for e in entries).count("normal") == 5
    assert all(e.folder.is_dir() and e.folder.is_relative_to(real_root) for e in entries)
    # LIDC-IDRI-0001 of the small stacks is the same patient as lidc-idri-0001-full: not listed twice
    assert not any(e.folder.name == "LIDC-IDRI-0001" for e in entries)


def _manifest(tmp_path: Path, *rows: str, header: str = "case_id,folder,diagnosis,note") -> Path:
    path = tmp_path / "m.csv"
    path.write_text("# comment line\n" + header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_manifest_errors_name_the_file_the_line_and_the_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    good = _manifest(tmp_path, "a1,a,covid,fine")
    assert [(e.case_id, e.line) for e in read_manifest(good, root)] == [("a1", 3)]
    cases = [
        (("a1,a,flu,x",), "m.csv:3: diagnosis 'flu' of a1 is not one of covid, cap, normal"),
        (("a1,a,covid,x", "b1,b,normal,x"), f"m.csv:4: folder {root / 'b'} of b1 does not exist"),
        (("a1,a,covid,x", "a1,a,normal,x"), "m.csv:4: case_id 'a1' already on line 3"),
        (("a1,,covid,x",), "m.csv:3: empty folder for a1"),
        (("a1,a,covid,x,extra",), "m.csv:3: 5 fields but the header has 4"),
        (("a1,/abs,covid,x",), "m.csv:3: folder /abs must be relative to the data root"),
    ]
    for rows, message in cases:
        with pytest.raises(ManifestError) as info:
            read_manifest(_manifest(tmp_path, *rows), root)
        assert message in str(info.value), str(info.value)
    with pytest.raises(ManifestError, match="m.csv:2: header lacks column.s. diagnosis"):
        read_manifest(_manifest(tmp_path, "a1,a", header="case_id,folder"), root)
    with pytest.raises(ManifestError, match="m.csv:2: unknown column.s. grade"):
        read_manifest(_manifest(tmp_path, "a1,a,covid,1", header="case_id,folder,diagnosis,grade"), root)
    with pytest.raises(RealSetError, match=f"data root {tmp_path / 'none'} does not exist"):
        read_manifest(good, tmp_path / "none")


def test_the_data_root_is_the_option_else_the_environment_else_next_to_the_checkout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert default_data_root(tmp_path) == tmp_path
    monkeypatch.setenv("TRIAGED_REAL_DATA", str(tmp_path / "env"))
    assert default_data_root() == tmp_path / "env"
    monkeypatch.delenv("TRIAGED_REAL_DATA")
    checkout = Path(__file__).resolve().parents[1]
    assert default_data_root() == checkout.parent / "shared" / "data" / "real"
