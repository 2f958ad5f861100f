"""A ``triaged serve`` subprocess, its destinations (DCMTK storescp, a hung TCP peer) and ledger reads."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from pydicom import dcmread
from pynetdicom import AE

#: The ``triaged`` entry point of the virtualenv running the harness.
TRIAGED = Path(sys.executable).with_name("triaged")
VERIFICATION = "1.2.840.10008.1.1"
#: The node's AE title in every scenario.
NODE_AE = "TRIAGED"


class NodeDied(RuntimeError):
    """The node exited (or never answered C-ECHO) when it should be serving."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the kernel says is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo(port: int, timeout: float = 5.0) -> bool:
    """Whether a C-ECHO to the node on ``port`` gets Success."""
    ae = AE(ae_title="SOAKECHO")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return bool(rsp) and int(rsp.get("Status", -1)) == 0
    finally:
        if assoc.is_established:
            assoc.release()


def node_settings(
    state: Path, port: int, destinations: dict[str, int], **sections: dict[str, Any]
) -> dict[str, Any]:
    """A config for a fast node: 1 s completion, quick retries, the ``threshold`` pipeline (no torch)."""
    data: dict[str, Any] = {
        "listener": {"ae_title": NODE_AE, "bind_address": "127.0.0.1", "port": port},
        "storage": {"spool": str(state / "spool"), "ledger": str(state / "ledger.sqlite"), "min_free_mb": 0},
        "completion": {"delay_seconds": 1, "sweep_interval_seconds": 0.2},
        "analysis": {
            "registry": "triaged.analysis.registry:default_registry",
            "default_pipeline": "threshold",
            "device": "cpu",
            "threads": 1,
            "timeout_seconds": 120,
        },
        "dispatch": {
            "interval_seconds": 0.3,
            "base_delay_seconds": 0.5,
            "max_delay_seconds": 2,
            "timeout_seconds": 20,
        },
        "destinations": {
            name: {"ae_title": name.upper()[:16], "host": "127.0.0.1", "port": dport}
            for name, dport in destinations.items()
        },
        "routing": {"default": {"destinations": list(destinations)}},
        "worklist": {"http_port": 0},
        "reload_on_change": False,
        "logging": {"level": "INFO"},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


class Node:
    """One node's config, state folder and (re)started ``triaged serve`` process."""

    def __init__(self, workdir: Path, settings: dict[str, Any]) -> None:
        self.workdir = workdir
        self.settings = settings
        self.port = int(settings["listener"]["port"])
        self.ledger = Path(settings["storage"]["ledger"])
        self.spool = Path(settings["storage"]["spool"])
        self.config = workdir / "config.yaml"
        self.log = workdir / "node.log"
        self.config.write_text(yaml.safe_dump(settings))
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise NodeDied("the node is not running")
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start ``triaged serve`` and wait until it answers C-ECHO; the seconds it took."""
        started = time.monotonic()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(TRIAGED), "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        self.starts += 1
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise NodeDied(f"triaged serve exited {self.proc.returncode} at start:\n{self.log_tail()}")
            if echo(self.port, timeout=2.0):
                return time.monotonic() - started
            time.sleep(0.2)
        raise NodeDied(f"no C-ECHO answer {timeout:.0f} s after start:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL the node (its analysis worker dies with it: PDEATHSIG)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def terminate(self, timeout: float = 120.0) -> tuple[float, int | None]:
        """SIGTERM; (seconds until it exited, exit status or None when it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0, None if self.proc is None else self.proc.returncode
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            rc = None
        return time.monotonic() - started, rc

    def rss_mib(self, field: str = "VmRSS") -> float:
        """The node process's resident memory (``VmHWM``: its peak so far), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- the ledger, read-only -----------------------------------------------------------------
    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` on the ledger (a short read-only connection; WAL lets the node write meanwhile)."""
        for attempt in range(20):
            try:
                con = sqlite3.connect(f"file:{self.ledger}?mode=ro", uri=True, timeout=10)
                try:
                    return con.execute(sql, args).fetchall()
                finally:
                    con.close()
            except sqlite3.OperationalError:
                if attempt == 19:
                    raise
                time.sleep(0.1)
        return []

    def instances(self) -> dict[str, tuple[str, str]]:
        """SOP Instance UID → (spool-relative path, sha256) of every recorded instance."""
        return {
            uid: (path, sha)
            for uid, path, sha in self.query("SELECT sop_instance_uid, path, sha256 FROM instances")
        }

    def current_jobs(self) -> list[tuple[str, int, str, str]]:
        """(study UID, revision, state, detail) of each study's newest job."""
        return [
            (r[0], int(r[1]), str(r[2]), str(r[3]))
            for r in self.query(
                "SELECT s.study_instance_uid, j.revision, j.state, j.detail FROM jobs j "
                "JOIN studies s ON s.id = j.study_id "
                "WHERE j.revision = (SELECT MAX(revision) FROM jobs k WHERE k.study_id = j.study_id)"
            )
        ]

    def job_states(self) -> Counter[str]:
        return Counter(state for (state,) in self.query("SELECT state FROM jobs"))

    def outbox(self) -> list[tuple[str, str, str]]:
        """(destination, SOP Instance UID, state) of every result object."""
        return [
            (str(a), str(b), str(c))
            for a, b, c in self.query("SELECT destination, sop_instance_uid, state FROM outbox")
        ]

    def integrity(self) -> str:
        con = sqlite3.connect(str(self.ledger), timeout=10)
        try:
            return str(con.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            con.close()

    def quiescent(self) -> bool:
        """Every study's newest job in a terminal state and no result object waiting."""
        jobs = self.current_jobs()
        if not jobs or any(state not in TERMINAL for _s, _r, state, _d in jobs):
            return False
        return not self.query("SELECT 1 FROM outbox WHERE state = 'PENDING' LIMIT 1")

    def wait_quiescent(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise NodeDied(
                    f"the node exited {self.proc.returncode if self.proc else '?'}:\n{self.log_tail()}"
                )
            if self.quiescent():
                return True
            time.sleep(0.3)
        return False

    def leftovers(self) -> list[Path]:
        """Temporary files in the spool: partial writes nobody cleaned."""
        found = list((self.spool / "tmp").glob("*")) if (self.spool / "tmp").is_dir() else []
        found += [p for p in self.spool.rglob("*") if p.suffix in {".part", ".tmp"} and p not in found]
        return found


TERMINAL = frozenset({"DONE", "IGNORED", "FAILED", "SUPERSEDED"})


class Storescp:
    """A DCMTK storescp destination keeping every received object in its own file (``+uf``)."""

    def __init__(self, workdir: Path, ae_title: str, port: int) -> None:
        self.out = workdir / f"received-{ae_title.lower()}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.port = port
        self._uids: dict[str, str] = {}
        self.proc = subprocess.Popen(
            ["storescp", "-aet", ae_title, "+uf", "-od", str(self.out), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
        )

    def files(self) -> int:
        return sum(1 for _ in self.out.iterdir())

    def receptions(self) -> Counter[str]:
        """How many times each SOP Instance UID arrived."""
        for f in self.out.iterdir():
            if f.name not in self._uids:
                try:
                    self._uids[f.name] = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                except Exception:  # noqa: BLE001 - storescp may still be writing it; read it next time
                    continue
        return Counter(self._uids.values())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class HungPeer:
    """A destination that accepts TCP connections and never answers a byte."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted = 0
        self._server = socket.create_server(("127.0.0.1", port))
        self._server.settimeout(0.2)
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="hung-peer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)  # read nothing, answer nothing

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in self._held:
            conn.close()
        self._server.close()
