"""Commands that read or act on the ledger: ``studies``, ``jobs``, ``outbox``, ``worklist``, ``resend``,
``reanalyze``, ``audit``, ``retention`` and ``rules test``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from triaged.audit import audit
from triaged.cli._common import AddParser, Subparsers, _ledger, _load, _table, with_config
from triaged.domain import RESEARCH_NOTE, JobState, OutboxState, outbox_status_text


def cmd_studies(args: argparse.Namespace) -> int:
    config = _load(args.config)
    ledger = _ledger(config)
    try:
        rows = ledger.studies(limit=args.limit)
        purged = ledger.purged_studies()  # retention deleted their files: shown as PURGED
    finally:
        ledger.close()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "study_instance_uid": s.study_instance_uid,
                        "first_seen": s.first_seen.isoformat(),
                        "last_seen": s.last_seen.isoformat(),
                        "instances": s.instances,
                        "bytes": s.bytes,
                        "series": s.series,
                        "state": "PURGED" if s.study_instance_uid in purged else s.state,
                        "accession_number": s.accession_number,
                    }
                    for s in rows
                ],
                indent=2,
            )
        )
        return 0
    print(
        _table(
            ["study", "accession", "series", "instances", "MB", "last seen (UTC)", "state"],
            [
                [
                    s.study_instance_uid,
                    s.accession_number,
                    s.series,
                    s.instances,
                    f"{s.bytes / 1e6:.1f}",
                    s.last_seen.strftime("%Y-%m-%d %H:%M:%S"),
                    "PURGED" if s.study_instance_uid in purged else s.state,
                ]
                for s in rows
            ],
        )
    )
    return 0


def _states(enum: type[JobState] | type[OutboxState]) -> dict[str, Any]:
    """``--state`` options: one of the enum's values, any case (``--state bogus`` lists the valid ones)."""
    values = [s.value for s in enum]
    return {
        "type": str.upper,
        "choices": values,
        "metavar": "STATE",
        "action": "append",
        "help": f"only {'jobs' if enum is JobState else 'items'} in this state, repeatable: "
        f"{', '.join(values)} (any case)",
    }


def cmd_jobs(args: argparse.Namespace) -> int:
    config = _load(args.config)
    ledger = _ledger(config)
    try:
        if args.job is not None:
            job = ledger.job(args.job)
            print(
                f"job {job.id}  study {job.study_instance_uid}  revision {job.revision}  state {job.state.value}"
            )
            if job.series_instance_uid:
                print(f"series {job.series_instance_uid}")
            print(
                _table(
                    ["at (UTC)", "from", "to", "detail"],
                    [[at.strftime("%Y-%m-%d %H:%M:%S"), f or "-", t, d] for at, f, t, d in job.history],
                )
            )
            return 0
        states = [JobState(s) for s in args.state] if args.state else None
        rows = ledger.jobs(states=states, limit=args.limit)
    finally:
        ledger.close()
    print(
        _table(
            ["job", "study", "rev", "state", "updated (UTC)", "detail"],
            [
                [
                    j.id,
                    j.study_instance_uid,
                    j.revision,
                    j.state.value,
                    j.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
                    j.detail[:100],
                ]
                for j in rows
            ],
        )
    )
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    config = _load(args.config)
    ledger = _ledger(config)
    try:
        states = list(args.state) if args.state else None
        items = ledger.outbox(job_id=args.job, states=states, limit=args.limit)
    finally:
        ledger.close()
    types = {name: dest.type for name, dest in config.destinations.items()}
    items = [replace(i, destination_type=types.get(i.destination, "")) for i in items]
    print(
        _table(
            [
                "item",
                "job",
                "destination",
                "kind",
                "state",
                "tries",
                "next attempt (UTC)",
                "last status",
                "last error",
            ],
            [
                [
                    i.id,
                    i.job_id,
                    i.destination,
                    i.kind,
                    i.state,
                    i.attempts,
                    i.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S") if i.state == OutboxState.PENDING else "",
                    outbox_status_text(i),
                    i.last_error[:80],
                ]
                for i in items
            ],
        )
    )
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from triaged.spool import Spool
    from triaged.stages import Dispatch

    config = _load(args.config)
    ledger = _ledger(config)
    try:
        count = Dispatch(ledger, Spool(config.storage.spool), lambda: config).resend(args.job)
        audit(
            "resend",
            f"job {args.job}: {count} result object(s) queued again by {_requested_by()}",
            actor="admin",
            recorder=ledger,
            job=args.job,
            objects=count,
            requested_by=_requested_by(),
        )
    finally:
        ledger.close()
    print(
        f"job {args.job}: {count} object(s) queued again; the running node sends them within "
        f"{config.dispatch.interval_seconds:g} s"
    )
    return 0


def _requested_by() -> str:
    """Who asked, for the job history: the login name (and the sudo caller's when run through sudo)."""
    import getpass
    import os

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo} (via sudo as {user})" if sudo and sudo != user else user


def cmd_reanalyze(args: argparse.Namespace) -> int:
    from triaged.domain import validate_uid
    from triaged.errors import InvalidDatasetError

    config = _load(args.config)
    target = args.target.strip()
    study_uid = ""
    if not target.isdigit():
        try:
            study_uid = validate_uid(target, "Study Instance UID")
        except InvalidDatasetError:
            print(
                f"triaged reanalyze: {target!r} is neither a job id nor a valid Study Instance UID",
                file=sys.stderr,
            )
            return 2
    if args.pipeline is not None:
        from triaged.analysis.registry import load_registry

        if args.pipeline not in load_registry(config.analysis.registry):
            print(
                f"triaged reanalyze: pipeline {args.pipeline!r} is not installed "
                f"(analysis.registry {config.analysis.registry})",
                file=sys.stderr,
            )
            return 2
    ledger = _ledger(config)
    try:
        if not study_uid:
            study_uid = ledger.job(int(target)).study_instance_uid
        purged = ledger.purged_at(study_uid)
        if purged is not None:
            print(
                f"triaged reanalyze: study {study_uid} cannot be analysed again: retention deleted its files "
                f"on {purged:%Y-%m-%d %H:%M} UTC; send it to the node again to have it analysed",
                file=sys.stderr,
            )
            return 1
        job = ledger.job(
            ledger.reanalyze(
                study_uid, requested_by=_requested_by(), reason=args.reason, pipeline=args.pipeline
            )
        )
        audit(
            "reanalyze",
            f"study {study_uid}: re-analysis as job {job.id} (revision {job.revision}) "
            f"requested by {_requested_by()}",
            actor="admin",
            study_uid=study_uid,
            recorder=ledger,
            requested_by=_requested_by(),
            job=job.id,
            revision=job.revision,
            reason=args.reason,
            pipeline=args.pipeline,
        )
    finally:
        ledger.close()
    print(
        f"study {study_uid}: job {job.id} (revision {job.revision}) created; the running node routes and "
        f"analyses it at its next completion sweep (every {config.completion.sweep_interval_seconds:g} s)"
    )
    return 0


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def when(text: str) -> datetime:
    """``--since``/``--until``: a duration back from now (``90m``, ``24h``, ``7d``, ``2w``) or an ISO time.

    An ISO time without a zone is UTC (every time the ledger shows is UTC).
    """
    value = text.strip()
    match = _DURATION.fullmatch(value.lower())
    if match:
        return datetime.now(UTC) - timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30m, 24h, 7d, 2w) nor an ISO date/time (2026-11-30T08:00)"
        ) from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _detail_text(detail: dict[str, object], width: int = 160) -> str:
    parts = []
    for key, value in detail.items():
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, list):
            value = "; ".join(str(v) for v in value)
        parts.append(f"{key}={value}")
    text = " ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_audit(args: argparse.Namespace) -> int:
    from triaged.errors import StorageError
    from triaged.ledger.audit import AuditTrailReader

    config = _load(args.config)
    path = config.storage.ledger
    try:
        reader = AuditTrailReader(path)
    except StorageError:
        print(f"no ledger at {path} (has the node run yet?)", file=sys.stderr)
        return 1
    with reader:
        entries = reader.audit_trail(
            since=args.since, until=args.until, kinds=args.kind or (), stores=args.stores
        )
    if args.json:
        for e in entries:
            line: dict[str, object] = {
                "at": e.at.isoformat(),
                "event": e.kind,
                "actor": e.actor,
                "peer": e.peer,
                "study_uid": e.study_uid,
                "source": e.source,
            }
            line.update({k: v for k, v in e.detail.items() if k not in line})
            print(json.dumps(line, default=str, ensure_ascii=False))
        return 0
    print(
        _table(
            ["at (UTC)", "event", "who", "from", "study", "detail"],
            [
                [
                    e.at.strftime("%Y-%m-%d %H:%M:%S"),
                    e.kind,
                    e.actor,
                    e.peer,
                    e.study_uid or "",
                    _detail_text(e.detail),
                ]
                for e in entries
            ],
        )
    )
    print(f"{len(entries)} event(s). {RESEARCH_NOTE}")
    return 0


def cmd_worklist(args: argparse.Namespace) -> int:
    import csv

    from triaged.spool import Spool
    from triaged.stages import Worklist

    config = _load(args.config)
    ledger = _ledger(config)
    try:
        rows = Worklist(ledger, Spool(config.storage.spool), lambda: config).rows()
    finally:
        ledger.close()
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    if args.csv:
        data = [r.as_dict() for r in rows]
        writer = csv.DictWriter(sys.stdout, fieldnames=list(data[0]) if data else ["study_instance_uid"])
        writer.writeheader()
        writer.writerows(data)
        return 0
    print(
        _table(
            ["priority", "score", "study", "accession", "arrived (UTC)", "result", "state", "why"],
            [
                [
                    (r.priority_level or "-") + (" OVERDUE" if r.overdue else ""),
                    f"{r.priority_score:.2f}" if r.priority_score is not None else "",
                    r.study_instance_uid,
                    r.accession_number,
                    r.arrived.strftime("%Y-%m-%d %H:%M"),
                    f"{(r.result_at - r.arrived).total_seconds() / 60:.1f} min" if r.result_at else "",
                    r.state,
                    r.priority_reasons[:90],
                ]
                for r in rows
            ],
        )
    )
    print(RESEARCH_NOTE)
    return 0


def cmd_rules_test(args: argparse.Namespace) -> int:
    from pydicom import dcmread

    from triaged.routing import StudyFacts, attributes_of, route

    config = _load(args.config)
    cases: list[tuple[str, StudyFacts]] = []
    if args.last:
        from triaged.spool import Spool
        from triaged.stages import study_facts

        ledger = _ledger(config)
        try:
            spool = Spool(config.storage.spool)
            for study in ledger.studies(limit=args.last):
                cases.append(
                    (study.study_instance_uid, study_facts(ledger, spool, study.study_instance_uid)[0])
                )
        finally:
            ledger.close()
    for folder in args.folder:
        if not folder.is_dir():
            print(f"triaged rules test: {folder} is not a folder", file=sys.stderr)
            return 2
        per_series: dict[str, dict[str, object]] = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001, S112 - not DICOM: skipped, like the listener would refuse it
                continue
            per_series.setdefault(str(ds.get("SeriesInstanceUID", path)), attributes_of(ds))
        if not per_series:
            print(f"triaged rules test: no DICOM file in {folder}", file=sys.stderr)
            return 2
        series = tuple(per_series.values())
        cases.append(
            (
                str(folder),
                StudyFacts(
                    args.called_ae or config.listener.ae_title,
                    args.calling_ae,
                    args.peer,
                    study=dict(series[0]),
                    series=series,
                ),
            )
        )
    if not cases:
        print("triaged rules test: give study folders or --last N", file=sys.stderr)
        return 2
    for name, facts in cases:
        decision = route(config, facts)
        print(f"{name}:")
        for line in decision.explanation:
            print(f"  {line}")
        if decision.ignored:
            print(f"  -> IGNORED by rule '{decision.rule}': {decision.ignore_reason}")
        else:
            dests = ", ".join(f"{d.name} ({'/'.join(d.outputs)})" for d in decision.destinations) or "none"
            print(
                f"  -> rule '{decision.rule}': pipelines {', '.join(decision.pipelines)}; destinations {dests}; "
                f"priority policy {decision.priority_policy}; analysis {decision.analysis_priority}; "
                f"complete after {decision.completion_delay_seconds:g} s"
            )
    return 0


def _add_studies(sub: Subparsers) -> None:
    p = with_config(sub.add_parser("studies", help="studies in the ledger, most recent first"))
    p.add_argument("--limit", type=int, default=50, help="at most this many studies (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the studies as JSON")
    p.set_defaults(func=cmd_studies)


def _add_jobs(sub: Subparsers) -> None:
    p = with_config(sub.add_parser("jobs", help="jobs and their states; give a job id for its history"))
    p.add_argument("job", type=int, nargs="?", help="a job id: show that job's state history")
    p.add_argument("--state", **_states(JobState))
    p.add_argument("--limit", type=int, default=50, help="at most this many jobs (default %(default)s)")
    p.set_defaults(func=cmd_jobs)


def _add_worklist(sub: Subparsers) -> None:
    p = with_config(sub.add_parser("worklist", help="studies in triage priority order, with the reasons"))
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the worklist as JSON")
    fmt.add_argument("--csv", action="store_true", help="print the worklist as CSV")
    p.set_defaults(func=cmd_worklist)


def _add_rules(sub: Subparsers) -> None:
    rules = sub.add_parser("rules", help="routing rules").add_subparsers(dest="rules_command", required=True)
    p = with_config(rules.add_parser("test", help="dry-run the rules on study folders or the last N studies"))
    p.add_argument("folder", type=Path, nargs="*", help="folders holding one study each")
    p.add_argument("--last", type=int, default=0, help="also the last N studies in the ledger")
    p.add_argument("--calling-ae", default="", help="calling AE title to assume for folders")
    p.add_argument("--called-ae", default="", help="called AE title to assume (default: the listener's)")
    p.add_argument("--peer", default=None, help="peer address to assume for folders")
    p.set_defaults(func=cmd_rules_test)


def _add_outbox(sub: Subparsers) -> None:
    p = with_config(sub.add_parser("outbox", help="result objects waiting for or delivered to destinations"))
    p.add_argument("--job", type=int, help="only this job's result objects")
    p.add_argument("--state", **_states(OutboxState))
    p.add_argument("--limit", type=int, default=200, help="at most this many items (default %(default)s)")
    p.set_defaults(func=cmd_outbox)


def _add_resend(sub: Subparsers) -> None:
    p = with_config(
        sub.add_parser("resend", help="send a job's result objects again (e.g. after a dead letter)")
    )
    p.add_argument("job", type=int, help="the job id (see triaged jobs, triaged outbox --state DEAD)")
    p.set_defaults(func=cmd_resend)


def _add_reanalyze(sub: Subparsers) -> None:
    p = with_config(
        sub.add_parser(
            "reanalyze",
            help="analyse a study again as a new revision (audited); the running node picks it up",
        )
    )
    p.add_argument(
        "target", metavar="STUDY_UID|JOB_ID", help="a Study Instance UID, or a job id (digits only)"
    )
    p.add_argument("--pipeline", help="run this pipeline instead of the route's")
    p.add_argument("--reason", default="", help="why, for the job history")
    p.set_defaults(func=cmd_reanalyze)


def _add_audit(sub: Subparsers) -> None:
    p = with_config(
        sub.add_parser(
            "audit",
            help="the audit trail: associations, queries, refusals, reloads, re-runs (read-only)",
            description="One chronological trail merged from the ledger's associations and audit events "
            "(and, with --stores, every stored instance and every result object sent).  Opens the ledger "
            "read-only: safe while the node runs.",
        )
    )
    p.add_argument("--since", type=when, help="from this time: 24h, 30m, 7d or an ISO time (UTC if no zone)")
    p.add_argument("--until", type=when, help="before this time (same forms as --since)")
    p.add_argument(
        "--kind",
        action="append",
        metavar="EVENT",
        help="only this event and its sub-events, e.g. find, association.refused, config (repeatable)",
    )
    p.add_argument(
        "--stores", action="store_true", help="also every stored instance and every result object sent (many)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_audit)


def cmd_retention(args: argparse.Namespace) -> int:
    from triaged.errors import StorageError
    from triaged.spool import Spool, SpoolLock
    from triaged.stages import Retention

    config = _load(args.config)
    lock = None
    if not args.dry_run:
        # The running node deletes on its own schedule, and only it can hold back a C-STORE into a
        # study while that study is being deleted: deleting from a second process is refused.
        try:
            lock = SpoolLock(config.storage.spool)
        except StorageError as exc:
            print(
                f"triaged retention: {exc}.\nThe running node applies retention itself every "
                f"{config.retention.interval_minutes:g} min (retention.enabled: "
                f"{str(config.retention.enabled).lower()}); `triaged retention --dry-run` shows what is due "
                "without touching anything.",
                file=sys.stderr,
            )
            return 1
    try:
        ledger = _ledger(config)
        try:
            report = Retention(ledger, Spool(config.storage.spool), lambda: config, actor="admin").run(
                dry_run=args.dry_run
            )
        finally:
            ledger.close()
    finally:
        if lock is not None:
            lock.release()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 1 if any(d.outcome == "error" for d in report.deletions) else 0
    verb = "would be deleted" if args.dry_run else "deleted"
    if report.deletions:
        print(
            _table(
                ["study", "kind", "finished (UTC)", "files", "MB", "outcome", "why"],
                [
                    [
                        d.study_instance_uid,
                        d.category,
                        d.finished_at.strftime("%Y-%m-%d %H:%M") if d.finished_at else "",
                        d.files,
                        f"{d.bytes / 1e6:.1f}",
                        d.outcome,
                        d.reason,
                    ]
                    for d in report.deletions
                ],
            )
        )
    counted = [d for d in report.deletions if d.outcome in ("deleted", "would delete")]
    print(
        f"{'dry run: ' if args.dry_run else ''}{len(counted)} studies, {report.files} files, "
        f"{report.bytes / 1e6:.1f} MB {verb}; ledger rows {verb}: {report.ledger.studies} purged studies, "
        f"{report.ledger.associations} associations, {report.ledger.audit_events} audit events"
    )
    if report.limit_bytes:
        print(
            f"spool: {report.spool_bytes / 2**30:.2f} GiB before, max_spool_gb {config.retention.max_spool_gb:g} GiB"
            + ("; still over the limit with only unfinished studies left" if report.over_limit else "")
        )
    print("never deleted: studies receiving, waiting to complete, queued, analysing or with results to send")
    return 1 if any(d.outcome == "error" for d in report.deletions) else 0


def _add_retention(sub: Subparsers) -> None:
    p = with_config(
        sub.add_parser(
            "retention",
            help="delete finished studies' files and old ledger rows as the retention policy says (audited)",
        )
    )
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted and why")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_retention)


PARSERS: dict[str, AddParser] = {
    "studies": _add_studies,
    "jobs": _add_jobs,
    "worklist": _add_worklist,
    "rules": _add_rules,
    "outbox": _add_outbox,
    "resend": _add_resend,
    "reanalyze": _add_reanalyze,
    "audit": _add_audit,
    "retention": _add_retention,
}
"""Command name -> the function that adds its parser."""
