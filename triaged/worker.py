"""Analysis worker processes fed by a priority queue.

One worker process per device runs one job at a time: load the chosen series, run the pipeline, write
the masks and findings to ``spool/work/<job>/``.  The parent watches it: a job past its timeout or a
process past its memory limit is killed (and the process replaced), a crashed process is replaced,
and the job is reported FAILED with the stage and reason; the daemon carries on.  When a task's analysis
is done and encoding begins, the process says so (:class:`EncodingStarted`), and the parent records
the findings and priority then, not after the encoded objects exist.

Queue order: urgent first, but waiting raises an item's standing (``aging_seconds`` of waiting is worth
one priority level), so a stream of urgent studies cannot starve routine ones.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import multiprocessing as mp
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Queue ranks: lower runs first.
RANKS = {"STAT": 0, "URGENT": 1, "ROUTINE": 2}


@dataclass(frozen=True)
class AnalysisTask:
    """Everything a worker process needs to analyse one job (picklable)."""

    job_id: int
    study_uid: str
    series_uid: str
    pipeline: str
    spool_root: str
    instance_paths: tuple[str, ...]
    work_dir: str
    level: str = "ROUTINE"
    device: str = "cpu"
    threads: int = 2
    #: "module:function" returning the pipeline registry; tests name their own (crashing, hanging).
    registry: str = "triaged.analysis:default_registry"
    #: Used in order when ``pipeline`` is not installed (e.g. its model weights are absent).
    fallbacks: tuple[str, ...] = ()
    #: Encode SR/SEG/SC after the analysis (the route has destinations).
    encode: bool = False
    revision: int = 1
    predecessor_sr: tuple[str, str, str] | None = None
    #: The route's priority policy (a ``PriorityPolicyConfig``): the level is burned into the SC.
    policy: Any = None
    key_slice_images: int = 1


@dataclass(frozen=True)
class TaskOutcome:
    """What came back for one task."""

    job_id: int
    ok: bool
    findings_json: str = ""
    error: str = ""  # "stage: reason"
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    #: Encoded objects: (kind, path relative to the spool root, SOP Class UID, SOP Instance UID).
    outputs: tuple[tuple[str, str, str, str], ...] = ()
    #: (score, level, reasons) from the route's policy, when one was given.
    priority: tuple[float, str, str] | None = None


@dataclass(frozen=True)
class EncodingStarted:
    """Sent by a worker process when its analysis is done and encoding begins (picklable).

    The parent records the findings and priority then (ANALYSING → ENCODING), so the worklist has
    them while SR, SEG and SC are still being built.
    """

    job_id: int
    findings_json: str
    #: (score, level, reasons) from the route's policy, when one was given.
    priority: tuple[float, str, str] | None = None
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


@dataclass(order=True)
class _Entry:
    standing: float
    seq: int
    task: AnalysisTask = field(compare=False)
    enqueued: float = field(compare=False, default=0.0)


class TaskQueue:
    """A priority queue with aging: ``rank - waited / aging_seconds``, then arrival order."""

    def __init__(self, aging_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.aging_seconds = aging_seconds
        self._clock = clock
        self._items: list[_Entry] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, task: AnalysisTask) -> None:
        with self._cond:
            self._items.append(_Entry(0.0, next(self._seq), task, self._clock()))
            self._cond.notify()

    def job_ids(self) -> set[int]:
        with self._cond:
            return {e.task.job_id for e in self._items}

    def _best(self) -> _Entry:
        now = self._clock()
        for e in self._items:
            e.standing = RANKS.get(e.task.level, 2) - (now - e.enqueued) / self.aging_seconds
        return min(self._items)

    def get(self, timeout: float | None = None) -> AnalysisTask | None:
        """The task to run next, or None on timeout or once closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if self._closed and not self._items:
                return None
            best = self._best()
            self._items.remove(best)
            return best.task

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# ---------------------------------------------------------------------------------- child process


def _run_task(task: AnalysisTask, report: Callable[[EncodingStarted], None] | None = None) -> TaskOutcome:
    """Load the series and run the pipeline (in the worker process); ``report`` is told when encoding starts."""
    import numpy as np

    from triaged.domain import SeriesChoice, findings_to_json
    from triaged.volume import load_volume, read_headers

    t0 = time.perf_counter()
    stage = "load"
    try:
        root = Path(task.spool_root)
        headers, problems = read_headers(root, task.instance_paths)
        series = tuple(h for h in headers if h.series_instance_uid == task.series_uid)
        if not series:
            raise RuntimeError(f"no readable instance of series {task.series_uid}; {problems[:3]}")
        volume = load_volume(root, SeriesChoice(task.series_uid, "queued", series), task.study_uid)
        stage = "analysis"
        registry = load_registry(task.registry, task.device)
        names = (task.pipeline, *task.fallbacks)
        name = next((n for n in names if n in registry), None)
        if name is None:
            raise LookupError(f"none of the pipelines {', '.join(names)} is installed")
        pipeline = registry.get(name)
        result = pipeline.run(volume)
        stage = "write results"
        work = Path(task.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        masks = result.masks
        arrays: dict[str, Any] = {
            "lungs": masks.lungs, "lesions": masks.lesions, "consolidation": masks.consolidation,
        }
        if masks.lobes is not None:
            arrays["lobes"] = masks.lobes
        tmp = work / "masks.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, work / "masks.npz")
        text = findings_to_json(result.findings)
        (work / "findings.json").write_text(text, encoding="utf-8")
        priority = None
        if task.policy is not None:
            from triaged.priority import prioritise

            p = prioritise(result.findings, task.policy)
            priority = (p.score, str(p.level), p.summary)
        outputs: tuple[tuple[str, str, str, str], ...] = ()
        if task.encode:
            stage = "encode"
            if report is not None:
                report(EncodingStarted(task.job_id, text, priority, seconds=time.perf_counter() - t0))
            outputs = _encode(task, result, volume, series, root, priority[1] if priority else None)
        return TaskOutcome(task.job_id, True, text, seconds=time.perf_counter() - t0, outputs=outputs,
                           priority=priority)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as the job's failure reason
        log.debug("task %s failed:\n%s", task.job_id, traceback.format_exc())
        return TaskOutcome(task.job_id, False, error=f"{stage}: {type(exc).__name__}: {exc}",
                           seconds=time.perf_counter() - t0)


def load_registry(spec: str, device: str | None = None) -> Any:
    """The pipeline registry named by ``module:function`` (``analysis.registry``).

    ``device`` is passed when the factory takes one (learned pipelines place their networks on it).
    """
    import importlib
    import inspect

    module, _, factory = spec.partition(":")
    make = getattr(importlib.import_module(module), factory)
    return make(device=device) if device is not None and "device" in inspect.signature(make).parameters else make()


def _output_kind(sop_class_uid: str) -> str:
    from pydicom.uid import UID

    name = UID(sop_class_uid).name
    if "Segmentation" in name:
        return "seg"
    if "SR" in name or "Report" in name:
        return "sr"
    return "sc"


def _encode(
    task: AnalysisTask, result: Any, volume: Any, series: tuple[Any, ...], root: Path, level: str | None
) -> tuple[tuple[str, str, str, str], ...]:
    """Build SR, SEG and SC and write them under ``work/<job>/outputs`` (atomically, fsynced)."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    from triaged import __version__
    from triaged.encode import OutputContext, build_outputs
    from triaged.spool import Spool

    source = [dcmread(root / h.path, stop_before_pixels=True) for h in series]
    ctx = OutputContext(
        software_version=__version__, revision=task.revision, predecessor_sr=task.predecessor_sr,
        priority_level=level, key_slice_images=task.key_slice_images,
    )
    spool = Spool(root, 0)
    out = []
    for ds in build_outputs(result.findings, result.masks, volume, source, ctx):
        kind = _output_kind(str(ds.SOPClassUID))
        rel = f"work/{task.job_id}/outputs/{kind}-{ds.SOPInstanceUID}.dcm"
        buffer = DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        spool.store_instance(rel, buffer.getvalue())
        out.append((kind, rel, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return tuple(out)


def _worker_main(conn: Connection, threads: int) -> None:
    """Entry point of a worker process: answer tasks until the pipe closes."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency; analysis without it still runs
        pass
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        conn.send(_run_task(task, conn.send))


# ---------------------------------------------------------------------------------- parent side


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class WorkerProcess:
    """One long-lived worker process; replaced after a crash, timeout or memory kill."""

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self.threads = threads
        self._ctx = mp.get_context("spawn")  # never fork a process that runs threads
        self._proc: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_worker_main, args=(child, self.threads), name=self.name, daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def kill(self) -> None:
        """Kill the process (if any); safe from any thread, any number of times."""
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc, self._conn = None, None
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(5)
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        """Ask the process to exit after its current task; kill it if it does not within 5 s."""
        proc, conn = self._proc, self._conn
        if conn is not None and proc is not None and proc.is_alive():
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(5)
        self.kill()

    def run(
        self, task: AnalysisTask, timeout: float, memory_limit_mb: float,
        wanted: Callable[[], bool] | None = None,
        on_encoding: Callable[[EncodingStarted], bool] | None = None,
    ) -> TaskOutcome:
        """Run one task; ``wanted`` is asked about once a second and False kills the analysis early.

        ``on_encoding`` is called when the worker starts encoding; False (the job moved on) kills it.
        """
        if self._proc is None or not self._proc.is_alive():
            self._start()
        # Local references: kill() from another thread (a stop) clears the attributes.
        proc, conn = self._proc, self._conn
        assert proc is not None and conn is not None
        start = time.monotonic()
        asked = start
        peak = 0.0

        def failed(error: str) -> TaskOutcome:
            return TaskOutcome(task.job_id, False, error=error, seconds=time.monotonic() - start, peak_rss_mb=peak)

        try:
            conn.send(task)
            while True:
                if conn.poll(0.2):
                    message: TaskOutcome | EncodingStarted = conn.recv()
                    peak = max(peak, _rss_mb(proc.pid))
                    if isinstance(message, TaskOutcome):
                        return dataclasses.replace(message, peak_rss_mb=peak)
                    if on_encoding is not None and not on_encoding(dataclasses.replace(message, peak_rss_mb=peak)):
                        self.kill()
                        return failed("encode: cancelled, the job moved on (e.g. superseded by a late instance)")
                    continue
                if not proc.is_alive():
                    break
                rss = _rss_mb(proc.pid)
                peak = max(peak, rss)
                if memory_limit_mb and rss > memory_limit_mb:
                    self.kill()
                    return failed(f"analysis: memory guard: {rss:.0f} MiB > limit {memory_limit_mb:.0f} MiB")
                if time.monotonic() - start > timeout:
                    self.kill()
                    return failed(f"analysis: timed out after {timeout:g} s")
                if wanted is not None and time.monotonic() - asked > 1.0:
                    asked = time.monotonic()
                    if not wanted():
                        self.kill()
                        return failed("analysis: cancelled, the job moved on (e.g. superseded by a late instance)")
        except (EOFError, OSError):
            pass  # the pipe broke: the process died (or was killed by a stop)
        proc.join(2)
        code = proc.exitcode
        self.kill()
        return failed(f"analysis: worker process crashed (exit code {code})")


class WorkerPool:
    """Threads that take tasks from the queue, run them in worker processes and report outcomes.

    ``on_start(task) -> bool`` is called before a task runs (False: skip it, e.g. the job was
    superseded); ``on_encoding(task, started) -> bool`` when its worker starts encoding (False: the
    job moved on, stop it); ``on_done(task, outcome)`` after.
    """

    def __init__(
        self,
        queue: TaskQueue,
        on_start: Callable[[AnalysisTask], bool],
        on_done: Callable[[AnalysisTask, TaskOutcome], None],
        *,
        still_wanted: Callable[[int], bool] | None = None,
        on_encoding: Callable[[AnalysisTask, EncodingStarted], bool] | None = None,
        workers: int = 1,
        threads: int = 2,
        timeout: float = 600.0,
        memory_limit_mb: float = 4096.0,
    ) -> None:
        self.queue = queue
        self._on_start = on_start
        self._on_done = on_done
        self._still_wanted = still_wanted
        self._on_encoding = on_encoding
        self.timeout = timeout
        self.memory_limit_mb = memory_limit_mb
        self._procs = [WorkerProcess(f"triaged-worker-{i}", threads) for i in range(workers)]
        self._threads: list[threading.Thread] = []
        self._running: dict[int, AnalysisTask] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        for proc in self._procs:
            t = threading.Thread(target=self._loop, args=(proc,), name=f"{proc.name}-feeder", daemon=True)
            t.start()
            self._threads.append(t)

    def running(self) -> set[int]:
        with self._lock:
            return set(self._running)

    def _loop(self, proc: WorkerProcess) -> None:
        while not self._stop.is_set():
            task = self.queue.get(timeout=0.5)
            if task is None:
                continue
            try:
                if not self._on_start(task):
                    continue
            except Exception:  # noqa: BLE001 - a ledger hiccup must not kill the feeder
                log.exception("job %s: could not start analysis", task.job_id)
                continue
            with self._lock:
                self._running[task.job_id] = task
            try:
                wanted = (functools.partial(self._still_wanted, task.job_id)
                          if self._still_wanted is not None else None)
                encoding = functools.partial(self._encoding, task) if self._on_encoding is not None else None
                outcome = proc.run(task, self.timeout, self.memory_limit_mb, wanted, encoding)
            finally:
                with self._lock:
                    self._running.pop(task.job_id, None)
            if self._stop.is_set() and not outcome.ok:
                continue  # killed by stop(): the job stays ANALYSING or ENCODING and resumes at the next start
            try:
                self._on_done(task, outcome)
            except Exception:  # noqa: BLE001
                log.exception("job %s: could not record the analysis outcome", task.job_id)

    def _encoding(self, task: AnalysisTask, started: EncodingStarted) -> bool:
        assert self._on_encoding is not None
        try:
            return self._on_encoding(task, started)
        except Exception:  # noqa: BLE001 - a ledger hiccup must not kill the feeder; the outcome records it
            log.exception("job %s: could not record the start of encoding", task.job_id)
            return True

    def stop(self) -> None:
        """Stop taking tasks; a running analysis is killed (its job resumes at the next start)."""
        self._stop.set()
        self.queue.close()
        for proc in self._procs:
            proc.kill()
        for t in self._threads:
            t.join(5)
