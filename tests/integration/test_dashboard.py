"""The web dashboard and the JSON API's filters: phantom studies through a real node, a real browser.

The screenshot committed as ``docs/dashboard.png`` comes from
:func:`test_the_dashboard_screenshot_shows_a_working_node`, a doc generator that runs only with
``TRIAGED_DASHBOARD_SCREENSHOT=docs/dashboard.png`` set (the classical pipeline on three phantom studies, a
real DCMTK storescp as the PACS): it is no part of ``make test``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import free_port, make_config
from tests.integration.conftest import start_storescp, storescu, wait_for
from triaged.daemon import Node

pytestmark = pytest.mark.integration

#: Debian's chromium (``make test`` installs it) found on PATH, or ``$TRIAGED_CHROMIUM``.
CHROMIUM = Path(os.environ.get("TRIAGED_CHROMIUM") or shutil.which("chromium") or "chromium")
#: Accession number -> (pipeline, patient name).  The second name is markup: it must show as text.
CASES = {"ACC-STAT": ("sev:60:0.40", "Phantom^Severe"), "ACC-ROUTINE": ("ok", "O'Brien<b>bold</b>^Test")}


def _copy_study(src: Path, dest: Path, accession: str, patient: str) -> str:
    study, series = generate_uid(), generate_uid()
    dest.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.AccessionNumber, ds.PatientName, ds.PatientID = accession, patient, f"PID-{accession}"
        ds.save_as(dest / path.name)
    return study


@pytest.fixture(scope="module")
def dashboard_node(
    tmp_path_factory: pytest.TempPathFactory, phantom_ct_series: Path
) -> Iterator[tuple[Node, dict[str, str]]]:
    """Two analysed studies; the STAT one's results wait for a PACS that is not there (retrying)."""
    tmp = tmp_path_factory.mktemp("dashboard")
    rules = [
        {
            "name": acc,
            "match": {"study": {"AccessionNumber": acc}},
            "action": {"pipelines": [pipe], **({"destinations": ["pacs"]} if acc == "ACC-STAT" else {})},
        }
        for acc, (pipe, _) in CASES.items()
    ]
    config = make_config(
        tmp,
        routing={"rules": rules, "default": {"priority_policy": "severity"}},
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}},
        worklist={"http_port": free_port(), "http_patient_data": True},
    )
    node = Node(config)
    node.start()
    try:
        studies = {}
        for acc, (_, patient) in CASES.items():
            studies[acc] = _copy_study(phantom_ct_series, tmp / acc, acc, patient)
            assert storescu(*node.listener.address, tmp / acc).returncode == 0
        # Analysed, and the STAT study's results wait to retry the absent PACS.
        wait_for(
            lambda: (
                all(r.result_at for r in node.worklist.rows())
                and {r.accession_number: r.state for r in node.worklist.rows()}.get("ACC-STAT")
                == "RETRY_WAIT"
            ),
            timeout=120,
            what="two analysed studies",
        )
        yield node, studies
    finally:
        node.stop(drain_seconds=2)
        shutil.rmtree(tmp, ignore_errors=True)


def _get(node: Node, path: str) -> tuple[int, Any, dict[str, str]]:
    assert node.http is not None
    url = "http://{}:{}".format(*node.http.address) + path
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:  # noqa: S310 - loopback
            body = rsp.read()
            return rsp.status, body, dict(rsp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def test_the_worklist_json_filters_by_priority_and_state_pages_and_refuses_bad_values(
    dashboard_node: tuple[Node, dict[str, str]],
) -> None:
    node, studies = dashboard_node
    code, body, headers = _get(node, "/worklist?priority=STAT")
    rows = json.loads(body)
    assert code == 200 and [r["study_instance_uid"] for r in rows] == [studies["ACC-STAT"]]
    assert (rows[0]["patient_id"], rows[0]["patient_name"]) == ("PID-ACC-STAT", "Phantom^Severe")
    assert headers["X-Total-Count"] == "1"
    code, body, _ = _get(node, "/worklist?priority=stat,routine")
    assert [r["accession_number"] for r in json.loads(body)] == ["ACC-STAT", "ACC-ROUTINE"]
    code, body, _ = _get(node, "/worklist?state=retry_wait")
    assert [r["accession_number"] for r in json.loads(body)] == ["ACC-STAT"]
    code, body, headers = _get(node, "/worklist?limit=1&offset=1")
    assert [r["accession_number"] for r in json.loads(body)] == ["ACC-ROUTINE"]
    assert headers["X-Total-Count"] == "2"
    code, body, _ = _get(node, "/worklist?priority=BOGUS")
    assert code == 400
    error = json.loads(body)
    assert error["parameter"] == "priority" and error["valid"] == ["STAT", "URGENT", "ROUTINE"]
    assert "BOGUS" in error["error"]
    code, body, _ = _get(node, "/worklist?state=nope")
    assert code == 400 and "DONE" in json.loads(body)["valid"]
    for bad in ("limit=0", "limit=100000", "offset=-1", "colour=red"):
        code, body, _ = _get(node, f"/worklist?{bad}")
        assert code == 400, bad
    stat_job = json.loads(_get(node, "/worklist?priority=STAT")[1])[0]["job_id"]
    code, body, _ = _get(node, f"/api/jobs/{stat_job}")
    job = json.loads(body)
    assert code == 200 and [h["to"] for h in job["history"]][-1] == "RETRY_WAIT"
    assert sorted(r["kind"] for r in job["results"]) == ["sc", "seg", "sr"]
    assert _get(node, "/api/jobs/999999")[0] == 404
    code, body, _ = _get(node, "/api/outbox")
    outbox = json.loads(body)
    assert code == 200 and outbox["retrying"] + outbox["pending"] >= 3 and outbox["dead"] == 0
    # Markup in a patient name is text on the page, never markup.
    page = _get(node, "/")[1].decode()
    assert "O&#x27;Brien&lt;b&gt;bold&lt;/b&gt;^Test" in page and "<b>" not in page
    assert "Research use only - not for diagnosis." in page


def test_the_dashboard_shows_the_study_its_history_and_overview_in_chromium(
    dashboard_node: tuple[Node, dict[str, str]],
) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium; `apt-get install chromium`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    node, studies = dashboard_node
    assert node.http is not None
    base = "http://{}:{}".format(*node.http.address)
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/", wait_until="load")
            assert "Research use only" in page.inner_text("#research-note")
            rows = page.locator("#worklist tr.study")
            assert rows.count() == 2
            first = rows.nth(0)
            assert first.get_attribute("data-study") == studies["ACC-STAT"]
            assert first.locator(".lvl").inner_text() == "STAT"
            assert "CT3" in first.inner_text() and "P(COVID-19) 0.40" in first.inner_text()
            second = rows.nth(1).inner_text()
            assert "O'Brien<b>bold</b>^Test" in second and page.locator("#worklist b").count() == 0
            assert re.search(r"retrying [1-9]", page.inner_text("#outbox-health"))
            assert "TRIAGED" in page.inner_text("#status")
            first.locator("a").first.click()
            page.wait_for_load_state("load")
            history = page.locator("#history tr").all_inner_texts()
            assert any("ANALYSING" in line and "ENCODING" in line for line in history), history
            assert page.locator("#results tr").count() == 4  # header + SR, SEG, SC
            page.wait_for_function("document.getElementById('overview').complete")
            assert page.eval_on_selector("#overview", "img => img.naturalWidth") > 0
            assert "Research use only" in page.inner_text("#research-note")
        finally:
            browser.close()
    assert errors == []


#: The doc generator's studies: accession -> (phantom severity, % of the worse lung; patient name).  The
#: severity policy makes CT3 (50 % or more) STAT, CT2 URGENT and the rest ROUTINE.
SCREENSHOT_CASES = {
    "ACC-1001": (65.0, "Phantom^Severe"),
    "ACC-1002": (45.0, "Phantom^Moderate"),
    "ACC-1003": (8.0, "Phantom^Mild"),
}


class _RefusingHook:
    """A local HTTP endpoint refusing every POST with 400 (a ward pager that does not take our fields)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                body = b'{"error": "unknown field accession_number"}'
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_dashboard_screenshot_shows_a_working_node(tmp_path: Path) -> None:
    """Doc generator: three phantom studies through the classical pipeline, results stored by storescp.

    One study's notification goes to a webhook that refuses it, so the outbox shows a dead letter with its
    reason.  Writes ``$TRIAGED_DASHBOARD_SCREENSHOT`` (``docs/dashboard.png``).
    """
    from tests.conftest import phantom_ct_spec
    from triaged.lab.datasets import write_dicom_study
    from triaged.lab.phantom import generate, to_datasets

    target = os.environ.get("TRIAGED_DASHBOARD_SCREENSHOT")
    if not target:
        pytest.skip("a doc generator: set TRIAGED_DASHBOARD_SCREENSHOT=docs/dashboard.png to run it")
    if not CHROMIUM.exists() or shutil.which("storescp") is None:
        pytest.fail("the screenshot needs Debian's chromium and DCMTK's storescp (apt: chromium dcmtk)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    storescp, pacs_port, received = start_storescp(tmp_path, folder="pacs", ae_title="PACS")
    pager = _RefusingHook()
    mild = "ACC-1003"
    rules = [
        {
            "name": f"chest CT {acc}",
            "match": {"study": {"AccessionNumber": acc}},
            "action": {
                "pipelines": ["classical"],
                "destinations": ["pacs", "ward-pager"] if acc == mild else ["pacs"],
            },
        }
        for acc in SCREENSHOT_CASES
    ]
    config = make_config(
        tmp_path,
        analysis={"registry": "triaged.nets.pipelines:node_registry", "default_pipeline": "classical"},
        routing={"rules": rules, "default": {"priority_policy": "severity"}},
        destinations={
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
            "ward-pager": {"type": "webhook", "url": pager.url, "min_priority": "ROUTINE"},
        },
        worklist={"http_port": free_port(), "http_patient_data": True},
    )
    node = Node(config)
    try:
        node.start()
        spec = phantom_ct_spec()
        for seed, (acc, (severity, patient)) in enumerate(SCREENSHOT_CASES.items(), 11):
            phantom = generate(replace(spec, severity=severity, seed=seed))
            (folder,) = {
                f.parent for f in write_dicom_study(to_datasets(phantom), tmp_path / f"phantom-{acc}")
            }
            _copy_study(folder, tmp_path / acc, acc, patient)
            assert storescu(*node.listener.address, tmp_path / acc).returncode == 0
        wait_for(
            lambda: len([r for r in node.worklist.rows() if r.state in ("DONE", "FAILED")]) == 3,
            timeout=300,
            what="three analysed and dispatched studies",
        )
        levels = {r.accession_number: (r.priority_level, r.state) for r in node.worklist.rows()}
        assert levels == {
            "ACC-1001": ("STAT", "DONE"),
            "ACC-1002": ("URGENT", "DONE"),
            mild: ("ROUTINE", "FAILED"),
        }
        assert len(list(received.rglob("*"))) >= 6  # SR, SEG and SC of the two studies without a dead letter
        assert node.http is not None
        base = "http://{}:{}".format(*node.http.address)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 900})
                page.goto(base + "/", wait_until="load")
                assert "dead letters 1" in page.inner_text("#outbox-health")
                assert "HTTP 400" in page.inner_text("body")
                page.screenshot(path=target, full_page=True)
            finally:
                browser.close()
    finally:
        node.stop(drain_seconds=2)
        pager.close()
        storescp.terminate()
        storescp.wait()


def test_the_dashboard_lists_the_nodes_of_the_ledger(dashboard_node: tuple[Node, dict[str, str]]) -> None:
    from datetime import UTC, datetime, timedelta

    node, _studies = dashboard_node
    node.ledger.register_node(
        "<b>ghost</b>",
        ["analyse"],
        version="0",
        lease_seconds=60,
        host="gpu-9",
        pid=9,
        now=datetime.now(UTC) - timedelta(minutes=10),
    )
    status, body, _ = _get(node, "/")
    assert status == 200
    page = body.decode()
    table = page.split('<table id="nodes">')[1].split("</table>")[0]
    ours = table.split(f'data-node="{node.name}">')[1].split("</tr>")[0]
    assert "(this node)" in ours and ">alive<" in ours and "<td>yes</td>" in ours  # SQLite: it leads
    ghost = table.split('data-node="&lt;b&gt;ghost&lt;/b&gt;">')[1].split("</tr>")[0]
    assert ">lost<" in ghost and "gpu-9:9" in ghost and "10 min ago" in ghost and "<b>" not in ghost
