"""The short form of the fault-injection suite (``make soak`` runs the long one): the node's promises hold.

It runs ``python -m soak --short`` in its own process (the harness sends files' bytes as written, a
pynetdicom setting that must not leak into other tests), which starts real ``triaged serve`` nodes:
one killed with SIGKILL inside a dispatch while three senders store, one whose spool and ledger sit on a
small tmpfs that fills up (skipped with a printed reason where ``mount`` is not permitted), and one given
the malformed-input corpus and connection attacks while its results go to a healthy storescp and to a
peer that never answers. See ``soak/`` and ``docs/security.md``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Kept out of `make test` (15-minute budget on 2 cores): `make soak` runs it, then the long form.
pytestmark = [pytest.mark.integration, pytest.mark.soak]

ROOT = Path(__file__).resolve().parents[2]


def test_the_short_soak_keeps_every_promise() -> None:
    if shutil.which("storescp") is None:
        pytest.fail("storescp is not installed; `make test` installs it (apt: dcmtk)")
    run = subprocess.run(
        [sys.executable, "-m", "soak", "--short"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    print(run.stdout[-6000:])
    assert run.returncode == 0, (
        f"soak failed (exit {run.returncode}):\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    )
    assert "lost: 0" in run.stdout and "node alive: yes" in run.stdout
