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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from triaged.errors import ConfigError

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


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


class LoggingConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    file: Path | None = None


class Config(_Model):
    """The whole configuration file."""

    listener: ListenerConfig = Field(default_factory=lambda: ListenerConfig())
    storage: StorageConfig = Field(default_factory=lambda: StorageConfig())
    completion: CompletionConfig = Field(default_factory=lambda: CompletionConfig())
    series_selection: SeriesSelectionConfig = Field(default_factory=lambda: SeriesSelectionConfig())
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)
    logging: LoggingConfig = Field(default_factory=lambda: LoggingConfig())


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
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            line = None
            for n in range(len(loc), -1, -1):
                if loc[:n] in lines:
                    line = lines[loc[:n]]
                    break
            where = f"{source}:{line}: " if line else f"{source}: "
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown setting (check the spelling; see docs/configuration.md)"
            problems.append((where + _format_path(loc), msg))
        raise ConfigError(source, problems) from exc
    problems.extend(_cross_checks(config, source, lines))
    if problems:
        raise ConfigError(source, problems)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


def _cross_checks(
    config: Config, source: str, lines: dict[tuple[str | int, ...], int]
) -> list[tuple[str, str]]:
    from pydicom.uid import UID, UID_dictionary

    problems = []
    keywords = {v[4]: k for k, v in UID_dictionary.items()}
    for i, sop in enumerate(config.listener.extra_storage_sop_classes):
        path = ("listener", "extra_storage_sop_classes", i)
        uid = keywords.get(sop, sop)
        if not _UID_RE.match(uid) or (uid in UID_dictionary and UID(uid).type != "SOP Class"):
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
