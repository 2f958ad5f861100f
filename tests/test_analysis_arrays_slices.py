"""for_each_slice: every slice once, any order, errors raised (research use only)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from triaged.analysis.arrays import for_each_slice, slice_threads


def test_every_slice_is_done_once_on_several_threads_and_the_result_is_the_serial_one() -> None:
    volume = np.random.default_rng(3).random((40, 16, 16))
    out_serial = np.zeros_like(volume)
    out_threads = np.zeros_like(volume)
    seen: list[int] = []
    names: set[str] = set()

    def serial(z: int) -> None:
        out_serial[z] = np.cumsum(volume[z], axis=0)

    def threaded(z: int) -> None:
        seen.append(z)
        names.add(threading.current_thread().name)
        out_threads[z] = np.cumsum(volume[z], axis=0)

    for_each_slice(serial, range(40), threads=1)
    for_each_slice(threaded, range(40), threads=3)
    assert sorted(seen) == list(range(40))
    assert np.array_equal(out_serial, out_threads)
    assert any(n.startswith("triaged-slices") for n in names)


def test_an_error_in_a_slice_is_raised() -> None:
    def step(z: int) -> None:
        if z == 7:
            raise ValueError("slice 7 has no lungs")

    with pytest.raises(ValueError, match="slice 7"):
        for_each_slice(step, range(20), threads=2)


def test_the_thread_count_follows_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert slice_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert 1 <= slice_threads() <= 4
