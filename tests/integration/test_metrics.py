"""``GET /metrics``: scraped over HTTP after a phantom study went through a real node."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE

from tests.conftest import free_port, make_config
from tests.integration.conftest import storescu, wait_for
from triaged.config import Config
from triaged.daemon import Node
from triaged.domain import JobState

pytestmark = pytest.mark.integration

VERIFICATION = "1.2.840.10008.1.1"


def _scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    assert node.http is not None
    with urllib.request.urlopen("http://{}:{}/metrics".format(*node.http.address), timeout=10) as rsp:  # noqa: S310
        assert rsp.status == 200 and rsp.headers["Content-Type"].startswith("text/plain")
        text = rsp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_what_a_study_did_and_read_the_ledger_at_scrape_time(
    node_factory: Callable[[Config], Node],
    tmp_path: Path,
    phantom_ct_series: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="triaged.audit")  # the node's default logging.level (INFO)
    node = node_factory(make_config(tmp_path, worklist={"http_port": free_port()}))
    before = _scrape(node)
    assert before[("triaged_associations_accepted_total", ())] == 0
    assert before[("triaged_received_bytes_total", ())] == 0
    host, port = node.listener.address
    assert storescu(host, port, phantom_ct_series).returncode == 0
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(VERIFICATION)
    assoc = stranger.associate(host, port, ae_title="NOT-THE-NODE")
    assert assoc.is_rejected
    wait_for(lambda: node.ledger.jobs(states=[JobState.DONE]), timeout=120, what="the analysed study")
    after = _scrape(node)
    files = len(list(phantom_ct_series.iterdir()))
    received = sum(v for (name, _), v in after.items() if name == "triaged_instances_received_total")
    assert received == files
    [accepted] = [a for a in node.ledger.associations() if a.accepted]
    assert after[("triaged_received_bytes_total", ())] == accepted.bytes > 0
    assert after[("triaged_associations_accepted_total", ())] == 1
    refused = {
        labels: v for (name, labels), v in after.items() if name == "triaged_associations_refused_total"
    }
    assert list(refused.values()) == [1] and dict(next(iter(refused)))["reason"].startswith(
        "called AE title * is not *"
    )  # the peer's AE titles are no label values
    assert after[("triaged_jobs", (("state", "DONE"),))] == 1
    assert after[("triaged_jobs", (("state", "QUEUED"),))] == 0
    assert all(after[("triaged_queue_depth", (("priority", p),))] == 0 for p in ("STAT", "URGENT", "ROUTINE"))
    assert after[("triaged_outbox_items", (("state", "dead"),))] == 0
    assert after[("triaged_spool_free_bytes", ())] > 0
    assert after[("triaged_analysis_seconds_count", (("pipeline", "ok"),))] == 1
    assert after[("triaged_arrival_to_result_seconds_count", ())] == 1
    assert after[("triaged_arrival_to_result_seconds_sum", ())] >= 1.0  # at least the completion delay
    again = _scrape(node)  # a result is observed once, not at every scrape
    assert again[("triaged_analysis_seconds_count", (("pipeline", "ok"),))] == 1
    assert again[("triaged_instances_received_total", (("outcome", "new"),))] == files


def test_metrics_count_audit_events_while_the_log_honours_logging_level_warning(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    """``logging.level: WARNING`` quiets the log output, not the audit events the counters are made of."""
    from triaged.daemon import configure_logging

    root, audit_log = logging.getLogger(), logging.getLogger("triaged.audit")
    saved = (list(root.handlers), root.level, audit_log.level)
    log_file = tmp_path / "node.log"
    config = make_config(
        tmp_path, worklist={"http_port": free_port()}, logging={"level": "WARNING", "file": str(log_file)}
    )
    try:
        configure_logging(config.logging)  # as `triaged serve` does
        node = node_factory(config)
        host, port = node.listener.address
        echo = AE(ae_title="ECHOSCU")
        echo.add_requested_context(VERIFICATION)
        assoc = echo.associate(host, port, ae_title="TRIAGED")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(VERIFICATION)
        assert stranger.associate(host, port, ae_title="NOT-THE-NODE").is_rejected
        after = _scrape(node)
        assert after[("triaged_associations_accepted_total", ())] == 1
        assert sum(v for (name, _), v in after.items() if name == "triaged_associations_refused_total") == 1
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        audit_log.setLevel(saved[2])
    lines = log_file.read_text().splitlines()
    assert not [line for line in lines if " INFO " in line]  # the accepted association is counted, not logged
    assert any(" WARNING triaged.audit: association from " in line and "rejected" in line for line in lines)


def test_metrics_show_every_node_of_the_ledger(
    node_factory: Callable[[Config], Node], tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    config = make_config(
        tmp_path,
        worklist={"http_port": free_port()},
        node={"name": "node-a", "lease_seconds": 4, "heartbeat_seconds": 1},
    )
    node = node_factory(config)
    # a node of the same ledger that stopped beating a minute ago (killed): lost, its job still held
    node.ledger.register_node(
        "ghost",
        ["analyse"],
        version="0",
        lease_seconds=4,
        now=datetime.now(UTC) - timedelta(seconds=60),
        host="elsewhere",
        pid=1,
    )
    scraped = _scrape(node)
    assert scraped[("triaged_node_up", (("node", "node-a"),))] == 1
    assert scraped[("triaged_node_up", (("node", "ghost"),))] == 0
    assert scraped[("triaged_node_heartbeat_age_seconds", (("node", "node-a"),))] < 4
    assert scraped[("triaged_node_heartbeat_age_seconds", (("node", "ghost"),))] >= 60
    assert scraped[("triaged_node_jobs_held", (("node", "node-a"),))] == 0
    assert scraped[("triaged_node_leader", (("node", "node-a"),))] == 1  # SQLite: the one live node leads
    assert scraped[("triaged_node_leader", (("node", "ghost"),))] == 0
