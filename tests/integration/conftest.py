"""Fixtures that run a real node in-process on a free port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage

from tests.conftest import free_port
from triaged.config import Config
from triaged.daemon import Node
from triaged.domain import InstanceRecord, JobState
from triaged.ledger import Ledger
from triaged.routing import RouteDecision

# Debian's DCMTK leaves Nagle on unless told otherwise (~60x slower transfers).
os.environ.setdefault("TCP_NODELAY", "1")


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def node_factory() -> Iterator[Callable[[Config], Node]]:
    started: list[Node] = []

    def start(config: Config) -> Node:
        node = Node(config)
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        if not node.stop_requested:
            node.stop(drain_seconds=2)


def job_states(node: Node) -> list[JobState]:
    return [j.state for j in node.ledger.jobs(limit=100)]


def storescu(
    host: str,
    port: int,
    files: list[Path] | Path,
    aec: str = "TRIAGED",
    aet: str = "STORESCU",
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    args = ["storescu", "-aet", aet, "-aec", aec, *(extra or [])]
    if isinstance(files, Path) and files.is_dir():
        args += ["+sd", "+r"]
        targets = [str(files)]
    else:
        targets = [str(f) for f in (files if isinstance(files, list) else [files])]
    return subprocess.run(
        [*args, host, str(port), *targets],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def listening(port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` (a connect that hangs for ``timeout``
    seconds, as on a full accept queue, counts as not listening)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def start_storescp(
    tmp_path: Path,
    *,
    folder: str = "received",
    ae_title: str | None = None,
    options: Sequence[str] = ("+xa",),
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """DCMTK storescp as a destination, listening on a free port of 127.0.0.1 and writing what it receives
    to the new folder ``tmp_path/folder``: ``(process, port, received)``, once it listens.  ``ae_title`` is
    its ``-aet`` (storescp's default when None); ``options`` are the other storescp options, by default
    ``+xa`` (any transfer syntax); pass ``+xa`` along with any others (``+uf``, ``+tls ...``) to keep it.
    It runs with ``TCP_NODELAY=1`` as :func:`storescu` does.  The caller terminates it.  Fails the test when
    storescp is not installed, exits before it listens or does not listen within 20 s (and then stops it)."""
    if shutil.which("storescp") is None:
        pytest.fail("storescp is not installed; `make test` installs it (apt: dcmtk)")
    port = free_port()
    received = tmp_path / folder
    received.mkdir()
    aet = ["-aet", ae_title] if ae_title is not None else []
    storescp = subprocess.Popen(
        ["storescp", *aet, "-od", str(received), *options, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    try:
        wait_for(lambda: storescp.poll() is not None or listening(port), what="storescp to listen")
        if storescp.poll() is not None:
            pytest.fail(f"storescp exited with status {storescp.returncode} before it listened on {port}")
    except BaseException:  # pytest.fail raises an exception that is not an Exception
        storescp.terminate()
        storescp.wait(timeout=10)
        raise
    return storescp, port, received


def analysing_job(ledger: Ledger, study: str, destinations: list[dict[str, object]]) -> int:
    """A one-instance study (``studies/<study>/<study>.1/<study>.1.1.dcm``) driven to ANALYSING through the
    ledger's own API, routed to ``destinations`` (route entries, e.g. ``{"name": "pacs"}``): its job id."""
    ledger.record_instance(
        InstanceRecord(
            study,
            f"{study}.1",
            f"{study}.1.1",
            CTImageStorage,
            "1.2.840.10008.1.2.1",
            f"studies/{study}/{study}.1/{study}.1.1.dcm",
            10,
            "0" * 64,
        ),
        association_id=None,
    )
    job = next(j for j in ledger.jobs() if j.study_instance_uid == study)
    ledger.transition(job.id, JobState.RECEIVING, JobState.COMPLETE)
    route = RouteDecision.from_json(json.dumps({"pipelines": ["ok"], "destinations": destinations}))
    ledger.queue_job(job.id, route=route, pipeline="ok", series_instance_uid=f"{study}.1", detail="")
    ledger.transition(job.id, JobState.QUEUED, JobState.ANALYSING)
    return job.id


def dispatching_job(
    ledger: Ledger, spool: Path, study: str, files: list[Path], destinations: list[str]
) -> tuple[int, tuple[tuple[str, str, str, str], ...]]:
    """A job driven to ENCODING through the ledger's own API, routed to ``destinations``, whose outputs
    are copies of ``files`` in the spool (kind ``sc``)."""
    job_id = analysing_job(ledger, study, [{"name": d, "outputs": ["sc"]} for d in destinations])
    ledger.transition(job_id, JobState.ANALYSING, JobState.ENCODING)
    outputs = []
    for f in files:
        hdr = dcmread(f, stop_before_pixels=True)
        rel = f"work/{job_id}/outputs/{f.name}"
        (spool / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, spool / rel)
        outputs.append(("sc", rel, str(hdr.SOPClassUID), str(hdr.SOPInstanceUID)))
    return job_id, tuple(outputs)
