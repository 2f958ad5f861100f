"""Helpers shared by the ``triaged`` subcommands: tables, config and ledger loading, JSON reports."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from triaged.config import Config, load_config
from triaged.errors import ConfigError, TriagedError

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What ``ArgumentParser.add_subparsers`` returns; each command group adds its parsers to it."""
AddParser: TypeAlias = "Callable[[Subparsers], None]"
"""Adds one command's parser (``set_defaults(func=...)`` included) to the subparsers."""

DEFAULT_CONFIG = Path("config.yaml")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(2) from exc


def _ledger(config: Config):  # type: ignore[no-untyped-def]
    from triaged.ledger import Ledger

    if not config.storage.ledger.exists():
        print(f"no ledger at {config.storage.ledger} (has the node run yet?)", file=sys.stderr)
        raise SystemExit(1)
    return Ledger(config.storage.ledger)


def _write_json(path: Path | None, report: dict[str, object]) -> None:
    """Write ``triaged eval``'s report as JSON (``--json FILE``; ``-`` = stdout)."""
    if path is None:
        return
    text = json.dumps(report, indent=1, default=str, ensure_ascii=False) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"JSON report in {path}")


def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config/-c`` (default ``config.yaml``) to a command's parser."""
    p.add_argument(
        "--config", "-c", type=Path, default=DEFAULT_CONFIG, help="config file (default: %(default)s)"
    )
    return p


def pipeline_problem(pipeline: object) -> str | None:
    """Why ``pipeline`` cannot run (its weights file is missing, corrupt or has no valid model card), or None.

    Learned pipelines have ``verify()`` (sha256 against the model card, nothing loaded); others always run.
    """
    verify = getattr(pipeline, "verify", None)
    if verify is None:
        return None
    try:
        verify()
    except TriagedError as exc:
        return str(exc)
    return None
