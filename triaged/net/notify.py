"""What the notification destinations share: the notification itself, a delivery's answer, secrets, HTTP.

A notification is written once per job as JSON in the job's work folder when the job's outputs go to the
outbox (:meth:`Notification.write`); the outbox item of each notification destination points at that
file, so retries, dead letters and ``triaged resend`` work as for the result objects, and a notification
that waits in the outbox survives a restart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from triaged.config.schema import SecretConfig
from triaged.domain import RESEARCH_NOTE
from triaged.errors import DispatchError
from triaged.net.scu import SendResult, StopSignal


@dataclass(frozen=True)
class Notification:
    """One study's triage result as the webhook and HL7 destinations tell it.

    ``p_covid_text`` is what the worklist shows (``"P(COVID-19) 0.87"`` or "not assessed"); the patient
    fields come from the study's header and go to HL7 (PID) only, never to a webhook.
    """

    job_id: int
    study_instance_uid: str
    accession_number: str
    priority_level: str
    priority_reasons: str
    pipeline: str
    p_covid_text: str | None
    severity_pct: float | None
    whole_lung_pct: float | None
    ct_grade: str | None
    created_at: str
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    study_description: str = ""
    note: str = RESEARCH_NOTE

    def webhook_payload(self) -> dict[str, Any]:
        """The JSON body of a webhook POST: everything but the patient's identity."""
        data = asdict(self)
        for key in ("patient_id", "patient_name"):
            del data[key]
        return {"event": "triaged.result", **data}

    def write(self, path: Path) -> None:
        """Write the notification as JSON, atomically (a reader never sees half a file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> Notification:
        """The notification stored at ``path``; :class:`DispatchError` when it is missing or unreadable."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DispatchError(f"cannot read the notification {path}: {exc}") from exc
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise DispatchError(f"{path} is not a notification: {exc}") from exc


@dataclass(frozen=True)
class Delivery(SendResult):
    """A non-DICOM destination's answer for one outbox item.

    ``status`` is the protocol's code (an HTTP status; None for HL7), ``label`` how it reads
    (``"HTTP 200"``, ``"ACK AA"``); ``accepted`` means delivered, ``permanent`` refused for good
    (dead-lettered now); neither means: try again later.
    """

    accepted: bool = False
    permanent: bool = False
    label: str = ""

    @property
    def ok(self) -> bool:
        return self.accepted


def read_secret(secret: SecretConfig, what: str) -> str:
    """The value of ``secret`` with its prefix, read now; :class:`DispatchError` naming ``what`` if missing."""
    if secret.env is not None:
        value = os.environ.get(secret.env, "")
        if not value:
            raise DispatchError(f"{what}: environment variable {secret.env} is not set")
    else:
        assert secret.file is not None  # SecretConfig holds exactly one of env and file
        try:
            value = secret.file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DispatchError(f"{what}: cannot read {secret.file}: {exc}") from exc
        if not value:
            raise DispatchError(f"{what}: {secret.file} is empty")
    return secret.prefix + value


def tls_verify(verify_tls: bool, ca_certificates: Path | None) -> bool | str:
    """``requests``' ``verify``: the CA file, True (system CAs) or False (no verification)."""
    if not verify_tls:
        return False
    return str(ca_certificates) if ca_certificates is not None else True


#: HTTP statuses worth another attempt (PS3.18 10.5.3 and RFC 9110): timeouts, too many requests, 5xx.
RETRY_HTTP_STATUSES = frozenset({408, 425, 429})


def http_retryable(status: int) -> bool:
    """True for a status that may succeed later (408, 425, 429, 5xx); other 4xx never will."""
    return status in RETRY_HTTP_STATUSES or status >= 500


def http_reason(status: int, reason: str, body: str) -> str:
    """``"HTTP 400 Bad Request: <the start of the body>"``, on one line."""
    text = " ".join(body.split())[:200]
    return f"HTTP {status} {reason}".strip() + (f": {text}" if text else "")


def send_each(
    paths: Sequence[Path],
    send_one: Callable[[Notification, str], SendResult],
    on_result: Callable[[SendResult], None],
    stop: StopSignal,
) -> list[SendResult]:
    """The notification destinations' loop: each item's notification sent on its own, in order.

    ``send_one(notification, path)`` delivers one; its result goes to ``on_result`` at once (the outbox
    records it before the next is sent); ``stop`` set leaves the rest unsent.
    """
    results: list[SendResult] = []
    for path in paths:
        if stop.is_set():
            break
        result = send_one(Notification.read(path), str(path))
        results.append(result)
        on_result(result)
    return results
