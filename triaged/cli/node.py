"""Node commands: ``serve``, ``check-config`` and ``status``."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from triaged.cli._common import DEFAULT_CONFIG, AddParser, Subparsers, _ledger, _load, with_config
from triaged.config import load_config
from triaged.errors import ConfigError, TriagedError


def cmd_check_config(args: argparse.Namespace) -> int:
    from triaged.daemon import pipeline_problems

    try:
        config = load_config(args.config)
        problems = pipeline_problems(config, args.config)
        if problems:
            raise ConfigError(str(args.config), problems)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    lst = config.listener
    print(
        f"{args.config}: valid. Listener {lst.ae_title} on {lst.bind_address}:{lst.port}; "
        f"{len(config.destinations)} destination(s); completion after {config.completion.delay_seconds:g} s."
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from triaged.daemon import serve

    try:
        return serve(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2


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
        ledger = _ledger(config)
        try:
            depth = ledger.queue_depth()
        finally:
            ledger.close()
        print("jobs       " + (", ".join(f"{s.value} {n}" for s, n in depth.items() if n) or "none"))
    else:
        print(f"ledger     {config.storage.ledger}: not created yet")
    return 0 if listening.startswith("up") else 1


def _add_serve(sub: Subparsers) -> None:
    p = with_config(sub.add_parser("serve", help="run the node in the foreground"))
    p.set_defaults(func=cmd_serve)


def _add_check_config(sub: Subparsers) -> None:
    p = sub.add_parser(
        "check-config", help="validate a config file and list every error with its path and line"
    )
    p.add_argument("config", type=Path, nargs="?", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_check_config)


def _add_status(sub: Subparsers) -> None:
    p = with_config(sub.add_parser("status", help="listener, queue depth and free disk"))
    p.set_defaults(func=cmd_status)


PARSERS: dict[str, AddParser] = {
    "serve": _add_serve,
    "check-config": _add_check_config,
    "status": _add_status,
}
"""Command name -> the function that adds its parser."""
