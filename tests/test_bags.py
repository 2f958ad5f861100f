"""Bags of lung-cropped slices (triaged/nets/bags.py): geometry checked against hand-made volumes."""

from __future__ import annotations

import numpy as np
import pytest

from triaged.nets.bags import (
    BAG_SIZE,
    HU_RANGE,
    PAD_HU,
    crop_labels,
    make_bag,
    normalise_hu,
    select_slices,
    square_box,
)


def _volume(nz: int = 40, ny: int = 100, nx: int = 120) -> tuple[np.ndarray, np.ndarray]:
    hu = np.full((nz, ny, nx), 40, np.int16)  # soft tissue
    lungs = np.zeros((nz, ny, nx), np.uint8)
    lungs[5:35, 30:70, 20:55] = 1  # right lung: image left
    lungs[5:35, 30:70, 65:100] = 2
    hu[lungs > 0] = -850
    return hu, lungs


def test_the_box_is_square_holds_both_lungs_and_the_margin() -> None:
    _, lungs = _volume()
    r0, r1, c0, c1 = square_box(lungs, (2.0, 2.0))  # 10 mm margin = 5 pixels
    assert r1 - r0 == c1 - c0
    assert (c0, c1) == (15, 105) and r0 <= 25 and r1 >= 75


def test_slices_are_5_mm_apart_inside_the_lungs_and_capped() -> None:
    _, lungs = _volume()
    z = select_slices(lungs, dz_mm=1.25)
    assert z[0] == 5 and z.max() < 35 and set(np.diff(z)) == {4}
    assert len(select_slices(lungs, dz_mm=1.0, z_step_mm=1.0, max_slices=7)) == 7
    assert len(select_slices(np.zeros_like(lungs), dz_mm=1.0)) == 0


def test_a_bag_keeps_left_and_right_and_maps_back_to_the_volume() -> None:
    hu, lungs = _volume()
    bag = make_bag(hu, lungs, (2.5, 2.0, 2.0))
    assert bag.images.shape == (len(bag.z), 1, BAG_SIZE, BAG_SIZE) and bag.images.dtype == np.float32
    assert 0.0 <= bag.images.min() and bag.images.max() <= 1.0
    # the right lung (label 1) stays on the image's left, as in the volume
    cols_right = np.nonzero(bag.lung[0] == 1)[1]
    cols_left = np.nonzero(bag.lung[0] == 2)[1]
    assert cols_right.max() < cols_left.min()
    # every lung pixel of the bag maps back onto a lung voxel of the same label
    zi, rows, cols = np.nonzero(bag.lung)
    vr, vc = bag.to_volume(rows, cols)
    assert (lungs[bag.z[zi], vr, vc] == bag.lung[zi, rows, cols]).mean() > 0.99
    # lung pixels are dark, the rest soft tissue
    assert np.isclose(bag.images[0, 0][bag.lung[0] > 0].mean(), normalise_hu(-850), atol=0.02)
    assert crop_labels(lungs, bag).tolist() == bag.lung.tolist()


def test_a_box_beyond_the_image_is_padded_with_air() -> None:
    hu, lungs = _volume(ny=80, nx=120)
    lungs[:, 1:3, :] = 1  # lungs reach the top edge: the square box sticks out of the image
    bag = make_bag(hu, lungs, (2.5, 2.0, 2.0))
    assert bag.box[0] < 0
    assert bag.images[0, 0, 0, BAG_SIZE // 2] == pytest.approx(normalise_hu(PAD_HU), abs=1e-6)  # air
    assert normalise_hu(HU_RANGE[1] + 100) == 1.0


def test_empty_or_mismatched_lungs_are_refused() -> None:
    hu, lungs = _volume()
    with pytest.raises(ValueError, match="no lung voxels"):
        make_bag(hu, np.zeros_like(lungs), (2.5, 2.0, 2.0))
    with pytest.raises(ValueError, match="differ in shape"):
        make_bag(hu, lungs[:-1], (2.5, 2.0, 2.0))
