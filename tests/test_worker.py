"""Worker processes and the priority queue: real spawned processes, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from triaged.worker import AnalysisTask, EncodingStarted, TaskOutcome, TaskQueue, WorkerProcess

REGISTRY = "tests.worker_pipelines:registry"


def _task(job_id: int, level: str = "ROUTINE", pipeline: str = "ok", root: Path = Path("."),
          paths: tuple[str, ...] = (), work: Path = Path(".")) -> AnalysisTask:
    return AnalysisTask(job_id=job_id, study_uid="1.2", series_uid="1.2.3", pipeline=pipeline,
                        spool_root=str(root), instance_paths=paths, work_dir=str(work), level=level,
                        registry=REGISTRY)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_urgent_tasks_run_first_in_arrival_order() -> None:
    queue = TaskQueue(aging_seconds=600, clock=_Clock())
    for job_id, level in [(1, "ROUTINE"), (2, "URGENT"), (3, "STAT"), (4, "URGENT"), (5, "ROUTINE")]:
        queue.put(_task(job_id, level))
    order = [t.job_id for t in iter(lambda: queue.get(timeout=0), None)]
    assert order == [3, 2, 4, 1, 5]


def test_a_routine_task_that_waited_long_enough_overtakes_new_urgent_ones() -> None:
    clock = _Clock()
    queue = TaskQueue(aging_seconds=60, clock=clock)
    queue.put(_task(1, "ROUTINE"))
    clock.now = 61.0  # more than one level's worth of waiting
    queue.put(_task(2, "URGENT"))
    assert queue.get(timeout=0).job_id == 1  # type: ignore[union-attr]
    assert queue.get(timeout=0).job_id == 2  # type: ignore[union-attr]


def test_a_closed_queue_answers_none() -> None:
    queue = TaskQueue()
    queue.close()
    assert queue.get(timeout=1) is None


@pytest.fixture(scope="module")
def worker() -> WorkerProcess:
    proc = WorkerProcess("test-worker", threads=1)
    yield proc
    proc.stop()


def _series(folder: Path) -> tuple[Path, tuple[str, ...]]:
    """A series folder and its file names (the tests pass the session's phantom: any CT series will do)."""
    return folder, tuple(sorted(p.name for p in folder.iterdir()))


def test_a_task_loads_the_series_runs_the_pipeline_and_writes_masks_and_findings(
    worker: WorkerProcess, phantom_ct_series: Path, tmp_path: Path
) -> None:
    root, paths = _series(phantom_ct_series)
    from pydicom import dcmread

    first = dcmread(root / paths[0], stop_before_pixels=True)
    task = AnalysisTask(job_id=7, study_uid="1.2", series_uid=first.SeriesInstanceUID, pipeline="ok",
                        spool_root=str(root), instance_paths=paths, work_dir=str(tmp_path / "work"),
                        registry=REGISTRY)
    outcome = worker.run(task, timeout=120, memory_limit_mb=0)
    assert outcome.ok, outcome.error
    assert json.loads(outcome.findings_json)["pipeline"] == "ok"
    masks = np.load(tmp_path / "work" / "masks.npz")
    assert masks["lungs"].shape == (len(paths), first.Rows, first.Columns)
    assert (tmp_path / "work" / "findings.json").read_text() == outcome.findings_json


def test_ctrl_c_at_the_terminal_does_not_kill_the_worker(
    worker: WorkerProcess, phantom_ct_series: Path, tmp_path: Path
) -> None:
    """SIGINT reaches a terminal's whole process group: the worker ignores it and still answers tasks."""
    import os
    import signal
    import time

    from pydicom import dcmread

    root, paths = _series(phantom_ct_series)
    first = dcmread(root / paths[0], stop_before_pixels=True)
    task = AnalysisTask(job_id=8, study_uid="1.2", series_uid=first.SeriesInstanceUID, pipeline="ok",
                        spool_root=str(root), instance_paths=paths, work_dir=str(tmp_path / "work"),
                        registry=REGISTRY)
    assert worker.run(task, timeout=120, memory_limit_mb=0).ok  # started and warm
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    assert worker.pid == pid  # the same process, alive
    assert worker.run(task, timeout=120, memory_limit_mb=0).ok


def test_an_exception_in_the_pipeline_is_reported_with_its_stage(
    worker: WorkerProcess, phantom_ct_series: Path, tmp_path: Path
) -> None:
    root, paths = _series(phantom_ct_series)
    from pydicom import dcmread

    series_uid = dcmread(root / paths[0], stop_before_pixels=True).SeriesInstanceUID
    task = AnalysisTask(job_id=8, study_uid="1.2", series_uid=series_uid, pipeline="raise", spool_root=str(root),
                        instance_paths=paths, work_dir=str(tmp_path), registry=REGISTRY)
    outcome = worker.run(task, timeout=120, memory_limit_mb=0)
    assert not outcome.ok
    assert outcome.error == "analysis: ValueError: no lungs found in this volume"


def test_a_series_that_cannot_be_read_fails_at_the_load_stage(worker: WorkerProcess, tmp_path: Path) -> None:
    outcome = worker.run(_task(9, paths=("missing.dcm",), root=tmp_path, work=tmp_path), timeout=60, memory_limit_mb=0)
    assert not outcome.ok and outcome.error.startswith("load: ")


@pytest.mark.parametrize(
    ("pipeline", "timeout", "memory_mb", "expected"),
    [
        ("crash", 120, 0, "analysis: worker process crashed (exit code 70)"),
        ("hang", 3, 0, "analysis: timed out after 3 s"),
        ("hog", 120, 1024, "analysis: memory guard: "),
    ],
)
def test_a_crashing_hanging_or_greedy_worker_is_killed_reported_and_replaced(
    worker: WorkerProcess, phantom_ct_series: Path, tmp_path: Path, pipeline: str, timeout: float,
    memory_mb: float, expected: str,
) -> None:
    root, paths = _series(phantom_ct_series)
    from pydicom import dcmread

    series_uid = dcmread(root / paths[0], stop_before_pixels=True).SeriesInstanceUID
    task = AnalysisTask(job_id=10, study_uid="1.2", series_uid=series_uid, pipeline=pipeline, spool_root=str(root),
                        instance_paths=paths, work_dir=str(tmp_path), registry=REGISTRY)
    outcome = worker.run(task, timeout=timeout, memory_limit_mb=memory_mb)
    assert not outcome.ok and outcome.error.startswith(expected), outcome.error
    # The next task gets a fresh process and succeeds.
    ok = worker.run(AnalysisTask(**{**task.__dict__, "pipeline": "ok", "work_dir": str(tmp_path / "next")}),
                    timeout=120, memory_limit_mb=0)
    assert ok.ok, ok.error


def _spooled_task(series: Path, root: Path, job_id: int) -> AnalysisTask:
    """A task that encodes, on a copy of ``series`` in its own spool (outputs are written there)."""
    import shutil

    from pydicom import dcmread

    (root / "in").mkdir(parents=True)
    for f in sorted(series.glob("*.dcm")):
        shutil.copy(f, root / "in" / f.name)
    paths = tuple(sorted(f"in/{p.name}" for p in (root / "in").iterdir()))
    series_uid = dcmread(root / paths[0], stop_before_pixels=True).SeriesInstanceUID
    return AnalysisTask(job_id=job_id, study_uid=str(dcmread(root / paths[0]).StudyInstanceUID),
                        series_uid=series_uid, pipeline="ok", spool_root=str(root), instance_paths=paths,
                        work_dir=str(root / "work" / str(job_id)), registry=REGISTRY, encode=True)


def test_the_worker_reports_encoding_when_it_starts_before_any_output_exists(
    worker: WorkerProcess, phantom_ct_series: Path, tmp_path: Path
) -> None:
    task = _spooled_task(phantom_ct_series, tmp_path / "spool", 11)
    outputs = tmp_path / "spool" / "work" / "11" / "outputs"
    seen: list[tuple[EncodingStarted, list[Path]]] = []

    def on_encoding(started: EncodingStarted) -> bool:
        seen.append((started, sorted(outputs.glob("*.dcm"))))
        return True

    outcome = worker.run(task, timeout=300, memory_limit_mb=0, on_encoding=on_encoding)
    assert outcome.ok, outcome.error
    ((started, on_disk_then),) = seen
    assert (started.job_id, started.findings_json) == (11, outcome.findings_json)
    assert on_disk_then == []  # reported before the first object was written
    assert sorted(kind for kind, *_ in outcome.outputs) == ["sc", "seg", "sr"]
    assert sorted(p.name for p in outputs.glob("*.dcm")) == sorted(Path(rel).name for _, rel, *_ in outcome.outputs)
    # the masks are written while the SEG is built, but before the task answers
    assert set(np.load(outputs.parent / "masks.npz").files) >= {"lungs", "lesions", "consolidation"}


def test_a_disk_full_on_the_masks_while_encoding_fails_the_task_at_writing_results(
    worker: WorkerProcess, phantom_ct_series: Path, tmp_path: Path
) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full to make a write fail with ENOSPC")
    task = _spooled_task(phantom_ct_series, tmp_path / "spool", 13)
    work = Path(task.work_dir)
    work.mkdir(parents=True)
    (work / "masks.tmp.npz").symlink_to("/dev/full")
    outcome = worker.run(task, timeout=300, memory_limit_mb=0)
    assert not outcome.ok
    assert outcome.error.startswith("write results: OSError"), outcome.error  # a transient, retried failure
    assert "No space left on device" in outcome.error


def test_a_refused_encoding_stops_the_worker_and_the_next_task_still_runs(
    worker: WorkerProcess, phantom_ct_series: Path, tmp_path: Path
) -> None:
    task = _spooled_task(phantom_ct_series, tmp_path / "spool", 12)
    outcome = worker.run(task, timeout=300, memory_limit_mb=0, on_encoding=lambda started: False)
    assert not outcome.ok
    assert outcome.error == "encode: cancelled, the job moved on (e.g. superseded by a late instance)"
    again = worker.run(AnalysisTask(**{**task.__dict__, "encode": False, "work_dir": str(tmp_path / "next")}),
                       timeout=300, memory_limit_mb=0)
    assert again.ok, again.error


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (an orphan's reaper may be slow, or absent in a container)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return _gone(pid)


def _kill_parent_and_wait_for(parent: subprocess.Popen[str], child_pid: int) -> bool:
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        return _wait_gone(child_pid, 5)
    finally:
        if not _gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)  # do not leave it behind when the test fails


_REPO = Path(__file__).resolve().parent.parent

# A node in miniature: a WorkerPool analysing one task with the hanging pipeline, no timeout that would end it.
_NODE = """
import multiprocessing, sys, time
from triaged.worker import AnalysisTask, TaskQueue, WorkerPool

if __name__ == "__main__":
    root, series_uid, work, *paths = sys.argv[1:]
    queue = TaskQueue()
    pool = WorkerPool(queue, lambda task: True, lambda task, outcome: None, threads=1, timeout=3600,
                      memory_limit_mb=0)
    pool.start()
    queue.put(AnalysisTask(job_id=1, study_uid="1.2", series_uid=series_uid, pipeline="hang", spool_root=root,
                           instance_paths=tuple(paths), work_dir=work, registry="tests.worker_pipelines:registry"))
    while not pool.running():
        time.sleep(0.05)
    time.sleep(1.0)  # the task is in the worker's hands
    (worker,) = multiprocessing.active_children()
    print(worker.pid, flush=True)
    time.sleep(3600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_node_takes_its_analysing_worker_with_it(
    phantom_ct_series: Path, tmp_path: Path
) -> None:
    root, paths = _series(phantom_ct_series)
    from pydicom import dcmread

    series_uid = dcmread(root / paths[0], stop_before_pixels=True).SeriesInstanceUID
    node = subprocess.Popen(
        [sys.executable, "-c", _NODE, str(root), series_uid, str(tmp_path / "work"), *paths],
        cwd=_REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert node.stdout is not None
        worker_pid = int(node.stdout.readline())
        assert not _gone(worker_pid)
        assert _kill_parent_and_wait_for(node, worker_pid), "the worker outlived kill -9 of its node"
    finally:
        node.kill()
        node.wait()


# The portable guard alone (no PR_SET_PDEATHSIG): a parent starts a child that binds itself to it.
_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "bound\\n"
print(child.pid, flush=True)
time.sleep(3600)
"""
_CHILD = """
import os, time
from triaged.worker.pool import bind_to_parent
bind_to_parent(os.getppid(), death_signal=False)
print("bound", flush=True)
time.sleep(3600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_watchdog_alone_ends_a_process_whose_parent_died() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, _CHILD], cwd=_REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid)
        assert _kill_parent_and_wait_for(parent, child_pid), "the watchdog did not notice its parent die"
    finally:
        parent.kill()
        parent.wait()


# ------------------------------------------------------------------ the warm worker

_COUNT_ENV = "TRIAGED_TEST_REGISTRY_COUNT"


def counting_registry() -> object:
    """The stand-in registry, and a line with this process's PID in ``$TRIAGED_TEST_REGISTRY_COUNT``."""
    from tests.worker_pipelines import registry

    with open(os.environ[_COUNT_ENV], "a", encoding="ascii") as fh:
        fh.write(f"{os.getpid()}\n")
    return registry()


def _builds(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _niceness(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_worker_starts_warm_with_the_pool_keeps_its_registry_and_is_niced(
    phantom_ct_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from triaged.worker import WorkerPool, WorkerSettings

    count = tmp_path / "registry-builds"
    monkeypatch.setenv(_COUNT_ENV, str(count))
    spec = "tests.test_worker:counting_registry"
    root, paths = _series(phantom_ct_series)
    from pydicom import dcmread

    series_uid = dcmread(root / paths[0], stop_before_pixels=True).SeriesInstanceUID
    queue = TaskQueue()
    done: list[TaskOutcome] = []
    pool = WorkerPool(queue, lambda task: True, lambda task, outcome: done.append(outcome), timeout=120,
                      memory_limit_mb=0, settings=WorkerSettings(threads=1, registry=spec, device="cpu", nice=5))
    pool.start()
    try:
        assert pool.wait_ready(120), "the worker did not warm up"
        (pid,) = pool.pids()  # there before any job
        assert _builds(count) == [pid]  # the registry was built at start
        assert _niceness(pid) == min(19, _niceness(0) + 5)
        for job_id in (1, 2):
            queue.put(AnalysisTask(job_id=job_id, study_uid="1.2", series_uid=series_uid, pipeline="ok",
                                   spool_root=str(root), instance_paths=paths, registry=spec,
                                   work_dir=str(tmp_path / f"work-{job_id}")))
        deadline = time.monotonic() + 120
        while len(done) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [o.ok for o in done] == [True, True], [o.error for o in done]
        assert pool.pids() == [pid] and _builds(count) == [pid]  # the second job re-built nothing
        # New settings (a config reload): a new process, warm again, between jobs.
        pool.reconfigure(WorkerSettings(threads=1, registry=spec, device="cpu", nice=3))
        while (pool.pids() in ([], [pid]) or not pool.wait_ready(0.1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        (new_pid,) = pool.pids()
        assert new_pid != pid and _niceness(new_pid) == min(19, _niceness(0) + 3)
        assert _builds(count) == [pid, new_pid]
    finally:
        pool.stop()


def test_saved_masks_load_back_identical_and_small(tmp_path: Path) -> None:
    """save_masks writes an .npz numpy reads (deflated): equal arrays, far smaller than the raw masks."""
    from triaged.worker.task import save_masks

    shape = (40, 64, 64)
    lungs = np.zeros(shape, np.uint8)
    lungs[:, 10:50, 5:30], lungs[:, 10:50, 34:60] = 1, 2
    lesions = np.zeros(shape, bool)
    lesions[10:20, 20:30, 10:20] = True
    save_masks(tmp_path / "m.npz", {"lungs": lungs, "lesions": lesions})
    loaded = np.load(tmp_path / "m.npz")
    assert sorted(loaded.files) == ["lesions", "lungs"]
    assert loaded["lungs"].dtype == np.uint8 and np.array_equal(loaded["lungs"], lungs)
    assert loaded["lesions"].dtype == bool and np.array_equal(loaded["lesions"], lesions)
    assert (tmp_path / "m.npz").stat().st_size < (lungs.nbytes + lesions.nbytes) / 20
