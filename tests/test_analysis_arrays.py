"""Bounded-memory forms of the analysis steps equal their whole-volume formulas (issue 13, item 3)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from triaged.analysis.arrays import component_sizes, label_compact, slab_slices
from triaged.analysis.grid import WorkGrid
from triaged.analysis.lesions import CoarseLesions, lesions_to_full
from triaged.analysis.lungs import LEFT, RIGHT, upsample_labels
from triaged.analysis.severity import lesion_boxes, lung_measures, voxel_ml
from triaged.domain import Volume

RNG = np.random.default_rng(13)


def _blobs(shape: tuple[int, int, int], fraction: float = 0.5, sigma: float = 1.5) -> np.ndarray:
    return ndimage.gaussian_filter(RNG.random(shape), sigma) > np.quantile(
        ndimage.gaussian_filter(RNG.random(shape), sigma), 1.0 - fraction
    )


def test_compact_labels_and_slab_counts_equal_scipy_and_bincount() -> None:
    mask = _blobs((40, 33, 29), 0.3)
    for structure in (None, np.ones((3, 3, 3), bool)):
        labels, n = label_compact(mask, structure)
        ref, n_ref = ndimage.label(mask, structure=structure)
        assert labels.dtype == np.uint16 and n == n_ref
        assert np.array_equal(labels, ref)
        assert np.array_equal(component_sizes(labels, n), np.bincount(ref.ravel()))


def test_more_components_than_uint16_holds_fall_back_to_int32() -> None:
    mask = np.zeros((92, 92, 92), bool)
    mask[::2, ::2, ::2] = True  # 46**3 = 97,336 isolated voxels
    labels, n = label_compact(mask)
    ref, n_ref = ndimage.label(mask)
    assert labels.dtype == np.int32 and n == n_ref == 46**3
    assert np.array_equal(labels, ref)
    assert np.array_equal(component_sizes(labels, n), np.bincount(ref.ravel()))


def test_slabs_cover_the_volume_with_about_a_million_voxels_each() -> None:
    assert slab_slices((300, 512, 512)).step == 4
    assert slab_slices((5, 2048, 2048)).step == 1
    assert list(slab_slices((10, 2, 2))) == [0]


def _grid(nz: int = 37, ny: int = 61, nx: int = 58, factor: int = 3) -> WorkGrid:
    return WorkGrid((nz, ny, nx), (1.0, 0.7, 0.7), factor)


def _whole_upsample(grid: WorkGrid, coarse: np.ndarray) -> np.ndarray:
    """The whole-volume linear upsampling (one chunk holding every slice)."""
    return grid.upsample_chunk(np.asarray(coarse, np.float32), slice(0, grid.shape[0]))


def test_chunked_upsampling_of_labels_and_lesions_equals_the_whole_volume_formula() -> None:
    grid = _grid()
    labels = np.zeros(grid.coarse_shape, np.uint8)
    labels[_blobs(grid.coarse_shape, 0.35)] = RIGHT
    labels[_blobs(grid.coarse_shape, 0.25)] = LEFT
    expected = np.zeros(grid.shape, np.uint8)
    expected[_whole_upsample(grid, labels == RIGHT) > 0.5] = RIGHT
    expected[_whole_upsample(grid, labels == LEFT) > 0.5] = LEFT
    lungs = upsample_labels(labels, grid)
    assert np.array_equal(lungs, expected)

    field = (RNG.random(grid.coarse_shape) * 600.0 - 900.0).astype(np.float32)
    field[: grid.shape[0] // 3] = -1000.0  # chunks with nothing above the level are skipped
    out = lesions_to_full(CoarseLesions(field, -720.0), lungs, grid)
    assert np.array_equal(out, (_whole_upsample(grid, field) > -720.0) & (lungs > 0))
    assert np.array_equal(grid.upsample_above(field, -500.0), _whole_upsample(grid, field) > -500.0)


def test_slab_wise_measures_and_compact_lesion_labels_equal_the_whole_volume_formulas() -> None:
    shape = (23, 41, 37)
    lungs = np.zeros(shape, np.uint8)
    lungs[_blobs(shape, 0.4)] = 1
    lungs[:, :, 20:][_blobs(shape, 0.4)[:, :, 20:]] = 2
    lesions = _blobs(shape, 0.2, 1.0)
    consolidation = lesions & _blobs(shape, 0.5, 1.0)
    spacing = (1.25, 0.7, 0.7)
    right, left = lung_measures(lungs, lesions, consolidation, spacing)
    ml = voxel_ml(spacing)
    for side, m in ((1, right), (2, left)):
        inside = lungs == side
        assert m.lung_ml == np.count_nonzero(inside) * ml
        assert m.lesion_ml == np.count_nonzero(inside & lesions) * ml
        assert m.consolidation_ml == np.count_nonzero(inside & consolidation) * ml

    volume = Volume(
        hu=np.zeros(shape, np.int16),
        spacing=spacing,
        affine=np.eye(4),
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        sop_instance_uids=tuple(f"1.2.3.{z}" for z in range(shape[0])),
    )
    boxes = lesion_boxes(volume, lungs, lesions, limit=50)
    ref, n = ndimage.label(lesions, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(ref.ravel())[1:]
    assert len(boxes) == min(50, n)
    assert [b.volume_ml for b in boxes] == [float(s) * ml for s in sorted(sizes, reverse=True)[:50]]
