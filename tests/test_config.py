from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from triaged.config import load_config, parse_config, validate_pipelines
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
    assert config.series_selection.min_slices == 20


def test_the_defaults_open_no_door_to_patient_data() -> None:
    # Issue 12 item 13: the node bound 0.0.0.0, accepted any called AE title and answered anyone's C-FIND.
    for config in (parse_config("", "empty.yaml"), load_config(REPO / "config.yaml")):
        assert config.listener.bind_address == "127.0.0.1"
        assert config.listener.find_allowed_aes == []
        assert config.listener.accept_any_called_ae is False
    opened = parse_config("listener: {find_allowed_aes: [' READER ']}", "open.yaml")
    assert opened.listener.find_allowed_aes == ["READER"]
    with pytest.raises(ConfigError) as info:
        parse_config("listener:\n  find_allowed_aes: ['BAD\\\\AE']\n", "bad.yaml")
    assert "not a valid AE title" in dict(info.value.problems)["bad.yaml:2: listener.find_allowed_aes"]


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


ROUTING_ERRORS = """\
destinations:
  demo: {ae_title: DEMO, host: 127.0.0.1, port: 11113}
routing:
  rules:
    - name: chest
      match:
        study:
          Modalty: CT
          StudyDescription: {regex: "thorax("}
        series:
          SliceThickness: {range: [5, 1]}
          KVP: {range: [100]}
          ImageType: {in: [AXIAL], present: true}
        Modality: CT
      action: {pipelines: [multitask]}
"""


def test_routing_rules_report_each_bad_condition_with_its_path_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(ROUTING_ERRORS, "r.yaml")
    problems = dict(info.value.problems)
    at = "routing.rules[0].match"
    assert (
        problems[f"r.yaml:8: {at}.study.Modalty"]
        == "'Modalty' is not a DICOM keyword (did you mean 'Modality'?)"
    )
    assert problems[f"r.yaml:9: {at}.study.StudyDescription.regex"].startswith(
        "'thorax(' is not a valid regular expression: missing )"
    )
    assert (
        problems[f"r.yaml:11: {at}.series.SliceThickness.range"]
        == "range [5, 1] is empty: min is larger than max"
    )
    assert problems[f"r.yaml:12: {at}.series.KVP.range"].startswith("range must be [min, max]")
    assert problems[f"r.yaml:13: {at}.series.ImageType"].startswith("give exactly one of")
    assert "go under `study:` or `series:`" in problems[f"r.yaml:14: {at}.Modality"]
    assert len(problems) == 6


def test_routing_refers_only_to_configured_destinations_and_policies() -> None:
    text = """\
destinations:
  demo: {ae_title: DEMO, host: 127.0.0.1, port: 11113}
routing:
  default:
    destinations: [demo, {name: pacs, outputs: [sr]}]
  rules:
    - name: icu
      match: {called_ae: TRIAGED_ICU}
      action: {priority_policy: icu-first}
    - name: icu
      match: {}
      action: {ignore: catch-all}
priority:
  policies:
    outbreak: {scenario: both, weights: {p_covid: 1, severity: 2}}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "r.yaml")
    assert info.value.problems == [
        ("r.yaml:10: routing.rules[1].name", "rule name 'icu' is already used by rules[0]"),
        ("r.yaml:5: routing.default.destinations[1]", "unknown destination 'pacs' (destinations: demo)"),
        (
            "r.yaml:9: routing.rules[0].action.priority_policy",
            "unknown priority policy 'icu-first' (priority.policies: outbreak)",
        ),
        (
            "r.yaml:14: priority.policies",
            "no policy named 'both', which routes use when they name none: "
            "add it or set routing.default.priority_policy",
        ),
    ]


def test_priority_policies_are_validated_with_their_paths() -> None:
    text = """\
priority:
  waiting_alert_minutes: 0
  policies:
    clinic:
      scenario: identification
      weights: {p_covid: 1}
    icu:
      scenario: severity
      escalate:
        - {measure: ct_grade, at_least: CT5, level: STAT}
        - {measure: severity_pct, at_least: 50, level: ROUTINE}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "p.yaml")
    problems = dict(info.value.problems)
    assert problems["p.yaml:2: priority.waiting_alert_minutes"].startswith("Input should be greater than 0")
    assert (
        problems["p.yaml:4: priority.policies.clinic"]
        == "weights apply only to scenario 'both', not 'identification'"
    )
    assert (
        problems["p.yaml:10: priority.policies.icu.escalate[0]"]
        == "ct_grade threshold must be CT0..CT4, not 'CT5'"
    )
    assert (
        problems["p.yaml:11: priority.policies.icu.escalate[1].level"] == "Input should be 'STAT' or 'URGENT'"
    )


def test_an_ignore_action_takes_no_pipelines_or_destinations() -> None:
    text = "routing:\n  rules:\n    - name: x\n      action: {ignore: why, pipelines: [a]}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "i.yaml")
    assert info.value.problems == [
        ("i.yaml:4: routing.rules[0].action", "an ignore action takes no pipelines")
    ]


def test_the_shipped_routing_sends_every_study_to_the_default_pipeline_and_the_demo_peer() -> None:
    config = load_config(REPO / "config.yaml")
    assert config.routing.rules == []
    assert config.routing.default.pipelines is None  # analysis.default_pipeline
    assert [d.name for d in config.routing.default.destinations or ()] == ["demo"]
    assert set(config.priority.policies) == {"identification", "severity", "both"}


def test_pipeline_names_are_checked_against_the_names_the_caller_knows() -> None:
    text = """\
analysis: {default_pipeline: classical}
routing:
  default: {pipelines: [classical]}
  rules:
    - name: research
      match: {called_ae: RESEARCH}
      action: {pipelines: [classical, multitsk]}
"""
    config = parse_config(text, "p.yaml")
    assert validate_pipelines(config, {"classical", "multitask"}) == [
        (
            "routing.rules[0].action.pipelines[1]",
            "unknown pipeline 'multitsk' (pipelines: classical, multitask)",
        )
    ]
    assert validate_pipelines(config, {"classical", "multitask"}, source="p.yaml", text=text) == [
        (
            "p.yaml:7: routing.rules[0].action.pipelines[1]",
            "unknown pipeline 'multitsk' (pipelines: classical, multitask)",
        )
    ]
    assert [w for w, _ in validate_pipelines(config, {"multitask"})] == [
        "analysis.default_pipeline",
        "routing.default.pipelines[0]",
        "routing.rules[0].action.pipelines[0]",
        "routing.rules[0].action.pipelines[1]",
    ]


def test_a_registry_that_answers_names_it_does_not_list_is_asked_by_membership() -> None:
    """A plug-in registry (tests/worker_pipelines.py answers any name but lists none) is asked by
    membership; its listed names only go into the message."""
    from triaged.daemon import pipeline_problems

    config = parse_config(
        "analysis: {registry: 'tests.worker_pipelines:registry', default_pipeline: ok}\n"
        "routing: {default: {pipelines: [sev:10:0.5, not-installed]}}\n"
    )
    assert pipeline_problems(config) == [
        ("routing.default.pipelines[1]", "unknown pipeline 'not-installed' (pipelines: none)")
    ]


def test_the_documented_routing_example_is_valid_and_the_documented_policies_are_the_built_in_ones() -> None:
    import re

    from triaged.config import PriorityConfig

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / "configuration.md").read_text(), re.S)
    peers = "destinations:\n  demo: {ae_title: D, host: 127.0.0.1, port: 1}\n  pacs: {ae_title: P, host: 10.0.0.5, port: 2}\n"
    routing = next(b for b in blocks if b.startswith("routing:"))
    priority = next(b for b in blocks if b.startswith("priority:"))
    routed = parse_config(peers + routing, "docs-routing")
    assert [r.name for r in routed.routing.rules] == ["no-ct", "icu", "thin-chest"]
    assert parse_config(priority, "docs-priority").priority == PriorityConfig()
    for block in blocks:  # every YAML example in the reference parses (peers added for routed ones)
        parse_config(peers + block, "docs-example")


def test_check_config_reports_unknown_pipeline_names_with_path_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "pipelines.yaml"
    bad.write_text("routing:\n  default:\n    pipelines: [no-such-pipeline]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "triaged.cli", "check-config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert f"{bad}:3: routing.default.pipelines[0]: unknown pipeline 'no-such-pipeline'" in proc.stderr


def test_a_file_that_is_not_utf8_or_not_readable_is_a_config_error_naming_the_byte(tmp_path: Path) -> None:
    # Issue 12 item 4: a Latin-1 "é" in a comment used to escape as UnicodeDecodeError (a traceback from
    # check-config, a dead node on auto-reload).
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"listener:\n  port: 11112\n# caf\xe9 on floor 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    [(where, message)] = info.value.problems
    assert where == f"{bad}:3"
    assert "not valid UTF-8" in message and "e9 at byte offset 29 (line 3, column 6)" in message
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a folder, not a file
    proc = subprocess.run(
        [sys.executable, "-m", "triaged.cli", "check-config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{bad}:3: not valid UTF-8" in proc.stderr


# --- Issue 12 "DICOM TLS": listener.tls and destinations.<name>.tls, their files checked at load ---


def _openssl(folder: Path, *args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (make sysdeps installs it with apt)")
    result = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two self-signed certificates and their keys (``a.pem``/``a.key``, ``b.pem``/``b.key``)
    and a key encrypted with a password (``enc.key``)."""
    folder = tmp_path_factory.mktemp("tls")
    for name in ("a", "b"):
        _openssl(
            folder,
            *f"req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN={name}".split(),
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
        )
    _openssl(
        folder,
        *"genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -aes256 -pass pass:x".split(),
        "-out",
        "enc.key",
    )
    return folder


def test_tls_settings_resolve_their_paths_next_to_the_config_and_default_to_tls12_without_hostnames(
    tmp_path: Path, tls_files: Path
) -> None:
    conf = tmp_path / "site"
    conf.mkdir()
    shutil.copytree(tls_files, conf / "certs")
    path = conf / "config.yaml"
    path.write_text(
        "listener:\n  tls: {certificate: certs/a.pem, private_key: certs/a.key, ca_certificates: certs/b.pem,\n"
        "        require_client_certificate: true}\n"
        "destinations:\n  pacs:\n    ae_title: PACS\n    host: 10.0.0.5\n    port: 104\n"
        "    tls: {ca_certificates: certs/b.pem, certificate: certs/a.pem, private_key: certs/a.key}\n"
    )
    config = load_config(path)
    tls = config.listener.tls
    assert tls is not None and tls.enabled and tls.require_client_certificate
    assert (tls.certificate, tls.private_key) == (conf / "certs" / "a.pem", conf / "certs" / "a.key")
    assert tls.minimum_version == "TLSv1.2"
    dest = config.destinations["pacs"].tls
    assert dest is not None and dest.ca_certificates == conf / "certs" / "b.pem"
    assert dest.verify is True and dest.verify_hostname is False and dest.minimum_version == "TLSv1.2"
    assert parse_config("", "empty.yaml").listener.tls is None  # no TLS unless asked for


def test_tls_files_are_checked_at_load_and_each_problem_names_its_setting_and_file(
    tmp_path: Path, tls_files: Path
) -> None:
    a, b = tls_files / "a", tls_files / "b"
    text = f"""\
listener:
  tls:
    certificate: {a}.pem
    private_key: {b}.key
    ca_certificates: {a}.key
destinations:
  pacs:
    ae_title: PACS
    host: pacs
    port: 104
    tls:
      ca_certificates: {tmp_path}/missing.pem
      certificate: {a}.pem
      private_key: {tls_files}/enc.key
  spare:
    ae_title: SPARE
    host: spare
    port: 104
    tls: {{enabled: false, ca_certificates: {tmp_path}/missing.pem}}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "site.yaml")
    problems = dict(info.value.problems)
    assert (
        problems["site.yaml:4: listener.tls.private_key"] == f"{b}.key does not match the certificate {a}.pem"
    )
    assert problems["site.yaml:5: listener.tls.ca_certificates"].startswith(
        f"{a}.key holds no PEM certificate"
    )
    assert problems["site.yaml:12: destinations.pacs.tls.ca_certificates"] == (
        f"cannot read {tmp_path}/missing.pem: No such file or directory"
    )
    assert "is encrypted" in problems["site.yaml:14: destinations.pacs.tls.private_key"]
    assert len(problems) == 4  # a disabled block's files are not checked
    # check-config says the same, without a traceback, and the running node's reload refuses it likewise.
    path = tmp_path / "site.yaml"
    path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "triaged.cli", "check-config", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        f"{path}:4: listener.tls.private_key: {b}.key does not match the certificate {a}.pem" in proc.stderr
    )


def test_tls_settings_that_cannot_work_together_are_refused() -> None:
    text = """\
listener:
  tls: {certificate: a.pem, private_key: a.key, require_client_certificate: true, minimum_version: TLSv1.1}
destinations:
  pacs:
    ae_title: PACS
    host: pacs
    port: 104
    tls: {certificate: client.pem}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "site.yaml")
    problems = dict(info.value.problems)
    assert "TLSv1.2" in problems["site.yaml:2: listener.tls.minimum_version"]
    assert "certificate and private_key go together" in problems["site.yaml:8: destinations.pacs.tls"]
    assert len(problems) == 2
    with pytest.raises(ConfigError, match="require_client_certificate needs ca_certificates"):
        parse_config(
            "listener:\n  tls: {certificate: a.pem, private_key: a.key, require_client_certificate: true}\n"
        )


def test_schema_errors_and_unknown_names_are_reported_in_one_pass() -> None:
    # Issue 15: a file with a schema error used to hide its unknown destinations and policies until fixed.
    text = """\
listener:
  port: 99999
destinations:
  pacs: {ae_title: PACS, host: pacs.local, port: 104}
routing:
  default:
    pipelines: [classical, nosuch]
    destinations: [pacs, nowhere]
  rules:
    - name: icu
      match: {calling_ae: CT_ICU}
      action: {destinations: [{name: elsewhere, outputs: [sr]}], priority_policy: bogus}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "site.yaml")
    problems = dict(info.value.problems)
    assert problems["site.yaml:2: listener.port"].startswith("Input should be less than or equal to 65535")
    assert problems["site.yaml:8: routing.default.destinations[1]"] == (
        "unknown destination 'nowhere' (destinations: pacs)"
    )
    assert (
        "unknown destination 'elsewhere'" in problems["site.yaml:12: routing.rules[0].action.destinations[0]"]
    )
    assert (
        "unknown priority policy 'bogus'" in problems["site.yaml:12: routing.rules[0].action.priority_policy"]
    )
    assert len(problems) == 4
    # the pipelines are checked against the registry (the config layer cannot import it): raw data works too
    import yaml

    unknown = validate_pipelines(yaml.safe_load(text), {"classical"}, source="site.yaml", text=text)
    assert unknown == [
        ("site.yaml:7: routing.default.pipelines[1]", "unknown pipeline 'nosuch' (pipelines: classical)")
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# only comments\n# here\n", "---\n"])
def test_an_empty_config_file_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        (
            f"{path}:1",
            "the file is empty: give at least one section (see config.yaml and docs/configuration.md)",
        )
    ]
