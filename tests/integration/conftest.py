"""Fixtures that run a real node in-process on a free port."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from triaged.config import Config
from triaged.daemon import Node
from triaged.domain import JobState

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
