"""Routing rules: which pipelines, destinations and priority policy a study gets (pure, no I/O).

Rules are YAML data (``routing:`` in the config, docs/configuration.md), matched against
:class:`StudyFacts` that the completion stage builds from the study's headers and the association that
brought them.  Evaluation order: rules in file order, **the first rule whose match holds wins**; when
none holds, ``routing.default`` applies.  A rule's action fields that are left out are taken from
``routing.default``, then from the site defaults (``analysis.default_pipeline``, every configured
destination with every output, ``completion.delay_seconds``, the ``both`` priority policy).

Every decision carries an explanation: one line per rule evaluated, saying why it matched (each
condition that held) or the first condition that failed, so an admin can see why a study went where
it went (``triaged jobs`` shows it in the job detail).
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from triaged.config import (
    DEFAULT_PRIORITY_POLICY,
    OUTPUT_KINDS,
    Config,
    MatchBlock,
    Matcher,
    OutputKind,
    RouteAction,
)

#: Name a decision carries when no rule matched.
DEFAULT_RULE = "default"
_BULK_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})


@dataclass(frozen=True)
class StudyFacts:
    """What routing may look at for one study.

    ``study`` maps DICOM keywords to values of study-level attributes, read from one instance of the
    study (use them for attributes that are the same for the whole study: StudyDescription,
    InstitutionName, AccessionNumber...).  ``series`` holds one such mapping per series, read from one
    instance of each series (Modality, SeriesDescription, SliceThickness, ImageType...).  Values are
    what pydicom returns (str, int, float, MultiValue, PersonName) or plain Python equivalents; an
    absent keyword, None or an empty value all count as absent.
    """

    called_ae: str
    calling_ae: str
    peer_address: str | None = None
    study: Mapping[str, Any] = field(default_factory=dict)
    series: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class RouteTarget:
    """A destination of a decision and which encoded outputs it receives."""

    name: str
    outputs: tuple[OutputKind, ...] = OUTPUT_KINDS


@dataclass(frozen=True)
class RouteDecision:
    """The outcome of :func:`route`.

    ``rule`` is the matched rule's name, or ``"default"``.  An ignored study has ``ignore_reason`` set
    and no pipelines or destinations.  ``explanation`` has one line per rule evaluated.
    """

    rule: str
    pipelines: tuple[str, ...]
    destinations: tuple[RouteTarget, ...]
    completion_delay_seconds: float
    priority_policy: str
    ignore_reason: str | None = None
    explanation: tuple[str, ...] = ()
    analysis_priority: str = "ROUTINE"

    @property
    def ignored(self) -> bool:
        return self.ignore_reason is not None

    def to_json(self) -> str:
        """The decision as the ledger stores it with its job: every field but ``explanation``.

        Keys in field order with :func:`json.dumps` defaults: byte for byte what earlier versions stored,
        so ``RouteDecision.from_json(text).to_json() == text`` for every stored route.
        """
        data = asdict(self)
        del data["explanation"]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> RouteDecision:
        """Inverse of :meth:`to_json` (``explanation`` is not stored, so it comes back empty).

        A key that is missing takes the value the job's readers always assumed: no pipelines, no
        destinations (and a destination without ``outputs`` takes none), no priority policy, routine
        analysis priority.  Numbers and strings are kept as stored, so a stored route re-serialises
        unchanged.

        Raises
        ------
        ValueError
            ``text`` is not JSON (:class:`json.JSONDecodeError`).
        KeyError
            A destination has no ``name``.
        """
        d = json.loads(text)
        return cls(
            rule=d.get("rule", ""),
            pipelines=tuple(d.get("pipelines", ())),
            destinations=tuple(
                RouteTarget(t["name"], tuple(t.get("outputs", ()))) for t in d.get("destinations", ())
            ),
            completion_delay_seconds=d.get("completion_delay_seconds", 0.0),
            priority_policy=d.get("priority_policy", ""),
            ignore_reason=d.get("ignore_reason"),
            analysis_priority=d.get("analysis_priority", "ROUTINE"),
        )


def attributes_of(dataset: Any) -> dict[str, Any]:
    """Keyword → value of a pydicom Dataset's top-level attributes, for :class:`StudyFacts`.

    Sequences and bulk data (pixel data, OB/OW/UN values) are left out: rules match single values.

    Parameters
    ----------
    dataset : pydicom.Dataset
        A header, typically read with ``stop_before_pixels=True``.

    Returns
    -------
    dict
        Values as pydicom returns them.
    """
    out: dict[str, Any] = {}
    for elem in dataset:
        # "OB or OW" (ambiguous pixel data VR) and raw bytes are bulk data, not matchable values.
        if not elem.keyword or elem.VR == "SQ" or elem.VR[:2] in _BULK_VRS or isinstance(elem.value, bytes):
            continue
        out[elem.keyword] = elem.value
    return out


def route(config: Config, facts: StudyFacts) -> RouteDecision:
    """Apply the routing rules of ``config`` to one study: first match wins, else ``routing.default``.

    Parameters
    ----------
    config : Config
        A validated configuration; its destinations and policies are known to exist.
    facts : StudyFacts
        The study's association and header attributes.

    Returns
    -------
    RouteDecision
        Pipelines, destinations with outputs, completion delay, priority policy or ignore reason, and
        one explanation line per rule evaluated.
    """
    explanation: list[str] = []
    for rule in config.routing.rules:
        held, notes = _match_block(rule.match, facts)
        if held:
            why = "; ".join(notes) if notes else "no conditions"
            explanation.append(f"rule {rule.name!r}: matched ({why})")
            return _decide(config, rule.name, rule.action, explanation)
        explanation.append(f"rule {rule.name!r}: {notes[0]}")
    explanation.append(
        "no rule matched: default route" if config.routing.rules else "no routing rules: default route"
    )
    return _decide(config, DEFAULT_RULE, config.routing.default, explanation)


def _decide(config: Config, name: str, action: RouteAction, explanation: list[str]) -> RouteDecision:
    default = config.routing.default
    delay = (
        action.completion_delay_seconds or default.completion_delay_seconds or config.completion.delay_seconds
    )
    policy = action.priority_policy or default.priority_policy or DEFAULT_PRIORITY_POLICY
    if action.ignore is not None:
        explanation.append(f"ignored: {action.ignore}")
        return RouteDecision(name, (), (), delay, policy, action.ignore, tuple(explanation))
    pipelines = action.pipelines or default.pipelines or (config.analysis.default_pipeline,)
    targets = action.destinations if action.destinations is not None else default.destinations
    if targets is None:  # today's behaviour: every configured destination gets everything
        destinations = tuple(RouteTarget(n) for n in config.destinations)
    else:
        destinations = tuple(RouteTarget(t.name, t.outputs) for t in targets)
    level = action.analysis_priority or default.analysis_priority or "ROUTINE"
    return RouteDecision(name, tuple(pipelines), destinations, delay, policy, None, tuple(explanation), level)


# --- matching ---------------------------------------------------------------------------------------
# Each check returns (held, text): text says what held, or why not, in words an admin can act on.


def _match_block(block: MatchBlock, facts: StudyFacts) -> tuple[bool, list[str]]:
    """All conditions of ``block`` (AND), in a fixed order; stop at the first that fails.

    Returns ``(True, texts of every condition)`` or ``(False, [text of the failing one])``.
    """
    checks: list[Callable[[], tuple[bool, str]]] = []
    if block.called_ae is not None:
        checks.append(partial(_match_value, "called_ae", _ae(facts.called_ae), block.called_ae))
    if block.calling_ae is not None:
        checks.append(partial(_match_value, "calling_ae", _ae(facts.calling_ae), block.calling_ae))
    if block.peer is not None:
        checks.append(partial(_match_peer, block, facts.peer_address))
    for keyword, matcher in block.study.items():
        checks.append(partial(_match_value, keyword, _values(facts.study.get(keyword)), matcher))
    if block.series:
        checks.append(partial(_match_series, block.series, facts.series))
    if block.any is not None:
        checks.append(partial(_match_any, block.any, facts))
    if block.not_ is not None:
        checks.append(partial(_match_not, block.not_, facts))
    held = []
    for check in checks:
        ok, text = check()
        if not ok:
            return False, [text]
        held.append(text)
    return True, held


def _match_any(blocks: Sequence[MatchBlock], facts: StudyFacts) -> tuple[bool, str]:
    failures = []
    for i, sub in enumerate(blocks):
        ok, notes = _match_block(sub, facts)
        if ok:
            return True, f"any[{i}] held: {', '.join(notes) or 'no conditions'}"
        failures.append(f"[{i}] {notes[0]}")
    return False, f"none of any held: {'; '.join(failures)}"


def _match_not(block: MatchBlock, facts: StudyFacts) -> tuple[bool, str]:
    ok, notes = _match_block(block, facts)
    if ok:
        return False, f"not: held ({'; '.join(notes) or 'no conditions'})"
    return True, f"not: {notes[0]}"


def _match_series(conditions: Mapping[str, Matcher], series: Sequence[Mapping[str, Any]]) -> tuple[bool, str]:
    # All series conditions must hold for one and the same series: "a CT series with thin slices" must
    # not match a study with a thin localizer and a thick CT series.
    if not series:
        return False, "no series attributes known"
    failures = []
    for i, attrs in enumerate(series):
        label = _series_label(attrs, i)
        texts = []
        for keyword, matcher in conditions.items():
            ok, text = _match_value(keyword, _values(attrs.get(keyword)), matcher)
            if not ok:
                failures.append(f"{label}: {text}")
                break
            texts.append(text)
        else:
            return True, f"{label}: {', '.join(texts)}"
    return False, f"no series matched ({'; '.join(failures)})"


def _series_label(attrs: Mapping[str, Any], index: int) -> str:
    number = _values(attrs.get("SeriesNumber"))
    if number:
        return f"series #{number[0]}"
    uid = _values(attrs.get("SeriesInstanceUID"))
    return f"series {uid[0]}" if uid else f"series [{index}]"


def _match_peer(block: MatchBlock, address: str | None) -> tuple[bool, str]:
    wanted = "{" + ", ".join(block.peer or ()) + "}"
    try:
        ip = ipaddress.ip_address((address or "").strip())
    except ValueError:
        return False, f"peer address {address!r} unknown, not in {wanted}"
    for net in block.networks:
        if ip.version == net.version and ip in net:
            return True, f"peer {ip} in {net}"
    return False, f"peer {ip} not in {wanted}"


def _ae(value: str) -> list[str] | None:
    # AE titles arrive space-padded to 16 characters (PS3.5 AE VR); trailing spaces are not significant.
    value = (value or "").strip()
    return [value] if value else None


def _values(value: Any) -> list[str] | None:
    """An attribute's values as stripped strings; None when absent or empty (type 2 empty = absent)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, str):
        # A string may still be multi-valued in DICOM form ("ORIGINAL\\PRIMARY\\AXIAL").
        items = [v.strip() for v in value.split("\\")]
    elif isinstance(value, Sequence):  # list, tuple, pydicom MultiValue
        items = [str(v).strip() for v in value]
    else:
        items = [str(value).strip()]
    items = [v for v in items if v]
    return items or None


def _number(text: str) -> float | None:
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _same(value: str, expected: str) -> bool:
    # DS and IS values compare as numbers ("2.50" is "2.5"); everything else as exact text.
    if value == expected:
        return True
    a, b = _number(value), _number(expected)
    return a is not None and b is not None and a == b


def _show(values: list[str]) -> str:
    return repr("\\".join(values))


def _match_value(label: str, values: list[str] | None, m: Matcher) -> tuple[bool, str]:
    """One matcher against an attribute's values.

    A multi-valued attribute (ImageType) matches ``equals``/``in`` when any single value does (or the
    whole backslash-joined value does); ``regex`` searches the backslash-joined value; ``range`` holds
    when any value is a number in range.  ``not_in`` and ``not_regex`` are the exact negations.
    """
    if m.present is not None:
        if m.present:
            return (True, f"{label} present") if values else (False, f"{label} absent")
        return (True, f"{label} absent") if not values else (False, f"{label} present ({_show(values)})")
    if m.not_in is not None:
        wanted = "{" + ", ".join(m.not_in) + "}"
        if not values:
            return True, f"{label} absent, not in {wanted}"
        ok = not _any_same(values, m.not_in)
        return ok, f"{label} {_show(values)} {'not in' if ok else 'in'} {wanted}"
    if m.not_regex is not None:
        shown = f"/{m.not_regex.pattern}/"
        if not values:
            return True, f"{label} absent, does not match {shown}"
        ok = m.not_regex.search("\\".join(values)) is None
        return ok, f"{label} {_show(values)} {'does not match' if ok else 'matches'} {shown}"
    if not values:
        return False, f"{label} absent"
    if m.equals is not None:
        ok = _any_same(values, (m.equals,))
        return ok, f"{label} {_show(values)} {'is' if ok else 'is not'} {m.equals!r}"
    if m.in_ is not None:
        wanted = "{" + ", ".join(m.in_) + "}"
        ok = _any_same(values, m.in_)
        return ok, f"{label} {_show(values)} {'in' if ok else 'not in'} {wanted}"
    if m.regex is not None:
        ok = m.regex.search("\\".join(values)) is not None
        return ok, f"{label} {_show(values)} {'matches' if ok else 'does not match'} /{m.regex.pattern}/"
    if m.range is not None:
        lo, hi = m.range
        shown = f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"
        numbers = [x for x in (_number(v) for v in values) if x is not None]
        if not numbers:
            return False, f"{label} {_show(values)} is not a number, range {shown}"
        ok = any((lo is None or x >= lo) and (hi is None or x <= hi) for x in numbers)
        return ok, f"{label} {_show(values)} {'in' if ok else 'not in'} {shown}"
    raise AssertionError("Matcher validation guarantees exactly one condition")  # pragma: no cover


def _any_same(values: list[str], expected: Sequence[str]) -> bool:
    joined = "\\".join(values)
    return any(_same(v, e) for e in expected for v in (*values, joined))
