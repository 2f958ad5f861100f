"""One job's DICOM headers are read once per process: once by the parent's completion, once by the worker.

Reads are counted by wrapping the real ``pydicom.dcmread`` where the node calls it (``triaged.volume``,
and ``pydicom.dcmread`` itself for the functions that import it when they run). The spooled files are the
session's phantom CT series (``phantom_ct_series`` in ``tests/conftest.py``), copied into the test's spool.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import make_config
from triaged.config import Config
from triaged.domain import JobState
from triaged.ledger import Ledger
from triaged.net.scp import instance_record
from triaged.spool import Spool
from triaged.stages import Analysis, Completion, Dispatch, study_facts
from triaged.worker.task import run_task

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
#: Routing sees CT series only in files in DICOM file format: this rule ignores such a study.
IGNORE_CT = {
    "name": "no-ct",
    "match": {"series": {"Modality": "CT"}},
    "action": {"ignore": "CT is not wanted"},
}


class Reads:
    """Every ``dcmread`` call by file name, split into header reads (no pixel data) and pixel reads."""

    def __init__(self) -> None:
        self.headers: Counter[str] = Counter()
        self.pixels: Counter[str] = Counter()

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def counting(fp: Any, *args: Any, **kwargs: Any) -> Any:
            which = self.headers if kwargs.get("stop_before_pixels") else self.pixels
            which[Path(fp).name] += 1
            return real(fp, *args, **kwargs)

        return counting

    def clear(self) -> None:
        self.headers.clear()
        self.pixels.clear()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    """Counts the reads of every module of the node that holds ``dcmread``, and of ``pydicom.dcmread``."""
    counted = Reads()
    real = pydicom.dcmread
    wrapper = counted.wrap(real)
    monkeypatch.setattr(pydicom, "dcmread", wrapper)
    for name, module in list(sys.modules.items()):
        if name.startswith("triaged") and getattr(module, "dcmread", None) is real:
            monkeypatch.setattr(module, "dcmread", wrapper)
    return counted


class Node:
    """Completion and analysis as the daemon composes them, on one ledger and spool."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ledger = Ledger(config.storage.ledger)
        self.spool = Spool(config.storage.spool)
        dispatch = Dispatch(self.ledger, self.spool, lambda: config, now=lambda: T0)
        self.analysis = Analysis(self.ledger, self.spool, lambda: config, dispatch)
        self.completion = Completion(self.ledger, self.spool, lambda: config, self.analysis, now=lambda: T0)

    def receive(self, folder: Path, *, preamble: bool = True) -> tuple[str, list[str]]:
        """Spool and record a folder's files as the C-STORE handler does (``preamble=False``: stored
        without the 128-byte preamble and ``DICM`` prefix); returns the study UID and the file names."""
        study, names = "", []
        for f in sorted(folder.glob("*.dcm")):
            data = f.read_bytes()
            assert data[128:132] == b"DICM"
            if not preamble:
                data = data[132:]  # the File Meta group follows directly, as some exporters write it
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            rel = self.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            stored = self.spool.store_instance(rel, data)
            self.ledger.record_instance(
                instance_record(ds, path=rel, size=len(data), sha256=stored.sha256),
                association_id=None,
                now=T0,
            )
            study = str(ds.StudyInstanceUID)
            names.append(Path(rel).name)
        return study, names


def make_node(tmp_path: Path, **sections: dict[str, object]) -> Iterator[Node]:
    node = Node(
        make_config(
            tmp_path,
            destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11112}},
            **sections,
        )
    )
    yield node
    node.ledger.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    yield from make_node(tmp_path)


def test_one_completion_reads_each_instance_header_once(
    node: Node, phantom_ct_series: Path, reads: Reads
) -> None:
    _, names = node.receive(phantom_ct_series)
    (job,) = node.ledger.jobs()
    reads.clear()
    assert node.completion.complete_quiet_studies(T0 + timedelta(seconds=2)) == [job.id]
    assert node.ledger.job(job.id).state is JobState.QUEUED, node.ledger.job(job.id).detail
    assert reads.headers == Counter({name: 1 for name in names})
    assert not reads.pixels


def test_series_choice_without_a_route_reads_each_instance_header_once(
    node: Node, phantom_ct_series: Path, reads: Reads
) -> None:
    study, names = node.receive(phantom_ct_series)
    (job,) = node.ledger.jobs()
    node.ledger.transition(job.id, JobState.RECEIVING, JobState.COMPLETE, "quiet")
    reads.clear()
    node.analysis.choose_series(job.id, study)  # as recovery calls it: it routes the study itself
    assert node.ledger.job(job.id).state is JobState.QUEUED, node.ledger.job(job.id).detail
    assert reads.headers == Counter({name: 1 for name in names})


@pytest.mark.parametrize("preamble", [True, False])
def test_routing_ignores_files_without_the_preamble_and_series_choice_uses_them(
    tmp_path: Path, phantom_ct_series: Path, reads: Reads, preamble: bool
) -> None:
    for node in make_node(tmp_path, routing={"rules": [IGNORE_CT]}):
        study, names = node.receive(phantom_ct_series, preamble=preamble)
        (job,) = node.ledger.jobs()
        facts, _ = study_facts(node.ledger, node.spool, study)
        assert [s["Modality"] for s in facts.series] == (["CT"] if preamble else [])

        reads.clear()
        assert node.completion.complete_quiet_studies(T0 + timedelta(seconds=2)) == [job.id]
        done = node.ledger.job(job.id)
        if preamble:  # routing saw the CT series: the rule ignores the study
            assert (done.state, done.detail) == (JobState.IGNORED, "routing rule 'no-ct': CT is not wanted")
        else:  # routing saw nothing (default route); series choice read every file, forced
            assert done.state is JobState.QUEUED, done.detail
            assert "30 axial slices" in done.detail
            task = node.analysis.analysis_task(done)
            assert len(task.instance_paths) == len(names)
            assert reads.headers == Counter({name: 1 for name in names})


@pytest.mark.parametrize("encode", [True, False])
def test_one_worker_task_reads_each_instance_header_once_and_its_pixels_once(
    node: Node, phantom_ct_series: Path, reads: Reads, encode: bool
) -> None:
    _, names = node.receive(phantom_ct_series)
    (job,) = node.ledger.jobs()
    node.completion.complete_quiet_studies(T0 + timedelta(seconds=2))
    task = node.analysis.analysis_task(node.ledger.job(job.id))
    assert task.encode
    if not encode:
        task = replace(task, encode=False)
    reads.clear()
    outcome = run_task(task)  # the body a worker process runs, here in this process to count its reads
    assert outcome.ok, outcome.error
    assert bool(outcome.outputs) is encode
    assert reads.headers == Counter({name: 1 for name in names})
    assert reads.pixels == Counter({name: 1 for name in names})
