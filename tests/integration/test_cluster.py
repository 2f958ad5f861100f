"""Three ``triaged serve`` processes sharing one PostgreSQL ledger and one spool folder (issue 16).

Real parts only: the throwaway PostgreSQL of ``tests/pg.py``, three node subprocesses on their own ports
(``node-1`` and ``node-2`` receive, complete, analyse and dispatch; ``node-3`` only analyses), DCMTK's
storescu as the scanners and storescp as the PACS.  Leases are 3 s with a 1 s heartbeat, so a node killed
with SIGKILL loses its job within about 4 s.  One test, in three acts, so the nodes start once:

1. studies sent to two different receivers are each analysed once (one claim in each job's history) and
   each result object reaches the PACS once;
2. ``kill -9`` of the node holding an analysis: after its lease runs out another node takes the job back
   and finishes it (the history names both);
3. a STAT study overtakes routine studies waiting on busy analysers of other nodes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import config_data
from tests.integration.conftest import listening, start_storescp, storescu, wait_for
from tests.pg import PostgresCluster
from triaged.config import load_config
from triaged.domain import JobRow, JobState
from triaged.ledger import Ledger
from triaged.observe import cluster_nodes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LEASE_SECONDS = 3
HEARTBEAT_SECONDS = 1
#: Outputs each job sends to the PACS.
OUTPUTS = ["sr", "sc"]
#: Accession number -> (pipeline, analysis priority) of the study's route; ``gate:<g>`` analyses until the
#: test opens gate ``<g>`` (tests/cluster_pipelines.py).  Other studies take the default route (``ok``).
ROUTES = {
    "KILL": ("gate:kill", "ROUTINE"),
    "BUSY-1": ("gate:busy-1", "ROUTINE"),
    "BUSY-2": ("gate:busy-2", "ROUTINE"),
    "WAITING": ("ok", "ROUTINE"),
    "STAT": ("ok", "STAT"),
}


@dataclass
class NodeProcess:
    name: str
    config: Path
    port: int | None
    log: Path
    gates: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "triaged.cli", "serve", "--config", str(self.config)],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a kill takes its workers too
                env={**os.environ, "PYTHONUNBUFFERED": "1", "TRIAGED_TEST_GATES": str(self.gates)},
            )

    def kill(self) -> None:
        """SIGKILL to the node and its worker processes, as when its machine dies."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _study(src: Path, dest: Path, accession: str) -> str:
    """A copy of the phantom series as a new study; returns its Study Instance UID."""
    study, series = generate_uid(), generate_uid()
    dest.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.AccessionNumber = accession
        ds.save_as(dest / path.name)
    return study


def _claims(job: JobRow) -> list[str]:
    return [detail for _at, _src, dst, detail in job.history if dst == JobState.ANALYSING]


def _analysing_at(job: JobRow) -> list[object]:
    return [at for at, _src, dst, _detail in job.history if dst == JobState.ANALYSING]


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp as the PACS, every object received kept in its own file (``+uf``)."""
    proc, port, received = start_storescp(tmp_path, folder="pacs", ae_title="PACS", options=("+uf", "+xa"))
    try:
        yield port, received
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_three_nodes_share_the_work_exactly_once_survive_a_kill_and_keep_stat_first(
    postgres: PostgresCluster, pacs: tuple[int, Path], tmp_path: Path, phantom_ct_series: Path
) -> None:
    pacs_port, received = pacs
    url = postgres.new_database()
    gates = tmp_path / "gates"
    gates.mkdir()
    destination = [{"name": "pacs", "outputs": OUTPUTS}]
    rules = [
        {
            "name": acc.lower(),
            "match": {"study": {"AccessionNumber": acc}},
            "action": {"pipelines": [pipe], "analysis_priority": level, "destinations": destination},
        }
        for acc, (pipe, level) in ROUTES.items()
    ]
    roles = {"node-1": None, "node-2": None, "node-3": ["analyse"]}
    nodes: dict[str, NodeProcess] = {}
    for name, only in roles.items():
        folder = tmp_path / name
        folder.mkdir()
        data = config_data(
            folder,
            storage={"spool": str(tmp_path / "spool"), "ledger": url},
            node={
                "name": name,
                "lease_seconds": LEASE_SECONDS,
                "heartbeat_seconds": HEARTBEAT_SECONDS,
                **({"roles": only} if only else {}),
            },
            analysis={"registry": "tests.cluster_pipelines:registry"},
            # long enough that a storescu slowed down by a busy machine never pauses past it mid-study
            # (a late instance would reopen the study as a second job, and the counts below would be off)
            completion={"delay_seconds": 2.0},
            dispatch={
                "interval_seconds": 0.5
            },  # what a node without dispatch encoded is sent at the next tick
            destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
            routing={"default": {"pipelines": ["ok"], "destinations": destination}, "rules": rules},
        )
        config = folder / "config.yaml"
        config.write_text(yaml.safe_dump(data))
        port = None if only else int(data["listener"]["port"])  # type: ignore[call-overload]
        nodes[name] = NodeProcess(name, config, port, folder / "node.log", gates)
    ledger = Ledger(load_config(nodes["node-1"].config).storage.ledger)  # migrates the empty database
    try:
        for node in nodes.values():
            node.start()
        # the studies are written while the nodes start
        studies: dict[str, tuple[str, Path]] = {}
        for acc in ["FAST-1", "FAST-2", *ROUTES]:
            folder = tmp_path / "studies" / acc
            studies[acc] = (_study(phantom_ct_series, folder, acc), folder)

        def up() -> bool:
            for node in nodes.values():
                assert node.proc is not None
                if node.proc.poll() is not None:
                    pytest.fail(f"{node.name} exited: {node.log.read_text()[-3000:]}")
            alive = {n.name for n in ledger.nodes() if n.stopped_at is None}
            return alive == set(nodes) and all(listening(n.port) for n in nodes.values() if n.port)

        wait_for(up, timeout=90, what="three nodes to start")

        def send(acc: str, node: str) -> str:
            study, folder = studies[acc]
            port = nodes[node].port
            assert port is not None
            sent = storescu("127.0.0.1", port, folder)
            assert sent.returncode == 0, sent.stderr
            return study

        def job(acc: str) -> JobRow | None:
            uid = studies[acc][0]
            found = next((j for j in ledger.jobs(limit=1000) if j.study_instance_uid == uid), None)
            return None if found is None else ledger.job(found.id)

        def reached(acc: str, *states: JobState) -> JobRow | None:
            found = job(acc)
            return found if found is not None and found.state in states else None

        def done(acc: str, timeout: float = 90) -> JobRow:
            found = wait_for(lambda: reached(acc, JobState.DONE), timeout, f"study {acc} DONE")
            assert isinstance(found, JobRow)
            return found

        def open_gate(name: str) -> None:
            (gates / name).touch()

        # 1. two receivers; each study analysed once (one claim in its history), its results sent once
        send("FAST-1", "node-1")
        send("FAST-2", "node-2")
        for acc in ("FAST-1", "FAST-2"):
            claims = _claims(done(acc))
            assert len(claims) == 1 and claims[0].startswith("claimed by node node-"), claims

        # 2. kill -9 of the node analysing a study: another node takes it back when its lease runs out
        send("KILL", "node-2")
        held = wait_for(lambda: reached("KILL", JobState.ANALYSING), 60, "the study to kill ANALYSING")
        assert isinstance(held, JobRow)
        _state, owner = ledger.job_owner(held.id)
        assert owner in nodes and held.id in next(n.jobs for n in ledger.nodes() if n.name == owner)
        nodes[owner].kill()
        open_gate("kill")  # for the node that takes it over
        details = [d for _at, _src, _dst, d in done("KILL").history]
        assert len([d for d in details if d.startswith(f"lease of node {owner} expired")]) == 1, details
        claims = _claims(done("KILL"))
        assert len(claims) == 2 and claims[0].startswith(f"claimed by node {owner} "), claims
        assert not claims[1].startswith(f"claimed by node {owner} "), claims  # a surviving node analysed it
        lost = next(n for n in ledger.nodes() if n.name == owner)
        assert lost.jobs == () and lost.stopped_at is None
        # what `triaged status`, the dashboard and /metrics show: the killed node lost, one live leader
        shown = {n.name: n for n in cluster_nodes(ledger, lease_seconds=LEASE_SECONDS)}
        assert shown[owner].condition == "lost" and not shown[owner].leader
        [leader] = [n for n in shown.values() if n.leader]
        assert leader.up and "complete" in leader.roles and leader.name == ledger.leader()

        # 3. both surviving analysers busy, a routine study waiting: a STAT study arriving later goes first
        survivors = [n for n in nodes if n != owner]
        receiver = next(n for n in survivors if nodes[n].port)
        for acc in ("BUSY-1", "BUSY-2"):
            send(acc, receiver)
            wait_for(lambda acc=acc: reached(acc, JobState.ANALYSING), 60, f"{acc} ANALYSING")
        send("WAITING", receiver)
        wait_for(lambda: reached("WAITING", JobState.QUEUED), 60, "the routine study QUEUED")
        send("STAT", receiver)
        wait_for(lambda: reached("STAT", JobState.QUEUED), 60, "the STAT study QUEUED")
        open_gate("busy-1")  # one analyser comes free: it must take the STAT study
        stat, waiting = done("STAT"), done("WAITING")
        assert _analysing_at(stat)[0] < _analysing_at(waiting)[0], (
            "the routine study went before the STAT one"
        )
        assert reached("BUSY-2", JobState.ANALYSING), "the other analyser was still busy"
        open_gate("busy-2")
        done("BUSY-2")

        # every job analysed once (the killed one twice) and every result object at the PACS once
        jobs = [ledger.job(j.id) for j in ledger.jobs(limit=1000)]
        assert len(jobs) == len(studies) and all(j.state == JobState.DONE for j in jobs)
        assert sorted(len(_claims(j)) for j in jobs) == [1] * (len(jobs) - 1) + [2]
        expected = len(jobs) * len(OUTPUTS)
        files = sorted(received.iterdir())
        uids = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        assert len(files) == expected and len(set(uids)) == expected, (len(files), len(set(uids)), expected)
        sent = [e.sop_instance_uid for j in jobs for e in ledger.outbox(job_id=j.id)]
        assert sorted(sent) == sorted(uids)
    finally:
        for node in nodes.values():
            node.stop()
        ledger.close()
