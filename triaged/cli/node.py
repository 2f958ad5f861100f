"""Node commands: ``serve``, ``check-config`` and ``status``."""

from __future__ import annotations

import argparse
import errno
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from triaged.cli._common import (
    DEFAULT_CONFIG,
    AddParser,
    Subparsers,
    _ledger,
    _load,
    pipeline_problem,
    with_config,
)
from triaged.config import Config, load_config
from triaged.domain import OutboxState
from triaged.errors import ConfigError, TriagedError

if TYPE_CHECKING:
    from triaged.net.dashboard import ClusterNode

#: Dead letters (and retrying items) ``triaged status`` shows, the most recent ones.
DEAD_LETTERS_SHOWN = 5


def _raw_pipeline_problems(path: Path) -> list[tuple[str, str]]:
    """Unknown pipelines in a file that failed the schema (its raw YAML), so they are listed in the same pass."""
    import yaml

    from triaged.analysis.registry import load_registry
    from triaged.config import validate_pipelines
    from triaged.config.load import read_config_text

    try:
        text = read_config_text(path)
        data = yaml.safe_load(text)
    except (ConfigError, yaml.YAMLError):
        return []  # already reported
    if not isinstance(data, dict):
        return []
    analysis = data.get("analysis")
    spec = analysis.get("registry") if isinstance(analysis, dict) else None
    try:
        registry = load_registry(spec if isinstance(spec, str) else Config().analysis.registry)
    except Exception:  # noqa: BLE001 - a broken registry setting is reported by the schema or at start
        return []
    return validate_pipelines(data, registry, source=str(path), text=text, listed=registry.pipeline_names())


def _weights_problems(config: Config) -> list[tuple[str, str]]:
    """Pipelines the config uses whose weights are missing or corrupt (each message names the file)."""
    from triaged.analysis.registry import load_registry

    try:
        registry = load_registry(config.analysis.registry)
    except Exception:  # noqa: BLE001 - reported by pipeline_problems
        return []
    used = {config.analysis.default_pipeline, *(config.routing.default.pipelines or ())}
    used.update(n for rule in config.routing.rules for n in rule.action.pipelines or ())
    problems = []
    for name in sorted(n for n in used if n in registry):
        problem = pipeline_problem(registry.get(name))
        if problem is not None:
            problems.append((f"pipeline {name}", problem))
    return problems


def _line_of(where: str, source: str) -> int:
    """The line number in a problem's ``"<source>:<line>: <path>"`` (problems without one sort last)."""
    number = where.removeprefix(f"{source}:").partition(":")[0]
    return int(number) if number.isdigit() else sys.maxsize


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        # schema and cross-reference errors together: the unknown pipelines too, from the raw YAML
        extra = [p for p in _raw_pipeline_problems(args.config) if p not in exc.problems]
        source = exc.source
        problems = sorted([*exc.problems, *extra], key=lambda p: _line_of(p[0], source))
        print(str(ConfigError(source, problems)), file=sys.stderr)
        return 2
    from triaged.daemon import pipeline_problems

    problems = pipeline_problems(config, args.config) or _weights_problems(config)
    if problems:
        print(str(ConfigError(str(args.config), problems)), file=sys.stderr)
        return 2
    unreachable = _ledger_server_problem(config)
    if unreachable:
        print(f"{args.config}: storage.ledger: {unreachable}", file=sys.stderr)
        return 1
    lst = config.listener
    print(
        f"{args.config}: valid. Listener {lst.ae_title} on {lst.bind_address}:{lst.port}; "
        f"{len(config.destinations)} destination(s); completion after {config.completion.delay_seconds:g} s."
    )
    return 0


def _ledger_server_problem(config: Config) -> str | None:
    """Why a PostgreSQL ledger (``storage.ledger`` as a URL) cannot be opened, or None (also for SQLite).

    Only connects (``SELECT 1``, 10 s at most): the schema is migrated by ``serve``, not here.  The
    message names host, port and database and never the password.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    from triaged.config.ledger_url import LedgerURL

    ledger = config.storage.ledger
    if not isinstance(ledger, LedgerURL):
        return None
    engine = create_engine(ledger.url, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return ledger.mask(f"cannot reach the PostgreSQL ledger at {ledger.server}: {reason}")
    finally:
        engine.dispose()
    return None


def listening_ports(config: Config) -> list[tuple[str, str, int]]:
    """``(setting, address, port)`` of every port the node listens on."""
    ports = [("listener.port", config.listener.bind_address, config.listener.port)]
    if config.worklist.http_port:
        ports.append(("worklist.http_port", config.worklist.http_bind_address, config.worklist.http_port))
    return ports


def port_problems(config: Config, source: Path) -> list[str]:
    """One line for each port the node could not listen on (in use, not allowed), naming its setting.

    Each port is bound once, with ``SO_REUSEADDR`` like the node's own sockets, and closed at once.
    """
    problems = []
    for setting, host, port in listening_ports(config):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                why = (
                    "is already in use (another node or program listens on it)"
                    if exc.errno == errno.EADDRINUSE
                    else f"cannot be listened on ({exc.strerror or exc})"
                )
                problems.append(
                    f"triaged serve: port {port} on {host} {why}: stop that program or change "
                    f"{setting} in {source}"
                )
    return problems


def _spool_locked(config: Config) -> bool:
    """Whether another node holds the spool's lock (then ``serve`` says so itself, naming its PID)."""
    from triaged.spool import SpoolLock

    if not config.storage.spool.exists():
        return False
    try:
        SpoolLock(config.storage.spool).release()
    except TriagedError:
        return True
    return False


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        # A port in use is found before the workers warm up and said in one line (the same node running
        # twice on one spool is reported by serve() itself: the lock, with the running node's PID).
        busy = port_problems(config, args.config)
        if busy and not _spool_locked(config):
            print("\n".join(busy), file=sys.stderr)
            return 1
        from triaged.daemon import serve

        return serve(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except OSError as exc:  # a port taken between the check and the bind
        if exc.errno != errno.EADDRINUSE:
            raise
        ports = ", ".join(
            f"{setting} {port}" for setting, _, port in listening_ports(load_config(args.config))
        )
        print(f"triaged serve: a port is already in use ({ports} in {args.config}): {exc}", file=sys.stderr)
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    from triaged.net.scu import echo
    from triaged.net.tls import self_check_tls

    config = _load(args.config)
    lst = config.listener
    host = "127.0.0.1" if lst.bind_address in ("0.0.0.0", "::") else lst.bind_address  # noqa: S104
    try:
        status = echo(host, lst.port, lst.ae_title, timeout=5, tls=self_check_tls(lst.tls))
        listening = f"up (C-ECHO status 0x{status:04X})"
    except TriagedError:
        listening = "not answering"
    print(f"listener   {lst.ae_title}@{host}:{lst.port}: {listening}")
    spool = config.storage.spool
    if spool.exists():
        du = shutil.disk_usage(spool)
        print(
            f"spool      {spool}: {du.free / 2**30:.1f} GiB free of {du.total / 2**30:.1f} GiB "
            f"(refuses below {config.storage.min_free_mb} MiB)"
        )
    if config.storage.ledger.exists():
        from triaged.observe import cluster_nodes

        ledger = _ledger(config)
        try:
            depth = ledger.queue_depth()
            pending = ledger.outbox(states=[OutboxState.PENDING], limit=1_000_000)
            dead = ledger.outbox(states=[OutboxState.DEAD], limit=1_000_000)
            nodes = cluster_nodes(ledger, lease_seconds=config.node.lease_seconds, this_node=config.node.name)
        finally:
            ledger.close()
        print("jobs       " + (", ".join(f"{s.value} {n}" for s, n in depth.items() if n) or "none"))
        retrying = [i for i in pending if i.attempts > 0]
        print(
            f"outbox     {len(pending)} pending ({len(retrying)} retrying after a failed attempt), "
            f"{len(dead)} dead letter(s)"
            + (" (triaged outbox --state DEAD; triaged resend JOB)" if dead else "")
        )
        for item in retrying[-DEAD_LETTERS_SHOWN:]:
            print(
                f"  retrying job {item.job_id} {item.kind} -> {item.destination}: try {item.attempts + 1} at "
                f"{item.next_attempt_at:%Y-%m-%d %H:%M:%S} UTC; last error: {item.last_error or '-'}"
            )
        for item in dead[::-1][:DEAD_LETTERS_SHOWN]:  # the most recent first
            print(
                f"  dead     job {item.job_id} {item.kind} -> {item.destination} after {item.attempts} "
                f"tries: {item.last_error or '-'}"
            )
        _print_nodes(nodes)
    else:
        print(f"ledger     {config.storage.ledger}: not created yet")
    return 0 if listening.startswith("up") else 1


def _print_nodes(nodes: list[ClusterNode]) -> None:
    """The nodes of the ledger, one line each: what ``triaged status`` says about the cluster."""
    alive = sum(1 for n in nodes if n.up)
    leaders = [n.name for n in nodes if n.leader]
    print(
        f"nodes      {len(nodes)} ({alive} alive); leader: "
        + (", ".join(leaders) if leaders else "none now (the next node with the complete role takes over)")
    )
    for n in nodes:
        held = f"jobs {', '.join(map(str, n.jobs))}" if n.jobs else "no jobs"
        print(
            f"  {n.name}{' (this config)' if n.this_node else ''}: {n.condition}"
            f"{', leader' if n.leader else ''}; roles {','.join(n.roles)}; {n.host} PID {n.pid}; "
            f"triaged {n.version}; heartbeat {n.heartbeat_age_seconds:.0f} s ago; "
            f"holds {held}, {n.outbox_rows} outbox row(s)"
        )


def _add_serve(sub: Subparsers) -> None:
    p = with_config(sub.add_parser("serve", help="run the node in the foreground"))
    p.set_defaults(func=cmd_serve)


def _add_check_config(sub: Subparsers) -> None:
    p = sub.add_parser(
        "check-config", help="validate a config file and list every error with its path and line"
    )
    p.add_argument(
        "config", type=Path, nargs="?", default=DEFAULT_CONFIG, help="config file (default: %(default)s)"
    )
    p.set_defaults(func=cmd_check_config)


def _add_status(sub: Subparsers) -> None:
    p = with_config(
        sub.add_parser(
            "status",
            help="listener, queue depth, free disk, outbox retries, the latest dead letters and every node",
        )
    )
    p.set_defaults(func=cmd_status)


PARSERS: dict[str, AddParser] = {
    "serve": _add_serve,
    "check-config": _add_check_config,
    "status": _add_status,
}
"""Command name -> the function that adds its parser."""
