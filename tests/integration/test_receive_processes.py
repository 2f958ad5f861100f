"""``listener.processes``: receiver processes on one listening socket, supervised by the node (issue 13 item 4).

Real sockets, DCMTK storescu, pynetdicom peers, a real SQLite ledger written by several processes, real
receiver processes and a real ``triaged serve`` for the parent's ``kill -9``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.conftest import free_port, write_config
from tests.integration.conftest import listening, storescu, wait_for
from triaged.config import parse_config
from triaged.daemon import Node
from triaged.domain import JobRow, JobState
from triaged.net.receivers import ReceiverPool

pytestmark = pytest.mark.integration


def _associate(port: int, ae_title: str):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="TRIAGED")


def _accepted(port: int, ae_title: str) -> bool:
    assoc = _associate(port, ae_title)
    if assoc.is_established:
        assoc.release()
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


class _Collect(logging.Handler):
    """The records a logger of the parent handles (``configure_logging`` on reload replaces the root's handlers)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _from_receivers(seen: _Collect, text: str) -> list[logging.LogRecord]:
    return [
        r for r in seen.records if (r.processName or "").startswith("receiver-") and text in r.getMessage()
    ]


def test_three_receivers_store_once_restart_reload_and_drain(
    tmp_path: Path, phantom_ct_series: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    audit_log, receivers_log = _Collect(), _Collect()
    logging.getLogger("triaged.audit").addHandler(audit_log)
    logging.getLogger("triaged.net.receivers").addHandler(receivers_log)
    path = write_config(
        tmp_path, listener={"processes": 3, "find_allowed_aes": ["READER"]}, completion={"delay_seconds": 1}
    )
    text = path.read_text()
    node = Node(parse_config(text, str(path), base_dir=tmp_path), path, text)
    node.start()
    pool = node.listener
    assert isinstance(pool, ReceiverPool)
    try:
        host, port = pool.address
        first_pids = pool.pids()
        assert len(first_pids) == 3 and os.getpid() not in first_pids
        for pid in first_pids:  # light receivers: no torch, no worker or scheduler machinery
            assert "torch" not in Path(f"/proc/{pid}/maps").read_text()

        # Several concurrent associations: every instance lands once, the study is analysed once.
        files = sorted(phantom_ct_series.iterdir())
        parts = [files[i::3] for i in range(3)] + [files[:4]]  # the last part is sent again
        with ThreadPoolExecutor(len(parts)) as ex:
            results = list(ex.map(lambda part: storescu(host, port, part), parts))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        [study] = node.ledger.studies()
        assert study.instances == len(files)
        job = cast(
            JobRow,
            wait_for(
                lambda: next(iter(node.ledger.jobs(states=[JobState.DONE])), None), timeout=120, what="DONE"
            ),
        )
        assert [j.id for j in node.ledger.jobs()] == [job.id]
        history = node.ledger.job(job.id).history
        assert [to for _, _, to, _ in history].count("ANALYSING") == 1
        assert sum(a.instances for a in node.ledger.associations()) == len(files) + 4
        # The receivers' log records, audit lines included, went through the parent's logging.
        assert len(_from_receivers(audit_log, "status 0x0000")) == len(files) + 4
        assert _from_receivers(audit_log, "accepted")
        # The receivers answer the worklist's C-FIND too.
        find = subprocess.run(
            ["findscu", "-S", "-aet", "READER", "-aec", "TRIAGED", "-k", "QueryRetrieveLevel=STUDY"]
            + ["-k", "StudyInstanceUID", "-k", "0032,4000", host, str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert find.returncode == 0, find.stderr
        assert study.study_instance_uid in find.stdout + find.stderr
        assert "Research use only" in find.stdout + find.stderr

        # A receiver killed is restarted (WARNING) and the node keeps receiving.
        os.kill(first_pids[0], signal.SIGKILL)
        wait_for(lambda: pool.restarts == 1 and len(set(pool.pids()) - set(first_pids)) == 1, what="restart")
        assert any(
            r.levelno == logging.WARNING
            and f"PID {first_pids[0]}) exited with signal SIGKILL" in r.getMessage()
            for r in receivers_log.records
        )
        with ThreadPoolExecutor(3) as ex:
            again = list(ex.map(lambda part: storescu(host, port, part), [files[:2]] * 6))
        assert all(r.returncode == 0 for r in again), [r.stderr for r in again]

        # A reload reaches every receiver (the restarted one too): a stranger is refused wherever it lands.
        path.write_text(text.replace("processes: 3", "processes: 3\n  allowed_calling_aes: [PACS]"))
        assert node.reload()
        wait_for(lambda: not _accepted(port, "STRANGER"), what="the new access rule")
        assert not any(_accepted(port, "STRANGER") for _ in range(8))
        assert _accepted(port, "PACS")
        refused = _from_receivers(audit_log, "calling AE title 'STRANGER' is not in")
        assert refused and all(r.levelno == logging.WARNING for r in refused)

        # Stop drains: an association open before the stop finishes its stores, new ones are refused.
        assoc = _associate(port, "PACS")
        assert assoc.is_established
        assert assoc.send_c_store(files[0]).Status == 0
        stopper = threading.Thread(target=node.stop, kwargs={"drain_seconds": 20})
        stopper.start()
        wait_for(lambda: not listening(port), what="the listening socket to close")
        assert all(assoc.send_c_store(f).Status == 0 for f in files[1:4])
        assoc.release()
        stopper.join(30)
        assert not stopper.is_alive()
        assert not any(_alive(pid) for pid in pool.pids())
    finally:
        logging.getLogger("triaged.audit").removeHandler(audit_log)
        logging.getLogger("triaged.net.receivers").removeHandler(receivers_log)
        if not node.stop_requested:
            node.stop(drain_seconds=2)


#: The node's receiver pool alone in a process of its own (a whole ``triaged serve`` also warms a worker).
_POOL_ONLY = """
import sys, time
from pathlib import Path
from triaged.config import parse_config
from triaged.net.receivers import ReceiverPool
path = Path(sys.argv[1])
pool = ReceiverPool(parse_config(path.read_text(), str(path), base_dir=path.parent), lambda study: None)
pool.start()
print(*pool.pids(), flush=True)
time.sleep(120)
"""


def test_a_kill_9_of_the_parent_leaves_no_receiver_holding_the_port(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, listener={"port": port, "processes": 2})
    proc = subprocess.Popen(
        [sys.executable, "-c", _POOL_ONLY, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        receivers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(receivers) == 2, proc.stderr.read() if proc.stderr else ""
        assert all(_alive(pid) for pid in receivers) and listening(port)
        proc.kill()
        proc.wait()
        wait_for(lambda: not any(_alive(pid) for pid in receivers), timeout=10, what="the receivers to end")
        wait_for(lambda: not listening(port), timeout=5, what="the port to be free")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
