"""Issue 12 "DICOM TLS": the listener and the destinations over TLS, with real DCMTK and Orthanc peers.

A throwaway CA, a certificate for the node and one for the peers are made with the ``openssl`` CLI once
per module; a second CA that signed nothing here stands for "the wrong CA".
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_config, write_config
from tests.integration import orthanc as orthanc_helpers
from tests.integration.conftest import dispatching_job, start_storescp, storescu, wait_for
from tests.integration.orthanc import OrthancPeer, OrthancTLS
from triaged.config import Config, load_config
from triaged.daemon import Node, configure_logging
from triaged.domain import OutboxEntry
from triaged.ledger import Ledger
from triaged.net.scu import echo
from triaged.net.tls import self_check_tls
from triaged.spool import Spool
from triaged.stages import Dispatch

pytestmark = pytest.mark.integration
orthanc_factory = orthanc_helpers.orthanc_factory

CT = "1.2.840.10008.5.1.4.1.1.2"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make sysdeps installs it with apt); DICOM TLS not tested")
    return path


@dataclass(frozen=True)
class PKI:
    folder: Path
    ca: Path
    other_ca: Path  # a CA that signed none of the certificates below

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """CA ``ca``, leaf certificates ``node`` and ``peer`` (127.0.0.1 / localhost, server and client use)."""
    _tool("openssl")
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN=triaged test {ca}",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            cwd=folder,
        )
    (folder / "leaf.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    for leaf in ("node", "peer"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={leaf}",
            "-keyout",
            f"{leaf}.key",
            "-out",
            f"{leaf}.csr",
            cwd=folder,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{leaf}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            f"{leaf}.pem",
            cwd=folder,
        )
    return PKI(folder, folder / "ca.pem", folder / "other-ca.pem")


def _listener_tls(pki: PKI, **extra: object) -> dict[str, object]:
    return {
        "certificate": str(pki.cert("node")),
        "private_key": str(pki.key("node")),
        "ca_certificates": str(pki.ca),
        **extra,
    }


def _files(series: Path, n: int) -> list[Path]:
    return sorted(series.iterdir())[:n]


def _count_spool(node: Node) -> int:
    return sum(1 for _ in (node.config.storage.spool / "studies").rglob("*.dcm"))


def _tls_storescu(
    pki: PKI, port: int, files: list[Path], *, client_cert: bool
) -> subprocess.CompletedProcess[str]:
    tls = ["+tls", str(pki.key("peer")), str(pki.cert("peer"))] if client_cert else ["+tla"]
    return storescu("127.0.0.1", port, files, extra=[*tls, "+cf", str(pki.ca), "-to", "10", "-ta", "10"])


# --------------------------------------------------------------------------- (a) peers -> the node


def test_a_tls_listener_stores_over_tls_and_refuses_plain_associations(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path, pki: PKI
) -> None:
    _tool("storescu")
    node = node_factory(make_config(tmp_path, listener={"tls": _listener_tls(pki)}))
    port = node.listener.address[1]
    files = _files(phantom_ct_series, 3)

    plain = storescu("127.0.0.1", port, files, extra=["-to", "10", "-ta", "10"])
    assert plain.returncode != 0, "a plain association was accepted by a TLS-only listener"
    assert _count_spool(node) == 0

    # No client certificate asked for (require_client_certificate: false): anonymous TLS clients store too.
    anonymous = _tls_storescu(pki, port, files[:1], client_cert=False)
    assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
    with_cert = _tls_storescu(pki, port, files, client_cert=True)
    assert with_cert.returncode == 0, with_cert.stdout + with_cert.stderr
    assert _count_spool(node) == 3
    # `triaged status` reaches its own TLS listener.
    assert echo("127.0.0.1", port, "TRIAGED", timeout=5, tls=self_check_tls(node.config.listener.tls)) == 0


def test_a_listener_requiring_client_certificates_refuses_a_client_without_one(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path, pki: PKI
) -> None:
    _tool("storescu")
    tls = _listener_tls(pki, require_client_certificate=True)
    node = node_factory(make_config(tmp_path, listener={"tls": tls}))
    port = node.listener.address[1]
    files = _files(phantom_ct_series, 2)

    without = _tls_storescu(pki, port, files, client_cert=False)
    assert without.returncode != 0, "a TLS client without a certificate was accepted"
    assert _count_spool(node) == 0
    with_cert = _tls_storescu(pki, port, files, client_cert=True)
    assert with_cert.returncode == 0, with_cert.stdout + with_cert.stderr
    assert _count_spool(node) == 2


# --------------------------------------------------------------------------- (b) the node -> destinations


@pytest.fixture
def tls_storescp(tmp_path: Path, pki: PKI) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp over TLS (client certificate required, signed by the test CA): (port, output folder)."""
    _tool("storescp")  # skips, as this module does for every missing tool (start_storescp would fail)
    tls = ("+tls", str(pki.key("peer")), str(pki.cert("peer")), "+cf", str(pki.ca))
    proc, port, out = start_storescp(tmp_path, folder="storescp", ae_title="PACS", options=tls)
    try:
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def _dest(port: int, aet: str, tls: dict[str, object] | None) -> dict[str, object]:
    return {"ae_title": aet, "host": "127.0.0.1", "port": port, **({"tls": tls} if tls is not None else {})}


def _node_client_tls(pki: PKI, ca: Path) -> dict[str, object]:
    return {
        "ca_certificates": str(ca),
        "certificate": str(pki.cert("node")),
        "private_key": str(pki.key("node")),
    }


def _dispatch(
    folder: Path, destinations: dict[str, dict[str, object]], files: list[Path]
) -> list[OutboxEntry]:
    """One job's ``files`` through the real outbox and dispatcher to ``destinations``; its outbox rows after."""
    folder.mkdir()
    config = make_config(
        folder, destinations=destinations, dispatch={"timeout_seconds": 10, "base_delay_seconds": 60}
    )
    study = "1.2.826.0.9.12." + str(int(time.time() * 1000) % 10**9)
    with Ledger(config.storage.ledger) as ledger:
        spool = config.storage.spool
        job_id, outputs = dispatching_job(ledger, spool, study, files, list(destinations))
        job = ledger.job(job_id)
        dispatch = Dispatch(ledger, Spool(spool), lambda: config)
        try:
            dispatch.enqueue_outputs(job, outputs)
            dispatch.dispatch_due()
        finally:
            dispatch.stop()
        return ledger.outbox(job_id=job.id)


def test_results_are_delivered_to_a_tls_destination_with_a_client_certificate(
    tmp_path: Path, phantom_ct_series: Path, pki: PKI, tls_storescp: tuple[int, Path]
) -> None:
    port, out = tls_storescp
    files = _files(phantom_ct_series, 3)
    items = _dispatch(tmp_path / "node", {"pacs": _dest(port, "PACS", _node_client_tls(pki, pki.ca))}, files)
    assert [i.state for i in items] == ["SENT"] * 3, [i.last_error for i in items]
    wait_for(lambda: len(list(out.iterdir())) == 3, timeout=5, what="storescp to write the 3 objects")


def test_a_tls_failure_is_a_transient_dispatch_failure_with_the_tls_error(
    tmp_path: Path, phantom_ct_series: Path, pki: PKI, tls_storescp: tuple[int, Path]
) -> None:
    port, out = tls_storescp
    # a destination that speaks plain DICOM only
    plain, plain_port, _ = start_storescp(tmp_path, folder="plain", ae_title="PLAIN", options=())
    try:
        items = _dispatch(
            tmp_path / "node",
            {
                "wrong_ca": _dest(port, "PACS", _node_client_tls(pki, pki.other_ca)),
                "plain": _dest(plain_port, "PLAIN", {"ca_certificates": str(pki.ca)}),
            },
            _files(phantom_ct_series, 1),
        )
    finally:
        plain.terminate()
        plain.wait(10)
    errors = {i.destination: (i.state, i.attempts, i.last_error) for i in items}
    state, attempts, error = errors["wrong_ca"]
    assert (state, attempts) == ("PENDING", 1)  # retried with backoff, not dead-lettered
    assert error.startswith(f"TLS handshake with PACS@127.0.0.1:{port} failed: certificate verify failed"), (
        error
    )
    state, attempts, error = errors["plain"]
    assert (state, attempts) == ("PENDING", 1)
    assert error.startswith(f"TLS handshake with PLAIN@127.0.0.1:{plain_port} failed"), error
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- (c) Orthanc over TLS


def test_orthanc_and_the_node_exchange_studies_over_mutual_tls(
    node_factory: Callable[[Config], Node],
    orthanc_factory: orthanc_helpers.OrthancFactory,
    tmp_path: Path,
    phantom_ct_series: Path,
    pki: PKI,
) -> None:
    _tool("Orthanc")
    node = node_factory(
        make_config(tmp_path, listener={"tls": _listener_tls(pki, require_client_certificate=True)})
    )
    node_port = node.listener.address[1]
    peer: OrthancPeer = orthanc_factory(
        tls=OrthancTLS(pki.cert("peer"), pki.key("peer"), pki.ca, remote_certificate_required=True),
        modalities={
            "triaged": {"AET": "TRIAGED", "Host": "127.0.0.1", "Port": node_port, "UseDicomTls": True}
        },
    )
    files = _files(phantom_ct_series, 2)

    # The node -> Orthanc: results delivered over TLS, the node presenting its client certificate.
    items = _dispatch(
        tmp_path / "sender", {"pacs": _dest(peer.dicom_port, peer.aet, _node_client_tls(pki, pki.ca))}, files
    )
    assert [i.state for i in items] == ["SENT"] * 2, [i.last_error for i in items]
    assert peer.wait_for_instances(2) == 2

    # Orthanc -> the node (client certificate required): C-STORE from Orthanc's REST API over TLS.
    ids = [_upload(peer, f) for f in files]
    answer = peer.post_json("/modalities/triaged/store", {"Resources": ids, "Synchronous": True}, timeout=30)
    assert answer.get("FailedInstancesCount", 0) == 0, answer
    wait_for(lambda: _count_spool(node) == 2, timeout=10, what="Orthanc's instances in the node's spool")


def _upload(peer: OrthancPeer, file: Path) -> str:
    import urllib.request

    req = urllib.request.Request(peer.url + "/instances", data=file.read_bytes(), method="POST")
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as response:
        return str(json.loads(response.read())["ID"])


# --------------------------------------------------------------------------- reload


def test_a_reload_that_changes_listener_tls_says_it_needs_a_restart_and_refuses_a_broken_key(
    tmp_path: Path, pki: PKI
) -> None:
    log_file = tmp_path / "node.log"
    path = write_config(tmp_path, logging={"file": str(log_file)})
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    config = load_config(path)
    configure_logging(config.logging)  # as `triaged serve` does
    node = Node(config, path, path.read_text())
    node.start()
    try:
        port = node.listener.address[1]
        data = yaml.safe_load(path.read_text())
        data["listener"]["tls"] = _listener_tls(pki)
        path.write_text(yaml.safe_dump(data))
        assert node.reload() is True
        assert (
            "config reload: listener.tls changed; it takes effect at the next restart" in log_file.read_text()
        )
        assert echo("127.0.0.1", port, "TRIAGED", timeout=5) == 0  # still the plain listener until then
        data["listener"]["tls"]["private_key"] = str(pki.key("peer"))  # not the node certificate's key
        path.write_text(yaml.safe_dump(data))
        assert node.reload() is False
        assert node.config.listener.tls is not None and node.config.listener.tls.private_key == pki.key(
            "node"
        )
        refused = f"config reload refused, keeping the running config: {path}:"
        assert any(
            line.startswith(refused, line.find("config reload refused"))
            and f"listener.tls.private_key: {pki.key('peer')} does not match the certificate" in line
            for line in log_file.read_text().splitlines()
        ), log_file.read_text()
    finally:
        node.stop(drain_seconds=1)
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            if handler not in saved[0]:
                handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
