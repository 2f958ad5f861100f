from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DSfloat

from triaged.config import Config, parse_config
from triaged.routing import RouteDecision, RouteTarget, StudyFacts, attributes_of, route

DESTINATIONS = """\
destinations:
  demo: {ae_title: DEMO, host: 127.0.0.1, port: 11113}
  pacs: {ae_title: PACS, host: 10.0.0.5, port: 104}
"""


def config_with(routing: str, extra: str = "") -> Config:
    return parse_config(DESTINATIONS + "routing:\n" + textwrap.indent(textwrap.dedent(routing), "  ") + extra)


def one_rule(match: str) -> Config:
    """A config whose only rule, 'r', has the given match block and sends to pacs."""
    body = textwrap.indent(textwrap.dedent(match), " " * 8)
    return config_with(f"rules:\n  - name: r\n    match:\n{body}\n    action: {{destinations: [pacs]}}\n")


def ct_study(**study: Any) -> StudyFacts:
    series = (
        {
            "SeriesNumber": 1,
            "Modality": "CT",
            "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
            "SliceThickness": 1.0,
        },
        {
            "SeriesNumber": 2,
            "Modality": "CT",
            "ImageType": MultiValue(str, ["ORIGINAL", "PRIMARY", "AXIAL"]),
            "SliceThickness": DSfloat("5.0"),
            "SeriesDescription": "Thorax 5mm",
        },
    )
    attrs = {"Modality": "CT", "StudyDescription": "CT THORAX", "InstitutionName": "City Hospital", **study}
    return StudyFacts("TRIAGED         ", "CT_SCANNER_1", "10.20.1.7", attrs, series)


# (match block in YAML, does it hold for ct_study()?)
MATCH_CASES = [
    ("study: {Modality: CT}", True),
    ("study: {Modality: MR}", False),
    ("study: {Modality: [CT, PT]}", True),
    ("study: {Modality: {in: [MR, PT]}}", False),
    ("study: {Modality: {not_in: [MR, SR]}}", True),
    ("study: {StudyDescription: {regex: '(?i)thorax|chest'}}", True),
    ("study: {StudyDescription: {regex: '^CHEST'}}", False),
    ("study: {StudyDescription: {not_regex: HEAD}}", True),
    ("study: {PatientWeight: {range: [40, 120]}}", False),  # absent: only `present: false` matches
    ("study: {PatientWeight: {present: false}}", True),
    ("study: {InstitutionName: {present: true}}", True),
    ("study: {AccessionNumber: {present: true}}", False),
    ("called_ae: TRIAGED", True),  # padding of the AE title does not count
    ("called_ae: {regex: '^TRI'}", True),
    ("calling_ae: {in: [PACS, CT_SCANNER_2]}", False),
    ("peer: 10.20.0.0/16", True),
    ("peer: [192.168.0.0/16, 10.20.1.7]", True),
    ("peer: 10.30.0.0/16", False),
    ("series: {SliceThickness: {range: [null, 1.5]}}", True),  # the localizer series is thin
    ("series: {SliceThickness: {range: [3, null]}}", True),
    ("series: {SliceThickness: 5}", True),  # DS '5.0' is the number 5
    ("series: {ImageType: AXIAL}", True),  # any value of a multi-valued attribute
    ("series: {ImageType: {regex: 'PRIMARY\\\\AXIAL'}}", True),  # regex sees the backslash-joined value
    # series conditions hold for one and the same series: no thin axial series here
    ("series: {ImageType: AXIAL, SliceThickness: {range: [null, 1.5]}}", False),
    ("series: {Modality: CT, ImageType: AXIAL, SliceThickness: {range: [4, 6]}}", True),
    ("not: {series: {Modality: MR}}", True),  # no series is MR
    ("not: {series: {ImageType: LOCALIZER}}", False),
    ("{}", True),
    ("{study: {Modality: CT}, called_ae: OTHER}", False),  # all conditions must hold
    ("any: [{called_ae: OTHER}, {calling_ae: CT_SCANNER_1}]", True),
    ("any: [{called_ae: OTHER}, {peer: 10.99.0.0/16}]", False),
    ("{study: {Modality: CT}, any: [{study: {StudyDescription: {regex: HEAD}}}, {peer: 10.0.0.0/8}]}", True),
]


@pytest.mark.parametrize(("match", "expected"), MATCH_CASES)
def test_a_rule_matches_exactly_when_every_condition_holds(match: str, expected: bool) -> None:
    decision = route(one_rule(match), ct_study())
    assert (decision.rule == "r") is expected, decision.explanation


def test_the_first_matching_rule_wins_in_file_order() -> None:
    config = config_with("""\
        rules:
          - name: first
            match: {study: {Modality: MR}}
            action: {pipelines: [mr-pipe]}
          - name: second
            match: {study: {Modality: CT}}
            action: {pipelines: [ct-pipe]}
          - name: third
            match: {}
            action: {pipelines: [catch-all]}
    """)
    decision = route(config, ct_study())
    assert decision.rule == "second"
    assert decision.pipelines == ("ct-pipe",)
    # one line per rule evaluated; rules after the match are not evaluated
    assert decision.explanation == (
        "rule 'first': Modality 'CT' is not 'MR'",
        "rule 'second': matched (Modality 'CT' is 'CT')",
    )


def test_without_routing_every_study_gets_the_default_pipeline_and_every_destination() -> None:
    config = parse_config(
        DESTINATIONS + "completion: {delay_seconds: 45}\nanalysis: {default_pipeline: classical}\n"
    )
    decision = route(config, ct_study())
    assert decision.rule == "default"
    assert decision.pipelines == ("classical",)
    assert decision.destinations == (
        RouteTarget("demo", ("sr", "seg", "sc")),
        RouteTarget("pacs", ("sr", "seg", "sc")),
    )
    assert decision.completion_delay_seconds == 45
    assert decision.priority_policy == "both"
    assert not decision.ignored
    assert decision.explanation == ("no routing rules: default route",)


def test_a_rule_takes_what_it_leaves_out_from_the_default_route() -> None:
    config = config_with("""\
        default:
          pipelines: [multitask]
          destinations: [demo]
          completion_delay_seconds: 20
          priority_policy: identification
        rules:
          - name: icu
            match: {called_ae: TRIAGED}
            action:
              destinations: [{name: pacs, outputs: [sr, sc]}]
              priority_policy: severity
    """)
    decision = route(config, ct_study())
    assert decision.rule == "icu"
    assert decision.pipelines == ("multitask",)
    assert decision.destinations == (RouteTarget("pacs", ("sr", "sc")),)
    assert decision.completion_delay_seconds == 20
    assert decision.priority_policy == "severity"


def test_an_ignore_rule_records_its_reason_and_sends_nothing() -> None:
    config = config_with("""\
        rules:
          - name: outside-ct
            match: {study: {Modality: {not_in: [CT]}}}
            action: {ignore: "not a CT study"}
    """)
    mr = route(config, ct_study(Modality="MR"))
    assert mr.ignored and mr.ignore_reason == "not a CT study"
    assert mr.pipelines == () and mr.destinations == ()
    assert mr.explanation == (
        "rule 'outside-ct': matched (Modality 'MR' not in {CT})",
        "ignored: not a CT study",
    )
    ct = route(config, ct_study())
    assert not ct.ignored
    assert ct.explanation == ("rule 'outside-ct': Modality 'CT' in {CT}", "no rule matched: default route")


def test_the_default_route_may_ignore_what_no_rule_claims() -> None:
    config = config_with("""\
        default: {ignore: "not sent to a triage AE title"}
        rules:
          - name: triage
            match: {called_ae: {in: [TRIAGE_A, TRIAGE_B]}}
            action: {pipelines: [multitask], destinations: [pacs]}
    """)
    decision = route(config, ct_study())
    assert decision.ignore_reason == "not sent to a triage AE title"
    assert decision.rule == "default"


# (match block, the explanation of its failure for ct_study())
EXPLANATION_CASES = [
    ("study: {Modality: {in: [MR]}}", "Modality 'CT' not in {MR}"),
    ("study: {AccessionNumber: A1}", "AccessionNumber absent"),
    ("study: {InstitutionName: {present: false}}", "InstitutionName present ('City Hospital')"),
    ("study: {StudyDescription: {regex: HEAD}}", "StudyDescription 'CT THORAX' does not match /HEAD/"),
    (
        "study: {StudyDescription: {range: [1, 2]}}",
        "StudyDescription 'CT THORAX' is not a number, range [1, 2]",
    ),
    ("peer: 192.168.0.0/16", "peer 10.20.1.7 not in {192.168.0.0/16}"),
    ("calling_ae: PACS", "calling_ae 'CT_SCANNER_1' is not 'PACS'"),
    (
        "series: {SliceThickness: {range: [null, 0.5]}}",
        "no series matched (series #1: SliceThickness '1.0' not in [-inf, 0.5]; "
        "series #2: SliceThickness '5.0' not in [-inf, 0.5])",
    ),
    (
        "any: [{called_ae: A}, {study: {Modality: MR}}]",
        "none of any held: [0] called_ae 'TRIAGED' is not 'A'; [1] Modality 'CT' is not 'MR'",
    ),
    ("not: {study: {Modality: CT}}", "not: held (Modality 'CT' is 'CT')"),
]


@pytest.mark.parametrize(("match", "because"), EXPLANATION_CASES)
def test_the_explanation_names_the_first_condition_that_failed(match: str, because: str) -> None:
    decision = route(one_rule(match), ct_study())
    assert decision.explanation[0] == f"rule 'r': {because}"


def test_the_explanation_of_a_match_lists_every_condition_that_held() -> None:
    decision = route(
        one_rule("{called_ae: TRIAGED, peer: 10.0.0.0/8, series: {Modality: CT, ImageType: AXIAL}}"),
        ct_study(),
    )
    assert decision.explanation[0] == (
        "rule 'r': matched (called_ae 'TRIAGED' is 'TRIAGED'; peer 10.20.1.7 in 10.0.0.0/8; "
        "series #2: Modality 'CT' is 'CT', ImageType 'ORIGINAL\\\\PRIMARY\\\\AXIAL' is 'AXIAL')"
    )


def test_an_unknown_peer_address_fails_a_peer_condition() -> None:
    facts = StudyFacts("TRIAGED", "X", None, {"Modality": "CT"})
    decision = route(one_rule("peer: 10.0.0.0/8"), facts)
    assert decision.rule == "default"
    assert decision.explanation[0] == "rule 'r': peer address None unknown, not in {10.0.0.0/8}"


def test_series_conditions_fail_when_no_series_is_known() -> None:
    facts = StudyFacts("TRIAGED", "X", "127.0.0.1", {"Modality": "CT"})
    decision = route(one_rule("series: {Modality: CT}"), facts)
    assert decision.explanation[0] == "rule 'r': no series attributes known"


def test_header_attributes_from_pydicom_route_like_plain_values() -> None:
    ds = Dataset()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "1.25"
    ds.SeriesNumber = "3"
    ds.PatientName = "Doe^Jane"
    ds.ReferencedImageSequence = []
    ds.PixelData = b"\0\0"
    attrs = attributes_of(ds)
    assert set(attrs) == {"Modality", "ImageType", "SliceThickness", "SeriesNumber", "PatientName"}
    facts = StudyFacts("TRIAGED", "X", "127.0.0.1", {}, (attrs,))
    config = one_rule(
        "series: {ImageType: AXIAL, SliceThickness: {range: [1, 1.5]}, SeriesNumber: {in: [3, 4]}}"
    )
    decision = route(config, facts)
    assert decision.rule == "r", decision.explanation
    assert "series #3" in decision.explanation[0]


# ------------------------------------------------------------------ the stored form (jobs.route)

#: A route as ``route_to_json`` (before ``RouteDecision.to_json``) stored it in ``jobs.route``.
OLD_ROUTE_JSON = (
    '{"rule": "chest", "pipelines": ["classical"], "destinations": [{"name": "pacs", "outputs": ["sr", "sc"]}], '
    '"completion_delay_seconds": 30.0, "priority_policy": "both", "ignore_reason": null, '
    '"analysis_priority": "URGENT"}'
)


def test_a_route_stored_by_earlier_versions_reads_back_and_re_serialises_byte_for_byte() -> None:
    decision = RouteDecision.from_json(OLD_ROUTE_JSON)
    assert decision == RouteDecision(
        "chest", ("classical",), (RouteTarget("pacs", ("sr", "sc")),), 30.0, "both", None, (), "URGENT"
    )
    assert decision.to_json() == OLD_ROUTE_JSON


def test_a_decision_round_trips_through_json_without_its_explanation() -> None:
    config = config_with(
        "rules:\n  - name: chest\n    match: {study: {Modality: CT}}\n"
        "    action: {destinations: [{name: pacs, outputs: [sr, sc]}], analysis_priority: URGENT}\n"
        "  - name: skip\n    match: {study: {Modality: MR}}\n    action: {ignore: not for us}\n"
    )
    for modality in ("CT", "MR", "PT"):  # routed, ignored, default
        decision = route(config, StudyFacts("A", "B", study={"Modality": modality}))
        assert decision.explanation
        text = decision.to_json()
        assert "explanation" not in json.loads(text)
        assert RouteDecision.from_json(text) == replace(decision, explanation=())
        assert RouteDecision.from_json(text).to_json() == text
    assert OLD_ROUTE_JSON == route(config, StudyFacts("A", "B", study={"Modality": "CT"})).to_json()


def test_missing_route_keys_take_the_defaults_the_readers_always_assumed() -> None:
    empty = RouteDecision.from_json("{}")
    assert (empty.pipelines, empty.destinations, empty.analysis_priority) == ((), (), "ROUTINE")
    assert empty.priority_policy == ""
    assert not empty.ignored
    bare = RouteDecision.from_json('{"pipelines": ["ok"], "destinations": [{"name": "pacs"}]}')
    assert (bare.pipelines, bare.destinations) == (("ok",), (RouteTarget("pacs", ()),))
