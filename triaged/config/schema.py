"""The node's settings: pydantic models (``extra="forbid"``), one per section of ``config.yaml``.

:class:`Config` is the whole file; the ``routing`` and ``priority`` policy models live in
:mod:`triaged.config.rules`, loading and the checks across sections in :mod:`triaged.config.load`.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, field_validator, model_validator

from triaged.config._model import _Model
from triaged.config.rules import PriorityPolicyConfig, RoutingConfig, _builtin_policies

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
    ledger: Path = Path("var/ledger.sqlite")
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
    """A DICOM peer that receives results by C-STORE."""

    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AETitle | None = None
    #: DICOM TLS to this destination; applies from the next association (reloadable).
    tls: DestinationTLSConfig | None = None

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))


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

    _bind = field_validator("http_bind_address")(classmethod(lambda cls, v: check_ip_address(v)))


class LoggingConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    file: Path | None = None


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
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)
    analysis: AnalysisConfig = Field(default_factory=lambda: AnalysisConfig())
    dispatch: DispatchConfig = Field(default_factory=lambda: DispatchConfig())
    worklist: WorklistConfig = Field(default_factory=lambda: WorklistConfig())
    #: Re-read the config file when it changes (as on SIGHUP); an invalid file is refused.
    reload_on_change: bool = True
    logging: LoggingConfig = Field(default_factory=lambda: LoggingConfig())
    routing: RoutingConfig = Field(default_factory=lambda: RoutingConfig())
    priority: PriorityConfig = Field(default_factory=lambda: PriorityConfig())
