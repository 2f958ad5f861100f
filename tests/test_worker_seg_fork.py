"""The worker builds the SEG in a forked child while it builds the SR and SC (research use only).

Run in this process (``run_task``), so the forked child inherits what a test patches.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

import triaged.encode as encode
from tests.test_worker import _spooled_task
from triaged.analysis.severity import findings_from_masks
from triaged.encode import OutputContext, build_seg, output_uids, planned_reference, segmentation_reference
from triaged.volume import load_volume, read_headers
from triaged.worker.task import _ForkedCall, run_task
from triaged.worker.warm import synthetic_study

#: attributes that carry the moment an object was made
_TIMES = {
    "InstanceCreationTime",
    "SeriesTime",
    "ContentTime",
    "InstanceCreationDate",
    "SeriesDate",
    "ContentDate",
}


def test_the_planned_reference_is_the_reference_of_the_seg_built() -> None:
    volume, source, masks = synthetic_study()
    findings = findings_from_masks(volume, masks, pipeline="t", version="1")
    uids = output_uids(volume.study_instance_uid, "t", "1", 1)
    seg = build_seg(findings, masks, volume, source, OutputContext(software_version="t"), uids=uids)
    assert seg is not None
    assert planned_reference(findings, masks, volume, uids) == segmentation_reference(seg)


def test_the_objects_come_back_in_order_and_the_seg_is_the_one_built_in_process(
    phantom_ct_series: Path, tmp_path: Path
) -> None:
    task = _spooled_task(phantom_ct_series, tmp_path / "spool", 21)
    outcome = run_task(task)
    assert outcome.ok, outcome.error
    kinds = [o.kind for o in outcome.outputs]
    assert kinds[:2] == ["sr", "seg"] and set(kinds[2:]) == {"sc"}
    root = Path(task.spool_root)
    written = dcmread(root / outcome.outputs[1].path)
    assert written.SOPInstanceUID == outcome.outputs[1].sop_instance_uid
    # the SR references that SEG by its UID
    sr = dcmread(root / outcome.outputs[0].path)
    assert written.SOPInstanceUID in str(sr.CurrentRequestedProcedureEvidenceSequence)
    # the same SEG, built here (the study and the pipeline's masks as the worker had them)
    headers, _ = read_headers(root, task.instance_paths)
    from tests.worker_pipelines import registry
    from triaged.domain import SeriesChoice

    volume = load_volume(root, SeriesChoice(task.series_uid, "t", tuple(headers)), task.study_uid)
    result = registry().get("ok").run(volume)
    source = [dcmread(root / p, stop_before_pixels=True) for p in task.instance_paths]
    from triaged import __version__

    here = build_seg(
        result.findings,
        result.masks,
        volume,
        source,
        OutputContext(software_version=__version__),
        uids=output_uids(volume.study_instance_uid, "ok", result.findings.pipeline_version, 1),
    )
    assert here is not None
    assert here.PixelData == written.PixelData
    assert _timeless(here) == _timeless(written)


def _timeless(ds: Dataset) -> list[tuple[str, object]]:
    """The dataset's elements, nested ones too, without dates and times (the moment each was made)."""
    out: list[tuple[str, object]] = []
    for element in ds:
        if element.VR in ("DA", "TM", "DT") or element.keyword == "PixelData":
            continue
        if element.VR == "SQ":
            out.append((element.keyword, [_timeless(item) for item in element.value]))
        else:
            out.append((element.keyword, element.value))
    return out


def test_a_seg_that_fails_in_the_child_fails_the_task_with_its_reason(
    phantom_ct_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("frames do not match the source")

    monkeypatch.setattr(encode, "build_seg", broken)
    outcome = run_task(_spooled_task(phantom_ct_series, tmp_path / "spool", 22))
    assert not outcome.ok
    assert outcome.error == "encode: RuntimeError: SEG: ValueError: frames do not match the source"


def test_a_seg_process_that_dies_fails_the_task_and_the_worker_goes_on(
    phantom_ct_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dies(*args: object, **kwargs: object) -> None:
        os._exit(9)  # as a crash in native code would: no exception, no answer

    monkeypatch.setattr(encode, "build_seg", dies)
    outcome = run_task(_spooled_task(phantom_ct_series, tmp_path / "one", 23))
    assert not outcome.ok and "the SEG process ended without an answer" in (outcome.error or "")
    monkeypatch.undo()
    assert run_task(_spooled_task(phantom_ct_series, tmp_path / "two", 24)).ok


def _gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for a reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_seg_child_dies_with_its_worker(tmp_path: Path) -> None:
    pid_file = tmp_path / "seg-child"
    worker = os.fork()
    if worker == 0:  # a stand-in worker whose SEG child would run for a minute
        try:

            def slow() -> None:
                pid_file.write_text(str(os.getpid()))
                time.sleep(60)

            _ForkedCall(slow, "SEG").result()
        finally:
            os._exit(0)
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the SEG child did not start"
        time.sleep(0.02)
    child = int(pid_file.read_text())
    os.kill(worker, signal.SIGKILL)  # the memory guard or the job timeout
    os.waitpid(worker, 0)
    deadline = time.monotonic() + 10
    while not _gone(child):
        assert time.monotonic() < deadline, "the SEG child outlived its worker"
        time.sleep(0.05)
