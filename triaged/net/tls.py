"""DICOM TLS (PS3.15 Annex B.9, BCP 195): the SSL contexts of the listener and of the destinations.

:func:`server_context` is what the listener wraps every accepted connection with (TLS only: a peer that
does not start a TLS handshake gets no association); :func:`client_context` is what a sender connects to
a destination with.  Both refuse TLS older than 1.2 and keep Python's default cipher list (forward-secret
ECDHE/DHE suites only; no RSA key exchange, SHA-1, RC4, 3DES or NULL suites).

A client context made here remembers why its handshake failed (:attr:`ClientContext.handshake_error`):
pynetdicom only logs it and reports "no association", and a PACS administrator needs to read in the
outbox that the certificate was the problem, not the network.
"""

from __future__ import annotations

import ssl
from typing import Any

from triaged.config.schema import DestinationConfig, DestinationTLSConfig, ListenerTLSConfig

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class EncryptedKeyError(ValueError):
    """The private key needs a password: never prompted for (a daemon has no terminal), refused instead."""


def _no_password() -> bytes:
    raise EncryptedKeyError("the private key is encrypted; triaged needs an unencrypted key")


class _HandshakeSocket(ssl.SSLSocket):
    """An SSL socket that tells its :class:`ClientContext` why the handshake failed."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            context = self.context
            if isinstance(context, ClientContext):
                context.handshake_error = exc
            raise


class ClientContext(ssl.SSLContext):
    """A client :class:`ssl.SSLContext` that keeps the last handshake failure (one context per association)."""

    sslsocket_class = _HandshakeSocket
    handshake_error: OSError | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> ClientContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)


def server_context(cfg: ListenerTLSConfig) -> ssl.SSLContext:
    """The listener's context: its certificate and key, and the peers' CA when it asks for client certificates.

    With ``ca_certificates`` a client certificate is verified when the peer presents one, and required with
    ``require_client_certificate`` (``CERT_REQUIRED``: a peer without one fails the handshake).
    Raises :class:`OSError` / :class:`ssl.SSLError` / :class:`EncryptedKeyError` for unusable files.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.minimum_version]
    ctx.load_cert_chain(cfg.certificate, cfg.private_key, password=_no_password)
    if cfg.ca_certificates is not None:
        ctx.load_verify_locations(cafile=cfg.ca_certificates)
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def client_context(cfg: DestinationTLSConfig) -> ClientContext:
    """A destination's context: verify its certificate (against ``ca_certificates``, else the system CAs).

    The host name is checked only with ``verify_hostname``; ``verify: false`` accepts any certificate.
    A client certificate and key are presented when configured (mutual TLS).
    """
    ctx = ClientContext()
    ctx.minimum_version = _VERSIONS[cfg.minimum_version]
    if not cfg.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.check_hostname = cfg.verify_hostname
        if cfg.ca_certificates is not None:
            ctx.load_verify_locations(cafile=cfg.ca_certificates)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cfg.certificate is not None and cfg.private_key is not None:
        ctx.load_cert_chain(cfg.certificate, cfg.private_key, password=_no_password)
    return ctx


def server_hostname(dest: DestinationConfig) -> str | None:
    """The name sent in SNI and checked against the certificate: ``tls.server_hostname``, else ``host``."""
    if dest.tls is None:
        return None
    return dest.tls.server_hostname or dest.host


def describe(exc: BaseException) -> str:
    """A handshake failure in words an administrator can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | ssl.SSLZeroReturnError):
        return "the peer closed the connection during the handshake (is it a TLS listener?)"
    if isinstance(exc, TimeoutError):
        return "no answer to the TLS handshake"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).replace("_", " ").lower()
        hint = (
            " (is it a TLS listener?)" if reason in ("wrong version number", "record layer failure") else ""
        )
        return reason + hint
    return str(exc) or type(exc).__name__


def self_check_tls(cfg: ListenerTLSConfig | None) -> DestinationTLSConfig | None:
    """How ``triaged status`` reaches its own TLS listener: TLS, the node's own certificate as the client
    certificate (accepted when its CA is among ``ca_certificates``), the server certificate not verified
    (a liveness check on this host, not an authentication). None for a plain listener.
    """
    if cfg is None or not cfg.enabled:
        return None
    return DestinationTLSConfig(
        verify=False,
        certificate=cfg.certificate,
        private_key=cfg.private_key,
        minimum_version=cfg.minimum_version,
    )
