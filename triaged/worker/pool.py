"""Worker processes and their supervision.

One worker process per device runs one job at a time (:func:`triaged.worker.task.run_task`).  The parent
watches it: a job past its timeout or a process past its memory limit is killed (and the process
replaced), a crashed process is replaced, and the job is reported FAILED with the stage and reason; the
daemon carries on.  When a task's analysis is done and encoding begins, the process says so
(:class:`~triaged.worker.task.EncodingStarted`), and the parent records the findings and priority then,
not after the encoded objects exist.

A worker process never outlives the node: on Linux the kernel kills it when the parent dies
(``PR_SET_PDEATHSIG``), and everywhere a watchdog thread in the process exits it within half a second of
its parent going away (:func:`bind_to_parent`), during a task as between tasks.  A ``kill -9`` of the node
so leaves no analysis running unsupervised beside the restarted node's worker on the same files.

A worker is warm: :class:`WorkerPool` starts its processes with the node, not at the first job.  Each
process lowers its priority (``analysis.worker_nice``), sets ``OMP_NUM_THREADS`` and
``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets them) before it imports torch, sets torch's
threads, and builds the configured pipeline registry once (:func:`~triaged.worker.task.registry_for`);
it then keeps all of it for every job.  Once it has said it is ready it encodes a tiny synthetic study
(:func:`~triaged.worker.warm.warm_encoders`), so the first real study does not pay for highdicom's
tables.  New :class:`WorkerSettings` (a config reload that changes the registry, device, threads or
niceness) replace the process between jobs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from triaged.worker.queue import ClaimQueue, TaskQueue
from triaged.worker.task import AnalysisTask, EncodingStarted, TaskOutcome, registry_for, run_task
from triaged.worker.warm import warm_encoders

log = logging.getLogger(__name__)


#: Exit status of a worker process whose watchdog found its parent gone (``EX_TEMPFAIL``).
ORPHANED_EXIT_CODE = 75
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_parent_death_signal() -> bool:
    """Ask the Linux kernel to SIGKILL this process when its parent dies; False where that is not possible.

    The kernel sends the signal when the *thread* that started the process ends, so the parent starts its
    workers from a thread that lives as long as they do (a :class:`WorkerPool` feeder thread).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl: the watchdog still runs
        return False


def _watch_parent(parent_pid: int, interval: float) -> None:
    while True:
        if os.getppid() != parent_pid:  # re-parented: the parent is gone
            os._exit(ORPHANED_EXIT_CODE)
        time.sleep(interval)


def bind_to_parent(parent_pid: int, *, death_signal: bool = True, interval: float = 0.5) -> None:
    """Tie the calling process's life to its parent ``parent_pid``; called first thing in a worker process.

    Parameters
    ----------
    parent_pid
        The parent's PID as the parent saw it when it started this process (not ``os.getppid()`` now:
        a parent that died before this call is then noticed at once).
    death_signal
        Also ask the Linux kernel for SIGKILL when the parent dies (``PR_SET_PDEATHSIG``).
    interval
        Seconds between the watchdog thread's checks of ``os.getppid()``: the portable guard, which also
        covers a parent that died before the kernel was asked.
    """
    if death_signal:
        _set_parent_death_signal()
    if os.getppid() != parent_pid:
        os._exit(ORPHANED_EXIT_CODE)
    threading.Thread(
        target=_watch_parent, args=(parent_pid, interval), name="triaged-parent-watchdog", daemon=True
    ).start()


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """What a worker process is started with and keeps for its life (picklable).

    Different settings need a new process: :class:`WorkerPool` replaces its processes between jobs.
    """

    #: torch's intra-op threads and the default ``OMP_NUM_THREADS`` (``analysis.threads``).
    threads: int = 2
    #: ``module:function`` of the pipeline registry built when the process starts (None: none in advance;
    #: each task's registry is then built at its first task and kept).
    registry: str | None = None
    #: Passed to the registry factory (``analysis.device``).
    device: str | None = None
    #: Added to the process's niceness when it starts (``analysis.worker_nice``): below the receiver.
    nice: int = 0
    #: ``OMP_WAIT_POLICY`` unless the environment sets it: PASSIVE threads sleep instead of spinning.
    omp_wait_policy: str = "PASSIVE"


def _warm_up(settings: WorkerSettings) -> None:
    """Prepare a new worker process: niceness, OpenMP environment, torch threads, the pipeline registry."""
    if settings.nice:
        try:
            os.nice(settings.nice)
        except OSError as exc:  # pragma: no cover - lowering one's own priority is always allowed
            log.warning("worker: cannot set niceness +%d: %s", settings.nice, exc)
    if "torch" in sys.modules:  # pragma: no cover - the environment below would then come too late
        log.warning("worker: torch was imported before its OpenMP settings were applied")
    os.environ.setdefault("OMP_NUM_THREADS", str(settings.threads))
    os.environ.setdefault("OMP_WAIT_POLICY", settings.omp_wait_policy)
    try:
        import torch

        torch.set_num_threads(settings.threads)
    except ImportError:  # pragma: no cover - torch is a dependency; analysis without it still runs
        pass
    if settings.registry is not None:
        try:
            registry_for(settings.registry, settings.device)
        except Exception:  # noqa: BLE001 - the first task that needs it tries again and reports the error
            log.exception("worker: cannot build the pipeline registry %s", settings.registry)


def _worker_main(
    conn: Connection, settings: WorkerSettings, parent_pid: int, ready: Any | None = None
) -> None:
    """Entry point of a worker process: warm up, then answer tasks until the pipe closes or the parent dies.

    SIGINT is ignored: Ctrl-C at a terminal reaches the whole process group, and the node, not the
    worker, decides when its worker stops (it stops or kills it on the way out; PDEATHSIG covers the rest).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    bind_to_parent(parent_pid)
    _warm_up(settings)
    if ready is not None:
        ready.set()
    # after "ready": a task sent meanwhile waits in the pipe (no longer than the first encoding would
    # have paid anyway), and a node waiting for its workers is not held up by it
    try:
        log.debug("worker: encoders warmed in %.2f s", warm_encoders())
    except Exception:  # noqa: BLE001 - an encoder that fails here fails the first task with its own error
        log.exception("worker: warming the encoders failed")
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        conn.send(run_task(task, conn.send))


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
    """One long-lived worker process; replaced after a crash, timeout or memory kill.

    The process dies with its parent (:func:`bind_to_parent`); on Linux also when the thread that started
    it (the one that called :meth:`start` or :meth:`run` first after a replacement) ends, so call those
    from a long-lived thread.

    Parameters
    ----------
    name
        The process name.
    threads
        torch threads (ignored when ``settings`` is given).
    settings
        Everything the process is started with (:class:`WorkerSettings`).
    """

    def __init__(self, name: str, threads: int = 2, *, settings: WorkerSettings | None = None) -> None:
        self.name = name
        self.settings = settings or WorkerSettings(threads=threads)
        self._ctx = mp.get_context("spawn")  # never fork a process that runs threads
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready: Any | None = None
        self._lock = threading.Lock()

    @property
    def threads(self) -> int:
        return self.settings.threads

    @property
    def pid(self) -> int | None:
        """The running process's PID, None when there is none."""
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    def start(self, settings: WorkerSettings | None = None) -> None:
        """Start the process now (warm: imports, torch threads, registry) unless it runs with these settings.

        A running process with other ``settings`` is stopped (after its task) and replaced.
        """
        if settings is not None and settings != self.settings:
            self.stop()
            self.settings = settings
        if self._proc is None or not self._proc.is_alive():
            self._start()

    def ready(self, timeout: float | None = None) -> bool:
        """Wait until the process has warmed up (True), or ``timeout`` passed or there is none (False)."""
        event = self._ready
        return bool(event is not None and event.wait(timeout))

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._ready = self._ctx.Event()
        self._proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self.settings, os.getpid(), self._ready),
            name=self.name,
            daemon=True,
        )
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
        self,
        task: AnalysisTask,
        timeout: float,
        memory_limit_mb: float,
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
        pid = proc.pid
        assert pid is not None  # set by start()
        start = time.monotonic()
        asked = start
        peak = 0.0

        def failed(error: str) -> TaskOutcome:
            return TaskOutcome(
                task.job_id, False, error=error, seconds=time.monotonic() - start, peak_rss_mb=peak
            )

        try:
            conn.send(task)
            while True:
                if conn.poll(0.2):
                    message: TaskOutcome | EncodingStarted = conn.recv()
                    peak = max(peak, _rss_mb(pid))
                    if isinstance(message, TaskOutcome):
                        return dataclasses.replace(message, peak_rss_mb=peak)
                    if on_encoding is not None and not on_encoding(
                        dataclasses.replace(message, peak_rss_mb=peak)
                    ):
                        self.kill()
                        return failed(
                            "encode: cancelled, the job moved on (e.g. superseded by a late instance)"
                        )
                    continue
                if not proc.is_alive():
                    break
                rss = _rss_mb(pid)
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
                        return failed(
                            "analysis: cancelled, the job moved on (e.g. superseded by a late instance)"
                        )
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
    job moved on, stop it); ``on_done(task, outcome)`` after.  :meth:`start` starts the worker processes
    at once (each from its feeder thread, which outlives it); ``settings`` (else ``threads``) is what they
    are started with, and :meth:`reconfigure` replaces them between jobs.  ``queue`` is a
    :class:`~triaged.worker.queue.TaskQueue` (tasks put by the node) or a
    :class:`~triaged.worker.queue.ClaimQueue` (tasks claimed from the ledger shared by several nodes: the
    job is ANALYSING, claimed by this node, when ``on_start`` is called).
    """

    def __init__(
        self,
        queue: TaskQueue | ClaimQueue,
        on_start: Callable[[AnalysisTask], bool],
        on_done: Callable[[AnalysisTask, TaskOutcome], None],
        *,
        still_wanted: Callable[[int], bool] | None = None,
        on_encoding: Callable[[AnalysisTask, EncodingStarted], bool] | None = None,
        workers: int = 1,
        threads: int = 2,
        timeout: float = 600.0,
        memory_limit_mb: float = 4096.0,
        settings: WorkerSettings | None = None,
    ) -> None:
        self.queue = queue
        self._on_start = on_start
        self._on_done = on_done
        self._still_wanted = still_wanted
        self._on_encoding = on_encoding
        self.timeout = timeout
        self.memory_limit_mb = memory_limit_mb
        self._settings = settings or WorkerSettings(threads=threads)
        self._procs = [WorkerProcess(f"triaged-worker-{i}", settings=self._settings) for i in range(workers)]
        self._threads: list[threading.Thread] = []
        self._running: dict[int, AnalysisTask] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def settings(self) -> WorkerSettings:
        return self._settings

    def start(self) -> None:
        """Start the feeder threads; each starts its worker process at once (warm before the first job)."""
        for proc in self._procs:
            t = threading.Thread(target=self._loop, args=(proc,), name=f"{proc.name}-feeder", daemon=True)
            t.start()
            self._threads.append(t)

    def reconfigure(self, settings: WorkerSettings) -> None:
        """New settings: each worker process is replaced when it is between jobs (at once when idle)."""
        self._settings = settings

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every worker process is started and warm (imports, registry); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            while not proc.ready(0.05):
                if time.monotonic() > deadline or self._stop.is_set():
                    return False
        return True

    def pids(self) -> list[int]:
        """PIDs of the running worker processes."""
        return [pid for pid in (p.pid for p in self._procs) if pid is not None]

    def running(self) -> set[int]:
        with self._lock:
            return set(self._running)

    def _claim(self, task: AnalysisTask) -> None:
        """Mark ``task`` running as it leaves the queue (under the queue's lock): never in neither."""
        with self._lock:
            self._running[task.job_id] = task

    def _release(self, task: AnalysisTask) -> None:
        with self._lock:
            self._running.pop(task.job_id, None)

    def _keep_warm(self, proc: WorkerProcess) -> None:
        try:
            proc.start(self._settings)
        except Exception:  # noqa: BLE001 - the next task starts it again (and reports a crash)
            log.exception("%s: could not start the worker process", proc.name)

    def _loop(self, proc: WorkerProcess) -> None:
        while not self._stop.is_set():
            self._keep_warm(proc)  # between jobs: (re)started with the current settings
            task = self.queue.get(timeout=0.5, claim=self._claim)
            if task is None:
                continue
            try:
                if not self._on_start(task):
                    self._release(task)
                    continue
            except Exception:  # noqa: BLE001 - a ledger hiccup must not kill the feeder
                log.exception("job %s: could not start analysis", task.job_id)
                self._release(task)
                continue
            try:
                wanted = (
                    functools.partial(self._still_wanted, task.job_id)
                    if self._still_wanted is not None
                    else None
                )
                encoding = functools.partial(self._encoding, task) if self._on_encoding is not None else None
                outcome = proc.run(task, self.timeout, self.memory_limit_mb, wanted, encoding)
            finally:
                self._release(task)
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
