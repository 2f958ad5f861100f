"""systemd/triaged.service: the hardening is present and consistent, systemd accepts it, and outside systemd
`triaged serve` applies the same umask (files the node creates are never world-readable)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.conftest import free_port

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "triaged.service"
DROP_IN_PREFIX = "#     "  # a drop-in quoted in a comment: its lines are indented by five spaces

REQUIRED_SERVICE = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateDevices": "yes",
    "PrivateMounts": "yes",
    "ProtectClock": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "RestrictRealtime": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "",
    "UMask": "0027",
}


def _directives(lines: list[str]) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values]}}`` of unit-file lines (comments and blanks skipped)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out.setdefault(section, {}).setdefault(key.strip(), []).append(value.strip())
    return out


def _quoted_drop_ins(text: str) -> list[list[str]]:
    """The drop-ins the unit's comments tell an admin to add, each as its lines."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for raw in text.splitlines():
        if raw.startswith(DROP_IN_PREFIX):
            body = raw[len(DROP_IN_PREFIX) :]
            if body.startswith("["):
                current = []
                blocks.append(current)
            if current is not None:
                current.append(body)
        else:
            current = None
    return blocks


def test_the_unit_carries_the_required_hardening_and_limits() -> None:
    unit = _directives(UNIT.read_text(encoding="utf-8").splitlines())
    service = unit["Service"]
    for key, value in REQUIRED_SERVICE.items():
        assert service.get(key) == [value], f"{key}={value} missing from [Service]: {service.get(key)}"
    assert service["MemoryMax"][0].rstrip("KMGT").isdigit()
    assert service["TasksMax"][0].isdigit()
    # Start rate limits belong to [Unit]: in [Service] systemd ignores them.
    assert unit["Unit"]["StartLimitBurst"][0].isdigit()
    assert unit["Unit"]["StartLimitIntervalSec"][0].isdigit()
    assert "StartLimitBurst" not in service and "StartLimitIntervalSec" not in service
    # No capability may be granted while the bounding set is empty.
    assert service.get("AmbientCapabilities", [""]) == [""]


def test_the_documented_drop_ins_are_consistent_with_the_unit() -> None:
    blocks = [_directives(block)["Service"] for block in _quoted_drop_ins(UNIT.read_text(encoding="utf-8"))]
    [cuda] = [b for b in blocks if "PrivateDevices" in b]
    assert cuda["PrivateDevices"] == ["no"]
    assert any("nvidia" in d for d in cuda["DeviceAllow"])
    [port_104] = [b for b in blocks if "AmbientCapabilities" in b]
    # An ambient capability outside the bounding set is silently dropped: both must name it.
    assert port_104["AmbientCapabilities"] == port_104["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    readme = (UNIT.parents[1] / "README.md").read_text(encoding="utf-8")
    assert "PrivateDevices=no" in readme and "DeviceAllow=" in readme


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("drop_in", [None, 0, 1])
def test_systemd_accepts_the_unit_and_each_documented_drop_in(tmp_path: Path, drop_in: int | None) -> None:
    # verify checks that commands exist: point them at an executable that does (the venv is not in /opt).
    text = UNIT.read_text(encoding="utf-8").replace("/opt/triaged/.venv/bin/triaged", sys.executable)
    (tmp_path / "triaged.service").write_text(text, encoding="utf-8")
    if drop_in is not None:
        (tmp_path / "triaged.service.d").mkdir()
        block = _quoted_drop_ins(text)[drop_in]
        (tmp_path / "triaged.service.d" / "override.conf").write_text(
            "\n".join(block) + "\n", encoding="utf-8"
        )
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "triaged.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Unknown or misplaced keys are only warnings (exit 0): any output at all is a failure.
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stderr


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.integration
def test_serve_outside_systemd_creates_no_world_readable_files(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"listener: {{bind_address: 127.0.0.1, port: {port}}}\n"
        f"storage: {{spool: {state / 'spool'}, ledger: {state / 'ledger.sqlite'}, min_free_mb: 0}}\n"
        "completion: {delay_seconds: 600}\nworklist: {http_port: 0}\n",
        encoding="utf-8",
    )
    log = (tmp_path / "daemon.log").open("w")
    # The permissive umask of an ordinary login shell: without the node's own umask, files come out 0644.
    proc = subprocess.Popen(
        [sys.executable, "-m", "triaged.cli", "serve", "--config", str(cfg)], stderr=log, umask=0o022
    )
    try:
        deadline = time.monotonic() + 30
        while not _listening(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and _listening(port), (tmp_path / "daemon.log").read_text()
        # A refused dataset (no StudyInstanceUID) makes the node write quarantine files too.
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.Modality = "CT"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGED")
        assert assoc.is_established
        try:
            assert assoc.send_c_store(ds).Status != 0
        finally:
            assoc.release()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    created = [state, *state.rglob("*")]
    assert (state / "ledger.sqlite") in created
    assert list((state / "spool" / "quarantine").iterdir())
    readable = {
        str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in created
        if os.path.exists(p) and p.stat().st_mode & 0o007
    }
    assert not readable, f"world-accessible: {readable}"
