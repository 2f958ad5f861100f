"""``consolidation-em`` on thick slices: the hilar bronchovascular bundle is no lesion (issue 11).

On the 8 mm Lung-PET-CT-Dx thorax (no pneumonia) UNet-1 marked the left lower-lobe bundle at the hilum,
23 mL, 1.4 % of the left lung: CT1.  :mod:`triaged.nets.thick_slices` drops the network's lesion
components of a volume with slices thicker than the network's 5 mm slab that are hardly denser than the
lung around them once vessels are suppressed and owe their density to narrow structures (vessel haze).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import REAL_DATA
from triaged.analysis.grid import WorkGrid
from triaged.assembly import select_series
from triaged.config import SeriesSelectionConfig
from triaged.domain import CT1_MIN_PCT, CTGrade, Volume
from triaged.nets import preprocess
from triaged.nets.pipelines import ConsolidationEMPipeline, _Front, build_pipeline
from triaged.nets.thick_slices import THICK_SLICE_MM, ThickSliceRule, faint_thick_slice_lesions
from triaged.volume import load_volume, read_headers

RICORD = REAL_DATA / "ricord-1a-covid-001012"


def _series(folder: Path) -> Volume:
    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.dcm"))
    headers, _ = read_headers(folder, rels)
    choice = select_series(headers, SeriesSelectionConfig(min_slices=10, min_coverage_mm=10))
    return load_volume(folder, choice, "1.2.3")


# ---- the rule on a synthetic working grid --------------------------------------------------------------
@dataclass
class _Scene:
    """Aerated lung (−850 HU) on a 2 mm working grid holding three 'network lesions': (a) a bundle of
    parallel 6 mm vessels 4 mm apart (−300 HU: partial volume), (b) a 20 mm ground-glass opacity (−450 HU)
    and (c) a faint 20 mm patch (−570 HU) inside a band of diffuse ground glass (−600 HU), as a lesion in
    diffuse disease."""

    hu: npt.NDArray[np.float32]
    lungs: npt.NDArray[np.uint8]
    bundle: npt.NDArray[np.bool_]
    opacity: npt.NDArray[np.bool_]
    patch: npt.NDArray[np.bool_]
    grid: WorkGrid

    @property
    def lesions(self) -> npt.NDArray[np.bool_]:
        return self.bundle | self.opacity | self.patch


def _scene(dz: float) -> _Scene:
    rng = np.random.default_rng(3)
    shape = (5, 64, 64)
    hu = np.full(shape, -1000.0, np.float32)
    lungs = np.zeros(shape, np.uint8)
    lungs[:, 6:58, 6:58] = 1
    hu[lungs > 0] = -850.0
    bundle = np.zeros(shape, bool)
    bundle[:, 14:30, 12:30] = True
    for col in range(12, 30, 5):  # vessels 6 mm wide, 4 mm apart, at 8 mm partial volume
        hu[:, 14:30, col : min(col + 3, 30)] = -300.0
    yy, xx = np.mgrid[:64, :64]
    disk = (yy - 20) ** 2 + (xx - 46) ** 2 <= 5**2
    opacity = np.broadcast_to(disk[None], shape).copy()
    hu[opacity] = -450.0
    hu[:, 38:58, 6:58] = -600.0
    patch = np.broadcast_to(((yy - 48) ** 2 + (xx - 30) ** 2 <= 5**2)[None], shape).copy()
    hu[patch] = -570.0
    hu += rng.normal(0.0, 10.0, shape).astype(np.float32)
    return _Scene(hu, lungs, bundle, opacity, patch, WorkGrid(shape, (dz, 2.0, 2.0), 1))


def test_a_thick_slice_vessel_bundle_is_dropped_and_opacities_kept() -> None:
    s = _scene(8.0)
    rule = ThickSliceRule()
    found = faint_thick_slice_lesions(s.lesions, s.hu, s.lungs, s.grid, rule)
    assert found.applied and len(found.components) == 3
    assert np.array_equal(found.dropped, s.bundle), found.components
    (haze,) = found.dropped_components
    assert haze.contrast < rule.min_contrast_hu and haze.narrow >= rule.min_narrow_hu
    # the faint patch in diffuse ground glass is no brighter than its ring either, but it is wide: kept
    patch = [c for c in found.components if c != haze and c.contrast < rule.min_contrast_hu]
    assert len(patch) == 1 and patch[0].narrow < rule.min_narrow_hu, found.components


def test_slices_as_thin_as_the_network_slab_are_left_alone() -> None:
    s = _scene(THICK_SLICE_MM)
    found = faint_thick_slice_lesions(s.lesions, s.hu, s.lungs, s.grid)
    assert not found.applied and not found.dropped.any()


def test_the_pipeline_zeroes_the_vessel_haze_of_a_thick_volume_only() -> None:
    pipe = build_pipeline("consolidation-em")
    assert isinstance(pipe, ConsolidationEMPipeline)
    for dz, dropped in ((8.0, True), (2.5, False)):
        s = _scene(dz)
        full = (slice(None), slice(None), slice(None))
        front = _Front(s.grid, s.hu, s.lungs, s.lungs, full, "test", (), np.ones(s.hu.shape, bool))
        prob = np.where(s.lesions, 0.9, 0.05).astype(np.float32)
        out, note = pipe._drop_thick_slice_haze(front, prob, 0.5)
        kept = s.opacity | s.patch
        assert np.array_equal(out[kept], prob[kept]), (dz, note)
        assert np.array_equal(out[~s.lesions], prob[~s.lesions]), (dz, note)
        assert (out[s.bundle] == 0.0).all() if dropped else np.array_equal(out[s.bundle], prob[s.bundle]), (
            dz,
            note,
        )
        assert ("1 of 3 component(s)" in note) is dropped, note


# ---- real CT ---------------------------------------------------------------------------------------------
def test_the_8mm_lung_pet_ct_dx_thorax_is_ct0(pet_ct_dx: Path) -> None:
    """A lung-cancer patient with a right-lung mass and no pneumonia: below 1 % and CT0 (was 1.40 % of the
    left lung, CT1, before the thick-slice rule)."""
    volume = _series(pet_ct_dx)
    assert volume.spacing[0] > THICK_SLICE_MM  # 8 mm: the series the rule is for
    f = build_pipeline("consolidation-em").run(volume).findings
    assert 1000 < f.right.lung_ml < 4000 and 1000 < f.left.lung_ml < 4000
    assert f.severity_pct < CT1_MIN_PCT and f.whole_lung_pct < CT1_MIN_PCT, (f.right, f.left)
    assert f.ct_grade == CTGrade.CT0


def test_covid_19_averaged_into_8mm_slices_keeps_its_lesions() -> None:
    """RICORD 1a-001012 (COVID-19, 1.25 mm) averaged into 8 mm slabs: the rule drops none of its opacities."""
    if not RICORD.is_dir():
        pytest.skip(f"real data folder {RICORD} is absent (only on development machines)")
    thin = _series(RICORD)
    dz = thin.spacing[0]
    hu = preprocess.resample_z(thin.hu.astype(np.float32), dz, 8.0)
    step = thin.hu.shape[0] * dz / hu.shape[0]
    affine = thin.affine.copy()
    affine[:3, 2] *= step / dz
    uids = tuple(thin.sop_instance_uids[int(i)] for i in np.linspace(0, thin.hu.shape[0] - 1, hu.shape[0]))
    thick = Volume(
        np.round(hu).astype(np.int16),
        (step, thin.spacing[1], thin.spacing[2]),
        affine,
        uids,
        thin.series_instance_uid,
        thin.study_instance_uid,
    )
    f = build_pipeline("consolidation-em").run(thick).findings
    note = dict(f.provenance)["lesions.thick_slices"]
    assert note.startswith(f"slices {step:.3g} mm > ") and ": 0 of " in note, note
    assert f.ct_grade >= CTGrade.CT1 and f.whole_lung_pct > 3.0, (f.right, f.left)
