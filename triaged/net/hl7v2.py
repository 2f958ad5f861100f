"""The ``hl7`` destination: an HL7 v2.5.1 ORU^R01 per notified study over MLLP (python-hl7).

The message (:func:`oru_message`) carries MSH, PID (PatientID and name from the study's header), OBR
(accession number in OBR-3 and OBR-18, the Study Instance UID in OBR-20) and one OBX per result:
priority level, reasons, affected percentage, CT grade, the P(COVID-19) text and the research-use
note.  Results are preliminary (OBR-25 / OBX-11 ``P``): they are not for diagnosis.

The receiver's ACK decides (:func:`send_oru`): ``AA`` (or ``CA``) is delivered; ``AE``/``AR`` (``CE``/``CR``)
are dead-lettered with the ACK's text; no ACK within the timeout, a closed connection or an ACK for
another message are tried again with the outbox's backoff.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import hl7
import hl7.mllp

from triaged.config.schema import AnyDestinationConfig, HL7DestinationConfig
from triaged.domain import pct_text
from triaged.errors import DispatchError
from triaged.net.notify import Delivery, Notification, send_each
from triaged.net.scu import SendResult, StopSignal

log = logging.getLogger(__name__)

#: HL7 v2 escape sequences (v2.5.1 section 2.7), the escape character first.
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def escape(text: str) -> str:
    """``text`` as an HL7 field value: delimiters escaped, line breaks as ``\\.br\\``."""
    for char, seq in _ESCAPES:
        text = text.replace(char, seq)
    return text.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")


def _person_name(dicom_name: str) -> str:
    """A DICOM PN (family^given^middle^prefix^suffix, alphabetic group) as an HL7 XPN (family^given^middle^suffix^prefix)."""
    parts = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (escape(p.strip()) for p in parts)
    return "^".join((family, given, middle, suffix, prefix)).rstrip("^")


def _hl7_time(iso: str) -> str:
    try:
        at = datetime.fromisoformat(iso)
    except ValueError:
        at = datetime.now(UTC)
    return at.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def oru_message(n: Notification, dest: HL7DestinationConfig, *, control_id: str, now: datetime) -> str:
    """The ORU^R01 for ``n``: segments joined by carriage returns (HL7 v2.5.1, UTF-8)."""
    observed = _hl7_time(n.created_at)
    msh = "|".join(
        [
            "MSH",
            "^~\\&",
            dest.sending_application,
            dest.sending_facility,
            dest.receiving_application,
            dest.receiving_facility,
            now.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000"),
            "",
            "ORU^R01^ORU_R01",
            control_id,
            dest.processing_id,
            "2.5.1",
            "",
            "",
            "",
            "",
            "",
            "UNICODE UTF-8",
        ]
    )
    pid = f"PID|1||{escape(n.patient_id)}||{_person_name(n.patient_name)}"
    accession = escape(n.accession_number)
    obr = "|".join(
        [
            "OBR",
            "1",
            "",
            accession,
            "CTCHEST-TRIAGE^Chest CT triage (research)^L",
            "",
            "",
            observed,
            *[""] * 10,
            accession,
            "",
            escape(n.study_instance_uid),
            "",
            "",
            "",
            "",
            "P",
        ]
    )
    results: list[tuple[str, str, str, str]] = [
        ("ST", "PRIORITY^Triage priority level^L", escape(n.priority_level), ""),
        ("TX", "REASONS^Triage priority reasons^L", escape(n.priority_reasons), ""),
    ]
    if n.severity_pct is not None:
        results.append(
            ("NM", "AFFECTED^Affected lung, worse lung^L", pct_text(n.severity_pct), "%^percent^UCUM")
        )
    if n.whole_lung_pct is not None:
        results.append(
            ("NM", "AFFECTED-BOTH^Affected lung, both lungs^L", pct_text(n.whole_lung_pct), "%^percent^UCUM")
        )
    if n.ct_grade is not None:
        results.append(("ST", "CTGRADE^CT severity grade (CT0-CT4)^L", escape(n.ct_grade), ""))
    if n.p_covid_text is not None:
        results.append(("ST", "PCOVID^P(COVID-19)^L", escape(n.p_covid_text), ""))
    results.append(("ST", "STUDYUID^Study Instance UID^L", escape(n.study_instance_uid), ""))
    results.append(("TX", "NOTE^Note^L", escape(n.note), ""))
    obx = [
        "|".join(["OBX", str(i), vt, code, "", value, units, "", "", "", "", "P", "", "", observed])
        for i, (vt, code, value, units) in enumerate(results, 1)
    ]
    return "\r".join([msh, pid, obr, *obx])


async def _exchange(host: str, port: int, message: str, timeout: float) -> hl7.Message:
    reader, writer = await asyncio.wait_for(
        hl7.mllp.open_hl7_connection(host, port, encoding="utf-8"), timeout
    )
    try:
        writer.writemessage(hl7.parse(message))
        await asyncio.wait_for(writer.drain(), timeout)
        return await asyncio.wait_for(reader.readmessage(), timeout)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (OSError, TimeoutError):
            pass


def send_oru(n: Notification, dest: HL7DestinationConfig, *, timeout: float, path: str = "") -> Delivery:
    """Send ``n``'s ORU^R01 to ``dest`` and read its ACK.

    Raises
    ------
    DispatchError
        No connection, no ACK within ``timeout``, or an answer that is no ACK: try again later.
    """
    control_id = uuid.uuid4().hex[:20]
    message = oru_message(n, dest, control_id=control_id, now=datetime.now(UTC))
    where = f"{dest.host}:{dest.port}"
    try:
        ack = asyncio.run(_exchange(dest.host, dest.port, message, timeout))
    except TimeoutError as exc:
        raise DispatchError(f"no HL7 ACK from {where} within {timeout:g} s") from exc
    except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
        raise DispatchError(f"MLLP to {where} failed: {exc or type(exc).__name__}") from exc
    except Exception as exc:  # noqa: BLE001 - a malformed answer (hl7.ParseException, InvalidBlockError...)
        raise DispatchError(f"unreadable answer from {where}: {exc}") from exc
    try:
        msa = ack.segment("MSA")
    except KeyError as exc:
        raise DispatchError(f"the answer from {where} has no MSA segment (not an ACK)") from exc
    code = str(msa[1]).strip().upper()
    acked = str(msa[2]).strip() if len(msa) > 2 else ""
    text = str(msa[3]).strip() if len(msa) > 3 else ""
    errors = [str(seg) for seg in ack if str(seg[0]) == "ERR"]
    if errors:
        text = "; ".join([text, *errors]).strip("; ")
    label = f"ACK {code}"
    if acked and acked != control_id:
        raise DispatchError(f"{where} acknowledged message {acked!r}, not {control_id!r}")
    uid = n.study_instance_uid
    if code in ("AA", "CA"):
        return Delivery(path, uid, None, text, accepted=True, label=label)
    if code in ("AE", "AR", "CE", "CR"):
        return Delivery(path, uid, None, text or "(no text)", permanent=True, label=label)
    raise DispatchError(f"{where} answered MSA-1 {code!r}, not an acknowledgment code")


class HL7Destination:
    """The dispatch :class:`~triaged.stages.dispatch.Destination` of ``type: hl7``: one ORU^R01 per item."""

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
        if not isinstance(dest, HL7DestinationConfig):
            raise DispatchError(f"an HL7 sender was given a {dest.type} destination")
        seconds = dest.timeout_seconds or timeout
        return send_each(
            paths,
            lambda notification, path: send_oru(notification, dest, timeout=seconds, path=path),
            on_result,
            stop,
        )
