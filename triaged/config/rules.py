"""Routing rules and priority policies (docs/configuration.md, "routing" and "priority").

Rules are YAML data matched by DICOM keyword, never evaluated code (ARCHITECTURE.md, style 4).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, Field, field_validator, model_validator

from triaged.config._model import _Model
from triaged.domain import PriorityLevel

#: Priority policy used when neither the rule nor ``routing.default`` names one (seed 004's outbreak
#: scenario: an outpatient clinic during an outbreak needs both identification and severity).
DEFAULT_PRIORITY_POLICY = "both"
#: Encoded outputs a destination can receive: TID 1500 SR, SEG, X-ray-like secondary capture.  The YAML
#: schema's spelling of :class:`triaged.encode.uids.OutputKind` (the runtime owner), which this layer cannot
#: import; tests/test_output_kind.py keeps the two equal.
OutputKind = Literal["sr", "seg", "sc"]
#: What a destination receives when a route does not say: every encoded object.
OUTPUT_KINDS: tuple[OutputKind, ...] = get_args(OutputKind)
#: Triage levels, most urgent first, as the YAML spells them (:class:`triaged.domain.PriorityLevel`).
PRIORITY_LEVELS: tuple[str, ...] = tuple(level.value for level in PriorityLevel)
#: Levels an escalation can raise a study to; every study starts ROUTINE.
ESCALATION_LEVELS: tuple[PriorityLevel, ...] = (PriorityLevel.STAT, PriorityLevel.URGENT)

_CT_GRADE_RE = re.compile(r"^CT([0-4])$", re.IGNORECASE)


def _check_keyword(name: str) -> str:
    """A DICOM keyword from pydicom's data dictionary that names a single (non-sequence) attribute."""
    import difflib

    from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword

    tag = tag_for_keyword(name)
    if tag is None:
        close = difflib.get_close_matches(name, keyword_dict.keys(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name!r} is not a DICOM keyword{hint}")
    if dictionary_VR(tag) == "SQ":
        raise ValueError(f"{name!r} is a sequence; only single attributes can be matched")
    return name


DicomKeyword = Annotated[str, AfterValidator(_check_keyword)]


def _scalar_text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{value!r} is not a string or number")
    return str(value)


class Matcher(_Model):
    """One condition on one attribute; exactly one of the fields is given.

    Shorthands: a bare string or number means ``equals``, a bare list means ``in``.
    """

    equals: str | None = None
    regex: re.Pattern[str] | None = None
    not_regex: re.Pattern[str] | None = None
    #: Inclusive ``[min, max]``; either end may be null for an open range.
    range: tuple[float | None, float | None] | None = None
    in_: tuple[str, ...] | None = Field(None, alias="in")
    not_in: tuple[str, ...] | None = None
    #: True: the attribute is present with a non-empty value; false: absent or empty.
    present: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, bool):
            raise ValueError("true/false is not a value to match: use {present: true} or quote the value")
        if isinstance(data, str | int | float):
            return {"equals": str(data)}
        if isinstance(data, list):
            return {"in": data}
        if data is None:
            raise ValueError(
                "no condition given (a value, a list, or one of equals, regex, range, in, present)"
            )
        return data

    @field_validator("equals", mode="before")
    @classmethod
    def _equals(cls, v: Any) -> str | None:
        return None if v is None else _scalar_text(v)

    @field_validator("regex", "not_regex", mode="before")
    @classmethod
    def _regex(cls, v: Any) -> re.Pattern[str] | None:
        if v is None or isinstance(v, re.Pattern):
            return v
        if not isinstance(v, str):
            raise ValueError(f"{v!r} is not a regular expression (a string)")
        try:
            return re.compile(v)  # compiled once at load; a frozen model caches it
        except re.error as exc:
            raise ValueError(f"{v!r} is not a valid regular expression: {exc}") from exc

    @field_validator("range", mode="before")
    @classmethod
    def _range(cls, v: Any) -> Any:
        if v is None:
            return v
        shape = "range must be [min, max] with numbers; leave one end null for an open range"
        if not isinstance(v, list | tuple) or len(v) != 2:
            raise ValueError(shape)
        if any(isinstance(x, bool) or not (x is None or isinstance(x, int | float)) for x in v):
            raise ValueError(shape)
        lo, hi = v
        if lo is None and hi is None:
            raise ValueError("range needs at least one end: [min, null] or [null, max]")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"range [{lo}, {hi}] is empty: min is larger than max")
        return tuple(v)

    @field_validator("in_", "not_in", mode="before")
    @classmethod
    def _set(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, list | tuple) or not v:
            raise ValueError("needs a non-empty list of values")
        return tuple(_scalar_text(x) for x in v)

    @model_validator(mode="after")
    def _exactly_one(self) -> Matcher:
        given = [
            name
            for name, value in (
                ("equals", self.equals),
                ("regex", self.regex),
                ("not_regex", self.not_regex),
                ("range", self.range),
                ("in", self.in_),
                ("not_in", self.not_in),
                ("present", self.present),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of equals, regex, not_regex, range, in, not_in, present"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class MatchBlock(_Model):
    """Conditions of a rule; all must hold (AND).  ``any`` is a list of blocks of which one must hold,
    ``not`` a block that must not hold.

    ``study`` conditions test the study-level attributes; ``series`` conditions must all hold for one
    and the same series (any series of the study).
    """

    called_ae: Matcher | None = None
    calling_ae: Matcher | None = None
    #: Peer IP addresses or CIDR networks; the peer must be in one of them.
    peer: tuple[str, ...] | None = None
    study: dict[DicomKeyword, Matcher] = Field(default_factory=dict)
    series: dict[DicomKeyword, Matcher] = Field(default_factory=dict)
    any: list[MatchBlock] | None = Field(None, min_length=1)
    #: A block that must NOT hold, e.g. ``not: {series: {Modality: CT}}``: no series is CT.
    not_: MatchBlock | None = Field(None, alias="not")

    @field_validator("peer", mode="before")
    @classmethod
    def _peer(cls, v: Any) -> Any:
        if v is None:
            return v
        nets = [v] if isinstance(v, str) else v
        if not isinstance(nets, list) or not nets:
            raise ValueError("peer needs an address, a CIDR network or a list of them")
        for net in nets:
            try:
                ipaddress.ip_network(str(net), strict=False)
            except ValueError as exc:
                raise ValueError(f"{net!r} is not an IP address or CIDR network (e.g. 10.0.0.0/8)") from exc
        return tuple(str(n) for n in nets)

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The ``peer`` entries as networks (a single address is a /32 or /128)."""
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.peer or ())


class DestinationTarget(_Model):
    """A destination of a route and what it receives; a bare name means every output."""

    name: str = Field(min_length=1)
    outputs: tuple[OutputKind, ...] = Field(OUTPUT_KINDS, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class RouteAction(_Model):
    """What to do with a matching study.  Fields left out are taken from ``routing.default``."""

    pipelines: tuple[str, ...] | None = Field(None, min_length=1)
    destinations: tuple[DestinationTarget, ...] | None = None
    completion_delay_seconds: float | None = Field(None, gt=0)
    priority_policy: str | None = Field(None, min_length=1)
    #: Do not analyse; the job is recorded IGNORED with this reason.
    ignore: str | None = Field(None, min_length=1)
    #: How soon the analysis runs (worker queue rank; waiting ages routine work up so it is never starved).
    analysis_priority: PriorityLevel | None = None

    @model_validator(mode="after")
    def _ignore_alone(self) -> RouteAction:
        if self.ignore is not None:
            extra = [
                n
                for n in ("pipelines", "destinations", "priority_policy", "analysis_priority")
                if getattr(self, n) is not None
            ]
            if extra:
                raise ValueError(f"an ignore action takes no {', '.join(extra)}")
        return self


class RoutingRule(_Model):
    """A named rule: when ``match`` holds, ``action`` applies (first match wins)."""

    name: str = Field(min_length=1)
    match: MatchBlock = Field(default_factory=lambda: MatchBlock())
    action: RouteAction


class RoutingConfig(_Model):
    """Rules in file order, first match wins; ``default`` applies when none matches."""

    #: Unset fields fall back to ``analysis.default_pipeline``, every destination, ``completion.delay_seconds``
    #: and the ``both`` policy: today's behaviour without a ``routing`` section.
    default: RouteAction = Field(default_factory=lambda: RouteAction())
    rules: list[RoutingRule] = Field(default_factory=list)


PriorityMeasure = Literal[
    "p_covid",
    "severity_pct",
    "whole_lung_pct",
    "consolidation_pct",
    "ct_grade",
    "score",
    "ctss",
    "severity_mil",
]


class Escalation(_Model):
    """Raise a study to ``level`` when ``measure >= at_least`` (structured data, not an expression).

    ``ct_grade`` thresholds are written ``CT0``..``CT4``; percentages are 0-100; ``p_covid``,
    ``severity_mil`` (P(severe), seed 000) and ``score`` are 0-1.
    """

    measure: PriorityMeasure
    at_least: float
    level: PriorityLevel

    @field_validator("level", mode="before")
    @classmethod
    def _escalation_level(cls, v: Any) -> Any:
        if v not in ESCALATION_LEVELS:
            raise ValueError(
                "Input should be " + " or ".join(repr(level.value) for level in ESCALATION_LEVELS)
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _grade(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("measure") == "ct_grade":
            value = data.get("at_least")
            m = _CT_GRADE_RE.match(value) if isinstance(value, str) else None
            if m is not None:
                return {**data, "at_least": int(m.group(1))}
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 4):
                raise ValueError(f"ct_grade threshold must be CT0..CT4, not {value!r}")
        return data

    @model_validator(mode="after")
    def _bounds(self) -> Escalation:
        hi = 100.0 if self.measure.endswith("_pct") else 4.0 if self.measure == "ct_grade" else 1.0
        hi = 25.0 if self.measure == "ctss" else hi
        if not 0 <= self.at_least <= hi:
            raise ValueError(f"{self.measure} threshold must be between 0 and {hi:g}, not {self.at_least:g}")
        return self


class PolicyWeights(_Model):
    """Weights of the ``both`` scenario; they are normalised to sum to 1."""

    p_covid: float = Field(0.5, ge=0)
    severity: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _positive(self) -> PolicyWeights:
        if self.p_covid + self.severity <= 0:
            raise ValueError("at least one weight must be positive")
        return self


class PriorityPolicyConfig(_Model):
    """A triage policy after seed 004's scenarios: rank by identification, severity or both."""

    scenario: Literal["identification", "severity", "both"]
    #: Only for ``scenario: both``; default 0.5 / 0.5.
    weights: PolicyWeights | None = None
    #: Level escalations; a study gets the most urgent level whose condition holds, else ROUTINE.
    escalate: list[Escalation] = Field(default_factory=list)

    @model_validator(mode="after")
    def _weights_only_for_both(self) -> PriorityPolicyConfig:
        if self.weights is not None and self.scenario != "both":
            raise ValueError(f"weights apply only to scenario 'both', not {self.scenario!r}")
        return self

    @property
    def effective_weights(self) -> PolicyWeights:
        return self.weights if self.weights is not None else PolicyWeights()


def _builtin_policies() -> dict[str, PriorityPolicyConfig]:
    # The three triage scenarios of seed 004 (Goncharov et al., sec. 1): identification for an outpatient
    # clinic with few infected, severity for an infectious-diseases hospital, both during an outbreak.
    # CT3 means "hospitalise" on the visual scale the paper uses, hence STAT.
    stat_ct3 = Escalation(measure="ct_grade", at_least=3, level=PriorityLevel.STAT)
    urgent_p90 = Escalation(measure="p_covid", at_least=0.9, level=PriorityLevel.URGENT)
    return {
        "identification": PriorityPolicyConfig(scenario="identification", escalate=[urgent_p90]),
        "severity": PriorityPolicyConfig(
            scenario="severity",
            escalate=[stat_ct3, Escalation(measure="ct_grade", at_least=2, level=PriorityLevel.URGENT)],
        ),
        "both": PriorityPolicyConfig(
            scenario="both", weights=PolicyWeights(), escalate=[stat_ct3, urgent_p90]
        ),
    }
