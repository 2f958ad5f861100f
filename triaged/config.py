"""Configuration: pydantic models (``extra="forbid"``) and :func:`load_config`.

Every problem in a file is reported at once, each with its YAML path and line, so an admin fixes a
config in one pass; a config that does not validate is never used (``triaged check-config``, SIGHUP).
Relative paths are resolved against the folder of the config file.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from triaged.errors import ConfigError

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars
#: PS3.5 9.1 UID syntax: digits and dots (leading zeros tolerated, as seen in the wild). Shared with
#: :func:`triaged.domain.validate_uid`.
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


AETitle = Annotated[str, Field(min_length=1, max_length=16)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerConfig(_Model):
    """The C-ECHO / C-STORE service class provider."""

    ae_title: AETitle = "TRIAGED"
    bind_address: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens for the PACS by design
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(16, ge=1, le=256)
    #: Maximum PDU we advertise; 0 means unlimited (PS3.8 D.3.3.1), the fastest for large CT.
    max_pdu: int = Field(0, ge=0)
    #: Calling AE titles allowed to associate; empty means any.
    allowed_calling_aes: list[AETitle] = Field(default_factory=list)
    #: Source networks allowed to associate (CIDR); empty means any.
    allowed_networks: list[str] = Field(default_factory=list)
    #: Storage SOP classes accepted besides CT and Enhanced CT (UIDs or keywords); stored, never analysed.
    extra_storage_sop_classes: list[str] = Field(default_factory=list)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @field_validator("allowed_calling_aes")
    @classmethod
    def _aes(cls, v: list[str]) -> list[str]:
        return [_check_ae(a) for a in v]

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"{net!r} is not a network in CIDR form (e.g. 10.0.0.0/8)") from exc
        return v

    @field_validator("bind_address")
    @classmethod
    def _bind(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError(f"{v!r} is not an IP address") from exc
        return v


class StorageConfig(_Model):
    """Where received instances and the ledger live."""

    spool: Path = Path("var/spool")
    ledger: Path = Path("var/ledger.sqlite")
    #: Refuse new instances with 0xA700 (out of resources) when less than this many MiB are free.
    min_free_mb: int = Field(500, ge=0)


class CompletionConfig(_Model):
    """When a study counts as completely received."""

    delay_seconds: float = Field(30.0, gt=0)
    sweep_interval_seconds: float = Field(5.0, gt=0)


class SeriesSelectionConfig(_Model):
    """Which series of a study may be analysed (see :mod:`triaged.assembly`)."""

    min_slices: int = Field(20, ge=1)
    min_coverage_mm: float = Field(150.0, ge=0)
    max_tilt_degrees: float = Field(10.0, ge=0, le=45)
    #: Convolution kernel substrings preferred, best first (case-insensitive): lung and sharp kernels.
    preferred_kernels: list[str] = Field(
        default_factory=lambda: ["LUNG", "B70", "B60", "I70", "FC5", "FC8", "YA", "BONE", "SHARP", "B50"]
    )


class DestinationConfig(_Model):
    """A DICOM peer that receives results by C-STORE."""

    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AETitle | None = None

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))


class AnalysisConfig(_Model):
    """Analysis worker processes (see :mod:`triaged.worker`)."""

    #: Pipeline for studies no routing rule assigns one to (names: ``triaged analyze --list``).
    default_pipeline: str = "classical"
    #: ``auto`` picks CUDA when torch sees a GPU, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(1, ge=1, le=16)
    threads: int = Field(2, ge=1, le=64)
    timeout_seconds: float = Field(600.0, gt=0)
    #: A worker whose resident memory passes this is killed and the job FAILED (0: no guard).
    memory_limit_mb: int = Field(6144, ge=0)
    #: Seconds of waiting that count as one priority level, so routine work is never starved.
    aging_seconds: float = Field(600.0, gt=0)
    #: ``module:function`` returning the pipeline registry (tests and plug-ins name their own).
    registry: str = Field("triaged.nets.pipelines:node_registry", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class DispatchConfig(_Model):
    """Sending result objects to destinations: retries with capped exponential backoff."""

    interval_seconds: float = Field(5.0, gt=0)
    #: Delay after the first failure; each further failure multiplies it, up to ``max_delay_seconds``.
    base_delay_seconds: float = Field(10.0, gt=0)
    multiplier: float = Field(2.0, ge=1)
    max_delay_seconds: float = Field(600.0, gt=0)
    #: After this long without success an item is dead-lettered (ERROR log, ledger flag, job FAILED).
    max_age_hours: float = Field(24.0, gt=0)
    calling_ae_title: AETitle = "TRIAGED"
    timeout_seconds: float = Field(30.0, gt=0)


class WorklistConfig(_Model):
    """How the radiology worklist reads the ledger: C-FIND on the listener and a JSON endpoint."""

    #: Answer Study Root C-FIND on the listener with the ledger's studies in priority order.
    c_find: bool = True
    #: A read-only HTTP endpoint serving the worklist as JSON (``GET /worklist``); 0 disables it.
    http_port: int = Field(8088, ge=0, le=65535)
    http_bind_address: str = "127.0.0.1"

    @field_validator("http_bind_address")
    @classmethod
    def _bind(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError(f"{v!r} is not an IP address") from exc
        return v


class LoggingConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    file: Path | None = None


# ---------------------------------------------------------------------------------------------------
# Routing rules and priority policies (docs/configuration.md, "routing" and "priority").
# Rules are YAML data matched by DICOM keyword, never evaluated code (ARCHITECTURE.md, style 4).

#: Priority policy used when neither the rule nor ``routing.default`` names one (seed 004's outbreak
#: scenario: an outpatient clinic during an outbreak needs both identification and severity).
DEFAULT_PRIORITY_POLICY = "both"
#: Encoded outputs a destination can receive: TID 1500 SR, SEG, X-ray-like secondary capture.
OutputKind = Literal["sr", "seg", "sc"]
#: What a destination receives when a route does not say: every encoded object.
OUTPUT_KINDS: tuple[OutputKind, ...] = ("sr", "seg", "sc")
#: Triage levels, most urgent first (triaged.priority.PriorityLevel has the same values).
PRIORITY_LEVELS = ("STAT", "URGENT", "ROUTINE")

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
    analysis_priority: Literal["STAT", "URGENT", "ROUTINE"] | None = None

    @model_validator(mode="after")
    def _ignore_alone(self) -> RouteAction:
        if self.ignore is not None:
            extra = [
                n for n in ("pipelines", "destinations", "priority_policy", "analysis_priority")
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
    "p_covid", "severity_pct", "whole_lung_pct", "consolidation_pct", "ct_grade", "score"
]


class Escalation(_Model):
    """Raise a study to ``level`` when ``measure >= at_least`` (structured data, not an expression).

    ``ct_grade`` thresholds are written ``CT0``..``CT4``; percentages are 0-100; ``p_covid`` and
    ``score`` are 0-1.
    """

    measure: PriorityMeasure
    at_least: float
    level: Literal["STAT", "URGENT"]

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
    stat_ct3 = Escalation(measure="ct_grade", at_least=3, level="STAT")
    urgent_p90 = Escalation(measure="p_covid", at_least=0.9, level="URGENT")
    return {
        "identification": PriorityPolicyConfig(scenario="identification", escalate=[urgent_p90]),
        "severity": PriorityPolicyConfig(
            scenario="severity",
            escalate=[stat_ct3, Escalation(measure="ct_grade", at_least=2, level="URGENT")],
        ),
        "both": PriorityPolicyConfig(
            scenario="both", weights=PolicyWeights(), escalate=[stat_ct3, urgent_p90]
        ),
    }


class PriorityConfig(_Model):
    """Worklist priority: named policies and the waiting alert."""

    #: Studies waiting longer than this (minutes since arrival, not yet reported) are flagged; null = never.
    waiting_alert_minutes: float | None = Field(60.0, gt=0)
    #: Named policies; giving this key replaces the built-in identification / severity / both.
    policies: dict[str, PriorityPolicyConfig] = Field(default_factory=_builtin_policies, min_length=1)


class Config(_Model):
    """The whole configuration file."""

    listener: ListenerConfig = Field(default_factory=lambda: ListenerConfig())
    storage: StorageConfig = Field(default_factory=lambda: StorageConfig())
    completion: CompletionConfig = Field(default_factory=lambda: CompletionConfig())
    series_selection: SeriesSelectionConfig = Field(default_factory=lambda: SeriesSelectionConfig())
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)
    analysis: AnalysisConfig = Field(default_factory=lambda: AnalysisConfig())
    dispatch: DispatchConfig = Field(default_factory=lambda: DispatchConfig())
    worklist: WorklistConfig = Field(default_factory=lambda: WorklistConfig())
    #: Re-read the config file when it changes (as on SIGHUP); an invalid file is refused.
    reload_on_change: bool = True
    logging: LoggingConfig = Field(default_factory=lambda: LoggingConfig())
    routing: RoutingConfig = Field(default_factory=lambda: RoutingConfig())
    priority: PriorityConfig = Field(default_factory=lambda: PriorityConfig())


def _line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map every YAML path (keys and list indices) to its 1-based line number."""
    index: dict[tuple[str | int, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                index[child] = key.start_mark.line + 1
                walk(value, child)
                index[child] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return index


def _format_path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_config(text: str, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate YAML text into a :class:`Config`; raise :class:`ConfigError` listing every problem.

    Each problem is ``("<source>:<line>: <yaml.path>", message)``.
    """
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(source, [(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [(f"{source}:1", "the top level must be a mapping of sections")])
    lines = _line_index(text)
    problems: list[tuple[str, str]] = []
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            # pydantic adds "function-..." for validator wrappers and "[key]" for a bad mapping key;
            # neither is part of the YAML path the admin sees.
            loc = tuple(
                p
                for p in err["loc"]
                if not (isinstance(p, str) and (p.startswith("function-") or p == "[key]"))
            )
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = _unknown_setting_message(loc)
            problems.append((_where(source, lines, loc) + _format_path(loc), msg))
        raise ConfigError(source, problems) from exc
    problems.extend(_cross_checks(config, source, lines))
    problems.extend(_routing_checks(config, source, lines))
    if problems:
        raise ConfigError(source, problems)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


def _where(source: str, lines: dict[tuple[str | int, ...], int], loc: tuple[str | int, ...]) -> str:
    """``"<source>:<line>: "`` of the deepest part of ``loc`` that the file spells out."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return f"{source}:{lines[loc[:n]]}: "
    return f"{source}: "


def _unknown_setting_message(loc: tuple[str | int, ...]) -> str:
    from pydicom.datadict import tag_for_keyword

    key = loc[-1] if loc else ""
    in_match = len(loc) >= 2 and "match" in loc[:-1]
    if in_match and isinstance(key, str) and tag_for_keyword(key) is not None:
        return f"DICOM keywords go under `study:` or `series:` in a match block (e.g. study: {{{key}: ...}})"
    return "unknown setting (check the spelling; see docs/configuration.md)"


def _routing_checks(
    config: Config, source: str, lines: dict[tuple[str | int, ...], int]
) -> list[tuple[str, str]]:
    """Names a route refers to must exist: destinations, priority policies; rule names are unique."""
    problems: list[tuple[str, str]] = []

    def add(path: tuple[str | int, ...], message: str) -> None:
        problems.append((_where(source, lines, path) + _format_path(path), message))

    known_destinations = sorted(config.destinations)
    known_policies = sorted(config.priority.policies)
    actions: list[tuple[tuple[str | int, ...], RouteAction]] = [
        (("routing", "default"), config.routing.default)
    ]
    seen: dict[str, int] = {}
    for i, rule in enumerate(config.routing.rules):
        actions.append((("routing", "rules", i, "action"), rule.action))
        if rule.name in seen:
            add(
                ("routing", "rules", i, "name"),
                f"rule name {rule.name!r} is already used by rules[{seen[rule.name]}]",
            )
        seen.setdefault(rule.name, i)
    for path, action in actions:
        for j, target in enumerate(action.destinations or ()):
            if target.name not in config.destinations:
                add(
                    (*path, "destinations", j),
                    f"unknown destination {target.name!r} (destinations: {', '.join(known_destinations) or 'none'})",
                )
        if action.priority_policy is not None and action.priority_policy not in config.priority.policies:
            add(
                (*path, "priority_policy"),
                f"unknown priority policy {action.priority_policy!r} (priority.policies: {', '.join(known_policies)})",
            )
    if (
        config.routing.default.priority_policy is None
        and DEFAULT_PRIORITY_POLICY not in config.priority.policies
    ):
        add(
            ("priority", "policies"),
            f"no policy named {DEFAULT_PRIORITY_POLICY!r}, which routes use when they name none: "
            "add it or set routing.default.priority_policy",
        )
    return problems


def validate_pipelines(
    config: Config, known: set[str], *, source: str = "", text: str | None = None
) -> list[tuple[str, str]]:
    """Pipeline names used by routing that ``known`` (the analysis registry's names) lacks.

    The config layer cannot import the analysis registry (layers point down only), so the daemon and
    ``triaged check-config`` call this with the registry's names.  Returns ``(where, message)`` pairs:
    ``where`` is the YAML path, prefixed with ``"<source>:<line>: "`` when the file ``text`` is given.
    """
    lines = _line_index(text) if text is not None else {}
    problems: list[tuple[str, str]] = []
    names = ", ".join(sorted(known)) or "none"

    def check(path: tuple[str | int, ...], name: str) -> None:
        if name not in known:
            where = _where(source, lines, path) if text is not None else ""
            problems.append((where + _format_path(path), f"unknown pipeline {name!r} (pipelines: {names})"))

    check(("analysis", "default_pipeline"), config.analysis.default_pipeline)
    for j, name in enumerate(config.routing.default.pipelines or ()):
        check(("routing", "default", "pipelines", j), name)
    for i, rule in enumerate(config.routing.rules):
        for j, name in enumerate(rule.action.pipelines or ()):
            check(("routing", "rules", i, "action", "pipelines", j), name)
    return problems


def _cross_checks(
    config: Config, source: str, lines: dict[tuple[str | int, ...], int]
) -> list[tuple[str, str]]:
    from pydicom.uid import UID, UID_dictionary

    problems = []
    keywords = {v[4]: k for k, v in UID_dictionary.items()}
    for i, sop in enumerate(config.listener.extra_storage_sop_classes):
        path = ("listener", "extra_storage_sop_classes", i)
        uid = keywords.get(sop, sop)
        if not UID_RE.match(uid) or (uid in UID_dictionary and UID(uid).type != "SOP Class"):
            line = lines.get(path, lines.get(path[:2], 0))
            problems.append(
                (f"{source}:{line}: {_format_path(path)}", f"{sop!r} is not a SOP Class UID or keyword")
            )
    return problems


def _resolve_paths(config: Config, base: Path) -> Config:
    def res(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    storage = config.storage.model_copy(
        update={"spool": res(config.storage.spool), "ledger": res(config.storage.ledger)}
    )
    log = config.logging
    if log.file is not None:
        log = log.model_copy(update={"file": res(log.file)})
    return config.model_copy(update={"storage": storage, "logging": log})


def sop_class_uids(names: list[str]) -> list[str]:
    """Translate SOP Class keywords (``"DigitalXRayImageStorageForPresentation"``) to UIDs."""
    from pydicom.uid import UID_dictionary

    keywords = {v[4]: k for k, v in UID_dictionary.items()}
    return [keywords.get(n, n) for n in names]


def load_config(path: Path) -> Config:
    """Read and validate a config file; raise :class:`ConfigError` listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [(str(path), f"cannot read: {exc.strerror}")]) from exc
    return parse_config(text, str(path), base_dir=path.resolve().parent)
