from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from triaged.config import load_config, parse_config
from triaged.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_config_is_valid_and_resolves_paths_next_to_itself() -> None:
    config = load_config(REPO / "config.yaml")
    assert config.listener.ae_title == "TRIAGED"
    assert config.listener.port == 11112
    assert config.storage.ledger == REPO / "var" / "ledger.sqlite"
    assert config.completion.delay_seconds == 30


def test_an_empty_file_gives_the_embedded_defaults() -> None:
    config = parse_config("", "empty.yaml")
    assert config.listener.bind_address == "0.0.0.0"
    assert config.series_selection.min_slices == 20


def test_every_error_is_reported_at_once_with_its_path_and_line() -> None:
    text = """\
listener:
  port: 99999
  ae_title: 'BAD\\\\AE'
  allowed_networks: [10.0.0.0/8, not-a-network]
storage:
  spool_dir: x
destinations:
  pacs: {ae_title: PACS, host: pacs.local}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "site.yaml")
    problems = dict(info.value.problems)
    assert problems["site.yaml:2: listener.port"].startswith("Input should be less than or equal to 65535")
    assert "not a valid AE title" in problems["site.yaml:3: listener.ae_title"]
    assert "not-a-network" in problems["site.yaml:4: listener.allowed_networks"]
    assert "unknown setting" in problems["site.yaml:6: storage.spool_dir"]
    assert "Field required" in problems["site.yaml:8: destinations.pacs.port"]
    assert len(problems) == 5


def test_broken_yaml_is_reported_with_its_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("listener:\n  port: [1, 2\n", "broken.yaml")
    ((where, message),) = info.value.problems
    assert where.startswith("broken.yaml:")
    assert "not valid YAML" in message


def test_unknown_storage_sop_classes_are_refused_and_keywords_accepted() -> None:
    config = parse_config("listener:\n  extra_storage_sop_classes: [SecondaryCaptureImageStorage]\n")
    assert config.listener.extra_storage_sop_classes == ["SecondaryCaptureImageStorage"]
    with pytest.raises(ConfigError) as info:
        parse_config("listener:\n  extra_storage_sop_classes: [NoSuchStorage, 1.2.840.10008.1.2]\n", "s.yaml")
    wheres = [w for w, _ in info.value.problems]
    assert wheres == [
        "s.yaml:2: listener.extra_storage_sop_classes[0]",
        "s.yaml:2: listener.extra_storage_sop_classes[1]",
    ]


def test_check_config_exits_non_zero_and_prints_each_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listener:\n  port: -1\ncompletion:\n  delay_seconds: 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "triaged.cli", "check-config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert f"{bad}:2: listener.port" in proc.stderr
    assert f"{bad}:4: completion.delay_seconds" in proc.stderr
    good = subprocess.run(
        [sys.executable, "-m", "triaged.cli", "check-config", str(REPO / "config.yaml")],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    assert "valid" in good.stdout
