"""`triaged selftest` end to end: phantom -> node -> real analysis -> SR/SEG/SC back -> checked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import free_port, make_config
from triaged.cli import main
from triaged.config import Config
from triaged.daemon import Node

pytestmark = pytest.mark.integration


def test_selftest_passes_against_a_running_node_with_the_real_pipeline(
    node_factory: Callable[[Config], Node], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    back = free_port()
    node = node_factory(make_config(
        tmp_path,
        analysis={"registry": "triaged.analysis:default_registry", "default_pipeline": "classical", "threads": 2},
        destinations={"selftest": {"ae_title": "SELFTEST", "host": "127.0.0.1", "port": back}},
        dispatch={"interval_seconds": 0.5},
    ))
    host, port = node.listener.address
    code = main(["selftest", "--to", f"TRIAGED@{host}:{port}", "--ae", "SELFTEST", "--listen-port", str(back),
                 "--kind", "covid", "--severity", "35", "--matrix", "192", "--slice-thickness", "5",
                 "--seed", "3", "--timeout", "180"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert "PASS: SR, SEG and SC arrived in the original study" in out.out
    assert "Research use only" in out.out


def test_selftest_fails_clearly_when_nothing_comes_back(
    node_factory: Callable[[Config], Node], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = node_factory(make_config(tmp_path))  # no destination: results never come back
    host, port = node.listener.address
    code = main(["selftest", "--to", f"TRIAGED@{host}:{port}", "--listen-port", str(free_port()),
                 "--matrix", "128", "--slice-thickness", "10", "--seed", "4", "--timeout", "8"])
    assert code == 1
    assert "FAIL: after 8 s nothing arrived for the study" in capsys.readouterr().err
