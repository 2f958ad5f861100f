"""Composition root: builds the adapters from a Config and runs the node until SIGTERM.

SIGTERM/SIGINT: stop accepting associations, let in-flight stores finish, stop the scheduler, exit 0.
SIGHUP: re-read the config file; a valid one replaces the running one atomically, an invalid one is
refused with every error logged and the old one stays.  A reload never takes the node down, and one edit
is applied once (SIGHUP and the file watcher skip content already applied).  ``serve`` locks the spool
(:class:`~triaged.spool.SpoolLock`) before touching any state, so a second node on the same state exits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from triaged import __version__
from triaged.analysis.registry import load_registry
from triaged.audit import audit
from triaged.config import Config, LoggingConfig, parse_config
from triaged.config.ledger_url import LedgerURL
from triaged.config.load import read_config_text
from triaged.domain import RESEARCH_NOTE, JobState
from triaged.errors import ConfigError, StorageError
from triaged.ledger import Ledger
from triaged.metrics import NodeMetrics
from triaged.net.receivers import ReceiverPool
from triaged.net.scp import Listener, StoreService
from triaged.net.worklist import WorklistFind, WorklistHTTP
from triaged.observe import NodeView
from triaged.scheduler import build_scheduler, reschedule
from triaged.spool import Spool, SpoolLock
from triaged.stages import Analysis, Completion, CompletionTimers, Dispatch, Recovery, Retention, Worklist
from triaged.stages.complete import shortest_delay
from triaged.worker import WorkerPool, WorkerSettings
from triaged.worker.queue import ClaimQueue

log = logging.getLogger(__name__)

#: Added to a study's completion delay for its timer (:meth:`Node._completion_delay`).
_TIMER_SLACK_SECONDS = 0.05


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        fields = getattr(record, "audit", None)  # triaged.audit: the event's fields as keys of the line
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # a receiver process's record: its traceback comes as text
            out["exception"] = record.exc_text
        return json.dumps(out, default=str)


def configure_logging(cfg: LoggingConfig) -> None:
    """Route logs to stderr (journald under systemd) and optionally a file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if cfg.file is not None:  # opened before the old handlers go: a bad path leaves logging as it was
        cfg.file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(cfg.file))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt: logging.Formatter = (
        _JsonFormatter() if cfg.format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    for h in handlers:
        h.setFormatter(fmt)
        h.setLevel(cfg.level)  # the output honours logging.level here, on the handlers...
        root.addHandler(h)
    root.setLevel(cfg.level)
    # ...while the audit events (INFO) are always emitted: /metrics counts them (triaged.metrics).
    logging.getLogger("triaged.audit").setLevel(min(logging.INFO, logging.getLevelNamesMapping()[cfg.level]))
    # pynetdicom logs every PDU at INFO; keep its chatter to warnings unless debugging.
    quiet = logging.DEBUG if cfg.level == "DEBUG" else logging.WARNING
    for chatty in ("pynetdicom", "alembic", "apscheduler.executors", "apscheduler.scheduler"):
        logging.getLogger(chatty).setLevel(quiet)


def pipeline_problems(
    config: Config, source: Path | None = None, text: str | None = None
) -> list[tuple[str, str]]:
    """Pipeline names in the config that the configured registry does not know (with file lines).

    ``text`` is the content ``config`` was parsed from (default: ``source`` is read again).
    """
    from triaged.config import validate_pipelines

    try:
        registry = load_registry(config.analysis.registry)
    except Exception as exc:  # noqa: BLE001 - a broken plug-in path is a config error
        return [("analysis.registry", f"cannot load {config.analysis.registry}: {exc}")]
    if text is None and source is not None and source.exists():
        try:
            text = read_config_text(source)
        except ConfigError:
            text = None  # the problems are then listed without their lines
    return validate_pipelines(
        config, registry, source=str(source or ""), text=text, listed=registry.pipeline_names()
    )


class Node:
    """One running triaged node.

    Parameters
    ----------
    config : Config
        The validated configuration.
    config_path : Path or None
        Where SIGHUP re-reads the configuration from.
    config_text : str or None
        The text ``config`` was parsed from: a reload of the same text is skipped.
    """

    def __init__(
        self, config: Config, config_path: Path | None = None, config_text: str | None = None
    ) -> None:
        self.config_path = config_path
        self._config = config
        # sha256 of the text the running config came from, and of the last text a reload tried
        self._applied_digest = _digest(config_text) if config_text is not None else None
        self._tried_digest = self._applied_digest
        self._stop = threading.Event()
        #: This node's name and roles (``node:``, restart-only); ``shared``: other nodes may use the ledger.
        self.name = config.node.name
        self.roles = frozenset(config.node.roles)
        self.shared = shared_ledger(config)
        self.ledger = Ledger(config.storage.ledger)
        self.spool = Spool(
            config.storage.spool,
            config.storage.min_free_mb,
            clean_partial=not self.shared,  # a shared spool's partial writes may be another node's, in progress
            quarantine_max_mb=config.storage.quarantine_max_mb,
        )
        current = self._current_config
        # Event-driven hand-offs: encoded results are sent at once, a queued job is offered to the workers
        # at once, each study completes at its own deadline; the scheduler's ticks are the safety net.
        self.dispatch = Dispatch(self.ledger, self.spool, current, send_at_once="dispatch" in self.roles,
                                 node=self.name, lease_seconds=config.node.lease_seconds)
        self.analysis = Analysis(self.ledger, self.spool, current, self.dispatch,
                                 on_queued=lambda _job_id: self.offer_queued(), node=self.name)
        self.completion = Completion(self.ledger, self.spool, current, self.analysis)
        self.timers = CompletionTimers(self.completion.complete_study, self._completion_delay)
        self.recovery = Recovery(self.ledger, self.spool, current, self.analysis)
        self.worklist = Worklist(self.ledger, self.spool, current)
        self.retention = Retention(self.ledger, self.spool, current)
        # Without the complete role the study's deadline lives in the ledger (its last instance's time): the
        # leader's sweep completes it.
        on_stored = self.timers.note if "complete" in self.roles else _not_timed
        self.service = StoreService(self.spool, self.ledger, config.listener, on_stored=on_stored)
        find = (
            WorklistFind(self.worklist.rows, self.worklist.study_header, recorder=self.ledger)
            if config.worklist.c_find else None
        )
        # listener.processes > 1: receiver processes on one listening socket (the parent's timers, logs)
        self.listener: Listener | ReceiverPool = (
            ReceiverPool(config, on_stored) if config.listener.processes > 1
            else Listener(config.listener, self.service, find)
        )
        self.http: WorklistHTTP | None = None
        # The dashboard's and /metrics' read-only view of the node (issue 15), served by the same HTTP port.
        self.view = NodeView(self.ledger, self.spool, self.worklist.rows, self.worklist.study_header,
                             self.listener, current)
        self.metrics = NodeMetrics(self.view, datetime.now(UTC))
        if config.worklist.http_port:
            self.http = WorklistHTTP(
                self.worklist.rows, config.worklist.http_bind_address, config.worklist.http_port,
                timeout=config.worklist.http_timeout_seconds, recorder=self.ledger,
                headers=self.worklist.study_header, patient_data=config.worklist.http_patient_data,
                dashboard=self.view, metrics=self.metrics.exposition,
            )
        # The workers claim their jobs from the ledger (most urgent first, aging), as every node's do.
        self.queue = ClaimQueue(self.analysis.claim_task)
        self.workers = WorkerPool(
            self.queue, self.analysis.owns, self.analysis.finish_analysis,
            still_wanted=self.analysis.analysis_wanted, on_encoding=self.analysis.start_encoding,
            workers=config.analysis.workers, settings=worker_settings(config),
            timeout=config.analysis.timeout_seconds, memory_limit_mb=config.analysis.memory_limit_mb,
        )
        dispatching = "dispatch" in self.roles
        self.scheduler = build_scheduler(
            self.completion.complete_quiet_studies, config.completion.sweep_interval_seconds,
            submit=self.offer_queued if "analyse" in self.roles else None,
            dispatch=self.dispatch.start_due if dispatching else None,
            dispatch_interval_seconds=config.dispatch.interval_seconds,
            stop_dispatch=self.dispatch.stop,
            retention=self.retention.run_scheduled,
            retention_interval_seconds=config.retention.interval_minutes * 60,
            leader=self.is_leader, heartbeat=self.heartbeat,
            heartbeat_interval_seconds=config.node.heartbeat_seconds, reclaim=self.reclaim_expired,
        )

    def _current_config(self) -> Config:
        return self._config

    def _completion_delay(self) -> float:
        """Seconds from a stored instance to its study's completion timer: the shortest route delay, plus
        a little, so the ledger's clock (the instance's arrival) agrees that the study is quiet."""
        return shortest_delay(self._config) + _TIMER_SLACK_SECONDS

    def offer_queued(self) -> int:
        """Tell the workers a job may be QUEUED (at once, and every tick): an idle one claims it now.

        Returns 0: the jobs wait in the ledger, not in memory (:class:`~triaged.worker.queue.ClaimQueue`).
        """
        queue = getattr(self, "queue", None)  # a job queued during construction waits for the start
        if queue is not None and "analyse" in self.roles:
            queue.nudge()
        return 0

    def is_leader(self) -> bool:
        """Whether this node runs the singletons now (completion sweep, retention, lease recovery).

        Only a node with the ``complete`` role may lead; on a SQLite ledger it always does, on PostgreSQL
        the node holding the ledger's leader lock (:meth:`~triaged.ledger.Ledger.is_leader`).
        """
        return "complete" in self.roles and self.ledger.is_leader()

    def heartbeat(self) -> int:
        """Record that this node is alive and extend its leases; returns how many leases were extended."""
        return self.ledger.heartbeat(self.name, self._config.node.lease_seconds)

    def reclaim_expired(self) -> tuple[list[int], int]:
        """The leader's duty: take back the jobs and outbox rows of nodes whose leases ran out."""
        return self.ledger.reclaim_expired(self.name)

    @property
    def config(self) -> Config:
        return self._config

    def start(self) -> None:
        """Recover from the last stop, then listen and sweep."""
        log.info("triaged: %s", RESEARCH_NOTE)
        log.info("node %s: roles %s; ledger %s", self.name, ", ".join(sorted(self.roles)),
                 "shared with other nodes" if self.shared else "of this node only")
        self.ledger.register_node(self.name, self._config.node.roles, version=__version__,
                                  lease_seconds=self._config.node.lease_seconds)
        self.recovery.reconcile_spool()
        self.recovery.resume_interrupted(self.name, shared=self.shared)
        if "analyse" in self.roles:
            self.workers.start()  # warm before the first study: the processes import and load now
        if "complete" in self.roles:
            self.timers.start()
            for job in self.ledger.jobs(states=[JobState.RECEIVING], limit=100000):
                self.timers.note(job.study_instance_uid)  # received before the stop: a deadline from now
        self.metrics.attach()  # before the listener: its first audit events are counted
        if "receive" in self.roles:
            self.listener.start()
        if self.http is not None:
            self.http.start()
        self.scheduler.start()
        host, port = self.listener.address
        audit(
            "node.started",
            f"node started: triaged {__version__} as {self._config.listener.ae_title} on {host}:{port}",
            actor="node", recorder=self.ledger, version=__version__, config_sha256=self._applied_digest,
            config_file=str(self.config_path) if self.config_path else None, pid=os.getpid(),
            ae_title=self._config.listener.ae_title, listening=f"{host}:{port}" if "receive" in self.roles else None,
            node=self.name, roles=sorted(self.roles),
        )

    def reload(self, *, from_signal: bool = True) -> bool:
        """Re-read the config file; swap only a valid config.  Returns whether a new config was applied.

        Never raises: whatever goes wrong reading, validating or applying the file (unreadable, not
        UTF-8, a broken plug-in registry, an unwritable log file) is logged and the running config stays.
        One edit is applied once: the file watcher (``from_signal=False``) skips text it has already
        tried, and SIGHUP for the text already applied only reopens the log files (for log rotation).
        """
        if self.config_path is None:
            return False
        path = self.config_path
        digest: str | None = None
        try:
            text = read_config_text(path)
            digest = _digest(text)
            if digest == (self._applied_digest if from_signal else self._tried_digest):
                if from_signal:
                    configure_logging(self._config.logging)
                    log.info(
                        "config file %s unchanged since it was applied: nothing to reload (logs reopened)",
                        path,
                    )
                return False
            self._tried_digest = digest
            new = parse_config(text, str(path), base_dir=path.resolve().parent)
            problems = pipeline_problems(new, path, text)
        except ConfigError as exc:
            problems = exc.problems
        except Exception as exc:  # noqa: BLE001 - a reload must never take the running node down
            problems = [(str(path), f"cannot reload: {type(exc).__name__}: {exc}")]
        if problems:
            for where, msg in problems:
                log.error("config reload refused, keeping the running config: %s: %s", where, msg)
            self._audit_refused(path, digest, [f"{where}: {msg}" for where, msg in problems], from_signal)
            return False
        restart_needed = [
            name for name, old, cur in (
                ("listener.ae_title", self._config.listener.ae_title, new.listener.ae_title),
                ("listener.port", self._config.listener.port, new.listener.port),
                ("listener.bind_address", self._config.listener.bind_address, new.listener.bind_address),
                ("listener.tls", self._config.listener.tls, new.listener.tls),
                ("listener.processes", self._config.listener.processes, new.listener.processes),
                ("listener.extra_storage_sop_classes", self._config.listener.extra_storage_sop_classes,
                 new.listener.extra_storage_sop_classes),
                ("storage", self._config.storage, new.storage),
                ("node", self._config.node, new.node),
            ) if old != cur
        ]
        for name in restart_needed:
            log.warning("config reload: %s changed; it takes effect at the next restart", name)
        try:
            configure_logging(new.logging)  # first: if the new log file cannot be opened nothing has changed
        except Exception as exc:  # noqa: BLE001 - a reload must never take the running node down
            log.error("config reload refused, keeping the running config: %s: logging: %s", path, exc)
            self._audit_refused(path, digest, [f"{path}: logging: {exc}"], from_signal)
            return False
        old_minutes = self._config.retention.interval_minutes
        self._config = new
        self._applied_digest = digest
        self.service.reload(new.listener)
        if isinstance(self.listener, ReceiverPool):
            self.listener.reload(new)
        if worker_settings(new) != self.workers.settings:
            log.info("config reload: analysis settings changed; the worker restarts between jobs")
            self.workers.reconfigure(worker_settings(new))
        reschedule(
            self.scheduler, new.completion.sweep_interval_seconds, new.dispatch.interval_seconds,
            new.retention.interval_minutes * 60 if new.retention.interval_minutes != old_minutes else None,
        )
        audit(  # the one log line of a reload (on triaged.audit), and its row
            "config.reloaded",
            f"configuration reloaded from {path} (sha256 {(digest or '')[:12]})",
            actor="node", recorder=self.ledger, config_file=str(path), config_sha256=digest,
            trigger="SIGHUP" if from_signal else "file watcher", restart_needed=restart_needed,
        )
        return True

    def _audit_refused(self, path: Path, digest: str | None, errors: list[str], from_signal: bool) -> None:
        audit(
            "config.refused",
            f"config reload from {path} refused, the running config stays: {len(errors)} error(s)",
            actor="node", recorder=self.ledger, level=logging.ERROR, config_file=str(path),
            config_sha256=digest, trigger="SIGHUP" if from_signal else "file watcher", errors=errors,
        )

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting, drain in-flight associations, stop the scheduler, close the ledger."""
        self._stop.set()
        if "receive" in self.roles:
            self.listener.stop(drain_seconds)
        if self.http is not None:
            self.http.stop()
        self.metrics.detach()
        self.timers.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.workers.stop()
        self._give_back()
        audit(
            "node.stopped",
            f"node stopped: triaged {__version__}",
            actor="node", recorder=self.ledger, version=__version__, config_sha256=self._applied_digest,
            pid=os.getpid(),
        )
        self.ledger.close()
        log.info("stopped")

    def _give_back(self) -> None:
        """At a stop: jobs this node held go back to QUEUED (another node of a shared ledger takes them now,
        this one at its next start), and the node is recorded as stopped."""
        try:
            if self.shared:
                self.ledger.release_jobs(self.name, reason=f"interrupted by a stop of node {self.name}")
            self.ledger.node_stopped(self.name)
        except StorageError as exc:
            log.warning("node %s: could not give its jobs back at the stop (its leases expire instead): %s",
                        self.name, exc)

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()


def shared_ledger(config: Config) -> bool:
    """Whether other nodes may share this config's ledger and spool: a PostgreSQL ledger."""
    return isinstance(config.storage.ledger, LedgerURL)


def _not_timed(study_uid: str) -> None:
    """``on_stored`` of a node without the ``complete`` role: the leader's sweep completes the study."""


def worker_settings(config: Config) -> WorkerSettings:
    """What the analysis worker processes are started with (a change restarts them between jobs)."""
    a = config.analysis
    return WorkerSettings(threads=a.threads, registry=a.registry, device=a.device, nice=a.worker_nice)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What the file watcher compares: modification time, size and inode (an editor's rename changes it)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def serve(config_path: Path) -> int:
    """Run the node in the foreground until SIGTERM/SIGINT; returns the exit status.

    1 without touching anything when another node holds the spool's lock.
    """
    os.umask(0o027)  # like the unit's UMask=: ledger, spool and work files never world-readable
    # the file's state *before* it is read: an edit made while the node starts is then seen and applied
    seen = _stamp(config_path)
    text = read_config_text(config_path)
    config = parse_config(text, str(config_path), base_dir=config_path.resolve().parent)
    # Before anything touches the spool or the ledger (partial writes, reconcile, resumed jobs).
    try:
        state_lock = SpoolLock(config.storage.spool, shared=shared_ledger(config))
    except StorageError as exc:
        print(f"triaged serve: {exc}", file=sys.stderr)
        return 1
    problems = pipeline_problems(config, config_path, text)
    if problems:
        raise ConfigError(str(config_path), problems)
    configure_logging(config.logging)
    node = Node(config, config_path, text)
    reload_requested = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping (in-flight stores finish first)", signal.Signals(signum).name)
        node.request_stop()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        reload_requested.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    node.start()
    # Signal handlers only set flags; the work happens here, outside the handler.
    pending: tuple[int, int, int] | None = None  # a change seen once, applied once it stays put for a poll
    while not node.stop_requested:
        if reload_requested.wait(0.5):
            reload_requested.clear()
            seen, pending = _stamp(config_path), None  # before the read: a later edit is seen by the watcher
            node.reload()
        elif node.config.reload_on_change:
            stamp = _stamp(config_path)
            if stamp == seen or stamp != pending:
                # unchanged, or still changing: an editor half-way through writing is not read
                pending = None if stamp == seen else stamp
                continue
            seen, pending = stamp, None
            log.info("%s changed on disk", config_path)
            node.reload(from_signal=False)
    node.stop()
    state_lock.release()
    return 0
