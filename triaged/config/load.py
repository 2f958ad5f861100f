"""Loading a config file: :func:`load_config`, :func:`parse_config` and the checks across sections.

Every problem in a file is reported at once, each with its YAML path and line, so an admin fixes a
config in one pass; a config that does not validate is never used (``triaged check-config``, SIGHUP).
Relative paths are resolved against the folder of the config file.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Container, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from triaged.config.rules import DEFAULT_PRIORITY_POLICY, RouteAction
from triaged.config.schema import (
    DESTINATION_TYPES,
    AnyDestinationConfig,
    Config,
    DestinationConfig,
    DestinationTLSConfig,
    ListenerTLSConfig,
    SecretConfig,
    StowDestinationConfig,
    WebhookDestinationConfig,
)
from triaged.domain import UID_RE
from triaged.errors import ConfigError


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
            if len(loc) > 2 and loc[0] == "destinations" and loc[2] in DESTINATION_TYPES:
                loc = loc[:2] + loc[3:]  # the union's tag (the entry's type) is no YAML key
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = _unknown_setting_message(loc)
            elif err["type"] == "destination_type" and isinstance(err["input"], dict):
                loc = (*loc, "type")
                msg = (
                    f"unknown destination type {err['input'].get('type')!r} ({', '.join(DESTINATION_TYPES)})"
                )
            problems.append((_where(source, lines, loc) + _format_path(loc), msg))
        # the names routes refer to are checked too, on the raw YAML: every error in one pass
        problems.extend(_raw_reference_checks(data, source, lines))
        raise ConfigError(source, problems) from exc
    problems.extend(_cross_checks(config, source, lines))
    problems.extend(_routing_checks(config, source, lines))
    if problems:
        raise ConfigError(source, problems)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    problems.extend(_tls_checks(config, source, lines))
    problems.extend(_destination_checks(config, source, lines))
    if problems:
        raise ConfigError(source, problems)
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


def _raw_actions(data: dict[str, Any]) -> list[tuple[tuple[str | int, ...], dict[str, Any]]]:
    """``(yaml path, action mapping)`` of ``routing.default`` and every rule's action, in raw YAML data."""
    routing = data.get("routing")
    if not isinstance(routing, dict):
        return []
    actions: list[tuple[tuple[str | int, ...], dict[str, Any]]] = []
    if isinstance(routing.get("default"), dict):
        actions.append((("routing", "default"), routing["default"]))
    rules = routing.get("rules")
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        if isinstance(rule, dict) and isinstance(rule.get("action"), dict):
            actions.append((("routing", "rules", i, "action"), rule["action"]))
    return actions


def _raw_reference_checks(
    data: dict[str, Any], source: str, lines: dict[tuple[str | int, ...], int]
) -> list[tuple[str, str]]:
    """:func:`_routing_checks`' unknown destinations and priority policies, on the raw YAML of a file
    that failed the schema (so that ``check-config`` lists them with the schema errors, in one pass)."""
    from triaged.config.rules import _builtin_policies

    problems: list[tuple[str, str]] = []

    def add(path: tuple[str | int, ...], message: str) -> None:
        problems.append((_where(source, lines, path) + _format_path(path), message))

    dests = data.get("destinations")
    known_destinations = sorted(str(k) for k in dests) if isinstance(dests, dict) else []
    priority = data.get("priority")
    policies = priority.get("policies") if isinstance(priority, dict) else None
    known_policies = sorted(str(k) for k in (policies if isinstance(policies, dict) else _builtin_policies()))
    for path, action in _raw_actions(data):
        targets = action.get("destinations")
        for j, target in enumerate(targets if isinstance(targets, list) else []):
            name = target.get("name") if isinstance(target, dict) else target
            if isinstance(name, str) and name not in known_destinations:
                add(
                    (*path, "destinations", j),
                    f"unknown destination {name!r} (destinations: {', '.join(known_destinations) or 'none'})",
                )
        policy = action.get("priority_policy")
        if isinstance(policy, str) and policy not in known_policies:
            add(
                (*path, "priority_policy"),
                f"unknown priority policy {policy!r} (priority.policies: {', '.join(known_policies)})",
            )
    return problems


def _pipeline_references(config: Config | dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """``(yaml path, pipeline name)`` for every pipeline a config (or its raw YAML data) names."""
    if isinstance(config, Config):
        refs: list[tuple[tuple[str | int, ...], str]] = [
            (("analysis", "default_pipeline"), config.analysis.default_pipeline)
        ]
        actions: list[tuple[tuple[str | int, ...], RouteAction]] = [
            (("routing", "default"), config.routing.default)
        ]
        actions += [(("routing", "rules", i, "action"), r.action) for i, r in enumerate(config.routing.rules)]
        for path, action in actions:
            refs += [((*path, "pipelines", j), name) for j, name in enumerate(action.pipelines or ())]
        return refs
    refs = []
    analysis = config.get("analysis")
    if isinstance(analysis, dict) and isinstance(analysis.get("default_pipeline"), str):
        refs.append((("analysis", "default_pipeline"), analysis["default_pipeline"]))
    for path, raw in _raw_actions(config):
        names = raw.get("pipelines")
        for j, name in enumerate(names if isinstance(names, list) else []):
            if isinstance(name, str):
                refs.append(((*path, "pipelines", j), name))
    return refs


def validate_pipelines(
    config: Config | dict[str, Any],
    known: Container[str],
    *,
    source: str = "",
    text: str | None = None,
    listed: Iterable[str] | None = None,
) -> list[tuple[str, str]]:
    """Pipeline names used by routing that ``known`` (the analysis registry) lacks.

    The config layer cannot import the analysis registry (layers point down only), so the daemon and
    ``triaged check-config`` call this with the registry itself (membership is what counts: a plug-in
    registry may answer names it does not list) and, for the message, the names it lists (``listed``;
    default: ``known`` when it is iterable).  Returns ``(where, message)`` pairs: ``where`` is the YAML
    path, prefixed with ``"<source>:<line>: "`` when the file ``text`` is given.  ``config`` may be the
    raw YAML data of a file that failed the schema: then the names it spells out are checked.
    """
    lines = _line_index(text) if text is not None else {}
    problems: list[tuple[str, str]] = []
    if listed is None and isinstance(known, Iterable):
        listed = known
    names = ", ".join(sorted(listed or ())) or "none"

    def check(path: tuple[str | int, ...], name: str) -> None:
        if name not in known:
            where = _where(source, lines, path) if text is not None else ""
            problems.append((where + _format_path(path), f"unknown pipeline {name!r} (pipelines: {names})"))

    for path, name in _pipeline_references(config):
        check(path, name)
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
        update={
            "spool": res(config.storage.spool),
            # A server ledger (LedgerURL) has no path to resolve.
            "ledger": res(ledger) if isinstance(ledger := config.storage.ledger, Path) else ledger,
        }
    )
    log = config.logging
    if log.file is not None:
        log = log.model_copy(update={"file": res(log.file)})

    def res_tls(tls: _TLS) -> _TLS:
        keys = ("certificate", "private_key", "ca_certificates")
        return tls.model_copy(update={k: res(getattr(tls, k)) for k in keys if getattr(tls, k) is not None})

    listener = config.listener
    if listener.tls is not None:
        listener = listener.model_copy(update={"tls": res_tls(listener.tls)})
    destinations = {name: _resolve_destination(d, res, res_tls) for name, d in config.destinations.items()}
    return config.model_copy(
        update={"storage": storage, "logging": log, "listener": listener, "destinations": destinations}
    )


_TLS = ListenerTLSConfig | DestinationTLSConfig


def _resolve_destination(
    dest: AnyDestinationConfig, res: Callable[[Path], Path], res_tls: Callable[[_TLS], _TLS]
) -> AnyDestinationConfig:
    """A destination with its TLS files, CA certificates and secret files relative to the config's folder."""

    def res_secret(secret: SecretConfig) -> SecretConfig:
        return secret.model_copy(update={"file": res(secret.file)}) if secret.file is not None else secret

    if isinstance(dest, DestinationConfig):
        return dest.model_copy(update={"tls": res_tls(dest.tls)}) if dest.tls is not None else dest
    update: dict[str, Any] = {}
    if (
        isinstance(dest, WebhookDestinationConfig | StowDestinationConfig)
        and dest.ca_certificates is not None
    ):
        update["ca_certificates"] = res(dest.ca_certificates)
    if isinstance(dest, WebhookDestinationConfig):
        update["headers"] = {
            k: res_secret(v) if isinstance(v, SecretConfig) else v for k, v in dest.headers.items()
        }
    if isinstance(dest, StowDestinationConfig):
        update.update(
            {k: res_secret(v) for k in ("password", "token") if (v := getattr(dest, k)) is not None}
        )
    return dest.model_copy(update=update)


def _destination_checks(
    config: Config, source: str, lines: dict[tuple[str | int, ...], int]
) -> list[tuple[str, str]]:
    """The secrets and CA files of HTTP destinations: each environment variable set, each file readable."""
    problems: list[tuple[str, str]] = []

    def add(loc: tuple[str | int, ...], message: str) -> None:
        problems.append((_where(source, lines, loc) + _format_path(loc), message))

    for name, dest in config.destinations.items():
        base: tuple[str | int, ...] = ("destinations", name)
        secrets: list[tuple[tuple[str | int, ...], SecretConfig]] = []
        if isinstance(dest, WebhookDestinationConfig):
            secrets += [
                ((*base, "headers", k), v) for k, v in dest.headers.items() if isinstance(v, SecretConfig)
            ]
        if isinstance(dest, StowDestinationConfig):
            secrets += [((*base, k), v) for k in ("password", "token") if (v := getattr(dest, k)) is not None]
        for loc, secret in secrets:
            if secret.env is not None and not os.environ.get(secret.env):
                add((*loc, "env"), f"environment variable {secret.env} is not set (or empty)")
            if secret.file is not None:
                try:
                    if not secret.file.read_text(encoding="utf-8").strip():
                        add((*loc, "file"), f"{secret.file} is empty")
                except (OSError, UnicodeDecodeError) as exc:
                    add((*loc, "file"), f"cannot read {secret.file}: {getattr(exc, 'strerror', None) or exc}")
        ca = getattr(dest, "ca_certificates", None)
        if isinstance(ca, Path):
            for key, message in tls_file_problems(None, None, ca):
                add((*base, key), message)
    return problems


class _EncryptedKeyError(Exception):
    """Raised by the password callback: a key that needs a password is refused, never prompted for."""


def _no_password() -> bytes:
    raise _EncryptedKeyError


def _tls_checks(
    config: Config, source: str, lines: dict[tuple[str | int, ...], int]
) -> list[tuple[str, str]]:
    """Every enabled TLS block's files: readable, PEM, and a private key that matches its certificate.

    Checked at load (``check-config``, start, every reload), so a node never starts, and a reload is never
    applied, with TLS it cannot set up; each problem names its YAML path and the file.
    """
    blocks: list[tuple[tuple[str | int, ...], _TLS]] = []
    if config.listener.tls is not None:
        blocks.append((("listener", "tls"), config.listener.tls))
    for name, dest in config.destinations.items():
        if isinstance(dest, DestinationConfig) and dest.tls is not None:
            blocks.append((("destinations", name, "tls"), dest.tls))
    problems: list[tuple[str, str]] = []
    for path, tls in blocks:
        if tls.enabled:
            for key, message in tls_file_problems(tls.certificate, tls.private_key, tls.ca_certificates):
                loc = (*path, key)
                problems.append((_where(source, lines, loc) + _format_path(loc), message))
    return problems


def tls_file_problems(
    certificate: Path | None, private_key: Path | None, ca_certificates: Path | None
) -> list[tuple[str, str]]:
    """``(key, message)`` for each TLS file that cannot be used; ``key`` is the setting's name."""
    problems: list[tuple[str, str]] = []
    unreadable = set()
    for key, file in (
        ("certificate", certificate),
        ("private_key", private_key),
        ("ca_certificates", ca_certificates),
    ):
        if file is None:
            continue
        try:
            with file.open("rb") as fh:
                fh.read(1)
        except OSError as exc:
            problems.append((key, f"cannot read {file}: {exc.strerror or exc}"))
            unreadable.add(key)
    for key, file in (("certificate", certificate), ("ca_certificates", ca_certificates)):
        if file is not None and key not in unreadable:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=file)
            except ssl.SSLError as exc:
                problems.append((key, f"{file} holds no PEM certificate ({exc.reason or exc})"))
                unreadable.add(key)
    if (
        certificate is not None
        and private_key is not None
        and not {"certificate", "private_key"} & unreadable
    ):
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                certificate, private_key, password=_no_password
            )
        except _EncryptedKeyError:
            problems.append(
                (
                    "private_key",
                    f"{private_key} is encrypted: give an unencrypted key, readable only by the node's user",
                )
            )
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                problems.append(
                    ("private_key", f"{private_key} does not match the certificate {certificate}")
                )
            else:
                problems.append(
                    ("private_key", f"{private_key} is not a PEM private key ({exc.reason or exc})")
                )
    return problems


def sop_class_uids(names: list[str]) -> list[str]:
    """Translate SOP Class keywords (``"DigitalXRayImageStorageForPresentation"``) to UIDs."""
    from pydicom.uid import UID_dictionary

    keywords = {v[4]: k for k, v in UID_dictionary.items()}
    return [keywords.get(n, n) for n in names]


def read_config_text(path: Path) -> str:
    """The text of a config file; raise :class:`ConfigError` if it cannot be read or is not UTF-8.

    The error names the file, the line and the byte offset of the first undecodable byte, so a stray
    Latin-1 character is as easy to fix as a misspelt key (and never escapes as a ``UnicodeDecodeError``).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [(str(path), f"cannot read: {exc.strerror or exc}")]) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = data[exc.start : exc.end].hex(" ")
        raise ConfigError(
            str(path),
            [
                (
                    f"{path}:{line}",
                    f"not valid UTF-8: byte(s) {bad} at byte offset {exc.start} (line {line}, column {column});"
                    " save the file as UTF-8",
                )
            ],
        ) from exc


def load_config(path: Path) -> Config:
    """Read and validate a config file; raise :class:`ConfigError` listing every problem.

    Nothing else escapes: an unreadable file or one that is not UTF-8 is a :class:`ConfigError` too, and
    so is an empty file (or one of comments only): a node never runs on defaults by accident.
    """
    text = read_config_text(path)
    try:
        empty = yaml.safe_load(text) is None
    except yaml.YAMLError:
        empty = False  # parse_config reports it, with its line
    if empty:
        message = "the file is empty: give at least one section (see config.yaml and docs/configuration.md)"
        raise ConfigError(str(path), [(f"{path}:1", message)])
    return parse_config(text, str(path), base_dir=path.resolve().parent)
