"""The read-only web dashboard: server-rendered HTML pages over what the node already knows.

``/`` (or ``/dashboard``): the listener and disk, the nodes sharing the ledger (their roles, heartbeats and
what each holds), the outbox's health and the worklist in priority order;
``/jobs/<id>``: one job's state history, its results and their outbox state, and the overview image.
Every page states that the results are for research use and not for diagnosis, refreshes itself every
few seconds (``<meta http-equiv=refresh>``, no script) and escapes every value it shows: patient names
and study descriptions come from the senders' datasets and are attacker-controlled input.  Patient name
and ID are shown only where the HTTP worklist returns them (``worklist.http_patient_data``).
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from pydicom.dataset import Dataset

from triaged.domain import (
    RESEARCH_NOTE,
    JobRow,
    OutboxEntry,
    OutboxState,
    WorklistRow,
    outbox_status_text,
    p_covid_text,
)

#: Seconds between the pages' own reloads.
REFRESH_SECONDS = 10


@dataclass(frozen=True)
class NodeStatus:
    """The listener, the disk and the job counts, as the dashboard and ``/metrics`` show them."""

    ae_title: str
    host: str
    port: int
    tls: bool
    active_associations: int | None
    spool_free_bytes: int | None
    min_free_mb: int
    jobs_per_state: dict[str, int] = field(default_factory=dict)
    version: str = ""

    @property
    def disk_ok(self) -> bool:
        return self.spool_free_bytes is not None and self.spool_free_bytes >= self.min_free_mb * 1024 * 1024


@dataclass(frozen=True)
class ClusterNode:
    """One node of the ledger as ``triaged status``, the dashboard and ``/metrics`` show it."""

    name: str
    roles: tuple[str, ...]
    host: str
    pid: int
    version: str
    heartbeat_at: datetime
    #: Seconds since its last heartbeat (at the time of reading).
    heartbeat_age_seconds: float
    #: ``alive`` (beating within its lease), ``stopped`` (a clean stop) or ``lost`` (no heartbeat for longer
    #: than ``node.lease_seconds``: killed, hung or cut off; its work is taken back).
    condition: str
    #: Leads now (completion sweep, retention, lease recovery); None: not known.
    leader: bool | None
    #: Jobs it holds (ANALYSING, ENCODING) and outbox rows it is sending.
    jobs: tuple[int, ...]
    outbox_rows: int
    #: The node serving the page (or running ``triaged status``' config).
    this_node: bool = False

    @property
    def up(self) -> bool:
        return self.condition == "alive"


@dataclass(frozen=True)
class OutboxHealth:
    """The outbox at a glance: waiting for a first attempt, waiting to retry after a failure, dead."""

    pending: int
    retrying: int
    dead: int
    problems: tuple[OutboxEntry, ...] = ()  # retrying and dead items, dead first

    @classmethod
    def of(cls, entries: Iterable[OutboxEntry]) -> OutboxHealth:
        waiting = [e for e in entries]
        pending = [e for e in waiting if e.state == OutboxState.PENDING and e.attempts == 0]
        retrying = [e for e in waiting if e.state == OutboxState.PENDING and e.attempts > 0]
        dead = [e for e in waiting if e.state == OutboxState.DEAD]
        return cls(len(pending), len(retrying), len(dead), tuple(dead + retrying))

    def as_dict(self) -> dict[str, object]:
        return {
            "pending": self.pending,
            "retrying": self.retrying,
            "dead": self.dead,
            "problems": [outbox_dict(e) for e in self.problems],
        }


class DashboardSource(Protocol):
    """What the pages read, at request time (the node's :class:`triaged.observe.NodeView` is one)."""

    def rows(self) -> list[WorklistRow]: ...

    def study_header(self, study_uid: str) -> Dataset | None: ...

    def job(self, job_id: int) -> JobRow | None: ...

    def pipelines(self) -> dict[int, str]: ...

    def outbox(self, *, job_id: int | None = None, unsent_only: bool = False) -> list[OutboxEntry]:
        """Outbox items, each with its ``destination_type`` where the destination is configured."""
        ...

    def status(self) -> NodeStatus: ...

    def nodes(self) -> list[ClusterNode]:
        """Every node that has run on this ledger (one on a SQLite ledger)."""
        ...

    def overview_png(self, job_id: int) -> bytes | None: ...


def outbox_dict(e: OutboxEntry) -> dict[str, object]:
    """One outbox item as JSON-ready data (no paths: they are the node's business).

    ``last_status`` reads in the destination's terms (:func:`~triaged.domain.outbox_status_text`).
    """
    return {
        "id": e.id,
        "job_id": e.job_id,
        "destination": e.destination,
        "kind": e.kind,
        "sop_instance_uid": e.sop_instance_uid,
        "state": str(e.state),
        "attempts": e.attempts,
        "created_at": e.created_at.isoformat(),
        "next_attempt_at": e.next_attempt_at.isoformat(),
        "sent_at": e.sent_at.isoformat() if e.sent_at else None,
        "last_status": outbox_status_text(e) or None,
        "last_error": e.last_error,
    }


def job_dict(job: JobRow, outbox: list[OutboxEntry]) -> dict[str, object]:
    """One job, its history and its results as JSON-ready data (``/api/jobs/<id>``)."""
    return {
        "id": job.id,
        "study_instance_uid": job.study_instance_uid,
        "revision": job.revision,
        "state": str(job.state),
        "detail": job.detail,
        "pipeline": job.pipeline,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
        "priority_level": job.priority_level,
        "priority_score": job.priority_score,
        "priority_reasons": job.priority_reasons,
        "result_at": job.result_at.isoformat() if job.result_at else None,
        "history": [
            {"at": at.isoformat(), "from": src, "to": dst, "detail": detail}
            for at, src, dst, detail in job.history
        ],
        "results": [outbox_dict(e) for e in outbox],
        "note": "research use only - not for diagnosis",
    }


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if at is not None else ""


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#1b1b1b;background:#fafafa}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.1em;margin:1.2em 0 .4em}
.note{background:#fff3cd;border:1px solid #e0c060;padding:.5em .8em;font-weight:600}
table{border-collapse:collapse;background:#fff;font-size:.9em}
td,th{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#eef}.lvl{font-weight:700;padding:.1em .4em;border-radius:3px}
.STAT{background:#c62828;color:#fff}.URGENT{background:#ef6c00;color:#fff}.ROUTINE{background:#ddd}
.bad{color:#b00020;font-weight:600}.ok{color:#1b5e20}.small{color:#555;font-size:.85em}
.grid{display:flex;gap:2em;flex-wrap:wrap}img{max-width:100%;border:1px solid #ccc;background:#000}
"""


def _page(title: str, body: str) -> bytes:
    note = _e(RESEARCH_NOTE)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        f"<title>{_e(title)} - triaged</title><style>{_CSS}</style></head><body>"
        f'<p class="note" id="research-note">{note} triaged is not a medical device.</p>'
        f"<h1>{_e(title)}</h1>{body}"
        f'<p class="small">{note} This page reloads every {REFRESH_SECONDS} s.</p></body></html>\n'
    ).encode()


def _status_html(status: NodeStatus) -> str:
    free = status.spool_free_bytes
    disk = (
        f'<span class="{"ok" if status.disk_ok else "bad"}">{free / 2**20:,.0f} MiB free</span>'
        if free is not None
        else '<span class="bad">unknown</span>'
    )
    assocs = "unknown" if status.active_associations is None else str(status.active_associations)
    states = ", ".join(f"{_e(s)} {n}" for s, n in status.jobs_per_state.items() if n) or "none"
    return (
        '<table id="status">'
        f"<tr><th>listener</th><td>{_e(status.ae_title)} on {_e(status.host)}:{status.port}, "
        f"{'DICOM TLS' if status.tls else 'no TLS'}; {_e(assocs)} active association(s)</td></tr>"
        f"<tr><th>spool disk</th><td>{disk} (refuses new instances below {status.min_free_mb:,} MiB: "
        "<code>storage.min_free_mb</code>)</td></tr>"
        f"<tr><th>jobs</th><td>{states}</td></tr>"
        f"<tr><th>version</th><td>triaged {_e(status.version)}</td></tr></table>"
    )


def nodes_html(nodes: list[ClusterNode]) -> str:
    """The "Nodes" table: every node of the ledger, its roles, heartbeat, condition and what it holds."""
    if not nodes:
        return '<p id="nodes">No node has registered in the ledger yet.</p>'
    lines = []
    for n in nodes:
        held = ", ".join(f'<a href="/jobs/{j}">{j}</a>' for j in n.jobs) or "-"
        condition = (
            f'<span class="{"ok" if n.up or n.condition == "stopped" else "bad"}">{_e(n.condition)}</span>'
        )
        lead = "yes" if n.leader else ("?" if n.leader is None else "")
        lines.append(
            f'<tr class="node" data-node="{_e(n.name)}"><td>{_e(n.name)}'
            f"{' (this node)' if n.this_node else ''}</td><td>{_e(', '.join(n.roles))}</td>"
            f"<td>{_e(n.host)}:{n.pid}</td><td>{_e(n.version)}</td>"
            f"<td>{_minutes(n.heartbeat_age_seconds)} ago</td><td>{condition}</td><td>{lead}</td>"
            f"<td>{held}</td><td>{n.outbox_rows}</td></tr>"
        )
    return (
        '<table id="nodes"><tr><th>node</th><th>roles</th><th>host:pid</th><th>version</th>'
        "<th>last heartbeat</th><th>condition</th><th>leader</th><th>jobs held</th><th>outbox rows sending</th>"
        "</tr>" + "".join(lines) + "</table>"
    )


def _outbox_html(health: OutboxHealth) -> str:
    head = (
        f'<p id="outbox-health">pending {health.pending}, retrying {health.retrying}, '
        f'<span class="{"bad" if health.dead else "ok"}">dead letters {health.dead}</span></p>'
    )
    if not health.problems:
        return head
    rows = "".join(
        f'<tr><td><a href="/jobs/{e.job_id}">{e.job_id}</a></td><td>{_e(e.destination)}</td><td>{_e(e.kind)}'
        f"</td><td>{_e(e.state)}</td><td>{e.attempts}</td>"
        f"<td>{_when(e.next_attempt_at) if e.state == OutboxState.PENDING else ''}</td>"
        f"<td>{_e(outbox_status_text(e))}</td><td>{_e(e.last_error)}</td></tr>"
        for e in health.problems[:50]
    )
    return head + (
        "<table><tr><th>job</th><th>destination</th><th>object</th><th>state</th><th>attempts</th>"
        f"<th>next attempt</th><th>last status</th><th>reason</th></tr>{rows}</table>"
    )


def dashboard_page(source: DashboardSource, *, patient_data: bool, now: datetime | None = None) -> bytes:
    """The front page: status, outbox health and the worklist in priority order."""
    now = now or datetime.now(UTC)
    rows = source.rows()
    pipelines = source.pipelines()
    patient_head = "<th>patient</th><th>patient ID</th>" if patient_data else ""
    lines = []
    for rank, row in enumerate(rows, 1):
        level = row.priority_level or ""
        if row.result_at is not None:
            waited = f"result after {_minutes((row.result_at - row.arrived).total_seconds())}"
        else:
            waited = f"waiting {_minutes((now - row.arrived).total_seconds())}"
        if row.overdue:
            waited += ' <span class="bad">OVERDUE</span>'
        patient = ""
        if patient_data:
            header = source.study_header(row.study_instance_uid) or Dataset()
            patient = (
                f"<td>{_e(header.get('PatientName', ''))}</td><td>{_e(header.get('PatientID', ''))}</td>"
            )
        p_covid = p_covid_text(row.p_covid) if row.ct_grade is not None else ""
        lines.append(
            f'<tr class="study" data-study="{_e(row.study_instance_uid)}"><td>{rank}</td>'
            f'<td><span class="lvl {_e(level)}">{_e(level or "-")}</span></td>'
            f'<td><a href="/jobs/{row.job_id}">{row.job_id}</a></td>{patient}'
            f"<td>{_e(row.accession_number)}</td><td>{_e(row.study_description)}</td>"
            f"<td>{_e(row.state)}</td><td>{_e(pipelines.get(row.job_id, ''))}</td>"
            f"<td>{_e(p_covid)}</td><td>{_e(row.priority_reasons)}</td><td>{waited}</td></tr>"
        )
    table = (
        '<table id="worklist"><tr><th>#</th><th>priority</th><th>job</th>'
        + patient_head
        + "<th>accession</th><th>description</th><th>state</th><th>pipeline</th><th>P(COVID-19)</th>"
        "<th>reasons</th><th>waiting</th></tr>" + "".join(lines) + "</table>"
        if lines
        else '<p id="worklist">No studies yet.</p>'
    )
    body = (
        '<div class="grid"><div><h2>Node</h2>' + _status_html(source.status()) + "</div>"
        "<div><h2>Outbox</h2>"
        + _outbox_html(OutboxHealth.of(source.outbox(unsent_only=True)))
        + "</div></div>"
        + "<h2>Nodes</h2>"
        + nodes_html(source.nodes())
        + f"<h2>Worklist ({len(rows)} studies, reading order)</h2>"
        + table
        + '<p class="small">JSON: <a href="/worklist">/worklist</a>, <a href="/api/outbox">/api/outbox</a>; '
        'metrics: <a href="/metrics">/metrics</a></p>'
    )
    return _page("triaged worklist", body)


def job_page(source: DashboardSource, job: JobRow, *, patient_data: bool) -> bytes:
    """One job: what it is, its state history, its results and their outbox state, the overview image."""
    outbox = source.outbox(job_id=job.id)
    facts = [
        ("study", job.study_instance_uid),
        ("revision", job.revision),
        ("state", job.state),
        ("detail", job.detail),
        ("pipeline", job.pipeline or ""),
        (
            "priority",
            f"{job.priority_level or '-'} (score {job.priority_score})"
            if job.priority_score is not None
            else job.priority_level or "-",
        ),
        ("reasons", job.priority_reasons),
        ("result recorded", _when(job.result_at)),
    ]
    if patient_data:
        header = source.study_header(job.study_instance_uid) or Dataset()
        facts[1:1] = [("patient", header.get("PatientName", "")), ("patient ID", header.get("PatientID", ""))]
    info = (
        '<table id="job">'
        + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
        + "</table>"
    )
    history = "".join(
        f"<tr><td>{_when(at)}</td><td>{_e(src)}</td><td>{_e(dst)}</td><td>{_e(detail)}</td></tr>"
        for at, src, dst, detail in job.history
    )
    results = "".join(
        f"<tr><td>{_e(e.kind)}</td><td>{_e(e.destination)}</td><td>{_e(e.state)}</td><td>{e.attempts}</td>"
        f"<td>{_when(e.sent_at)}</td><td>{_e(outbox_status_text(e))}</td><td>{_e(e.last_error)}</td>"
        f'<td class="small">{_e(e.sop_instance_uid)}</td></tr>'
        for e in outbox
    )
    image = (
        f'<img id="overview" src="/jobs/{job.id}/overview.png" alt="coronal overview of job {job.id} '
        '(research use only)">'
        if source.overview_png(job.id) is not None
        else '<p id="overview">No overview image for this job (none encoded, or deleted by retention).</p>'
    )
    body = (
        '<p><a href="/">&larr; worklist</a> &middot; JSON: '
        f'<a href="/api/jobs/{job.id}">/api/jobs/{job.id}</a></p><div class="grid"><div>{info}'
        '<h2>State history</h2><table id="history"><tr><th>at</th><th>from</th><th>to</th><th>detail</th></tr>'
        f"{history}</table><h2>Results</h2>"
        + (
            '<table id="results"><tr><th>object</th><th>destination</th><th>state</th><th>attempts</th>'
            "<th>sent</th><th>last status</th><th>last error</th>"
            f"<th>SOP Instance UID</th></tr>{results}</table>"
            if results
            else '<p id="results">No result objects.</p>'
        )
        + f"</div><div><h2>Overview</h2>{image}</div></div>"
    )
    return _page(f"Job {job.id}", body)


def not_found_page(what: str) -> bytes:
    return _page("Not found", f'<p>{_e(what)}</p><p><a href="/">worklist</a></p>')
