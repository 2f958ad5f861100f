"""The ``triaged`` command line.  Every output that shows results says they are for research use only."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from triaged import __version__
from triaged.config import Config, load_config
from triaged.domain import RESEARCH_NOTE, Findings, p_covid_text
from triaged.errors import ConfigError, TriagedError

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
    print(f"{args.config}: valid. Listener {lst.ae_title} on {lst.bind_address}:{lst.port}; "
          f"{len(config.destinations)} destination(s); completion after {config.completion.delay_seconds:g} s.")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from triaged.daemon import serve

    try:
        return serve(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2


def cmd_studies(args: argparse.Namespace) -> int:
    config = _load(args.config)
    ledger = _ledger(config)
    try:
        rows = ledger.studies(limit=args.limit)
    finally:
        ledger.close()
    if args.json:
        print(json.dumps([
            {"study_instance_uid": s.study_instance_uid, "first_seen": s.first_seen.isoformat(),
             "last_seen": s.last_seen.isoformat(), "instances": s.instances, "bytes": s.bytes,
             "series": s.series, "state": s.state, "accession_number": s.accession_number}
            for s in rows], indent=2))
        return 0
    print(_table(
        ["study", "accession", "series", "instances", "MB", "last seen (UTC)", "state"],
        [[s.study_instance_uid, s.accession_number, s.series, s.instances, f"{s.bytes / 1e6:.1f}",
          s.last_seen.strftime("%Y-%m-%d %H:%M:%S"), s.state] for s in rows],
    ))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from triaged.domain import JobState

    config = _load(args.config)
    ledger = _ledger(config)
    try:
        if args.job is not None:
            job = ledger.job(args.job)
            print(f"job {job.id}  study {job.study_instance_uid}  revision {job.revision}  state {job.state.value}")
            if job.series_instance_uid:
                print(f"series {job.series_instance_uid}")
            print(_table(["at (UTC)", "from", "to", "detail"],
                         [[at.strftime("%Y-%m-%d %H:%M:%S"), f or "-", t, d] for at, f, t, d in job.history]))
            return 0
        states = [JobState(s.upper()) for s in args.state] if args.state else None
        rows = ledger.jobs(states=states, limit=args.limit)
    finally:
        ledger.close()
    print(_table(
        ["job", "study", "rev", "state", "updated (UTC)", "detail"],
        [[j.id, j.study_instance_uid, j.revision, j.state.value, j.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
          j.detail[:100]] for j in rows],
    ))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from triaged.net.scu import echo

    config = _load(args.config)
    lst = config.listener
    host = "127.0.0.1" if lst.bind_address in ("0.0.0.0", "::") else lst.bind_address  # noqa: S104
    try:
        status = echo(host, lst.port, lst.ae_title, timeout=5)
        listening = f"up (C-ECHO status 0x{status:04X})"
    except TriagedError:
        listening = "not answering"
    print(f"listener   {lst.ae_title}@{host}:{lst.port}: {listening}")
    spool = config.storage.spool
    if spool.exists():
        du = shutil.disk_usage(spool)
        print(f"spool      {spool}: {du.free / 2**30:.1f} GiB free of {du.total / 2**30:.1f} GiB "
              f"(refuses below {config.storage.min_free_mb} MiB)")
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


def _registry(config: Config | None = None):  # type: ignore[no-untyped-def]
    """The configured pipeline registry (non-learned pipelines + shipped learned models)."""
    from triaged.worker import load_registry

    return load_registry((config or Config()).analysis.registry)


def findings_table(findings: Findings) -> str:
    """The findings of one analysis as a text table (shared by analyze and selftest)."""
    rows = []
    for name, m in (("right lung", findings.right), ("left lung", findings.left), ("both lungs", findings.both)):
        rows.append([name, f"{m.lung_ml:.0f}", f"{m.lesion_ml:.0f}", f"{m.affected_pct:.1f}",
                     f"{m.consolidation_pct:.1f}"])
    text = _table(["", "lung mL", "lesion mL", "affected %", "consolidation %"], rows)
    extra = [f"CT grade {findings.ct_grade.name} (worse lung {findings.severity_pct:.1f} %)"]
    extra.append(p_covid_text(findings.p_covid))
    if findings.key_slices:
        extra.append("key slices " + ", ".join(str(z) for z in findings.key_slices))
    extra.append(f"{len(findings.lesion_boxes)} lesion box(es)")
    return text + "\n" + "; ".join(extra) + "\n" + RESEARCH_NOTE


def cmd_analyze(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from triaged.analysis.overview import render_overview
    from triaged.domain import findings_to_json
    from triaged.volume import UnusableUIDsError, load_nifti, load_series_folder, write_nifti

    config = load_config(args.config) if args.config.exists() else Config()
    registry = _registry(config)
    if args.list:
        for name in registry.pipeline_names():
            p = registry.get(name)
            print(f"{name:20s} {p.version:8s} {p.description}")
        return 0
    if args.path is None:
        print("triaged analyze: give a DICOM folder or a NIfTI file (or --list)", file=sys.stderr)
        return 2
    pipeline = registry.get(args.pipeline or config.analysis.default_pipeline)
    path: Path = args.path
    if not path.exists():
        print(f"triaged analyze: {path} does not exist", file=sys.stderr)
        return 2
    out: Path = args.out or Path(f"{path.name.removesuffix('.gz').removesuffix('.nii')}-triaged")
    with tqdm(total=100, unit="%", desc="load", disable=args.quiet, bar_format="{desc:<28}{bar}| {n:.0f}%") as bar:
        if path.is_dir():
            try:
                volume, choice = load_series_folder(path, config.series_selection)
            except UnusableUIDsError as exc:
                bar.close()
                print(f"triaged analyze: {exc}", file=sys.stderr)
                return 2
            bar.write(f"series: {choice.reason}")
        else:
            volume = load_nifti(path)
        bar.update(10)

        def progress(fraction: float, message: str) -> None:
            bar.set_description_str(message[:28])
            bar.n = 10 + 80 * max(0.0, min(1.0, fraction))
            bar.refresh()

        bar.set_description_str(pipeline.name)
        result = pipeline.run(volume, progress=progress)
        bar.set_description_str("write")
        bar.n = 90
        bar.refresh()
        out.mkdir(parents=True, exist_ok=True)
        masks = result.masks
        write_nifti(volume, masks.lungs, out / "lungs.nii.gz")
        write_nifti(volume, masks.lesions.astype(np.uint8), out / "lesions.nii.gz")
        write_nifti(volume, masks.consolidation.astype(np.uint8), out / "consolidation.nii.gz")
        if masks.lobes is not None:
            write_nifti(volume, masks.lobes, out / "lobes.nii.gz")
        (out / "findings.json").write_text(findings_to_json(result.findings) + "\n", encoding="utf-8")
        Image.fromarray(render_overview(volume, masks, result.findings)).save(out / "overview.png")
        bar.n = 100
        bar.set_description_str("done")
        bar.refresh()
    print(findings_table(result.findings))
    print(f"masks, findings.json and overview.png in {out}/")
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    config = _load(args.config)
    ledger = _ledger(config)
    try:
        states = [s.upper() for s in args.state] if args.state else None
        items = ledger.outbox(job_id=args.job, states=states, limit=args.limit)
    finally:
        ledger.close()
    print(_table(
        ["item", "job", "destination", "kind", "state", "tries", "next attempt (UTC)", "last status", "last error"],
        [[i.id, i.job_id, i.destination, i.kind, i.state, i.attempts,
          i.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S") if i.state == "PENDING" else "",
          f"0x{i.last_status:04X}" if i.last_status is not None else "", i.last_error[:80]] for i in items],
    ))
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from triaged.spool import Spool
    from triaged.stages import Dispatch

    config = _load(args.config)
    ledger = _ledger(config)
    try:
        count = Dispatch(ledger, Spool(config.storage.spool), lambda: config).resend(args.job)
    finally:
        ledger.close()
    print(f"job {args.job}: {count} object(s) queued again; the running node sends them within "
          f"{config.dispatch.interval_seconds:g} s")
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
    print(_table(
        ["priority", "score", "study", "accession", "arrived (UTC)", "result", "state", "why"],
        [[(r.priority_level or "-") + (" OVERDUE" if r.overdue else ""),
          f"{r.priority_score:.2f}" if r.priority_score is not None else "",
          r.study_instance_uid, r.accession_number, r.arrived.strftime("%Y-%m-%d %H:%M"),
          f"{(r.result_at - r.arrived).total_seconds() / 60:.1f} min" if r.result_at else "",
          r.state, r.priority_reasons[:90]] for r in rows],
    ))
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
                cases.append((study.study_instance_uid, study_facts(ledger, spool, study.study_instance_uid)[0]))
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
        cases.append((str(folder), StudyFacts(args.called_ae or config.listener.ae_title, args.calling_ae,
                                              args.peer, study=dict(series[0]), series=series)))
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
            print(f"  -> rule '{decision.rule}': pipelines {', '.join(decision.pipelines)}; destinations {dests}; "
                  f"priority policy {decision.priority_policy}; analysis {decision.analysis_priority}; "
                  f"complete after {decision.completion_delay_seconds:g} s")
    return 0


def _spec_from_args(args: argparse.Namespace, seed: int):  # type: ignore[no-untyped-def]
    from triaged.phantom import PhantomSpec

    return PhantomSpec(
        kind=args.kind, severity=args.severity, seed=seed, matrix=args.matrix,
        slice_thickness=args.slice_thickness, vendor=args.vendor, feet_first=args.feet_first,
        with_localizer=args.localizer, with_dose_report=args.dose_report,
        transfer_syntax=TRANSFER_SYNTAXES[args.transfer_syntax] if args.transfer_syntax else None,
    )


TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1", "jpeg-ls": "1.2.840.10008.1.2.4.80", "jpeg2000": "1.2.840.10008.1.2.4.90", "rle": "1.2.840.10008.1.2.5",
}


def cmd_demo(args: argparse.Namespace) -> int:
    from triaged.datasets import write_dataset, write_demo_study
    from triaged.phantom import dataset_specs

    if args.dataset:
        specs = dataset_specs(args.dataset, args.seed, matrix=args.matrix)
        write_dataset(specs, args.out, progress=not args.quiet)
        print(f"{len(specs)} labelled phantom studies in {args.out}/ (labels.csv + one folder per case). "
              f"Synthetic data. {RESEARCH_NOTE}")
        return 0
    try:
        spec = _spec_from_args(args, args.seed)
    except ValueError as exc:
        print(f"triaged demo: {exc}", file=sys.stderr)
        return 2
    study = write_demo_study(spec, args.out)
    print(f"{len(study.dicom_files)} DICOM files in {study.dicom_dir}/, ground truth in {study.truth_dir}/")
    print(f"send it: TCP_NODELAY=1 storescu -aec TRIAGED +sd +r 127.0.0.1 11112 {study.dicom_dir}")
    return 0


def _sr_severity(sr: object) -> float | None:
    """Study severity (% of the worse lung) from a triaged SR's content tree (code SEVPCT, 99TRIAGED)."""
    stack = list(getattr(sr, "ContentSequence", []))
    while stack:
        item = stack.pop()
        names = item.get("ConceptNameCodeSequence", [])
        if names and names[0].CodeValue == "SEVPCT" and "MeasuredValueSequence" in item:
            return float(item.MeasuredValueSequence[0].NumericValue)
        stack.extend(item.get("ContentSequence", []))
    return None


def cmd_selftest(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from pydicom import dcmread

    from triaged.datasets import read_dataset, write_demo_study
    from triaged.net.collector import ResultCollector
    from triaged.net.scu import send_files

    try:
        called, _, address = args.to.partition("@")
        host, _, port_text = address.rpartition(":")
        port = int(port_text)
        if not called or not host:
            raise ValueError
    except ValueError:
        print(f"triaged selftest: --to must be AE@host:port, not {args.to!r}", file=sys.stderr)
        return 2
    spec = _spec_from_args(args, args.seed if args.seed is not None else int(time.time()) % 100000)
    collector = ResultCollector(args.ae, args.listen_host, args.listen_port)
    try:
        collector.start()
    except OSError as exc:
        print(f"triaged selftest: cannot listen on {args.listen_host}:{args.listen_port} as the destination: "
              f"{exc}", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="triaged-selftest-") as tmp:
            t0 = time.monotonic()
            study = write_demo_study(spec, Path(tmp))
            [truth] = read_dataset(study.truth_dir)
            study_uid = str(dcmread(study.dicom_files[0], stop_before_pixels=True).StudyInstanceUID)
            print(f"phantom {spec.kind} {truth.affected_pct_max:.1f} % (worse lung): {len(study.dicom_files)} files "
                  f"in {time.monotonic() - t0:.1f} s; study {study_uid}")
            results = send_files(study.dicom_files, host, port, called, calling_ae=args.ae)
            refused = [r for r in results if not r.ok]
            if refused:
                print(f"FAIL: {len(refused)} of {len(results)} instances refused, first: "
                      f"{refused[0].status} {refused[0].comment}", file=sys.stderr)
                return 1
            print(f"sent {len(results)} instances to {called}@{host}:{port}; waiting up to {args.timeout:g} s "
                  f"for SR, SEG and SC as {args.ae}@{args.listen_host}:{args.listen_port}")
            deadline = time.monotonic() + args.timeout
            kinds: dict[str, object] = {}
            with collector.arrived:
                while time.monotonic() < deadline:
                    for ds in collector.received:
                        if str(ds.get("StudyInstanceUID", "")) == study_uid:
                            kinds.setdefault(str(ds.get("Modality", "")), ds)
                    if {"SR", "SEG", "OT"} <= set(kinds) or {"SR", "SEG", "SC"} <= set(kinds):
                        break
                    collector.arrived.wait(1.0)
        missing = {"SR", "SEG"} - set(kinds)
        if missing or not ({"OT", "SC"} & set(kinds)):
            got = f"only {', '.join(sorted(kinds))}" if kinds else "nothing"
            print(f"FAIL: after {args.timeout:g} s {got} arrived for the study (SR, SEG and SC expected)",
                  file=sys.stderr)
            return 1
        severity = _sr_severity(kinds["SR"])
        if severity is None:
            print("FAIL: the SR carries no study severity", file=sys.stderr)
            return 1
        error = abs(severity - truth.affected_pct_max)
        verdict = "PASS" if error <= args.tolerance else "FAIL"
        print(f"{verdict}: SR, SEG and SC arrived in the original study; reported severity {severity:.1f} %, "
              f"ground truth {truth.affected_pct_max:.1f} % (error {error:.1f}, tolerance {args.tolerance:g}). "
              f"{RESEARCH_NOTE}")
        return 0 if verdict == "PASS" else 1
    finally:
        collector.stop()


def cmd_eval(args: argparse.Namespace) -> int:
    """``triaged eval PATH``: phantom dataset, real slice set or real volume manifest (by what PATH is)."""
    import dataclasses

    from tqdm import tqdm

    from triaged.domain import Volume
    from triaged.realsets import RealSetError, default_data_root, detect_kind
    from triaged.worker import load_registry

    config = load_config(args.config) if args.config.exists() else Config()
    registry = _registry(config) if args.registry is None else load_registry(args.registry)
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        print(f"triaged eval: unknown or not installed pipeline(s) {', '.join(unknown)}; "
              f"installed: {', '.join(registry.pipeline_names())}", file=sys.stderr)
        return 2
    pipelines = {name: registry.get(name) for name in names}
    report: dict[str, object] = {"source": str(args.dataset), "pipelines": names, "note": RESEARCH_NOTE}
    try:
        if args.limit < 0:
            raise RealSetError(f"--limit must be ≥ 0, got {args.limit}")
        kind = detect_kind(args.dataset)
        if kind == "slices":
            from triaged.analysis.metrics import slice_markdown_table, slice_set_row
            from triaged.realsets import evaluate_slice_set, read_slice_set

            sset = read_slice_set(args.dataset, split=args.split, limit=args.limit)
            print(f"{sset.describe()}; window per slice (per source for <source>_<index> names) from "
                  f"landmarks; mean per-image pixel Dice / sensitivity / specificity:", flush=True)
            with tqdm(total=len(sset.refs) * len(names), disable=args.quiet, unit="run") as bar:
                def tick(message: str) -> None:
                    bar.set_description_str(message[:32])
                    bar.update()

                slices = evaluate_slice_set(sset, pipelines, progress=tick)
            print(f"orientation: {slices.describe_orientation()}")
            srows = [slice_set_row(name, slices.scores[name]) for name in names]
            print(slice_markdown_table(srows))
            print("Dice and sensitivity: mean over images with a reference lesion; specificity: over all "
                  "images; a failed analysis counts as an empty prediction.")
            report.update(kind="slice set", split=args.split, rows=[dataclasses.asdict(r) for r in srows],
                          **slices.to_json())
        elif kind == "volumes":
            from triaged.analysis.metrics import (
                volume_cases_markdown,
                volume_set_row,
                volume_summary_markdown,
            )
            from triaged.realsets import evaluate_volume_set, read_manifest
            from triaged.volume import load_nifti, load_series_folder

            root = default_data_root(args.root)
            entries = read_manifest(args.dataset, root)
            if args.limit:
                entries = entries[: args.limit]
            # the manifest names each folder on purpose: short stacks the node would refuse are read too
            rules = config.series_selection.model_copy(update={"min_slices": 1, "min_coverage_mm": 0.0})

            def load(folder: Path) -> tuple[Volume, str]:
                volume, choice = load_series_folder(folder, rules)
                return volume, choice.reason

            print(f"volume manifest {args.dataset}: {len(entries)} case(s) under {root}", flush=True)
            with tqdm(total=len(entries) * len(names), disable=args.quiet, unit="run") as bar:
                def tick(message: str) -> None:
                    bar.set_description_str(message[:32])
                    bar.update()

                vols = evaluate_volume_set(entries, pipelines, load, load_mask=lambda p: load_nifti(p).hu,
                                           progress=tick)
            for e in entries:
                print(f"  {e.case_id}: {vols.series.get(e.case_id, '')}")
            vrows = [volume_set_row(name, vols.results[name]) for name in names]
            print()
            print(volume_cases_markdown(vols.results))
            print(volume_summary_markdown(vrows))
            report.update(kind="volume manifest", root=str(root), rows=[dataclasses.asdict(r) for r in vrows],
                          **vols.to_json())
        else:
            from triaged.analysis.metrics import CaseResult, case_result, markdown_table, table2_row
            from triaged.datasets import read_dataset

            folder = args.dataset.parent if args.dataset.is_file() else args.dataset
            if args.split != "all":
                raise RealSetError(f"{folder}: --split applies to the doctor-labelled slice sets only")
            try:
                cases = read_dataset(folder)[: args.limit or None]
            except (FileNotFoundError, ValueError) as exc:
                raise RealSetError(str(exc)) from exc
            if not cases:
                raise RealSetError(f"no labelled case in {folder}")
            results: dict[str, list[CaseResult]] = {n: [] for n in names}
            with tqdm(total=len(cases) * len(names), disable=args.quiet, unit="run") as bar:
                for case in cases:
                    volume = case.volume()
                    truth = {m: case.mask(m) for m in ("lungs", "lesions", "consolidation")}
                    for name, pipeline in pipelines.items():
                        bar.set_description_str(f"{name} {case.case_id}"[:32])
                        result = pipeline.run(volume)
                        results[name].append(case_result(
                            case.case_id, case.label, result.findings, true_pct=case.affected_pct_max,
                            lungs=result.masks.lungs, true_lungs=truth["lungs"],
                            lesions=result.masks.lesions, true_lesions=truth["lesions"] > 0,
                            consolidation=result.masks.consolidation,
                            true_consolidation=truth["consolidation"] > 0,
                        ))
                        bar.update()
            rows = [table2_row(name, results[name]) for name in names]
            print(f"{len(cases)} phantom case(s) from {folder}; seed 004 Table 2 columns (ROC AUC of P(COVID-19), "
                  f"or of the severity where a pipeline has no classifier), plus lung and consolidation Dice.")
            print(markdown_table(rows))
            report.update(kind="phantom dataset", rows=[dataclasses.asdict(r) for r in rows],
                          cases={n: [dataclasses.asdict(c) for c in cs] for n, cs in results.items()})
    except RealSetError as exc:
        print(f"triaged eval: {exc}", file=sys.stderr)
        return 2
    print(RESEARCH_NOTE)
    _write_json(args.json, report)
    return 0


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


def cmd_train(args: argparse.Namespace) -> int:
    from triaged.nets.train import train

    if args.data is None and args.real_slices is None:
        print("triaged train: give --real-slices DIR (real data first), --data DIR (phantoms), or both",
              file=sys.stderr)
        return 2
    if args.data is not None and not args.data.is_dir():
        print(f"triaged train: {args.data} is not a dataset folder (make one with triaged demo --dataset N)",
              file=sys.stderr)
        return 2
    if args.real_slices is not None and not args.real_slices.is_dir():
        print(f"triaged train: {args.real_slices} is not the medseg-covid-slices folder", file=sys.stderr)
        return 2
    out = train(args.model, args.data, args.out, epochs=args.epochs, seed=args.seed, resume=args.resume,
                device=args.device, progress=not args.quiet, real_slices=args.real_slices, test_data=args.test_data,
                command=" ".join(["triaged", *sys.argv[1:]]))
    print(f"weights and model card in {out}/ (copy to models/{args.model}/ to ship them). {RESEARCH_NOTE}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triaged",
        description=f"A DICOM node that triages chest CT for COVID-19. {RESEARCH_NOTE}",
    )
    parser.add_argument("--version", action="version", version=f"triaged {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
        return p

    p = with_config(sub.add_parser("serve", help="run the node in the foreground"))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file and list every error with its path and line")
    p.add_argument("config", type=Path, nargs="?", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_check_config)

    p = with_config(sub.add_parser("studies", help="studies in the ledger, most recent first"))
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_studies)

    p = with_config(sub.add_parser("jobs", help="jobs and their states; give a job id for its history"))
    p.add_argument("job", type=int, nargs="?")
    p.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_jobs)

    p = with_config(sub.add_parser("status", help="listener, queue depth and free disk"))
    p.set_defaults(func=cmd_status)

    p = with_config(sub.add_parser("worklist", help="studies in triage priority order, with the reasons"))
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_worklist)

    rules = sub.add_parser("rules", help="routing rules").add_subparsers(dest="rules_command", required=True)
    p = with_config(rules.add_parser("test", help="dry-run the rules on study folders or the last N studies"))
    p.add_argument("folder", type=Path, nargs="*", help="folders holding one study each")
    p.add_argument("--last", type=int, default=0, help="also the last N studies in the ledger")
    p.add_argument("--calling-ae", default="", help="calling AE title to assume for folders")
    p.add_argument("--called-ae", default="", help="called AE title to assume (default: the listener's)")
    p.add_argument("--peer", default=None, help="peer address to assume for folders")
    p.set_defaults(func=cmd_rules_test)

    p = with_config(sub.add_parser("outbox", help="result objects waiting for or delivered to destinations"))
    p.add_argument("--job", type=int)
    p.add_argument("--state", action="append", help="PENDING, SENT or DEAD (repeatable)")
    p.add_argument("--limit", type=int, default=200)
    p.set_defaults(func=cmd_outbox)

    p = with_config(sub.add_parser("resend", help="send a job's result objects again (e.g. after a dead letter)"))
    p.add_argument("job", type=int)
    p.set_defaults(func=cmd_resend)

    p = with_config(sub.add_parser(
        "eval", help="the papers' metrics for pipelines on a labelled set: phantoms, real slices or real volumes"))
    p.add_argument("dataset", type=Path, help="a phantom dataset (folder with labels.csv), a real slice set "
                   "(folder with images/ and infection/ or labels/) or a volume manifest (.csv)")
    p.add_argument("--pipelines", "-p", default="threshold,classical", help="comma-separated (default %(default)s)")
    p.add_argument("--limit", type=int, default=0, help="only the first N cases or slices")
    p.add_argument("--split", "--subset", choices=["all", "validation", "training"], default="all",
                   help="doctor-labelled slice sets: the 15 held-out slices (validation) or the others")
    p.add_argument("--root", type=Path, default=None, help="data root of a volume manifest's folders "
                   "(default: $TRIAGED_REAL_DATA, else ../shared/data/real next to the checkout)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--registry", help="module:function returning the pipeline registry (default: the config's)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train a learned model (multitask, consolidation-em) on a labelled dataset")
    p.add_argument("model", choices=["multitask", "consolidation-em"])
    p.add_argument("--data", type=Path, help="labelled phantom dataset (triaged demo --dataset N); optional: "
                   "without it `multitask` trains on real data only")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, model.pt, manifest.yaml")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--device", help="cpu or cuda (default: CUDA when present)")
    p.add_argument("--real-slices", type=Path, help="the MedSeg COVID-19 slices folder (CC BY-NC 4.0)")
    p.add_argument("--test-data", type=Path, help="a labelled dataset with unseen seeds for the card's metrics")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_train)

    def phantom_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kind", choices=["healthy", "covid", "bacterial", "other"], default="covid")
        p.add_argument("--severity", type=float, help="affected %% of the worse lung (covid, bacterial)")
        p.add_argument("--matrix", type=int, default=512, help="rows = columns (default %(default)s)")
        p.add_argument("--slice-thickness", type=float, default=2.5, help="mm (0.6-10; default %(default)s)")
        p.add_argument("--vendor", choices=["siemens", "ge", "philips", "canon"], default="siemens")
        p.add_argument("--feet-first", action="store_true")
        p.add_argument("--localizer", action="store_true", help="add a localizer series")
        p.add_argument("--dose-report", action="store_true", help="add a dose-screen image")
        p.add_argument("--transfer-syntax", choices=sorted(TRANSFER_SYNTAXES))
        p.add_argument("--quiet", "-q", action="store_true")

    p = sub.add_parser("demo", help="write a synthetic chest CT study (or a labelled dataset) with ground truth")
    phantom_options(p)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dataset", type=int, metavar="N", help="write N labelled studies (balanced kinds) instead")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("selftest", help="send a phantom to a running node, act as its destination, check results")
    phantom_options(p)
    p.add_argument("--to", required=True, help="the node as AE@host:port, e.g. TRIAGED@127.0.0.1:11112")
    p.add_argument("--ae", default="TRIAGED_DEMO", help="our AE title as the destination (default %(default)s)")
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument("--listen-port", type=int, default=11113)
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the results")
    p.add_argument("--tolerance", type=float, default=10.0, help="allowed severity error, percentage points")
    p.set_defaults(func=cmd_selftest)

    p = with_config(sub.add_parser("analyze", help="analyse a DICOM folder or a NIfTI file offline"))
    p.add_argument("path", type=Path, nargs="?", help="DICOM folder (the best series is chosen) or NIfTI in HU")
    p.add_argument("--pipeline", "-p", help="pipeline name (default: analysis.default_pipeline)")
    p.add_argument("--out", "-o", type=Path, help="output folder (default: <name>-triaged)")
    p.add_argument("--list", action="store_true", help="list the pipelines and exit")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TriagedError as exc:
        print(f"triaged: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
