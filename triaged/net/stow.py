"""The ``stow-rs`` destination: result objects stored by DICOMweb STOW-RS (``dicomweb-client``).

One POST per batch (a job's objects for this destination) to ``<url>/studies``.  The answer is read per
instance as PS3.18 10.5.3 gives it: an instance in the Referenced SOP Sequence is stored (with any
Warning Reason as comment); one in the Failed SOP Sequence is dead-lettered with its Failure Reason,
unless that reason may pass later (0xA7xx out of resources, 0x0110 processing failure: retried).  An
HTTP error without per-instance answers applies to every instance: 408, 425, 429 and 5xx are retried,
other 4xx dead-lettered; no answer at all (connection refused, timeout) is retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests
from pydicom import Dataset, dcmread

from triaged.config.schema import AnyDestinationConfig, StowDestinationConfig
from triaged.errors import DispatchError
from triaged.net.notify import Delivery, http_reason, http_retryable, read_secret, tls_verify
from triaged.net.scu import SendResult, StopSignal

log = logging.getLogger(__name__)


def failure_retryable(reason: int) -> bool:
    """A STOW-RS Failure Reason (a PS3.4 status) that may pass later: 0xA7xx, 0x0110."""
    return (reason & 0xFF00) == 0xA700 or reason == 0x0110


def _session(dest: StowDestinationConfig) -> requests.Session:
    session = requests.Session()
    session.verify = tls_verify(dest.verify_tls, dest.ca_certificates)
    session.trust_env = False  # never through a proxy from the environment: the config names the server
    if dest.username is not None and dest.password is not None:
        session.auth = (dest.username, read_secret(dest.password, "password"))
    if dest.token is not None:
        token = read_secret(dest.token, "token")
        session.headers["Authorization"] = token if dest.token.prefix else f"Bearer {token}"
    return session


def _answers(response: Dataset) -> tuple[dict[str, str], dict[str, int]]:
    """(stored UID → warning text, failed UID → Failure Reason) from a STOW-RS response dataset."""
    stored: dict[str, str] = {}
    failed: dict[str, int] = {}
    for item in response.get("ReferencedSOPSequence", []):
        warning = item.get("WarningReason")
        stored[str(item.get("ReferencedSOPInstanceUID", ""))] = (
            f"warning 0x{int(warning):04X}" if warning else ""
        )
    for item in response.get("FailedSOPSequence", []):
        failed[str(item.get("ReferencedSOPInstanceUID", ""))] = int(item.get("FailureReason", 0xC000))
    return stored, failed


def _error_dataset(response: requests.Response) -> Dataset:
    """The STOW-RS answer in an HTTP error response (e.g. 409 with a Failed SOP Sequence), if it has one."""
    if "json" not in response.headers.get("Content-Type", ""):
        return Dataset()
    try:
        data: Any = response.json()
        return Dataset.from_json(data) if isinstance(data, dict) else Dataset()
    except ValueError:
        return Dataset()


def store_instances(paths: Sequence[Path], dest: StowDestinationConfig, *, timeout: float) -> list[Delivery]:
    """STOW-RS ``paths`` to ``dest`` in one request; one :class:`Delivery` per path, in order.

    Raises
    ------
    DispatchError
        No answer (connection refused, TLS failure, timeout) or a secret that cannot be read: every
        instance is tried again later.
    """
    from dicomweb_client.api import DICOMwebClient

    datasets = [dcmread(p) for p in paths]
    client = DICOMwebClient(url=dest.url.rstrip("/"), session=_session(dest), timeout=timeout)
    client.set_http_retry_params(retry=False)  # the outbox retries, with its own backoff
    http_status = 200
    error = ""
    try:
        response = client.store_instances(datasets)
    except requests.HTTPError as exc:
        if exc.response is None:
            raise DispatchError(f"STOW-RS to {dest.url} failed: {exc}") from exc
        http_status = exc.response.status_code
        error = http_reason(http_status, exc.response.reason or "", exc.response.text)
        response = _error_dataset(exc.response)
    except requests.Timeout as exc:
        raise DispatchError(f"no STOW-RS answer from {dest.url} within {timeout:g} s") from exc
    except requests.RequestException as exc:
        raise DispatchError(f"cannot STOW-RS to {dest.url}: {exc}") from exc
    except ValueError as exc:  # an answer in a media type that is no STOW-RS response
        raise DispatchError(f"unreadable STOW-RS answer from {dest.url}: {exc}") from exc
    stored, failed = _answers(response)
    label = f"HTTP {http_status}"
    results = []
    for path, ds in zip(paths, datasets, strict=True):
        uid = str(ds.SOPInstanceUID)
        if uid in failed:
            reason = failed[uid]
            results.append(
                Delivery(
                    str(path),
                    uid,
                    http_status,
                    f"Failure Reason 0x{reason:04X} {error}".strip(),
                    permanent=not failure_retryable(reason),
                    label=label,
                )
            )
        elif uid in stored or (http_status == 200 and not failed):
            results.append(
                Delivery(str(path), uid, http_status, stored.get(uid, ""), accepted=True, label=label)
            )
        elif error:
            results.append(
                Delivery(
                    str(path), uid, http_status, error, permanent=not http_retryable(http_status), label=label
                )
            )
        else:  # 202 without a word about this instance: not confirmed, so not delivered
            results.append(
                Delivery(str(path), uid, http_status, "not confirmed in the STOW-RS answer", label=label)
            )
    return results


class StowDestination:
    """The dispatch :class:`~triaged.stages.dispatch.Destination` of ``type: stow-rs``: one POST per batch."""

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
        if not isinstance(dest, StowDestinationConfig):
            raise DispatchError(f"a STOW-RS sender was given a {dest.type} destination")
        if stop.is_set() or not paths:
            return []
        try:
            results = store_instances(paths, dest, timeout=dest.timeout_seconds or timeout)
        except OSError as exc:  # a result object that cannot be read
            raise DispatchError(f"cannot read a result object for STOW-RS: {exc}") from exc
        for result in results:
            on_result(result)
        return list(results)
