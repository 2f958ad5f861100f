"""The ``triaged`` command line.  Every output that shows results says they are for research use only.

One module per command group adds its subparsers: :mod:`triaged.cli.node` (serve, check-config, status),
:mod:`triaged.cli.records` (studies, jobs, outbox, worklist, resend, reanalyze, audit, retention,
rules test) and :mod:`triaged.cli.offline` (analyze, eval, demo, selftest, train).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from triaged import __version__
from triaged.cli import node, offline, records
from triaged.cli.offline import findings_table
from triaged.domain import RESEARCH_NOTE
from triaged.errors import TriagedError

__all__ = ["RESEARCH_NOTE", "build_parser", "findings_table", "main"]

COMMAND_ORDER = (
    "serve", "check-config", "studies", "jobs", "status", "worklist", "rules", "outbox", "resend",
    "reanalyze", "audit", "retention", "eval", "train", "demo", "selftest", "analyze",
)  # fmt: skip
"""The order ``triaged --help`` lists the commands in (every group's command must be named here)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triaged",
        description=f"A DICOM node that triages chest CT for COVID-19. {RESEARCH_NOTE}",
    )
    parser.add_argument("--version", action="version", version=f"triaged {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {**node.PARSERS, **records.PARSERS, **offline.PARSERS}
    for name in sorted(parsers, key=COMMAND_ORDER.index):
        parsers[name](sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TriagedError as exc:
        print(f"triaged: {exc}", file=sys.stderr)
        return 1
