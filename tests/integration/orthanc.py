"""A real Orthanc peer for integration tests: the node C-STOREs to it, tests read back over REST.

Facts about the Debian package (Orthanc 1.10.1) that this helper relies on or works around:

* **Nagle.** Debian's DCMTK (which Orthanc links dynamically for its DICOM server) leaves Nagle's
  algorithm on unless the environment says ``TCP_NODELAY=1``; without it every C-STORE round trip
  waits for a delayed ACK and transfers are about 60x slower. The peer is always started with
  ``TCP_NODELAY=1`` in its environment (the ``TcpNoDelay`` option in the config is for the HTTP
  server only). Send to it with DCMTK tools under the same variable.
* **Bind address.** Orthanc 1.10 has no bind-address option: both the DICOM and the HTTP server
  listen on 0.0.0.0. ``RemoteAccessAllowed: false`` makes the REST API refuse anything but
  loopback, and the ports are free ports handed out by ``tests.conftest.free_port`` (this pytest
  process's own block, below the kernel's ephemeral range), so nothing well known is exposed.
  The package's own system service (4242/8042), if apt enabled it, is never touched and those
  ports are never used.
* **Shutdown time.** After SIGTERM Orthanc takes a few seconds to exit (its threads wind down on
  their own poll intervals). :meth:`OrthancPeer.stop` waits for the process to be gone (SIGKILL
  after ``kill_after`` seconds) so that :meth:`OrthancPeer.start` can reopen the same SQLite
  index and storage folder right away: outage tests stop the peer and restart it on the same data.
* **Readiness.** Orthanc starts its DICOM server before its HTTP server, so once
  ``GET /system`` answers the DICOM port accepts associations too; :meth:`OrthancPeer.start`
  polls both against a deadline.
* **Duplicates.** ``OverwriteInstances`` stays false (Orthanc's default): a second C-STORE of an
  instance already stored succeeds but keeps the first copy, so a resend after an outage does not
  add instances.

The throwaway config loads no plugins (``Plugins: []``) unless ``plugins`` names some (e.g.
:func:`dicomweb_plugin`, Debian's ``orthanc-dicomweb``: then ``DicomWeb`` is enabled at ``/dicom-web/``), stores uncompressed without fsync, and
keeps no jobs across restarts. ``extra_config`` overrides or adds any key. ``tls`` (an :class:`OrthancTLS`)
turns on DICOM TLS: the DICOM server then accepts TLS only, and Orthanc uses TLS towards a modality whose
entry says ``"UseDicomTls": true``.

Usage::

    with OrthancPeer(tmp_path / "orthanc", aet="ORTHANC") as orthanc:   # free ports by default
        storescu("127.0.0.1", orthanc.dicom_port, files, aec=orthanc.aet)
        orthanc.instances_of_study(study_uid)

or, in a test, the :func:`orthanc_factory` / :func:`orthanc` fixtures (import them into the test
module or a conftest).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from tests.conftest import PORT_BLOCK, free_port


def dicomweb_plugin() -> Path | None:
    """The Orthanc DICOMweb plugin (``libOrthancDicomWeb.so*``), or None when it is not installed.

    ``$TRIAGED_ORTHANC_DICOMWEB`` names it; else the package manager says where Debian's
    ``orthanc-dicomweb`` put it (``dpkg -L``), so no machine path is written here.
    """
    named = os.environ.get("TRIAGED_ORTHANC_DICOMWEB")
    if named:
        return Path(named) if Path(named).is_file() else None
    if shutil.which("dpkg") is None:
        return None
    listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False)
    found = sorted(
        Path(line) for line in listing.stdout.splitlines() if Path(line).name.startswith("libOrthancDicomWeb.so")
    )
    return next((p for p in found if p.is_file()), None)


SYSTEM_SERVICE_PORTS = frozenset({4242, 8042})  # the Debian package's own service: never use these

_LIVE: weakref.WeakSet[OrthancPeer] = weakref.WeakSet()


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that are free now, from :func:`tests.conftest.free_port`.

    That hands out ports in turn from this pytest process's own block (per xdist worker, outside the
    kernel's ephemeral range), so two peers, or a peer and a node, started at the same time by different
    workers do not get the same port, as ports picked by binding port 0 and releasing it could.
    """
    ports: list[int] = []
    tries = PORT_BLOCK  # free_port() comes back to a port only after the rest of its block
    while len(ports) < count:
        if tries == 0:
            raise RuntimeError(f"only {len(ports)} of {count} free port(s) found on 127.0.0.1")
        tries -= 1
        port = free_port()
        if port not in SYSTEM_SERVICE_PORTS and port not in ports:
            ports.append(port)
    return ports


@dataclass(frozen=True)
class OrthancTLS:
    """Orthanc's DICOM TLS settings: its certificate and key (server and client alike), the certificates it
    trusts (a CA bundle works), and whether a peer connecting to it must present a client certificate."""

    certificate: Path
    private_key: Path
    trusted_certificates: Path
    remote_certificate_required: bool = True

    def config(self) -> dict[str, Any]:
        return {
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(self.certificate),
            "DicomTlsPrivateKey": str(self.private_key),
            "DicomTlsTrustedCertificates": str(self.trusted_certificates),
            "DicomTlsRemoteCertificateRequired": self.remote_certificate_required,
        }


class OrthancError(RuntimeError):
    """Orthanc did not start, did not stop, or answered a REST call with an error."""


class OrthancPeer:
    """One Orthanc process with its own config, storage and index under ``folder``.

    ``dicom_port`` / ``http_port`` default to free ports, chosen once, so a restart keeps them.
    ``modalities`` becomes ``DicomModalities`` (name -> ``[aet, host, port]`` or a dict).
    """

    def __init__(
        self,
        folder: Path,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        *,
        modalities: Mapping[str, Sequence[str | int] | Mapping[str, Any]] | None = None,
        stable_age: int = 1,
        extra_config: Mapping[str, Any] | None = None,
        startup_timeout: float = 30.0,
        binary: str = "Orthanc",
        tls: OrthancTLS | None = None,
        plugins: Sequence[Path] = (),
    ) -> None:
        if dicom_port is None or http_port is None:
            picked = iter(free_ports(2))
            dicom_port = dicom_port if dicom_port is not None else next(picked)
            http_port = http_port if http_port is not None else next(picked)
        for port in (dicom_port, http_port):
            if port in SYSTEM_SERVICE_PORTS:
                raise ValueError(f"port {port} belongs to the system Orthanc service; use a free port")
        if dicom_port == http_port:
            raise ValueError("dicom_port and http_port must differ")
        self.folder = Path(folder)
        self.aet = aet
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.modalities = dict(modalities or {})
        self.stable_age = stable_age
        self.extra_config = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.binary = binary
        self.tls = tls
        self.plugins = tuple(Path(p) for p in plugins)
        self.config_path = self.folder / "orthanc.json"
        self.log_path = self.folder / "orthanc.log"
        self.url = f"http://127.0.0.1:{http_port}"
        self.last_start_seconds: float | None = None
        self.last_stop_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        # Never route loopback REST calls through an http_proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ------------------------------------------------------------------ lifecycle

    def config(self) -> dict[str, Any]:
        """The configuration written to :attr:`config_path` on every :meth:`start`."""
        data: dict[str, Any] = {
            "Name": f"triaged-test-{self.aet}",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "StorageCompression": False,
            "SyncStorageArea": False,
            "Plugins": [str(p) for p in self.plugins],
            "LuaScripts": [],
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpDescribeErrors": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "SslEnabled": False,
            "WebDavEnabled": False,
            "ExecuteLuaEnabled": False,
            "RestApiWriteToFileSystemEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomTlsEnabled": False,
            "DicomModalities": self.modalities,
            "DicomModalitiesInDatabase": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAssociationCloseDelay": 0,
            "OrthancPeers": {},
            "OrthancPeersInDatabase": False,
            "StableAge": self.stable_age,
            "LogExportedResources": False,
            "OverwriteInstances": False,
            "DeidentifyLogs": False,
            "MaximumStorageSize": 0,
            "MaximumPatientCount": 0,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
        }
        if self.tls is not None:
            data.update(self.tls.config())
        if any("DicomWeb" in p.name for p in self.plugins):
            data["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False}
        data.update(self.extra_config)
        return data

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> Self:
        """Write the config, launch Orthanc, and wait until REST and DICOM both answer."""
        if self.running:
            raise OrthancError(f"Orthanc {self.aet} is already running (pid {self.pid})")
        if shutil.which(self.binary) is None:
            raise OrthancError(f"{self.binary} is not installed (apt: orthanc)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n===== test helper: starting {self.binary} {self.config_path}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [self.binary, str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        _LIVE.add(self)
        deadline = began + self.startup_timeout
        while not (self._http_ready() and self._dicom_listening()):
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise OrthancError(f"Orthanc exited with status {code} while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self._terminate(kill_after=5.0)
                raise OrthancError(
                    f"Orthanc did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.last_start_seconds = time.monotonic() - began
        return self

    def stop(self, kill_after: float = 20.0) -> None:
        """SIGTERM, then wait until the process is gone (SIGKILL after ``kill_after`` s). Idempotent."""
        if self._process is None:
            return
        began = time.monotonic()
        self._terminate(kill_after)
        self.last_stop_seconds = time.monotonic() - began

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def _terminate(self, kill_after: float) -> None:
        process, self._process = self._process, None
        _LIVE.discard(self)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def _http_ready(self) -> bool:
        try:
            self.get_json("/system", timeout=1.0)
        except (OSError, OrthancError, ValueError):
            return False
        return True

    def _dicom_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1.0):
                return True
        except OSError:
            return False

    # ------------------------------------------------------------------ REST

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0) -> bytes:
        """One REST call; raises :class:`OrthancError` on an HTTP error status."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise OrthancError(f"{method} {path} -> HTTP {e.code}: {detail}") from e

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def post_json(self, path: str, payload: object, timeout: float = 30.0) -> Any:
        return json.loads(self.request("POST", path, json.dumps(payload).encode(), timeout=timeout))

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json("/system")
        return result

    def studies(self) -> list[str]:
        """Orthanc IDs of all studies."""
        result: list[str] = self.get_json("/studies")
        return result

    def instances_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Expanded instance resources (``ID``, ``MainDicomTags``, ``ParentSeries``, ...) of one study."""
        result: list[dict[str, Any]] = self.post_json(
            "/tools/find",
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True},
        )
        return result

    def sop_instance_uids(self, study_instance_uid: str) -> set[str]:
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self.instances_of_study(study_instance_uid)}

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags``: keyword -> value (sequences as lists of dicts)."""
        result: dict[str, Any] = self.get_json(f"/instances/{orthanc_id}/simplified-tags")
        return result

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file (Part 10), byte for byte as received."""
        return self.request("GET", f"/instances/{orthanc_id}/file")

    def count_instances(self) -> int:
        return int(self.get_json("/statistics")["CountInstances"])

    def wait_for_instances(self, count: int, timeout: float = 20.0) -> int:
        """Poll until at least ``count`` instances are stored; returns the count, raises on timeout."""
        deadline = time.monotonic() + timeout
        while (found := self.count_instances()) < count:
            if time.monotonic() > deadline:
                raise OrthancError(f"{found} instance(s) after {timeout:.0f} s, expected {count}")
            time.sleep(0.1)
        return found

    # ------------------------------------------------------------------ DICOM

    def echo_ok(self, calling_aet: str = "ECHOSCU", timeout: int = 5) -> bool:
        """True when a DCMTK ``echoscu`` C-ECHO to this peer's DICOM port succeeds."""
        echoscu = shutil.which("echoscu")
        if echoscu is None:
            raise OrthancError("echoscu is not installed (apt: dcmtk)")
        try:
            result = subprocess.run(
                [
                    echoscu,
                    "-aet",
                    calling_aet,
                    "-aec",
                    self.aet,
                    "-to",
                    str(timeout),
                    "-ta",
                    str(timeout),
                    "-td",
                    str(timeout),
                    "127.0.0.1",
                    str(self.dicom_port),
                ],
                capture_output=True,
                timeout=timeout * 3 + 5,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"OrthancPeer({self.aet}@127.0.0.1:{self.dicom_port}, http {self.http_port}, {state})"


@atexit.register
def _kill_leftovers() -> None:
    """Last resort for peers a crashed test never stopped: no orphaned Orthanc after pytest exits."""
    for peer in list(_LIVE):
        peer._terminate(kill_after=10.0)


# ---------------------------------------------------------------------- fixtures

OrthancFactory = Callable[..., OrthancPeer]


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[OrthancFactory]:
    """Start peers on demand: ``orthanc_factory(name="orthanc", aet="ORTHANC", start=True, **kwargs)``.

    Each peer lives in ``tmp_path / name`` on free ports (unless given); all are stopped at teardown.
    """
    peers: list[OrthancPeer] = []

    def make(
        name: str = "orthanc", *, aet: str = "ORTHANC", start: bool = True, **kwargs: Any
    ) -> OrthancPeer:
        peer = OrthancPeer(tmp_path / name, aet=aet, **kwargs)
        peers.append(peer)
        return peer.start() if start else peer

    yield make
    for peer in peers:
        peer.stop()


@pytest.fixture
def orthanc(orthanc_factory: OrthancFactory) -> OrthancPeer:
    """One running peer, AE title ``ORTHANC``, in ``tmp_path / "orthanc"``."""
    return orthanc_factory()
