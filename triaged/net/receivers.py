"""Receive past one Python process: a pool of receiver processes sharing the node's listening socket.

One Python process stores near 200 images/s whatever the cores (the GIL: ~5 ms of CPU per instance in
pynetdicom and the handler).  With ``listener.processes`` above 1 the node binds the listening socket
itself and starts that many receiver processes (``python -m triaged.receiver``), each running the same
:class:`~triaged.net.scp.Listener` (guards, access rules, TLS, audit) with its own ledger connection and
spool on the same files.  Every process accepts from the one socket the parent bound and keeps: the kernel
hands each connection to one of them (whichever is free first), a port in use fails in the parent
exactly as it does in one process, and connections queued while a receiver restarts wait for another.
One socket shared this way rather than one socket per process with ``SO_REUSEPORT``: with that, any
other program of the same user binding the port with ``SO_REUSEPORT`` would silently get a share of
the connections, and a dying receiver would reset the connections queued on its own socket.

What a receiver tells the parent travels over a pipe (:class:`ChildChannel`, read by one thread per
receiver in the parent): each stored instance's Study Instance UID (the parent's completion timers) and
its log records, which the parent hands to its own loggers, so journald, JSON logging, ``logging.file``
and any handler installed in the parent see them.  Audit rows are written by the receiver itself.
The parent tells the receivers over another pipe: the configuration at start and at each reload, and
stop (drain, then abort, as :meth:`~triaged.net.scp.Listener.stop`).  A receiver dies with its parent:
``PR_SET_PDEATHSIG`` on Linux, and the control pipe's end of file everywhere.

The per-process limits (``max_associations``, ``max_pending_connections``,
``max_associations_per_address``) apply in each receiver: the node accepts up to ``processes`` times as
many (``docs/configuration.md``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from triaged.config import Config, ListenerConfig
from triaged.errors import TriagedError

log = logging.getLogger(__name__)

#: The module a receiver process runs (``python -m``): the composition root of one receiver.
RECEIVER_MODULE = "triaged.receiver"
#: Exit status of a receiver whose parent went away (``EX_TEMPFAIL``, as the analysis worker's).
ORPHANED_EXIT_CODE = 75
#: Seconds a receiver has to import, open the ledger and start serving.
START_TIMEOUT_SECONDS = 90.0
#: A receiver that dies sooner than this after its start is restarted only after this long (no hot loop).
_RESTART_SPACING_SECONDS = 2.0
#: Past the drain, seconds a receiver gets to abort its associations and close before it is killed.
_STOP_GRACE_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def bind_listening_socket(config: ListenerConfig, port: int | None = None) -> socket.socket:
    """Bind and listen as the single-process listener does (``SO_REUSEADDR``, a backlog of 64).

    Raises the same :class:`OSError` as :meth:`~triaged.net.scp.Listener.start` for a port in use.
    """
    host = config.bind_address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, config.port if port is None else port))
        sock.listen(64)  # GuardedAssociationServer.request_queue_size
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class _Child:
    """One receiver process as the parent sees it."""

    slot: int
    proc: subprocess.Popen[bytes]
    control: Connection  # parent → receiver
    events: Connection  # receiver → parent
    started: float = field(default_factory=time.monotonic)
    ready: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None
    active: int = 0  # associations open, as the receiver last said
    lock: threading.Lock = field(default_factory=threading.Lock)
    reader: threading.Thread | None = None

    def send(self, message: tuple[Any, ...]) -> bool:
        """Send ``message`` to the receiver; False: it is gone (its restart gets the current config)."""
        with self.lock:
            try:
                self.control.send(message)
                return True
            except (OSError, ValueError):
                return False


class ReceiverPool:
    """``listener.processes`` receiver processes on one listening socket, supervised by the node.

    Parameters
    ----------
    config
        The node's configuration at start: restart-only settings (AE title, TLS, storage classes, bind
        address and port, storage) stay as they are here for every receiver, restarted ones included.
    on_stored
        Called in the parent with the Study Instance UID of each instance a receiver stored and recorded.
    processes
        How many receivers (default ``config.listener.processes``).
    start_timeout
        Seconds each receiver has to start serving.

    The pool offers what the node uses of :class:`~triaged.net.scp.Listener`: :meth:`start`,
    :attr:`address`, :meth:`reload`, :meth:`stop`.
    """

    def __init__(
        self,
        config: Config,
        on_stored: Callable[[str], None],
        *,
        processes: int | None = None,
        start_timeout: float = START_TIMEOUT_SECONDS,
    ) -> None:
        self._start_config = config
        self._current = config
        self._on_stored = on_stored
        self.processes = processes if processes is not None else config.listener.processes
        self._start_timeout = start_timeout
        self._sock: socket.socket | None = None
        self._children: dict[int, _Child] = {}
        self._children_lock = threading.Lock()
        self._deaths: queue.Queue[tuple[_Child, int] | None] = queue.Queue()
        self._spawn_requests: queue.Queue[int] = queue.Queue()
        self._running = False
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.restarts = 0

    @property
    def config(self) -> ListenerConfig:
        return self._current.listener

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when the config asked for port 0."""
        if self._sock is None:
            return (self._start_config.listener.bind_address, self._start_config.listener.port)
        host, port = self._sock.getsockname()[:2]
        return (str(host), int(port))

    def active_associations(self) -> int:
        """Associations open in all receivers (as each last reported it, within half a second)."""
        with self._children_lock:
            return sum(c.active for c in self._children.values() if c.proc.poll() is None)

    def pids(self) -> list[int]:
        """The receiver processes' PIDs now (slot order)."""
        with self._children_lock:
            return [self._children[s].proc.pid for s in sorted(self._children)]

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, port: int | None = None) -> None:
        """Bind, start every receiver and wait until each serves; raise if one cannot start.

        Raises
        ------
        OSError
            The address cannot be bound (a port in use), as with one process.
        TriagedError
            A receiver did not start (the reason it gave, or its exit status); none is left running.
        """
        cfg = self._start_config.listener
        self._sock = bind_listening_socket(cfg, port)
        self._supervisor = threading.Thread(target=self._supervise, name="triaged-receivers", daemon=True)
        self._supervisor.start()
        for slot in range(self.processes):
            self._spawn_requests.put(slot)
        deadline = time.monotonic() + self._start_timeout
        problem: str | None = None
        for slot in range(self.processes):
            child = self._wait_spawned(slot, deadline)
            if child is None:
                problem = f"receiver process {slot} was not started within {self._start_timeout:.0f} s"
                break
            if not child.ready.wait(max(deadline - time.monotonic(), 0.0)):
                problem = f"receiver process {slot} did not start serving within {self._start_timeout:.0f} s"
                break
            if child.failure is not None:
                problem = f"receiver process {slot} could not start: {child.failure}"
                break
        if problem is not None:
            self._shutdown(0.0)
            raise TriagedError(problem)
        self._running = True
        tls = cfg.tls is not None and cfg.tls.enabled
        log.info(
            "listening as %s on %s:%s%s (%d receiver processes)",
            cfg.ae_title,
            *self.address,
            " (DICOM TLS only)" if tls else "",
            self.processes,
        )

    def _wait_spawned(self, slot: int, deadline: float) -> _Child | None:
        while time.monotonic() < deadline:
            with self._children_lock:
                child = self._children.get(slot)
            if child is not None:
                return child
            time.sleep(0.02)
        return None

    def reload(self, config: Config) -> None:
        """Hand a reloaded configuration to every receiver (and to the ones started from now on).

        What is reloadable in one process is reloadable here (access rules, limits, timeouts, logging
        level); the rest keeps the start configuration until the node restarts.
        """
        self._current = config
        with self._children_lock:
            children = list(self._children.values())
        for child in children:
            child.send(("reload", config))

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting at once, let each receiver drain for ``drain_seconds``, abort the rest, wait."""
        if self._sock is None:
            return
        self._shutdown(drain_seconds)
        log.info("listener stopped")

    def _shutdown(self, drain_seconds: float) -> None:
        self._running = False
        self._stopping.set()
        with self._children_lock:
            children = list(self._children.values())
        for child in children:
            child.send(("stop", drain_seconds))
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # stops accepting in every receiver at once
            except OSError:
                pass
            sock.close()
        deadline = time.monotonic() + drain_seconds + _STOP_GRACE_SECONDS
        for child in children:
            try:
                child.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("receiver process %d (PID %d) did not stop; killed", child.slot, child.proc.pid)
                child.proc.kill()
                child.proc.wait()
        for child in children:
            if child.reader is not None:
                child.reader.join(5.0)
        self._deaths.put(None)
        if self._supervisor is not None:
            self._supervisor.join(10.0)  # it started the receivers: PDEATHSIG follows its end

    # -- supervision (one thread: the receivers' parent-death signal follows the thread that started them)
    def _supervise(self) -> None:
        while True:
            while True:
                try:
                    slot = self._spawn_requests.get_nowait()
                except queue.Empty:
                    break
                self._spawn_or_retry(slot)
            try:
                item = self._deaths.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                return
            child, code = item
            if self._stopping.is_set():
                continue
            if not self._running:
                continue  # still starting: start() reports the failure
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
            why = f" ({child.failure})" if child.failure else ""
            log.warning(
                "receiver process %d (PID %d) exited with %s%s; starting a new one",
                child.slot,
                child.proc.pid,
                how,
                why,
            )
            lived = time.monotonic() - child.started
            if lived < _RESTART_SPACING_SECONDS and self._stopping.wait(_RESTART_SPACING_SECONDS - lived):
                continue
            if not self._stopping.is_set():
                self.restarts += 1
                self._spawn_or_retry(child.slot)

    def _spawn_or_retry(self, slot: int) -> None:
        try:
            child = self._spawn(slot)
        except OSError as exc:
            log.error("cannot start receiver process %d: %s; trying again", slot, exc)
            threading.Timer(_RESTART_SPACING_SECONDS, self._spawn_requests.put, (slot,)).start()
            return
        with self._children_lock:
            self._children[slot] = child

    def _spawn(self, slot: int) -> _Child:
        sock = self._sock
        if sock is None:
            raise OSError("the listening socket is closed")
        control_r, control_w = os.pipe()
        events_r, events_w = os.pipe()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # where ``triaged`` is importable from
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    RECEIVER_MODULE,
                    "--slot",
                    str(slot),
                    "--parent",
                    str(os.getpid()),
                    "--listen-fd",
                    str(sock.fileno()),
                    "--control-fd",
                    str(control_r),
                    "--events-fd",
                    str(events_w),
                ],
                pass_fds=(sock.fileno(), control_r, events_w),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            for fd in (control_r, control_w, events_r, events_w):
                os.close(fd)
            raise
        os.close(control_r)
        os.close(events_w)
        child = _Child(
            slot, proc, Connection(control_w, readable=False), Connection(events_r, writable=False)
        )
        child.send(("start", self._start_config, self._current))
        child.reader = threading.Thread(
            target=self._read, args=(child,), name=f"triaged-receiver-{slot}", daemon=True
        )
        child.reader.start()
        return child

    def _read(self, child: _Child) -> None:
        """Everything one receiver says, until it is gone; then report its death to the supervisor."""
        try:
            while True:
                message = child.events.recv()
                kind = message[0]
                if kind == "stored":
                    self._stored(message[1])
                elif kind == "log":
                    _relay_log(message[1])
                elif kind == "active":
                    child.active = int(message[1])
                elif kind == "ready":
                    child.ready.set()
                elif kind == "failed":
                    child.failure = str(message[1])
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a garbled message: the receiver is killed and restarted
            log.exception("receiver process %d sent something unreadable; killed", child.slot)
            child.proc.kill()
        code = child.proc.wait()
        if not child.ready.is_set():
            child.failure = child.failure or (
                f"exited with status {code}" if code >= 0 else f"killed by signal {-code}"
            )
            child.ready.set()
        for conn in (child.events, child.control):
            try:
                conn.close()
            except OSError:
                pass
        self._deaths.put((child, code))

    def _stored(self, study_uid: str) -> None:
        try:
            self._on_stored(study_uid)
        except Exception:  # noqa: BLE001 - the receiver's next instance must still be heard
            log.exception("the stored-instance event for study %s failed", study_uid)


def _relay_log(fields: dict[str, Any]) -> None:
    """Hand a receiver's log record to the parent's logger of the same name (its levels and handlers)."""
    record = logging.makeLogRecord(fields)
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


# -- the receiver's side ---------------------------------------------------------------------------
class ChildChannel:
    """A receiver process's two pipes to its parent (see the module docstring).

    Parameters
    ----------
    control_fd, events_fd
        The inherited ends of the parent's pipes: what the parent says, what this process tells it.
    parent_pid
        The parent's PID when it started this process: a different ``os.getppid()`` means it is gone.
    """

    def __init__(self, control_fd: int, events_fd: int, parent_pid: int) -> None:
        self._control = Connection(control_fd, writable=False)
        self._events = Connection(events_fd, readable=False)
        self._lock = threading.Lock()
        _die_with_parent(parent_pid)

    def send(self, message: tuple[Any, ...]) -> None:
        """Send ``message`` to the parent; a parent gone ends this process (it must not serve alone)."""
        with self._lock:
            try:
                self._events.send(message)
            except (OSError, ValueError):
                os._exit(ORPHANED_EXIT_CODE)

    def receive(self) -> tuple[Any, ...]:
        """The parent's next message; end of file (the parent is gone) ends this process."""
        try:
            message: tuple[Any, ...] = self._control.recv()
        except (EOFError, OSError):
            os._exit(ORPHANED_EXIT_CODE)
        return message

    def stored(self, study_uid: str) -> None:
        """``StoreService(on_stored=...)``: the parent's completion timer for ``study_uid``."""
        self.send(("stored", study_uid))

    def forward_logs(self, level: str) -> None:
        """Send this process's log records at ``level`` and above (pynetdicom's chatter: warnings) to the parent."""
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(_ForwardingHandler(self))
        self.set_level(level)

    @staticmethod
    def set_level(level: str) -> None:
        """The levels the node's ``configure_logging`` sets, here (records below them are not sent)."""
        logging.getLogger().setLevel(level)
        quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
        for chatty in ("pynetdicom", "alembic"):
            logging.getLogger(chatty).setLevel(quiet)


class _ForwardingHandler(logging.Handler):
    """A log record, made plain (message formatted, exception as text), sent to the parent."""

    def __init__(self, channel: ChildChannel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": record.getMessage(),
                "args": None,
                "created": record.created,
                "msecs": record.msecs,
                "pathname": record.pathname,
                "filename": record.filename,
                "module": record.module,
                "lineno": record.lineno,
                "funcName": record.funcName,
                "process": record.process,
                "processName": f"receiver-{os.getpid()}",
                "thread": record.thread,
                "threadName": record.threadName,
            }
            if record.exc_info:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            elif record.exc_text:
                fields["exc_text"] = record.exc_text
            extra = getattr(record, "audit", None)
            if isinstance(extra, dict):  # triaged.audit's structured fields, as plain JSON values
                fields["audit"] = json.loads(json.dumps(extra, default=str))
            self._channel.send(("log", fields))
        except Exception:  # noqa: BLE001 - logging must never fail the caller
            self.handleError(record)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux), and exit now if it is gone already."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - the control pipe's end of file still ends it
            pass
    if os.getppid() != parent_pid:
        os._exit(ORPHANED_EXIT_CODE)


def _report_active(channel: ChildChannel, listener: Any, interval: float = 0.5) -> None:
    """Tell the parent how many associations are open here whenever it changes (its status and metrics)."""
    last = 0
    while True:
        time.sleep(interval)
        now = int(listener.active_associations())
        if now != last:
            channel.send(("active", now))
            last = now


def serve_receiver(
    channel: ChildChannel,
    listen_socket: socket.socket,
    start: Callable[[Config, Config], tuple[Any, Callable[[Config], None], Callable[[], None]]],
) -> int:
    """The receiver process's life: start from the parent's configuration, serve, reload, stop.

    Parameters
    ----------
    channel
        The pipes to the parent.
    listen_socket
        The parent's listening socket.
    start
        Builds and starts the listener from the start configuration and the configuration in force
        (``triaged.receiver``); returns the listener (with ``stop(drain_seconds)``), what applies a
        reloaded configuration, and what closes the rest (the ledger) after the stop.

    Returns the exit status: 0 after a stop, 1 when it could not start (the reason went to the parent).
    """
    message = channel.receive()
    if message[0] != "start":
        channel.send(("failed", f"expected the start configuration, got {message[0]!r}"))
        return 1
    start_config, current = message[1], message[2]
    # The parent decides when to stop and drains the receivers itself: a terminal's ^C, systemd's SIGTERM
    # to the whole control group or a SIGHUP must not end a receiver in the middle of a store.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    channel.forward_logs(current.logging.level)
    try:
        listener, reload, close = start(start_config, current)
        listener.start(listen_socket=listen_socket)
    except Exception as exc:  # noqa: BLE001 - the parent reports it in one line
        log.debug("receiver cannot start", exc_info=True)
        channel.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    channel.send(("ready", os.getpid()))
    threading.Thread(
        target=_report_active, args=(channel, listener), name="triaged-receiver-active", daemon=True
    ).start()
    while True:
        message = channel.receive()
        if message[0] == "reload":
            channel.set_level(message[1].logging.level)
            try:
                reload(message[1])
            except Exception:  # noqa: BLE001 - a reload never takes a receiver down
                log.exception("receiver could not apply the reloaded configuration")
        elif message[0] == "stop":
            listener.stop(float(message[1]))
            close()
            return 0
