"""The node's settings: pydantic models (``extra="forbid"``), one per section of ``config.yaml``.

:class:`Config` is the whole file; the ``routing`` and ``priority`` policy models live in
:mod:`triaged.config.rules`, loading and the checks across sections in :mod:`triaged.config.load`.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from triaged.config._model import _Model
from triaged.config.ledger_url import LedgerLocation
from triaged.config.rules import PriorityPolicyConfig, RoutingConfig, _builtin_policies
from triaged.domain import PriorityLevel

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


def check_ip_address(value: str) -> str:
    """``value`` if it is an IPv4 or IPv6 address (what a listening socket binds to), else ValueError."""
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address") from exc
    return value


AETitle = Annotated[str, Field(min_length=1, max_length=16)]


#: Oldest TLS version accepted (BCP 195 forbids TLS 1.0 and 1.1; PS3.15 B.9).
TLSVersion = Literal["TLSv1.2", "TLSv1.3"]


class ListenerTLSConfig(_Model):
    """DICOM TLS on the listener (``listener.tls``): with it enabled the listener accepts TLS only.

    Paths are PEM files, relative to the config file's folder; they are read and checked (a private key
    that does not match its certificate too) when the config is loaded, and again at every start.
    """

    #: ``false`` keeps the block but listens without TLS (the files are then not checked).
    enabled: bool = True
    #: The node's certificate (with any intermediate certificates after it).
    certificate: Path
    #: Its private key, unencrypted (readable only by the node's user).
    private_key: Path
    #: CA certificates that signed the peers' client certificates; without it peers are not asked for one.
    ca_certificates: Path | None = None
    #: Refuse a peer that presents no client certificate signed by ``ca_certificates`` (mutual TLS).
    require_client_certificate: bool = False
    minimum_version: TLSVersion = "TLSv1.2"

    @model_validator(mode="after")
    def _client_ca(self) -> Self:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError(
                "require_client_certificate needs ca_certificates (the CA certificates that signed the "
                "peers' client certificates)"
            )
        return self


class DestinationTLSConfig(_Model):
    """DICOM TLS to a destination (``destinations.<name>.tls``), optionally with a client certificate."""

    #: ``false`` keeps the block but connects without TLS (the files are then not checked).
    enabled: bool = True
    #: ``false``: accept any server certificate (encryption without authentication; tests only).
    verify: bool = True
    #: CA certificates that signed the destination's certificate; none: the system's trusted CAs.
    ca_certificates: Path | None = None
    #: Also check that the certificate names the host (``server_hostname``, else ``host``). Off by default:
    #: PACS certificates rarely name the IP address they are reached at.
    verify_hostname: bool = False
    #: The name the certificate must carry when ``verify_hostname`` is on (default: ``host``).
    server_hostname: str | None = None
    #: Client certificate and private key for a destination that requires one (mutual TLS).
    certificate: Path | None = None
    private_key: Path | None = None
    minimum_version: TLSVersion = "TLSv1.2"

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (a client certificate needs its key)")
        if self.verify_hostname and not self.verify:
            raise ValueError("verify_hostname needs verify: true")
        return self


class ListenerConfig(_Model):
    """The C-ECHO / C-STORE service class provider."""

    ae_title: AETitle = "TRIAGED"
    #: Loopback by default: the node is reachable from other hosts only when an admin opens it.
    bind_address: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(16, ge=1, le=256)
    #: Maximum PDU we advertise; 0 means unlimited (PS3.8 D.3.3.1), the fastest for large CT.
    max_pdu: int = Field(0, ge=0)
    #: Calling AE titles allowed to associate; empty means any.
    allowed_calling_aes: list[AETitle] = Field(default_factory=list)
    #: Source networks allowed to associate (CIDR); empty means any.
    allowed_networks: list[str] = Field(default_factory=list)
    #: Calling AE titles whose Study Root C-FIND (the worklist, ``worklist.c_find``) is answered; empty
    #: means nobody's: the FIND presentation context is rejected for every other calling AE title.
    find_allowed_aes: list[AETitle] = Field(default_factory=list)
    #: Accept associations whatever called AE title they name; false: only ``ae_title`` (else A-ASSOCIATE-RJ).
    accept_any_called_ae: bool = False
    #: Storage SOP classes accepted besides CT and Enhanced CT (UIDs or keywords); stored, never analysed.
    extra_storage_sop_classes: list[str] = Field(default_factory=list)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    #: Largest dataset accepted, in MiB: a Deflated dataset that inflates beyond it is refused (0xC217)
    #: and, with ``max_pdu: 0``, it bounds a single P-DATA PDU.  An Enhanced CT of 1000 512×512 frames is
    #: ~500 MiB; the whole dataset is held in memory while it is received.
    max_dataset_mb: int = Field(1024, ge=1)
    #: Seconds a new connection has to complete its TLS handshake (with ``tls``) and send its whole
    #: A-ASSOCIATE-RQ; a connection that has not is closed.  Until then it holds no association slot.
    handshake_timeout_seconds: float = Field(10.0, gt=0)
    #: Connections still in that handshake, at most; beyond it the oldest of them is closed for the newcomer.
    max_pending_connections: int = Field(8, ge=1, le=256)
    #: Connections (handshaking or associated) from one source address, at most; beyond it a connection is
    #: closed at accept (first the oldest still handshaking from that address, if any, makes room).
    max_associations_per_address: int = Field(8, ge=1, le=256)
    #: Receiver processes sharing the listening socket (:mod:`triaged.net.receivers`); 1: the node receives
    #: in its own process.  The three limits above apply per process.  Changes need a restart.
    processes: int = Field(1, ge=1, le=64)
    #: DICOM TLS; when set (and enabled) the listener is TLS-only.  Changes need a restart.
    tls: ListenerTLSConfig | None = None

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @field_validator("allowed_calling_aes", "find_allowed_aes")
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

    _bind = field_validator("bind_address")(classmethod(lambda cls, v: check_ip_address(v)))


class StorageConfig(_Model):
    """Where received instances and the ledger live."""

    spool: Path = Path("var/spool")
    #: A SQLite file (a path or ``sqlite:///path``) or a PostgreSQL server
    #: (``postgresql://user:password@host:port/database``, run with psycopg 3; the password is never shown).
    ledger: LedgerLocation = Path("var/ledger.sqlite")
    #: Refuse new instances with 0xA700 (out of resources) when less than this many MiB are free.
    min_free_mb: int = Field(500, ge=0)
    #: Most MiB kept in ``quarantine/`` (refused datasets); the oldest are deleted first (0: no cap).
    #: Below ``min_free_mb`` refused datasets are not kept at all, only why they were refused.
    quarantine_max_mb: int = Field(500, ge=0)


class RetentionConfig(_Model):
    """What the node deletes, and when (:mod:`triaged.stages.retention`); never anything unfinished.

    A study is finished when its latest job is DONE, IGNORED or FAILED and none of its result objects
    is still PENDING; a study still receiving, inside its completion window, queued, analysing, encoding,
    dispatching or waiting to retry is never deleted.  Days are counted from when the study finished (or
    last received an instance, whichever is later).  ``null`` keeps for ever.
    """

    #: Run retention on schedule (``triaged retention`` works either way).
    enabled: bool = True
    interval_minutes: float = Field(60.0, gt=0)
    #: Spool files and work folders of studies analysed (or ignored) with every result delivered.
    keep_done_days: float | None = Field(7.0, gt=0)
    #: The same for studies whose latest job FAILED or whose results were dead-lettered.
    keep_failed_days: float | None = Field(30.0, gt=0)
    #: Most GiB the received instances (``studies/``) and work folders (``work/``) may hold; over it the
    #: finished studies are deleted oldest first, whatever their age, until it fits (0: no limit).
    max_spool_gb: float = Field(0.0, ge=0)
    #: Ledger rows of studies whose files were deleted this long ago, and associations and audit events
    #: older than this; nothing younger is ever deleted.
    keep_ledger_days: float | None = Field(365.0, gt=0)


class CompletionConfig(_Model):
    """When a study counts as completely received."""

    #: A study is complete this long after its last instance (each study has its own timer).
    delay_seconds: float = Field(30.0, gt=0)
    #: The safety net behind the per-study timers (a restart, a missed timer) and the analysis feeder's.
    sweep_interval_seconds: float = Field(30.0, gt=0)


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
    """A DICOM peer that receives results by C-STORE (``type: dicom``, the default)."""

    type: Literal["dicom"] = "dicom"
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AETitle | None = None
    #: DICOM TLS to this destination; applies from the next association (reloadable).
    tls: DestinationTLSConfig | None = None

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))


#: The destination types: ``dicom`` and ``stow-rs`` receive the result objects (SR, SEG, SC), ``webhook``
#: and ``hl7`` a notification per study whose priority level reaches their ``min_priority``.
DESTINATION_TYPES: tuple[str, ...] = ("dicom", "webhook", "hl7", "stow-rs")
#: The types that receive a notification instead of the result objects.
NOTIFICATION_TYPES: frozenset[str] = frozenset({"webhook", "hl7"})


class SecretConfig(_Model):
    """A secret read when it is used, never written in the config: ``{env: NAME}`` or ``{file: path}``.

    A file is relative to the config file's folder; its content is used with surrounding whitespace
    stripped.  ``prefix`` goes before the value (e.g. ``"Bearer "`` for an Authorization header).
    """

    env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    file: Path | None = None
    prefix: str = ""

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env (an environment variable) or file (a file holding it)")
        return self


_HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token


def _check_url(value: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError("put no credentials in the URL: use the auth settings (env or file)")
    return value


class _HTTPDestination(_Model):
    """Settings every HTTP destination has: the URL, TLS verification and a timeout."""

    url: str
    #: Check the server's TLS certificate (https); ``false`` only for tests.
    verify_tls: bool = True
    #: CA certificates that signed the server's certificate; none: the system's trusted CAs.
    ca_certificates: Path | None = None
    #: Seconds to connect and to wait for the answer; none: ``dispatch.timeout_seconds``.
    timeout_seconds: float | None = Field(None, gt=0)

    _url = field_validator("url")(classmethod(lambda cls, v: _check_url(v)))


class WebhookDestinationConfig(_HTTPDestination):
    """A JSON POST of a notification (``type: webhook``); retried through the outbox like any result."""

    type: Literal["webhook"]
    #: HTTP headers: a literal value, or a secret (``{env: HOOK_TOKEN, prefix: "Bearer "}``).
    headers: dict[str, str | SecretConfig] = Field(default_factory=dict)
    #: Only studies at this priority level or a more urgent one are notified.
    min_priority: PriorityLevel = PriorityLevel.STAT

    @field_validator("headers")
    @classmethod
    def _header_names(cls, v: dict[str, str | SecretConfig]) -> dict[str, str | SecretConfig]:
        for name in v:
            if not _HEADER_RE.match(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
        return v


class HL7DestinationConfig(_Model):
    """An HL7 v2.5 ORU^R01 over MLLP per notified study (``type: hl7``); the receiver's ACK decides."""

    type: Literal["hl7"]
    host: str
    port: int = Field(ge=1, le=65535)
    #: MSH-3 / MSH-4 / MSH-5 / MSH-6.
    sending_application: str = Field("TRIAGED", min_length=1, max_length=227)
    sending_facility: str = Field("", max_length=227)
    receiving_application: str = Field("", max_length=227)
    receiving_facility: str = Field("", max_length=227)
    #: MSH-11: ``P`` production, ``T`` training, ``D`` debugging.
    processing_id: Literal["P", "T", "D"] = "P"
    #: Seconds to connect and to wait for the ACK; none: ``dispatch.timeout_seconds``.
    timeout_seconds: float | None = Field(None, gt=0)
    #: Only studies at this priority level or a more urgent one are notified.
    min_priority: PriorityLevel = PriorityLevel.STAT

    @field_validator("sending_application", "sending_facility", "receiving_application", "receiving_facility")
    @classmethod
    def _plain(cls, v: str) -> str:
        if any(c in v for c in "|^~\\&\r\n"):
            raise ValueError(f"{v!r} may not contain HL7 delimiters (| ^ ~ \\ &) or line breaks")
        return v


class StowDestinationConfig(_HTTPDestination):
    """A DICOMweb server that stores the result objects by STOW-RS (``type: stow-rs``).

    ``url`` is the DICOMweb service root (e.g. ``https://pacs.example.org/dicom-web``); the objects are
    POSTed to ``<url>/studies``.  Authentication: ``username`` with ``password`` (HTTP Basic) or ``token``
    (a Bearer token), both secrets.
    """

    type: Literal["stow-rs"]
    username: str | None = None
    password: SecretConfig | None = None
    token: SecretConfig | None = None

    @model_validator(mode="after")
    def _auth(self) -> Self:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together (HTTP Basic authentication)")
        if self.token is not None and self.username is not None:
            raise ValueError("give either username/password or token, not both")
        return self


def _destination_type(value: Any) -> str:
    """The ``type`` of a destination entry; an entry without one is a DICOM peer."""
    if isinstance(value, dict):
        return str(value.get("type", "dicom"))
    return str(getattr(value, "type", "dicom"))


#: One entry of ``destinations:``, told apart by its ``type`` (default ``dicom``).
AnyDestinationConfig = Annotated[
    Annotated[DestinationConfig, Tag("dicom")]
    | Annotated[WebhookDestinationConfig, Tag("webhook")]
    | Annotated[HL7DestinationConfig, Tag("hl7")]
    | Annotated[StowDestinationConfig, Tag("stow-rs")],
    Discriminator(
        _destination_type,
        custom_error_type="destination_type",
        custom_error_message="unknown destination type: type is one of " + ", ".join(DESTINATION_TYPES),
    ),
]


class AnalysisConfig(_Model):
    """Analysis worker processes (see :mod:`triaged.worker`)."""

    #: Pipeline for studies no routing rule assigns one to (names: ``triaged analyze --list``).
    default_pipeline: str = "classical"
    #: ``auto`` picks CUDA when torch sees a GPU, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(1, ge=1, le=16)
    threads: int = Field(2, ge=1, le=64)
    #: Added to a worker process's niceness: analysis yields the CPU to the receiver (0: same priority).
    worker_nice: int = Field(10, ge=0, le=19)
    timeout_seconds: float = Field(600.0, gt=0)
    #: A worker whose resident memory passes this is killed and the job FAILED (0: no guard).
    memory_limit_mb: int = Field(6144, ge=0)
    #: Seconds of waiting that count as one priority level, so routine work is never starved.
    aging_seconds: float = Field(600.0, gt=0)
    #: ``module:function`` returning the pipeline registry (tests and plug-ins name their own).
    registry: str = Field("triaged.nets.pipelines:node_registry", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class DispatchConfig(_Model):
    """Sending result objects to destinations: retries with capped exponential backoff."""

    #: The retry and recovery tick: new results are sent as soon as they are encoded.
    interval_seconds: float = Field(5.0, gt=0)
    #: Delay after the first failure; each further failure multiplies it, up to ``max_delay_seconds``.
    base_delay_seconds: float = Field(10.0, gt=0)
    multiplier: float = Field(2.0, ge=1)
    max_delay_seconds: float = Field(600.0, gt=0)
    #: After this long without success an item is dead-lettered (ERROR log, ledger flag, job FAILED).
    max_age_hours: float = Field(24.0, gt=0)
    calling_ae_title: AETitle = "TRIAGED"
    timeout_seconds: float = Field(30.0, gt=0)
    #: What an IGNORED study's destinations get: ``sr``, a short SR saying why it was not analysed (to
    #: the destinations that take SRs; routing's default destinations for a study a rule ignored), or
    #: ``none``.
    ignored_report: Literal["sr", "none"] = "sr"


class WorklistConfig(_Model):
    """How the radiology worklist reads the ledger: C-FIND on the listener and a JSON endpoint."""

    #: Answer Study Root C-FIND on the listener with the ledger's studies in priority order, to the calling
    #: AE titles in ``listener.find_allowed_aes`` only.
    c_find: bool = True
    #: A read-only HTTP endpoint serving the worklist as JSON (``GET /worklist``); 0 disables it.
    http_port: int = Field(8088, ge=0, le=65535)
    http_bind_address: str = "127.0.0.1"
    #: Seconds a client of the HTTP endpoint has to send its whole request (request line and headers) and
    #: the limit on each later socket read or write; a slower client is disconnected.
    http_timeout_seconds: float = Field(10.0, gt=0, le=300)
    #: Also return PatientID and PatientName (the values C-FIND returns) in ``GET /worklist`` and show them
    #: on the dashboard.  Off by default: the HTTP endpoint has no caller to check, unlike C-FIND.
    http_patient_data: bool = False

    _bind = field_validator("http_bind_address")(classmethod(lambda cls, v: check_ip_address(v)))


class LoggingConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    file: Path | None = None


#: What a node can do (``node.roles``); a node without a role leaves that work to the nodes with it.
NodeRole = Literal["receive", "complete", "analyse", "dispatch"]
NODE_ROLES: tuple[NodeRole, ...] = ("receive", "complete", "analyse", "dispatch")


def _hostname() -> str:
    """The default node name: the host's name (``uname -n``), cut to what the ledger stores."""
    import os

    name = re.sub(r"[^A-Za-z0-9_.@:-]", "-", os.uname().nodename)
    return name[:64] or "triaged"


class NodeConfig(_Model):
    """This node's identity and roles when several nodes share one PostgreSQL ledger (restart-only)."""

    #: Unique among the nodes sharing a ledger; shown in job history, logs and ``triaged status``.
    name: str = Field(default_factory=_hostname, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@:-]+$")
    #: receive: listen for DICOM; complete: completion timers and (as leader) the sweep, retention and lease
    #: recovery; analyse: run the analysis worker; dispatch: send results.
    roles: list[NodeRole] = Field(default_factory=lambda: list(NODE_ROLES), min_length=1)
    #: A claimed job or outbox row belongs to this node for this long after its last heartbeat.
    lease_seconds: float = Field(60.0, gt=0)
    #: How often the node records that it is alive and extends its leases.
    heartbeat_seconds: float = Field(10.0, gt=0)

    @field_validator("roles")
    @classmethod
    def _unique_roles(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"roles listed twice: {sorted({r for r in v if v.count(r) > 1})}")
        return v

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Self:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds:g}) must be at most half of lease_seconds "
                f"({self.lease_seconds:g}), so one late heartbeat does not lose the node's leases"
            )
        return self


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
    retention: RetentionConfig = Field(default_factory=lambda: RetentionConfig())
    completion: CompletionConfig = Field(default_factory=lambda: CompletionConfig())
    series_selection: SeriesSelectionConfig = Field(default_factory=lambda: SeriesSelectionConfig())
    destinations: dict[str, AnyDestinationConfig] = Field(default_factory=dict)
    analysis: AnalysisConfig = Field(default_factory=lambda: AnalysisConfig())
    dispatch: DispatchConfig = Field(default_factory=lambda: DispatchConfig())
    worklist: WorklistConfig = Field(default_factory=lambda: WorklistConfig())
    #: Re-read the config file when it changes (as on SIGHUP); an invalid file is refused.
    reload_on_change: bool = True
    logging: LoggingConfig = Field(default_factory=lambda: LoggingConfig())
    routing: RoutingConfig = Field(default_factory=lambda: RoutingConfig())
    priority: PriorityConfig = Field(default_factory=lambda: PriorityConfig())
    node: NodeConfig = Field(default_factory=lambda: NodeConfig())
