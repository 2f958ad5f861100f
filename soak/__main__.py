"""``python -m soak [--short] [--seed N] [--keep DIR]``: run every scenario and print the final block.

Exit status 0 when every promise held, 1 otherwise.  ``make soak`` runs the long form (~10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from soak.scenarios import LONG, SHORT, Params, Totals, attack_scenario, full_disk_scenario, kill_scenario
from soak.senders import phantom_datasets


def run(params: Params, seed: int, workdir: Path, *, parallel: bool = False) -> Totals:
    """Every scenario in ``workdir`` (each with its own node; at once when ``parallel``); the totals."""
    template = phantom_datasets(seed)
    scenarios = {"kill": kill_scenario, "full": full_disk_scenario, "attack": attack_scenario}

    def one(name: str) -> Totals:
        totals, started = Totals(), time.monotonic()
        scenarios[name](workdir / name, template, params, seed, totals)
        print(f"  ({name}: {time.monotonic() - started:.0f} s)", flush=True)
        return totals

    with ThreadPoolExecutor(max_workers=len(scenarios) if parallel else 1) as pool:
        parts = list(pool.map(one, scenarios))
    totals = Totals()
    for part in parts:
        totals.merge(part)
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    parser.add_argument("--short", action="store_true", help="the short form run inside make test")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument(
        "--parallel", action="store_true", help="run the scenarios at once (the short form does)"
    )
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, ledgers)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="triaged-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        totals = run(SHORT if args.short else LONG, args.seed, workdir, parallel=args.short or args.parallel)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\n=== triaged soak ({'short' if args.short else 'long'} form, seed {args.seed}, "
        f"{time.monotonic() - started:.0f} s) ==="
    )
    print(totals.summary(), flush=True)
    return 0 if totals.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
