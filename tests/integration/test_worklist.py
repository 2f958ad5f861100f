"""The worklist: DCMTK findscu, the HTTP endpoint and the CLI read the ledger in priority order."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from tests.conftest import free_port, make_config, require_tool, write_config
from tests.integration.conftest import storescu, wait_for
from triaged.cli import main
from triaged.config import Config, load_config
from triaged.daemon import Node
from triaged.domain import JobState

pytestmark = pytest.mark.integration

# Accession number -> test pipeline "sev:<affected % of the right lung>:<P(COVID-19)>"; "ok" finds nothing
# and, like every shipped pipeline without a classifier validated on real data, gives no P(COVID-19).
CASES = {"ACC-MILD": "sev:10:0.97", "ACC-SEVERE": "sev:60:0.40", "ACC-MEDIUM": "sev:30:0.60", "ACC-NOP": "ok"}


def _copy_study(src: Path, dest: Path, accession: str) -> str:
    """All of the series in ``src`` as a new study (new UIDs), with its own accession number.

    All of it: the phantom's slices are 6 mm apart, so 20 of them would be too short for the default rules.
    """
    study, series = generate_uid(), generate_uid()
    dest.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.AccessionNumber = accession
        ds.save_as(dest / path.name)
    return study


@pytest.fixture
def node_with_three_studies(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path
) -> tuple[Node, Path, dict[str, str]]:
    rules = [{"name": acc, "match": {"study": {"AccessionNumber": acc}}, "action": {"pipelines": [pipe]}}
             for acc, pipe in CASES.items()]
    cfg = write_config(
        tmp_path, routing={"rules": rules, "default": {"priority_policy": "severity"}},
        worklist={"http_port": free_port()}, listener={"find_allowed_aes": ["READER"]},
    )
    node = node_factory(load_config(cfg))
    studies = {}
    for acc in CASES:
        studies[acc] = _copy_study(phantom_ct_series, tmp_path / acc, acc)
        assert storescu(*node.listener.address, tmp_path / acc).returncode == 0
    wait_for(lambda: len(node.ledger.jobs(states=[JobState.DONE])) == 4, timeout=120, what="four analysed studies")
    return node, cfg, studies


def test_findscu_reads_the_worklist_in_priority_order_with_the_reasons(
    node_with_three_studies: tuple[Node, Path, dict[str, str]],
) -> None:
    node, _, _ = node_with_three_studies
    host, port = node.listener.address
    keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "AccessionNumber", "RequestedProcedurePriority",
            "0032,4000", "PatientName"]  # Study Comments is retired: DCMTK knows it by tag only
    args = ["findscu", "-S", "-aet", "READER", "-aec", "TRIAGED", *[a for k in keys for a in ("-k", k)],
            host, str(port)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env={"TCP_NODELAY": "1"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    accessions = re.findall(r"\(0008,0050\) SH \[(ACC-[A-Z]+)\s*\]", out)
    # Severity policy: CT3 (60 %) is STAT, then 30 %, then 10 %, then the study without findings.
    assert accessions == ["ACC-SEVERE", "ACC-MEDIUM", "ACC-MILD", "ACC-NOP"], out
    assert re.findall(r"\(0040,1003\) SH \[(\w+)\s*\]", out) == ["STAT", "HIGH", "ROUTINE", "ROUTINE"]
    assert "CT3: 60 % of the right lung affected" in out
    assert "CT0: no affected lung tissue found; P(COVID-19): not assessed" in out
    assert "Research use only" in out
    # Matching on the priority attribute returns only the STAT study.
    only_stat = subprocess.run([*args[:-2], "-k", "RequestedProcedurePriority=STAT", host, str(port)],
                               capture_output=True, text=True, timeout=60)
    assert re.findall(r"\[(ACC-[A-Z]+)\s*\]", only_stat.stdout + only_stat.stderr) == ["ACC-SEVERE"]


def test_the_http_endpoint_and_the_cli_agree_with_the_ledger(
    node_with_three_studies: tuple[Node, Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    node, cfg, studies = node_with_three_studies
    assert node.http is not None
    host, port = node.http.address
    with urllib.request.urlopen(f"http://{host}:{port}/worklist", timeout=10) as rsp:  # noqa: S310 - loopback
        served = json.load(rsp)
    assert main(["worklist", "--config", str(cfg), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert served == printed
    assert [r["accession_number"] for r in served] == ["ACC-SEVERE", "ACC-MEDIUM", "ACC-MILD", "ACC-NOP"]
    assert [(r["p_covid"], r["p_covid_text"]) for r in served] == [
        (0.4, "P(COVID-19) 0.40"), (0.6, "P(COVID-19) 0.60"), (0.97, "P(COVID-19) 0.97"),
        (None, "P(COVID-19): not assessed"),
    ]
    for row in served:
        job = node.ledger.job(row["job_id"])
        assert (row["priority_level"], row["priority_score"]) == (job.priority_level, job.priority_score)
        assert row["study_instance_uid"] == studies[row["accession_number"]]
        assert row["minutes_to_result"] is not None and row["note"].startswith("research use only")
    assert served[0]["priority_level"] == "STAT" and served[0]["ct_grade"] == "CT3"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{host}:{port}/nothing", timeout=10)  # noqa: S310
    assert info.value.code == 404
    assert main(["worklist", "--config", str(cfg)]) == 0
    table = capsys.readouterr().out
    assert table.index("ACC-SEVERE") < table.index("ACC-MEDIUM") < table.index("ACC-MILD") < table.index("ACC-NOP")
    assert "P(COVID-19): not assessed" in table
    assert "Research use only" in table


def test_c_find_answers_only_the_calling_ae_titles_in_find_allowed_aes(
    node_factory: Callable[[Config], Node], tmp_path: Path, phantom_ct_series: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Issue 12 item 13: with C-FIND on by default, `findscu -aet STRANGER` got the names, IDs and birth
    # dates of every study.  Now the Study Root FIND context is accepted only for listener.find_allowed_aes.
    require_tool("findscu")
    node = node_factory(make_config(tmp_path, listener={"find_allowed_aes": ["READER"]}))
    host, port = node.listener.address
    assert storescu(host, port, phantom_ct_series).returncode == 0
    wait_for(lambda: node.worklist.rows(), what="the study on the worklist")
    header = dcmread(next(phantom_ct_series.iterdir()), stop_before_pixels=True)
    identifiers = [str(header.PatientID), str(header.PatientName), str(header.PatientBirthDate)]

    def findscu(aet: str) -> tuple[int, str]:
        keys = ["QueryRetrieveLevel=STUDY", "PatientName", "PatientID", "PatientBirthDate", "StudyDate"]
        args = ["findscu", "-S", "-aet", aet, "-aec", "TRIAGED", *[a for k in keys for a in ("-k", k)]]
        proc = subprocess.run([*args, host, str(port)], capture_output=True, text=True, timeout=60)
        return proc.returncode, proc.stdout + proc.stderr

    code, out = findscu("STRANGER")
    assert code != 0 and not any(i in out for i in identifiers), out
    assert "STRANGER" in caplog.text and "listener.find_allowed_aes" in caplog.text
    code, out = findscu("READER")
    assert code == 0 and all(i in out for i in identifiers), out
    # A stranger's association is still accepted for storage and echo; only its FIND context is rejected.
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(host, port, ae_title="TRIAGED")
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CTImageStorage]
        [rejected] = assoc.rejected_contexts
        find = StudyRootQueryRetrieveInformationModelFind
        assert (rejected.abstract_syntax, rejected.result) == (find, 0x03)  # abstract syntax not supported
    finally:
        assoc.release()
    # The default, an empty list, refuses everyone (a reload applies to new associations).
    node.service.reload(node.config.listener.model_copy(update={"find_allowed_aes": []}))
    code, out = findscu("READER")
    assert code != 0 and not any(i in out for i in identifiers), out


def test_the_http_worklist_drops_half_sent_requests_and_serves_others_meanwhile(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    # Issue 12 item 14: a client that sent half a request held a thread for ever (no timeout at all).
    import socket
    import time

    node = node_factory(make_config(tmp_path, worklist={"http_port": free_port(), "http_timeout_seconds": 1}))
    assert node.http is not None
    host, port = node.http.address
    started = time.monotonic()
    slowloris = [socket.create_connection((host, port), timeout=5) for _ in range(20)]
    for sock in slowloris:
        sock.sendall(b"GET /worklist HTTP/1.1\r\n")  # and nothing more
    try:
        t0 = time.monotonic()
        with urllib.request.urlopen(f"http://{host}:{port}/worklist", timeout=5) as rsp:
            assert rsp.status == 200 and json.loads(rsp.read()) == []
        assert time.monotonic() - t0 < 2, "a normal GET waited behind the half-sent requests"
        for sock in slowloris:
            assert sock.recv(100) == b""  # dropped by the node, before this side's 5 s timeout
        assert time.monotonic() - started < 4
    finally:
        for sock in slowloris:
            sock.close()


def test_the_http_worklist_answers_503_beyond_its_request_threads_and_431_to_oversize_headers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Issue 12 item 14: requests got a thread each without bound, and headers up to 100 lines of 64 KiB.
    import socket
    import threading
    import time
    import urllib.error

    from triaged.domain import WorklistRow
    from triaged.net.worklist import WorklistHTTP

    entered, release = threading.Semaphore(0), threading.Event()

    def slow_rows() -> list[WorklistRow]:
        entered.release()
        release.wait(10)
        return []

    http = WorklistHTTP(slow_rows, "127.0.0.1", 0, timeout=5, max_requests=2, max_request_bytes=4096)
    http.start()
    url = "http://{}:{}/worklist".format(*http.address)
    codes: list[int] = []

    def get() -> None:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            codes.append(rsp.status)

    busy = [threading.Thread(target=get) for _ in range(2)]
    try:
        for t in busy:
            t.start()
        for _ in busy:
            assert entered.acquire(timeout=5)  # both request threads are inside the handler
        t0 = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 503 and time.monotonic() - t0 < 1
        assert "HTTP worklist busy" in caplog.text
        release.set()
        for t in busy:
            t.join(10)
        assert codes == [200, 200]
        with socket.create_connection(http.address, timeout=5) as sock:
            sock.sendall(b"GET /worklist HTTP/1.1\r\nX-Filler: " + b"x" * 5000 + b"\r\n\r\n")
            answer = sock.recv(200)
        assert answer.startswith(b"HTTP/1.0 431 ")
        with urllib.request.urlopen(url, timeout=5) as rsp:  # the node still serves
            assert rsp.status == 200
    finally:
        release.set()
        http.stop()
