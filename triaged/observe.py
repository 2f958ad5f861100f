"""What the dashboard and ``/metrics`` read of a running node, at request time: ledger, spool, listener.

Read-only: nothing here writes to the ledger or the spool.  The overview image of a job is the
secondary capture it encoded (``work/<job>/outputs/sc-*.dcm``), rendered to PNG on request and kept in a
small in-memory cache (the SC of a job never changes: a re-analysis is a new job).
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset

from triaged import __version__
from triaged.config import Config
from triaged.domain import JobRow, OutboxEntry, OutboxState, WorklistRow
from triaged.errors import TriagedError
from triaged.ledger import Ledger
from triaged.ledger.claims import LEADER_APPLICATION, NodeRow
from triaged.net.dashboard import ClusterNode, NodeStatus
from triaged.spool import Spool

log = logging.getLogger(__name__)

#: Overview PNGs kept in memory (a few hundred KiB each).
OVERVIEW_CACHE = 16
#: Jobs looked at for the pipeline column of the front page (newest first).
PIPELINE_LOOKUP_JOBS = 5000


def cluster_nodes(
    ledger: Ledger,
    *,
    lease_seconds: float,
    this_node: str | None = None,
    now: datetime | None = None,
) -> list[ClusterNode]:
    """Every node of ``ledger`` with its condition, leadership and what it holds, read now.

    A node is ``stopped`` after a clean stop, ``lost`` when its last heartbeat is older than
    ``lease_seconds`` (its leases ran out: another node takes its work back), else ``alive``.  The leader
    is the node holding the ledger's leader lock (PostgreSQL); on SQLite the one live node with the
    ``complete`` role.
    """
    now = now or datetime.now(UTC)
    rows = ledger.nodes()
    leader = ledger.leader()

    def leads(row: NodeRow, condition: str) -> bool | None:
        if leader is not None:
            return (LEADER_APPLICATION + row.name)[:63] == LEADER_APPLICATION + leader
        if condition != "alive":
            return False
        if ledger.path is None:  # PostgreSQL
            return False  # nobody holds the leader's lock now (between one leader and the next)
        return "complete" in row.roles

    nodes = []
    for row in rows:
        age = max(0.0, (now - row.heartbeat_at).total_seconds())
        if row.stopped_at is not None:
            condition = "stopped"
        elif row.alive(now, lease_seconds):
            condition = "alive"
        else:
            condition = "lost"
        nodes.append(
            ClusterNode(
                name=row.name,
                roles=row.roles,
                host=row.host,
                pid=row.pid,
                version=row.version,
                heartbeat_at=row.heartbeat_at,
                heartbeat_age_seconds=age,
                condition=condition,
                leader=leads(row, condition),
                jobs=row.jobs,
                outbox_rows=row.outbox_rows,
                this_node=row.name == this_node,
            )
        )
    return nodes


class ListenerLike(Protocol):
    """The listener as the view sees it (:class:`triaged.net.scp.Listener`)."""

    @property
    def address(self) -> tuple[str, int]: ...

    def active_associations(self) -> int: ...


class NodeView:
    """The node's state for readers (:class:`triaged.net.dashboard.DashboardSource`, the metrics)."""

    def __init__(
        self,
        ledger: Ledger,
        spool: Spool,
        rows: Callable[[], list[WorklistRow]],
        headers: Callable[[str], Dataset | None],
        listener: ListenerLike,
        config: Callable[[], Config],
    ) -> None:
        self.ledger = ledger
        self.spool = spool
        self._rows = rows
        self._headers = headers
        self._listener = listener
        self._config = config
        self._lock = threading.Lock()
        self._overviews: OrderedDict[int, bytes | None] = OrderedDict()

    def rows(self) -> list[WorklistRow]:
        return self._rows()

    def study_header(self, study_uid: str) -> Dataset | None:
        return self._headers(study_uid)

    def job(self, job_id: int) -> JobRow | None:
        try:
            return self.ledger.job(job_id)
        except TriagedError:
            return None

    def pipelines(self) -> dict[int, str]:
        return {j.id: j.pipeline or "" for j in self.ledger.jobs(limit=PIPELINE_LOOKUP_JOBS)}

    def outbox(self, *, job_id: int | None = None, unsent_only: bool = False) -> list[OutboxEntry]:
        """Outbox items, each with its destination's configured type (how its status reads)."""
        states = [OutboxState.PENDING, OutboxState.DEAD] if unsent_only else None
        types = {name: dest.type for name, dest in self._config().destinations.items()}
        return [
            replace(e, destination_type=types.get(e.destination, ""))
            for e in self.ledger.outbox(job_id=job_id, states=states, limit=100000)
        ]

    def status(self) -> NodeStatus:
        cfg = self._config()
        host, port = self._listener.address
        try:
            free: int | None = self.spool.free_bytes()
        except OSError:
            free = None
        return NodeStatus(
            ae_title=cfg.listener.ae_title,
            host=host,
            port=port,
            tls=cfg.listener.tls is not None,
            active_associations=self._listener.active_associations(),
            spool_free_bytes=free,
            min_free_mb=cfg.storage.min_free_mb,
            jobs_per_state={str(s): n for s, n in self.ledger.queue_depth().items()},
            version=__version__,
        )

    def nodes(self) -> list[ClusterNode]:
        """Every node of the ledger (:func:`cluster_nodes`), this one marked."""
        cfg = self._config()
        return cluster_nodes(self.ledger, lease_seconds=cfg.node.lease_seconds, this_node=cfg.node.name)

    def overview_png(self, job_id: int) -> bytes | None:
        """The job's secondary capture as PNG, or None when it encoded none (or retention deleted it)."""
        with self._lock:
            if job_id in self._overviews:
                self._overviews.move_to_end(job_id)
                png = self._overviews[job_id]
                if png is not None:
                    return png
        png = self._render_overview(job_id)
        with self._lock:
            self._overviews[job_id] = png
            while len(self._overviews) > OVERVIEW_CACHE:
                self._overviews.popitem(last=False)
        return png

    def _render_overview(self, job_id: int) -> bytes | None:
        from PIL import Image

        paths = sorted({e.path for e in self.ledger.outbox(job_id=job_id, limit=1000) if e.kind == "sc"})
        for rel in paths:
            path = self.spool.absolute(rel)
            if not path.is_file():
                continue
            try:
                ds = dcmread(path)
                pixels = ds.pixel_array
                if pixels.ndim == 4:  # a multi-frame SC: its first frame
                    pixels = pixels[0]
                image = Image.fromarray(pixels)
                if image.mode not in ("RGB", "L"):
                    image = image.convert("RGB")
                out = io.BytesIO()
                image.save(out, format="PNG")
                return out.getvalue()
            except Exception as exc:  # noqa: BLE001 - a broken file is no image, not a failed page
                log.warning("job %s: cannot render the overview %s: %s", job_id, rel, exc)
        return None
