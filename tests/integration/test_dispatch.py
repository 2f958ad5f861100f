"""Results back to a real PACS: Orthanc on loopback receives SR, SEG and SC in the original study."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

from tests.conftest import make_config, write_config
from tests.integration import orthanc as orthanc_helpers
from tests.integration.conftest import dispatching_job, storescu, wait_for
from tests.integration.orthanc import OrthancPeer
from triaged.config import Config
from triaged.daemon import Node
from triaged.domain import JobState
from triaged.ledger import Ledger
from triaged.spool import Spool
from triaged.stages import Dispatch

pytestmark = pytest.mark.integration
orthanc = orthanc_helpers.orthanc
orthanc_factory = orthanc_helpers.orthanc_factory

SR, SEG, SC = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.7"


def _sections(peer: OrthancPeer) -> dict[str, dict[str, object]]:
    return {
        "destinations": {"pacs": {"ae_title": peer.aet, "host": "127.0.0.1", "port": peer.dicom_port}},
        "routing": {"default": {"destinations": ["pacs"]}},
        "dispatch": {"interval_seconds": 0.3, "base_delay_seconds": 0.5, "max_delay_seconds": 2},
    }


def _study_uid(series: Path) -> str:
    return str(dcmread(next(series.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def _classes(peer: OrthancPeer, study_uid: str) -> list[str]:
    return sorted(peer.instance_tags(i["ID"])["SOPClassUID"] for i in peer.instances_of_study(study_uid))


def test_sr_seg_and_sc_arrive_in_the_original_study_exactly_once(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path, orthanc: OrthancPeer
) -> None:
    node = node_factory(make_config(tmp_path, **_sections(orthanc)))
    assert storescu(*node.listener.address, phantom_ct_series).returncode == 0
    job = wait_for(lambda: next(iter(node.ledger.jobs(states=[JobState.DONE])), None), timeout=120, what="DONE")
    study_uid = _study_uid(phantom_ct_series)
    classes = _classes(orthanc, study_uid)
    assert SR in classes and SEG in classes and SC in classes, classes
    items = node.ledger.outbox(job_id=job.id)
    assert {i.state for i in items} == {"SENT"} and len(items) == len(classes)
    assert "delivered to pacs" in job.detail
    # Resend is idempotent: same UIDs, so the PACS still holds each object once.
    assert node.dispatch.resend(job.id) == len(items)
    wait_for(lambda: node.ledger.job(job.id).state is JobState.DONE and
             all(i.state == "SENT" for i in node.ledger.outbox(job_id=job.id)), what="the resend")
    assert _classes(orthanc, study_uid) == classes


def test_an_outage_of_the_pacs_delays_delivery_and_loses_nothing(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path, orthanc: OrthancPeer
) -> None:
    orthanc.stop()
    node = node_factory(make_config(tmp_path, **_sections(orthanc)))
    assert storescu(*node.listener.address, phantom_ct_series).returncode == 0
    job = wait_for(lambda: next(iter(node.ledger.jobs(states=[JobState.RETRY_WAIT])), None), timeout=120,
                   what="RETRY_WAIT while the PACS is down")
    assert "next attempt" in job.detail
    wait_for(lambda: all(i.attempts >= 2 for i in node.ledger.outbox(job_id=job.id)), what="a second attempt")
    orthanc.start()
    wait_for(lambda: node.ledger.job(job.id).state is JobState.DONE, timeout=60, what="delivery after the outage")
    items = node.ledger.outbox(job_id=job.id)
    assert len(_classes(orthanc, _study_uid(phantom_ct_series))) == len(items)
    assert orthanc.count_instances() == len(items)  # nothing twice
    history = [to for _, _, to, _ in node.ledger.job(job.id).history]
    assert history.count("RETRY_WAIT") >= 1 and history[-1] == "DONE"


def test_an_item_past_its_maximum_age_is_dead_lettered_and_can_be_resent(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path, orthanc: OrthancPeer
) -> None:
    orthanc.stop()
    sections = _sections(orthanc)
    sections["dispatch"]["max_age_hours"] = 0.0005  # 1.8 s
    node = node_factory(make_config(tmp_path, **sections))
    assert storescu(*node.listener.address, phantom_ct_series).returncode == 0
    job = wait_for(lambda: next(iter(node.ledger.jobs(states=[JobState.FAILED])), None), timeout=120,
                   what="dead letters")
    assert job.detail.startswith("dispatch: ") and "dead-lettered" in job.detail
    assert {i.state for i in node.ledger.outbox(job_id=job.id)} == {"DEAD"}
    orthanc.start()
    node.dispatch.resend(job.id)
    wait_for(lambda: node.ledger.job(job.id).state is JobState.DONE, timeout=60, what="the resent objects")


def test_a_killed_daemon_delivers_after_restart(
    tmp_path: Path, phantom_ct_series: Path, orthanc: OrthancPeer
) -> None:
    orthanc.stop()
    cfg = write_config(tmp_path, **_sections(orthanc))
    log = (tmp_path / "daemon.log").open("w")

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "triaged.cli", "serve", "--config", str(cfg)],
                                stderr=log, text=True)

    proc = start()
    try:
        ledger_path = tmp_path / "ledger.sqlite"
        wait_for(lambda: ledger_path.exists(), what="the ledger")
        port = int(yaml.safe_load(cfg.read_text())["listener"]["port"])
        wait_for(lambda: storescu("127.0.0.1", port, phantom_ct_series).returncode == 0, what="the upload")

        def state() -> JobState | None:
            with Ledger(ledger_path) as ledger:
                jobs = ledger.jobs()
                return jobs[0].state if jobs else None

        wait_for(lambda: state() is JobState.RETRY_WAIT, timeout=120, what="encoded results waiting to be sent")
        os.kill(proc.pid, signal.SIGKILL)  # no drain, no goodbye
        proc.wait()
        orthanc.start()
        proc = start()
        wait_for(lambda: state() is JobState.DONE, timeout=60, what="delivery after the restart")
        with Ledger(ledger_path) as ledger:
            [job] = ledger.jobs()
            items = ledger.outbox(job_id=job.id)
        assert {i.state for i in items} == {"SENT"}
        assert orthanc.count_instances() == len(items) >= 3
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


# --- Issue 12 items 7 and 9: a sender per destination, a prompt stop, each acknowledgement recorded ---


class HungPeer:
    """A plain TCP server that accepts connections and never answers (a hung PACS)."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = int(self.server.getsockname()[1])
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.server.close()
        for conn in self.accepted:
            conn.close()


class StorePeer:
    """A real pynetdicom Storage SCP that counts what it gets; ``hold_at`` n: the n-th C-STORE (1-based) waits
    for :attr:`release` before answering, and :attr:`holding` is set while it waits."""

    def __init__(self, hold_at: int | None = None) -> None:
        self.received: list[str] = []
        self.received_at: list[float] = []
        self.hold_at = hold_at
        self.holding = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            self.received_at.append(time.time())
            count = len(self.received)
        if count == self.hold_at:
            self.holding.set()
            self.release.wait(30)
        return 0x0000

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def hung_peer() -> Iterator[HungPeer]:
    peer = HungPeer()
    yield peer
    peer.close()


def _dest(port: int, aet: str) -> dict[str, object]:
    return {"ae_title": aet, "host": "127.0.0.1", "port": port}


def _uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_hung_destination_delays_no_other_destination_and_times_out_on_its_own(
    tmp_path: Path, phantom_ct_series: Path, hung_peer: HungPeer
) -> None:
    pacs = StorePeer()
    config = make_config(
        tmp_path, destinations={"hung": _dest(hung_peer.port, "HUNG"), "pacs": _dest(pacs.port, "PACS")},
        dispatch={"timeout_seconds": 4, "base_delay_seconds": 60},
    )
    files = sorted(phantom_ct_series.iterdir())
    with Ledger(config.storage.ledger) as ledger:
        spool = Spool(config.storage.spool)
        dispatch = Dispatch(ledger, spool, lambda: config)
        try:
            # The hung destination comes first in the route: a single dispatcher would wait for it first.
            both, outputs = dispatching_job(ledger, config.storage.spool, "1.2.826.0.9.1", files[:2], ["hung", "pacs"])
            dispatch.enqueue_outputs(ledger.job(both), outputs)
            started = time.monotonic()
            assert dispatch.start_due() == 4
            wait_for(lambda: len(pacs.received) == 2, timeout=2, what="the healthy destination's objects")
            # A later job for the healthy destination goes at the next tick while the hung one still holds.
            later, outputs = dispatching_job(ledger, config.storage.spool, "1.2.826.0.9.2", files[2:3], ["pacs"])
            dispatch.enqueue_outputs(ledger.job(later), outputs)
            # pacs's sender is free once it has recorded its acks (a moment after pacs has the objects; under
            # load that moment can come after this line): poll until the later job starts, at most once
            wait_for(lambda: dispatch.start_due() == 1, timeout=2, what="the later job started for pacs")
            wait_for(lambda: ledger.job(later).state is JobState.DONE, timeout=2, what="the later job delivered")
            assert hung_peer.accepted and time.monotonic() - started < 3.5
            assert {i.destination: i.state for i in ledger.outbox(job_id=both)} == {"hung": "PENDING", "pacs": "SENT"}
            # The hung destination times out on its own; the job then waits for its next attempt.
            wait_for(lambda: ledger.job(both).state is JobState.RETRY_WAIT, timeout=10, what="the hung timeout")
            hung_items = [i for i in ledger.outbox(job_id=both) if i.destination == "hung"]
            assert [(i.state, i.attempts) for i in hung_items] == [("PENDING", 1)] * 2
            assert all("no association with HUNG" in i.last_error for i in hung_items)
            assert sorted(pacs.received) == sorted(_uid(f) for f in files[:3])
        finally:
            dispatch.stop()
            pacs.close()


def test_stop_cuts_a_hung_association_at_once_and_counts_no_attempt(
    tmp_path: Path, phantom_ct_series: Path, hung_peer: HungPeer
) -> None:
    config = make_config(tmp_path, destinations={"hung": _dest(hung_peer.port, "HUNG")},
                         dispatch={"timeout_seconds": 60})
    with Ledger(config.storage.ledger) as ledger:
        dispatch = Dispatch(ledger, Spool(config.storage.spool), lambda: config)
        job_id, outputs = dispatching_job(ledger, config.storage.spool, "1.2.826.0.9.3",
                                           sorted(phantom_ct_series.iterdir())[:2], ["hung"])
        dispatch.enqueue_outputs(ledger.job(job_id), outputs)
        assert dispatch.start_due() == 2
        wait_for(lambda: hung_peer.accepted, timeout=5, what="the connection to the hung peer")
        time.sleep(0.3)  # the A-ASSOCIATE-RQ is out and unanswered
        started = time.monotonic()
        dispatch.stop()
        assert time.monotonic() - started < 2
        assert [(i.state, i.attempts) for i in ledger.outbox(job_id=job_id)] == [("PENDING", 0)] * 2
        assert ledger.job(job_id).state is JobState.DISPATCHING  # picked up again at the next start
        assert dispatch.start_due() == 0  # stopped for good


_DISPATCH_ONCE = (
    "import sys; from pathlib import Path; from triaged.config import load_config; from triaged.ledger import Ledger; "
    "from triaged.spool import Spool; from triaged.stages import Dispatch; "
    "cfg = load_config(Path(sys.argv[1])); "
    "Dispatch(Ledger(cfg.storage.ledger), Spool(cfg.storage.spool), lambda: cfg).dispatch_due()"
)


def test_each_acknowledgement_is_recorded_as_it_comes_so_a_kill_resends_only_the_rest(
    tmp_path: Path, phantom_ct_series: Path
) -> None:
    pacs = StorePeer(hold_at=4)  # acknowledges 3 objects, then holds the 4th unanswered
    sections: dict[str, dict[str, object]] = {"destinations": {"pacs": _dest(pacs.port, "PACS")},
                                              "dispatch": {"timeout_seconds": 30}}
    cfg_path = write_config(tmp_path, **sections)
    config = make_config(tmp_path, **sections)
    files = sorted(phantom_ct_series.iterdir())[:6]
    try:
        with Ledger(config.storage.ledger) as ledger:
            job_id, outputs = dispatching_job(ledger, config.storage.spool, "1.2.826.0.9.4", files, ["pacs"])
            Dispatch(ledger, Spool(config.storage.spool), lambda: config).enqueue_outputs(ledger.job(job_id), outputs)
        proc = subprocess.Popen([sys.executable, "-c", _DISPATCH_ONCE, str(cfg_path)], cwd=Path(__file__).parents[2])
        try:
            assert pacs.holding.wait(30), "the 4th object never arrived"
        finally:
            os.kill(proc.pid, signal.SIGKILL)  # kill -9 in the middle of the association
            proc.wait()
        pacs.release.set()
        with Ledger(config.storage.ledger) as ledger:
            items = ledger.outbox(job_id=job_id)
            assert [i.state for i in items] == ["SENT"] * 3 + ["PENDING"] * 3
            assert [i.last_status for i in items[:3]] == [0, 0, 0]
            # The restarted node gives back the claims its killed dispatcher held (its start-up
            # recovery, Recovery.resume_interrupted), then sends only what was not acknowledged.
            assert ledger.release_outbox(node="local") == 3  # the node name a bare Dispatch claims under
            pacs.hold_at = None
            assert Dispatch(ledger, Spool(config.storage.spool), lambda: config).dispatch_due() == 3
            assert ledger.job(job_id).state is JobState.DONE
        uids = [_uid(f) for f in files]
        assert [pacs.received.count(u) for u in uids] == [1, 1, 1, 2, 1, 1]  # the 4th was never acknowledged
    finally:
        pacs.close()


def test_serve_delivers_beside_a_hung_destination_and_a_sigterm_ends_it_promptly(
    tmp_path: Path, phantom_ct_series: Path, hung_peer: HungPeer
) -> None:
    pacs = StorePeer()
    cfg = write_config(
        tmp_path, destinations={"hung": _dest(hung_peer.port, "HUNG"), "pacs": _dest(pacs.port, "PACS")},
        routing={"default": {"destinations": ["hung", "pacs"]}},  # the hung one first
        dispatch={"interval_seconds": 0.3, "timeout_seconds": 60},
    )
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "triaged.cli", "serve", "--config", str(cfg)], stderr=log)
    try:
        port = int(yaml.safe_load(cfg.read_text())["listener"]["port"])
        wait_for(lambda: storescu("127.0.0.1", port, phantom_ct_series).returncode == 0, what="the upload")
        ledger_path = tmp_path / "ledger.sqlite"

        def delivered() -> list[tuple[str, str]] | None:
            with Ledger(ledger_path) as ledger:
                jobs = ledger.jobs()
                items = ledger.outbox(job_id=jobs[0].id) if jobs else []
            pairs = [(i.destination, i.state) for i in items]
            return pairs if pairs and all(s == "SENT" for d, s in pairs if d == "pacs") else None

        pairs = wait_for(delivered, timeout=120, what="delivery to the healthy destination")
        assert isinstance(pairs, list) and {s for d, s in pairs if d == "hung"} == {"PENDING"}
        with Ledger(ledger_path) as ledger:
            [row] = ledger.jobs()
            history = ledger.job(row.id).history
        dispatching_at = next(at for at, _, to, _ in history if to == "DISPATCHING").timestamp()
        assert max(pacs.received_at) - dispatching_at < 3  # not after the hung peer's 60 s timeout
        assert hung_peer.accepted  # and the hung association is still waiting
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert time.monotonic() - started < 10  # not the 60 s timeout, nor systemd's TimeoutStopSec=45
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        pacs.close()
