"""Composition root: builds the adapters from a Config and runs the node until SIGTERM.

SIGTERM/SIGINT: stop accepting associations, let in-flight stores finish, stop the scheduler, exit 0.
SIGHUP: re-read the config file; a valid one replaces the running one atomically, an invalid one is
refused with every error logged and the old one stays.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from triaged.analysis.registry import load_registry
from triaged.config import Config, LoggingConfig, load_config
from triaged.domain import RESEARCH_NOTE
from triaged.errors import ConfigError
from triaged.ledger import Ledger
from triaged.net.scp import Listener, StoreService
from triaged.net.worklist import WorklistFind, WorklistHTTP
from triaged.scheduler import build_scheduler, reschedule
from triaged.spool import Spool
from triaged.stages import Analysis, Completion, Dispatch, Recovery, Worklist
from triaged.worker import TaskQueue, WorkerPool

log = logging.getLogger(__name__)



class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(cfg: LoggingConfig) -> None:
    """Route logs to stderr (journald under systemd) and optionally a file."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if cfg.file is not None:
        cfg.file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(cfg.file))
    fmt: logging.Formatter = (
        _JsonFormatter() if cfg.format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(cfg.level)
    # pynetdicom logs every PDU at INFO; keep its chatter to warnings unless debugging.
    quiet = logging.DEBUG if cfg.level == "DEBUG" else logging.WARNING
    for chatty in ("pynetdicom", "alembic", "apscheduler.executors", "apscheduler.scheduler"):
        logging.getLogger(chatty).setLevel(quiet)


def pipeline_problems(config: Config, source: Path | None = None) -> list[tuple[str, str]]:
    """Pipeline names in the config that the configured registry does not know (with file lines)."""
    from triaged.config import validate_pipelines

    try:
        registry = load_registry(config.analysis.registry)
    except Exception as exc:  # noqa: BLE001 - a broken plug-in path is a config error
        return [("analysis.registry", f"cannot load {config.analysis.registry}: {exc}")]
    text = source.read_text(encoding="utf-8") if source is not None and source.exists() else None
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
    """

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config_path = config_path
        self._config = config
        self._stop = threading.Event()
        self.ledger = Ledger(config.storage.ledger)
        self.spool = Spool(config.storage.spool, config.storage.min_free_mb, clean_partial=True)
        current = self._current_config
        self.dispatch = Dispatch(self.ledger, self.spool, current)
        self.analysis = Analysis(self.ledger, self.spool, current, self.dispatch)
        self.completion = Completion(self.ledger, self.spool, current, self.analysis)
        self.recovery = Recovery(self.ledger, self.spool, current, self.analysis)
        self.worklist = Worklist(self.ledger, self.spool, current)
        self.service = StoreService(self.spool, self.ledger, config.listener)
        find = WorklistFind(self.worklist.rows, self.worklist.study_header) if config.worklist.c_find else None
        self.listener = Listener(config.listener, self.service, find)
        self.http: WorklistHTTP | None = None
        if config.worklist.http_port:
            self.http = WorklistHTTP(self.worklist.rows, config.worklist.http_bind_address, config.worklist.http_port)
        self.queue = TaskQueue(config.analysis.aging_seconds)
        self.workers = WorkerPool(
            self.queue, self.analysis.start_analysis, self.analysis.finish_analysis,
            still_wanted=self.analysis.analysis_wanted, on_encoding=self.analysis.start_encoding,
            workers=config.analysis.workers, threads=config.analysis.threads,
            timeout=config.analysis.timeout_seconds, memory_limit_mb=config.analysis.memory_limit_mb,
        )
        self.scheduler = build_scheduler(
            self.completion.complete_quiet_studies, config.completion.sweep_interval_seconds,
            submit=lambda: self.analysis.submit_queued(self.queue, self.workers.running()),
            dispatch=self.dispatch.dispatch_due, dispatch_interval_seconds=config.dispatch.interval_seconds,
        )

    def _current_config(self) -> Config:
        return self._config

    @property
    def config(self) -> Config:
        return self._config

    def start(self) -> None:
        """Recover from the last stop, then listen and sweep."""
        log.info("triaged: %s", RESEARCH_NOTE)
        self.recovery.reconcile_spool()
        self.recovery.resume_interrupted()
        self.listener.start()
        if self.http is not None:
            self.http.start()
        self.workers.start()
        self.scheduler.start()

    def reload(self) -> bool:
        """Re-read the config file; swap only a valid config.  Returns whether it was applied."""
        if self.config_path is None:
            return False
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            for where, msg in exc.problems:
                log.error("config reload refused, keeping the running config: %s: %s", where, msg)
            return False
        problems = pipeline_problems(new, self.config_path)
        if problems:
            for where, msg in problems:
                log.error("config reload refused, keeping the running config: %s: %s", where, msg)
            return False
        restart_needed = [
            name for name, old, cur in (
                ("listener.ae_title", self._config.listener.ae_title, new.listener.ae_title),
                ("listener.port", self._config.listener.port, new.listener.port),
                ("listener.bind_address", self._config.listener.bind_address, new.listener.bind_address),
                ("listener.extra_storage_sop_classes", self._config.listener.extra_storage_sop_classes,
                 new.listener.extra_storage_sop_classes),
                ("storage", self._config.storage, new.storage),
            ) if old != cur
        ]
        for name in restart_needed:
            log.warning("config reload: %s changed; it takes effect at the next restart", name)
        self._config = new
        self.service.reload(new.listener)
        reschedule(self.scheduler, new.completion.sweep_interval_seconds, new.dispatch.interval_seconds)
        configure_logging(new.logging)
        log.info("configuration reloaded from %s", self.config_path)
        return True

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting, drain in-flight associations, stop the scheduler, close the ledger."""
        self._stop.set()
        self.listener.stop(drain_seconds)
        if self.http is not None:
            self.http.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.workers.stop()
        self.ledger.close()
        log.info("stopped")

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def serve(config_path: Path) -> int:
    """Run the node in the foreground until SIGTERM/SIGINT; returns the exit status."""
    # the file's state *before* it is read: an edit made while the node starts is then seen and applied
    seen = _mtime(config_path)
    config = load_config(config_path)
    problems = pipeline_problems(config, config_path)
    if problems:
        raise ConfigError(str(config_path), problems)
    configure_logging(config.logging)
    node = Node(config, config_path)
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
    while not node.stop_requested:
        if reload_requested.wait(0.5):
            reload_requested.clear()
            node.reload()
            seen = _mtime(config_path)
        elif node.config.reload_on_change and _mtime(config_path) != seen:
            seen = _mtime(config_path)
            log.info("%s changed on disk", config_path)
            node.reload()
    node.stop()
    return 0
