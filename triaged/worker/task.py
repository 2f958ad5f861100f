"""The task body a worker process runs: load the series, analyse, write the results, encode.

Everything here crosses the pipe between the parent and a worker process, so it is picklable: the task,
what the process says when encoding begins (:class:`EncodingStarted`) and the outcome.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from triaged.analysis.registry import PipelineRegistry, load_registry
from triaged.config import PriorityPolicyConfig
from triaged.domain import AnalysisResult, InstanceHeader, Masks, Volume
from triaged.encode.uids import OutputKind

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pydicom.dataset import Dataset

    from triaged.spool import Spool

log = logging.getLogger(__name__)

#: The pipeline registries this process has built, by (``module:function``, device): built once and kept,
#: so a learned pipeline verifies and loads its weights once per worker process, not once per job.
_REGISTRIES: dict[tuple[str, str | None], PipelineRegistry] = {}


def registry_for(spec: str, device: str | None) -> PipelineRegistry:
    """The registry ``spec`` makes for ``device``, built on the first call in this process and kept.

    A factory that fails is not remembered: the next call tries again (and its task reports the error).
    """
    key = (spec, device)
    registry = _REGISTRIES.get(key)
    if registry is None:
        registry = _REGISTRIES[key] = load_registry(spec, device)
    return registry


class PriorityResult(NamedTuple):
    """A study's priority under the route's policy, as the ledger records it."""

    score: float
    #: The level's name (``STAT``, ``URGENT``, ``ROUTINE``).
    level: str
    #: The reasons on one line (:attr:`triaged.priority.Priority.summary`).
    reasons: str


class EncodedOutput(NamedTuple):
    """One encoded object, written under ``work/<job>/outputs``."""

    kind: OutputKind
    #: Relative to the spool root.
    path: str
    sop_class_uid: str
    sop_instance_uid: str


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
    #: The route's priority policy: the level is burned into the SC.
    policy: PriorityPolicyConfig | None = None
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
    #: The encoded objects.
    outputs: tuple[EncodedOutput, ...] = ()
    #: From the route's policy, when one was given.
    priority: PriorityResult | None = None


@dataclass(frozen=True)
class EncodingStarted:
    """Sent by a worker process when its analysis is done and encoding begins (picklable).

    The parent records the findings and priority then (ANALYSING → ENCODING), so the worklist has
    them while SR, SEG and SC are still being built.
    """

    job_id: int
    findings_json: str
    #: From the route's policy, when one was given.
    priority: PriorityResult | None = None
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


def run_task(task: AnalysisTask, report: Callable[[EncodingStarted], None] | None = None) -> TaskOutcome:
    """Load the series and run the pipeline (in the worker process); ``report`` is told when encoding starts.

    Each instance's header is read once: whole when the task encodes (the same datasets are the encoding
    context), else only the series-choice attributes; the pixel data is read once more, by the volume load.
    """
    from triaged.domain import SeriesChoice, findings_to_json
    from triaged.volume import load_volume, read_headers

    t0 = time.perf_counter()
    stage = "load"
    try:
        root = Path(task.spool_root)
        datasets: dict[str, Dataset] = {}
        headers, problems = read_headers(root, task.instance_paths, datasets=datasets, whole=task.encode)
        series = tuple(h for h in headers if h.series_instance_uid == task.series_uid)
        if not series:
            raise RuntimeError(f"no readable instance of series {task.series_uid}; {problems[:3]}")
        volume = load_volume(root, SeriesChoice(task.series_uid, "queued", series), task.study_uid, datasets)
        stage = "analysis"
        registry = registry_for(task.registry, task.device)
        names = (task.pipeline, *task.fallbacks)
        name = next((n for n in names if n in registry), None)
        if name is None:
            raise LookupError(f"none of the pipelines {', '.join(names)} is installed")
        pipeline = registry.get(name)
        result = pipeline.run(volume)
        stage = "write results"
        work = Path(task.work_dir)
        work.mkdir(parents=True, exist_ok=True)

        def write_masks() -> None:
            nonlocal stage
            before, stage = stage, "write results"
            _write_masks(work, result.masks)
            stage = before

        if not task.encode:
            write_masks()
        text = findings_to_json(result.findings)
        (work / "findings.json").write_text(text, encoding="utf-8")
        priority = None
        if task.policy is not None:
            from triaged.priority import prioritise

            p = prioritise(result.findings, task.policy)
            priority = PriorityResult(p.score, str(p.level), p.summary)
        outputs: tuple[EncodedOutput, ...] = ()
        if task.encode:
            stage = "encode"
            if report is not None:
                report(EncodingStarted(task.job_id, text, priority, seconds=time.perf_counter() - t0))
            # the masks are written while the forked child still builds the SEG (the longer part)
            outputs = _encode(
                task,
                result,
                volume,
                series,
                root,
                priority.level if priority else None,
                datasets,
                meanwhile=write_masks,
            )
        return TaskOutcome(
            task.job_id, True, text, seconds=time.perf_counter() - t0, outputs=outputs, priority=priority
        )
    except Exception as exc:  # noqa: BLE001 - reported to the parent as the job's failure reason
        log.debug("task %s failed:\n%s", task.job_id, traceback.format_exc())
        return TaskOutcome(
            task.job_id,
            False,
            error=f"{stage}: {type(exc).__name__}: {exc}",
            seconds=time.perf_counter() - t0,
        )


def _write_masks(work: Path, masks: Masks) -> None:
    """``work/masks.npz``: lungs, lesions, consolidation (and lobes), written whole or not at all."""
    arrays: dict[str, Any] = {
        "lungs": masks.lungs,
        "lesions": masks.lesions,
        "consolidation": masks.consolidation,
    }
    if masks.lobes is not None:
        arrays["lobes"] = masks.lobes
    tmp = work / "masks.tmp.npz"
    save_masks(tmp, arrays)
    os.replace(tmp, work / "masks.npz")


def save_masks(path: Path, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    """Write ``arrays`` as an ``.npz`` that :func:`numpy.load` reads, deflated at level 1.

    The masks are long runs of equal values: level 1 keeps them within a few MB (300 × 512² slices: 1.7 MB,
    against 0.45 MB at ``np.savez_compressed``'s level 6) in about a quarter of the time (0.8 s against 3.1 s).
    """
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def output_kind(sop_class_uid: str) -> OutputKind:
    """The kind of an encoded object, by its SOP Class (SEG, an SR, else a secondary capture)."""
    from pydicom.uid import UID

    name = UID(sop_class_uid).name
    if "Segmentation" in name:
        return OutputKind.SEG
    if "SR" in name or "Report" in name:
        return OutputKind.SR
    return OutputKind.SC


def _encode(
    task: AnalysisTask,
    result: AnalysisResult,
    volume: Volume,
    series: tuple[InstanceHeader, ...],
    root: Path,
    level: str | None,
    datasets: Mapping[str, Dataset],
    meanwhile: Callable[[], None] | None = None,
) -> tuple[EncodedOutput, ...]:
    """Build SR, SEG and SC and write them under ``work/<job>/outputs`` (atomically, fsynced).

    The SEG (the largest object: highdicom's per-frame functional groups) is built and written in a
    forked child process while this one builds the SR and the SC: encoding is single-threaded Python,
    so on two cores this takes the SEG's time instead of the sum.  ``meanwhile`` runs here after the SR
    and the SC, while the child is still at work (the SEG takes longer), before waiting for it.  The
    objects come back in :func:`~triaged.encode.build_outputs` order (SR, SEG, SC...).  The source datasets are the whole
    headers already read for the volume (``datasets``, by path).
    """
    from triaged import __version__
    from triaged.encode import OutputContext, build_report_and_images, build_seg, output_uids
    from triaged.spool import Spool

    source = [_source_dataset(root, h.path, datasets) for h in series]
    ctx = OutputContext(
        software_version=__version__,
        revision=task.revision,
        predecessor_sr=task.predecessor_sr,
        priority_level=level,
        key_slice_images=task.key_slice_images,
    )
    findings, masks = result.findings, result.masks
    uids = output_uids(volume.study_instance_uid, findings.pipeline, findings.pipeline_version, ctx.revision)
    spool = Spool(root, 0)

    def seg_output() -> EncodedOutput | None:
        seg = build_seg(findings, masks, volume, source, ctx, uids=uids)
        return None if seg is None else _store_output(spool, task.job_id, seg)

    pending = _ForkedCall(seg_output, "SEG")  # forks now
    try:
        sr, *scs = (
            _store_output(spool, task.job_id, ds)
            for ds in build_report_and_images(findings, masks, volume, source, ctx, uids=uids)
        )
        if meanwhile is not None:
            meanwhile()
    except BaseException:
        pending.cancel()
        raise
    seg = pending.result()
    return (sr, *([seg] if seg is not None else []), *scs)


def _store_output(spool: Spool, job_id: int, ds: Dataset) -> EncodedOutput:
    """Write one encoded object under ``work/<job>/outputs`` (atomically, fsynced)."""
    from pydicom.filebase import DicomBytesIO

    kind = output_kind(str(ds.SOPClassUID))
    rel = f"work/{job_id}/outputs/{kind}-{ds.SOPInstanceUID}.dcm"
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    spool.store_instance(rel, buffer.getvalue())
    return EncodedOutput(kind, rel, str(ds.SOPClassUID), str(ds.SOPInstanceUID))


class _ForkedCall:
    """A call run in a forked child process (where ``fork`` exists; else at once, in this process).

    The child shares this process's memory copy-on-write (masks, volume, headers: nothing is copied or
    pickled but the answer), runs no torch and ends with ``os._exit`` when the call returns; an exception
    in it is raised here by :meth:`result` with its type and message, as is a child that dies without
    answering.  A bare ``os.fork`` rather than :mod:`multiprocessing`: the worker is a daemonic process,
    which multiprocessing does not let have children.  On Linux the child dies with the worker
    (``PR_SET_PDEATHSIG``), so a worker killed for its timeout or memory leaves no SEG writer behind.
    """

    def __init__(self, call: Callable[[], Any], what: str) -> None:
        """Fork now; ``what`` names the call in the errors :meth:`result` raises."""
        self._what = what
        self._pid = 0
        self._value: Any = None
        if not hasattr(os, "fork"):  # pragma: no cover - Linux and macOS have it
            self._value = call()
            return
        read, write = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: answer through the pipe, then leave without the parent's exit handlers
            code = 0
            try:
                os.close(read)
                # a worker killed for its timeout or memory takes its child along (Linux)
                from triaged.worker.pool import _set_parent_death_signal

                _set_parent_death_signal()
                if os.getppid() != parent:  # the worker died before the signal was asked for
                    raise SystemExit(71)
                try:
                    answer: tuple[str, Any] = ("ok", call())
                except BaseException as exc:  # noqa: BLE001 - goes back to the worker as the job's error
                    answer = ("error", f"{type(exc).__name__}: {exc}")
                with os.fdopen(write, "wb") as pipe:
                    pickle.dump(answer, pipe)
            except BaseException:  # noqa: BLE001 - the parent reports the silent exit
                code = 70
            finally:
                os._exit(code)
        os.close(write)
        self._pid, self._pipe = pid, os.fdopen(read, "rb")

    def result(self) -> Any:
        """Wait for the child and return what the call returned (or raise what it raised)."""
        if not self._pid:
            return self._value
        with self._pipe:
            data = self._pipe.read()
        _, status = os.waitpid(self._pid, 0)
        if not data:
            raise RuntimeError(f"the {self._what} process ended without an answer (wait status {status})")
        kind, value = pickle.loads(data)
        if kind != "ok":
            raise RuntimeError(f"{self._what}: {value}")
        return value

    def cancel(self) -> None:
        """Stop the child (this process failed before it needed the answer)."""
        if self._pid:
            os.kill(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)
            self._pipe.close()


def _source_dataset(root: Path, rel_path: str, datasets: Mapping[str, Dataset]) -> Dataset:
    """The whole header of one source instance for the encoding context, as read for the volume.

    A file read without its 128-byte preamble, or whose whole header could not be read, is read here
    as the encoding context always read its sources (unforced), so it fails the encoding as it did.
    """
    ds = datasets.get(rel_path)
    if ds is not None and getattr(ds, "preamble", None) is not None:
        return ds
    from pydicom import dcmread

    return dcmread(root / rel_path, stop_before_pixels=True)
