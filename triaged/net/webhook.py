"""The ``webhook`` destination: a notification as a JSON POST (``requests``).

2xx is delivered; 408, 425, 429, 5xx, timeouts and connection errors are tried again with the outbox's
backoff; any other status (4xx, a redirect) is dead-lettered with the server's answer as the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import requests

from triaged import __version__
from triaged.config.schema import AnyDestinationConfig, SecretConfig, WebhookDestinationConfig
from triaged.errors import DispatchError
from triaged.net.notify import (
    Delivery,
    Notification,
    http_reason,
    http_retryable,
    read_secret,
    send_each,
    tls_verify,
)
from triaged.net.scu import SendResult, StopSignal

log = logging.getLogger(__name__)


def post_notification(
    notification: Notification, dest: WebhookDestinationConfig, *, timeout: float, path: str = ""
) -> Delivery:
    """POST ``notification`` to ``dest.url``; the answer as a :class:`Delivery`.

    Raises
    ------
    DispatchError
        No answer: the server could not be reached, TLS failed, or it did not answer within ``timeout``
        (the outbox tries again later), or a header secret cannot be read.
    """
    headers = {"User-Agent": f"triaged/{__version__}", "Accept": "application/json, */*;q=0.5"}
    for name, value in dest.headers.items():
        headers[name] = read_secret(value, f"header {name}") if isinstance(value, SecretConfig) else value
    try:
        response = requests.post(
            dest.url,
            json=notification.webhook_payload(),
            headers=headers,
            timeout=timeout,
            verify=tls_verify(dest.verify_tls, dest.ca_certificates),
            allow_redirects=False,
        )
    except requests.Timeout as exc:
        raise DispatchError(f"no answer from {dest.url} within {timeout:g} s") from exc
    except requests.RequestException as exc:
        raise DispatchError(f"cannot POST to {dest.url}: {exc}") from exc
    status = response.status_code
    label = f"HTTP {status}"
    uid = notification.study_instance_uid
    if 200 <= status < 300:
        return Delivery(path, uid, status, accepted=True, label=label)
    reason = http_reason(status, response.reason or "", response.text)
    if 300 <= status < 400:
        reason += f" (redirect to {response.headers.get('Location', '?')}: set url to where it points)"
    return Delivery(path, uid, status, reason, permanent=not http_retryable(status), label=label)


class WebhookDestination:
    """The dispatch :class:`~triaged.stages.dispatch.Destination` of ``type: webhook``: one POST per item."""

    def send(
        self,
        paths: Sequence[Path],
        dest: AnyDestinationConfig,
        *,
        calling_ae: str,
        timeout: float,
        on_result: Callable[[SendResult], None],
        stop: StopSignal,
    ) -> list[SendResult]:
        if not isinstance(dest, WebhookDestinationConfig):
            raise DispatchError(f"a webhook sender was given a {dest.type} destination")
        seconds = dest.timeout_seconds or timeout
        return send_each(
            paths,
            lambda notification, path: post_notification(notification, dest, timeout=seconds, path=path),
            on_result,
            stop,
        )
