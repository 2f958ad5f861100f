"""Offline and lab commands: ``analyze``, ``eval``, ``demo``, ``selftest`` and ``train``.

They may use the lab (phantoms, datasets, training); those modules are imported inside the command functions
only, so that building the parser stays light.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from triaged.cli._common import AddParser, Subparsers, _table, _write_json, pipeline_problem, with_config
from triaged.config import Config, load_config
from triaged.domain import RESEARCH_NOTE, Findings, p_covid_text, pct_text

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from pydicom import Dataset

    from triaged.lab.metrics import PaperCase


def _registry(config: Config | None = None):  # type: ignore[no-untyped-def]
    """The configured pipeline registry (non-learned pipelines + shipped learned models)."""
    from triaged.analysis.registry import load_registry

    return load_registry((config or Config()).analysis.registry)


def findings_table(findings: Findings) -> str:
    """The findings of one analysis as a text table (shared by analyze and selftest)."""
    rows = []
    for name, m in (
        ("right lung", findings.right),
        ("left lung", findings.left),
        ("both lungs", findings.both),
    ):
        rows.append(
            [
                name,
                f"{m.lung_ml:.0f}",
                f"{m.lesion_ml:.0f}",
                pct_text(m.affected_pct),
                f"{m.consolidation_pct:.1f}",
            ]
        )
    lobe_names = {1: "RUL", 2: "RML", 3: "RLL", 4: "LUL", 5: "LLL"}
    for lobe in findings.lobes:
        name = f"{lobe_names.get(lobe.label, str(lobe.label))} (CT-SS {lobe.score})"
        rows.append([name, f"{lobe.lobe_ml:.0f}", f"{lobe.lesion_ml:.0f}", f"{lobe.affected_pct:.1f}", ""])
    text = _table(["", "lung mL", "lesion mL", "affected %", "consolidation %"], rows)
    extra = [f"CT grade {findings.ct_grade.name} (worse lung {pct_text(findings.severity_pct)} %)"]
    ctss = findings.ct_severity_score
    extra.append(
        "CT severity score not assessed (no lobes)" if ctss is None else f"CT severity score {ctss}/25"
    )
    extra.append(p_covid_text(findings.p_covid))
    if findings.p_severe is not None:
        from triaged.priority import p_severe_text

        extra.append(p_severe_text(findings))
    if findings.key_slices:
        method = dict(findings.provenance).get("key_slices_by")
        extra.append(
            "key slices "
            + ", ".join(str(z) for z in findings.key_slices)
            + (f" (by {method})" if method else "")
        )
    extra.append(f"{len(findings.lesion_boxes)} lesion box(es)")
    if findings.saliency_boxes:
        extra.append(f"{len(findings.saliency_boxes)} saliency box(es)")
    return text + "\n" + "; ".join(extra) + "\n" + RESEARCH_NOTE


def cmd_analyze(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config.exists() else Config()
    registry = _registry(config)
    if args.list:
        broken = 0
        for name in registry.pipeline_names():
            p = registry.get(name)
            problem = pipeline_problem(p)
            broken += problem is not None
            state = "ok" if problem is None else "BROKEN"
            print(f"{name:20s} {p.version:8s} {state:6s} {p.description}")
            if problem is not None:
                print(f"{'':36s}{problem}")
        print(RESEARCH_NOTE)
        return 1 if broken else 0
    if args.path is None:
        print("triaged analyze: give a DICOM folder or a NIfTI file (or --list)", file=sys.stderr)
        return 2
    pipeline = registry.get(args.pipeline or config.analysis.default_pipeline)
    path: Path = args.path
    if not path.exists():
        print(f"triaged analyze: {path} does not exist", file=sys.stderr)
        return 2
    problem = pipeline_problem(pipeline)
    if problem is not None:  # before the volume is read: a broken weights file is found in a second
        print(f"triaged analyze: pipeline {pipeline.name!r}: {problem}", file=sys.stderr)
        return 1
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from triaged import __version__
    from triaged.domain import findings_to_json
    from triaged.encode import OutputContext
    from triaged.encode.sc import render_overview
    from triaged.volume import UnusableUIDsError, load_nifti, load_series_folder, write_nifti

    out: Path = args.out or Path(f"{path.name.removesuffix('.gz').removesuffix('.nii')}-triaged")
    with tqdm(
        total=100, unit="%", desc="load", disable=args.quiet, bar_format="{desc:<28}{bar}| {n:.0f}%"
    ) as bar:
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
        # The same coronal overview the PACS receives as the first SC image (an offline run: revision 1,
        # no predecessor, no triage priority).
        overview, _pixel_mm = render_overview(
            result.findings, masks, volume, OutputContext(software_version=__version__)
        )
        Image.fromarray(overview).save(out / "overview.png")
        bar.n = 100
        bar.set_description_str("done")
        bar.refresh()
    print(findings_table(result.findings))
    print(f"masks, findings.json and overview.png in {out}/")
    return 0


def _spec_from_args(args: argparse.Namespace, seed: int):  # type: ignore[no-untyped-def]
    from triaged.lab.phantom import PhantomSpec

    return PhantomSpec(
        kind=args.kind,
        severity=args.severity,
        seed=seed,
        matrix=args.matrix,
        slice_thickness=args.slice_thickness,
        vendor=args.vendor,
        feet_first=args.feet_first,
        with_localizer=args.localizer,
        with_dose_report=args.dose_report,
        transfer_syntax=TRANSFER_SYNTAXES[args.transfer_syntax] if args.transfer_syntax else None,
    )


TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "jpeg-ls": "1.2.840.10008.1.2.4.80",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
    "rle": "1.2.840.10008.1.2.5",
}


def cmd_demo(args: argparse.Namespace) -> int:
    from triaged.lab.datasets import write_dataset, write_demo_study
    from triaged.lab.phantom import dataset_specs

    if args.dataset:
        specs = dataset_specs(args.dataset, args.seed, matrix=args.matrix)
        write_dataset(specs, args.out, progress=not args.quiet)
        print(
            f"{len(specs)} labelled phantom studies in {args.out}/ (labels.csv + one folder per case). "
            f"Synthetic data. {RESEARCH_NOTE}"
        )
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


def _route_hint(args: argparse.Namespace, called: str, header: Dataset) -> str:
    """Where the node's routing (per ``--config``) sends this phantom's results, for a selftest that got none."""
    from triaged.errors import ConfigError
    from triaged.routing import StudyFacts, attributes_of, route

    if not args.config.exists():
        return (
            f"no {args.config} to read the node's routing from: check that a route of the node sends results "
            f"to {args.ae}@{args.listen_host}:{args.listen_port} (triaged rules test)"
        )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return f"the node's routing cannot be read from {args.config}: {exc.problems[0][1] if exc.problems else exc}"
    attrs = attributes_of(header)
    decision = route(config, StudyFacts(called, args.ae, "127.0.0.1", study=dict(attrs), series=(attrs,)))
    if decision.ignored:
        return f"per {args.config}, rule {decision.rule!r} ignores the study: {decision.ignore_reason}"
    where = []
    for target in decision.destinations:
        dest = config.destinations.get(target.name)
        ae, host, port = (getattr(dest, k, None) for k in ("ae_title", "host", "port"))
        where.append(f"{target.name} ({ae}@{host}:{port})" if ae else target.name)
    sent = ", ".join(where) if where else "no destination"
    return (
        f"per {args.config}, the node's route {decision.rule!r} sends results to {sent}; to receive them here, "
        f"add a destination {args.ae}@{args.listen_host}:{args.listen_port} to that route (or pass --ae, "
        "--listen-host and --listen-port to match one)"
    )


def cmd_selftest(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from pydicom import dcmread

    from triaged.errors import TriagedError
    from triaged.lab.datasets import read_dataset, write_demo_study
    from triaged.net.collector import ResultCollector
    from triaged.net.scu import echo, send_files

    try:
        called, _, address = args.to.partition("@")
        host, _, port_text = address.rpartition(":")
        port = int(port_text)
        if not called or not host:
            raise ValueError
    except ValueError:
        print(f"triaged selftest: --to must be AE@host:port, not {args.to!r}", file=sys.stderr)
        return 2
    try:  # is the node there at all?  Asked before a phantom is made (that takes a while)
        status = echo(host, port, called, calling_ae=args.ae, timeout=10)
    except TriagedError as exc:
        print(
            f"FAIL: the node {called}@{host}:{port} does not answer C-ECHO ({exc}); is it running "
            "(triaged status), and do the AE title, host and port match its listener settings?",
            file=sys.stderr,
        )
        return 1
    if status != 0:
        print(
            f"FAIL: the node {called}@{host}:{port} answered C-ECHO with status 0x{status:04X}",
            file=sys.stderr,
        )
        return 1
    print(f"node {called}@{host}:{port} answers C-ECHO")
    spec = _spec_from_args(args, args.seed if args.seed is not None else int(time.time()) % 100000)
    collector = ResultCollector(args.ae, args.listen_host, args.listen_port)
    try:
        collector.start()
    except OSError as exc:
        print(
            f"triaged selftest: cannot listen on {args.listen_host}:{args.listen_port} as the destination: "
            f"{exc}",
            file=sys.stderr,
        )
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="triaged-selftest-") as tmp:
            t0 = time.monotonic()
            study = write_demo_study(spec, Path(tmp))
            [truth] = read_dataset(study.truth_dir)
            study_header = dcmread(study.dicom_files[0], stop_before_pixels=True)
            study_uid = str(study_header.StudyInstanceUID)
            print(
                f"phantom {spec.kind} {truth.affected_pct_max:.1f} % (worse lung): {len(study.dicom_files)} files "
                f"in {time.monotonic() - t0:.1f} s; study {study_uid}"
            )
            results = send_files(study.dicom_files, host, port, called, calling_ae=args.ae)
            refused = [r for r in results if not r.ok]
            if refused:
                print(
                    f"FAIL: {len(refused)} of {len(results)} instances refused, first: "
                    f"{refused[0].status} {refused[0].comment}",
                    file=sys.stderr,
                )
                return 1
            print(
                f"sent {len(results)} instances to {called}@{host}:{port}; waiting up to {args.timeout:g} s "
                f"for SR, SEG and SC as {args.ae}@{args.listen_host}:{args.listen_port}"
            )
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
            print(
                f"FAIL: after {args.timeout:g} s {got} arrived for the study (SR, SEG and SC expected) at "
                f"{args.ae}@{args.listen_host}:{args.listen_port}; {_route_hint(args, called, study_header)}",
                file=sys.stderr,
            )
            return 1
        severity = _sr_severity(kinds["SR"])
        if severity is None:
            print("FAIL: the SR carries no study severity", file=sys.stderr)
            return 1
        error = abs(severity - truth.affected_pct_max)
        verdict = "PASS" if error <= args.tolerance else "FAIL"
        print(
            f"{verdict}: SR, SEG and SC arrived in the original study; reported severity {severity:.1f} %, "
            f"ground truth {truth.affected_pct_max:.1f} % (error {error:.1f}, tolerance {args.tolerance:g}). "
            f"{RESEARCH_NOTE}"
        )
        return 0 if verdict == "PASS" else 1
    finally:
        collector.stop()


def cmd_eval(args: argparse.Namespace) -> int:
    """``triaged eval PATH``: phantom dataset, real slice set or real volume manifest (by what PATH is)."""
    import dataclasses

    from tqdm import tqdm

    from triaged.analysis.registry import load_registry
    from triaged.domain import Volume
    from triaged.lab.realsets import RealSetError, default_data_root, detect_kind

    config = load_config(args.config) if args.config.exists() else Config()
    registry = _registry(config) if args.registry is None else load_registry(args.registry)
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        print(
            f"triaged eval: unknown or not installed pipeline(s) {', '.join(unknown)}; "
            f"installed: {', '.join(registry.pipeline_names())}",
            file=sys.stderr,
        )
        return 2
    pipelines = {name: registry.get(name) for name in names}
    report: dict[str, object] = {"source": str(args.dataset), "pipelines": names, "note": RESEARCH_NOTE}
    try:
        if args.limit < 0:
            raise RealSetError(f"--limit must be ≥ 0, got {args.limit}")
        kind = detect_kind(args.dataset)
        if kind == "slices":
            from triaged.lab.metrics import slice_markdown_table, slice_set_row, volume_severity_markdown
            from triaged.lab.realsets import evaluate_slice_set, read_slice_set

            sset = read_slice_set(args.dataset, split=args.split, limit=args.limit)
            print(
                f"{sset.describe()}; window per slice (per source for <source>_<index> names) from "
                f"landmarks; mean per-image pixel Dice / sensitivity / specificity:",
                flush=True,
            )
            with tqdm(total=len(sset.refs) * len(names), disable=args.quiet, unit="run") as bar:

                def tick(message: str) -> None:
                    bar.set_description_str(message[:32])
                    bar.update()

                slices = evaluate_slice_set(sset, pipelines, progress=tick)
            print(f"orientation: {slices.describe_orientation()}")
            srows = [slice_set_row(name, slices.scores[name]) for name in names]
            print(slice_markdown_table(srows))
            print(
                "Dice and sensitivity: mean over images with a reference lesion; specificity: over all "
                "images; a failed analysis counts as an empty prediction. Affected %: lesion / lungs on the "
                "slice; reference %: reference lesion / (lungs ∪ reference lesion), the pipeline's own lungs "
                "(the slices have no reference lung mask); its error over the analysed slices."
            )
            volumes = slices.volume_severities()
            if volumes:
                print("\nPer volume (slices of one source summed), affected % of the lungs:")
                print(volume_severity_markdown(volumes))
            report.update(
                kind="slice set",
                split=args.split,
                rows=[dataclasses.asdict(r) for r in srows],
                **slices.to_json(),
            )
        elif kind == "volumes":
            from triaged.lab.metrics import (
                volume_cases_markdown,
                volume_set_row,
                volume_summary_markdown,
            )
            from triaged.lab.realsets import evaluate_volume_set, read_manifest
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

                vols = evaluate_volume_set(
                    entries, pipelines, load, load_mask=lambda p: load_nifti(p).hu, progress=tick
                )
            for e in entries:
                print(f"  {e.case_id}: {vols.series.get(e.case_id, '')}")
            vrows = [volume_set_row(name, vols.results[name]) for name in names]
            print()
            print(volume_cases_markdown(vols.results))
            print(volume_summary_markdown(vrows))
            papers = _print_papers({name: vols.papers[name] for name in names}, real=True)
            report.update(
                kind="volume manifest",
                root=str(root),
                rows=[dataclasses.asdict(r) for r in vrows],
                papers=papers,
                **vols.to_json(),
            )
        else:
            from triaged.lab.datasets import read_dataset
            from triaged.lab.metrics import (
                CaseResult,
                case_result,
                lobe_dice_table,
                markdown_table,
                paper_case,
                table2_row,
            )

            folder = args.dataset.parent if args.dataset.is_file() else args.dataset
            if args.split != "all":
                raise RealSetError(f"{folder}: --split applies to the doctor-label, multiclass and pseudo-label slice sets only")
            try:
                cases = read_dataset(folder)[: args.limit or None]
            except (FileNotFoundError, ValueError) as exc:
                raise RealSetError(str(exc)) from exc
            if not cases:
                raise RealSetError(f"no labelled case in {folder}")
            results: dict[str, list[CaseResult]] = {n: [] for n in names}
            paper_cases: dict[str, list[PaperCase]] = {n: [] for n in names}
            with tqdm(total=len(cases) * len(names), disable=args.quiet, unit="run") as bar:
                for case in cases:
                    volume = case.volume()
                    truth = {m: case.mask(m) for m in ("lungs", "lesions", "consolidation", "lobes")}
                    for name, pipeline in pipelines.items():
                        bar.set_description_str(f"{name} {case.case_id}"[:32])
                        result = pipeline.run(volume)
                        results[name].append(
                            case_result(
                                case.case_id,
                                case.label,
                                result.findings,
                                true_pct=case.affected_pct_max,
                                lungs=result.masks.lungs,
                                true_lungs=truth["lungs"],
                                lesions=result.masks.lesions,
                                true_lesions=truth["lesions"] > 0,
                                consolidation=result.masks.consolidation,
                                true_consolidation=truth["consolidation"] > 0,
                                lobes=result.masks.lobes,
                                true_lobes=truth["lobes"],
                            )
                        )
                        paper_cases[name].append(
                            paper_case(
                                case.case_id,
                                case.label,
                                result.findings,
                                true_pct=case.affected_pct_max,
                                true_lesions=truth["lesions"] > 0,
                            )
                        )
                        bar.update()
            rows = [table2_row(name, results[name]) for name in names]
            print(
                f"{len(cases)} phantom case(s) from {folder}; seed 004 Table 2 columns (ROC AUC of P(COVID-19), "
                f"or of the severity where a pipeline has no classifier), plus lung, consolidation and lobe Dice."
            )
            print(markdown_table(rows))
            lobe_table = lobe_dice_table(rows)
            if lobe_table:
                print("Lobe Dice per lobe (seed 000; phantom lobes as reference):")
                print(lobe_table)
            papers = _print_papers(paper_cases, real=False)
            report.update(
                kind="phantom dataset",
                rows=[dataclasses.asdict(r) for r in rows],
                papers=papers,
                cases={n: [dataclasses.asdict(c) for c in cs] for n, cs in results.items()},
            )
    except RealSetError as exc:
        print(f"triaged eval: {exc}", file=sys.stderr)
        return 2
    print(RESEARCH_NOTE)
    _write_json(args.json, report)
    return 0


def _print_papers(cases: Mapping[str, Sequence[PaperCase]], *, real: bool) -> dict[str, object]:
    """Print the papers' classifier columns (seeds 000, 002, 003) of the pipelines that output them and
    return them for the JSON report: ``rows`` and each such pipeline's per-case outputs (``cases``); both
    empty and nothing printed when no pipeline has a classifier output."""
    import dataclasses

    from triaged.lab.metrics import paper_row, paper_row_json, papers_markdown

    rows = [paper_row(name, cs) for name, cs in cases.items()]
    rows = [r for r in rows if not r.empty]
    if not rows:
        return {"rows": [], "cases": {}}
    where = (
        "real series: no severity reference, bacterial/CAP cases only where the manifest lists them"
        if real
        else "phantoms: reference severity and lesions from the phantom's ground truth"
    )
    print(f"The papers' classifier columns ({where}); n/a where a class is missing. Research outputs:")
    print(papers_markdown(rows))
    return {
        "rows": [paper_row_json(r) for r in rows],
        "cases": {r.method: [dataclasses.asdict(c) for c in cases[r.method]] for r in rows},
    }


def cmd_train(args: argparse.Namespace) -> int:
    from triaged.lab.train import train_from_args

    if args.data is None and args.real_slices is None:
        print(
            "triaged train: give --real-slices DIR (real data first), --data DIR (phantoms), or both",
            file=sys.stderr,
        )
        return 2
    if args.data is not None and not args.data.is_dir():
        print(
            f"triaged train: {args.data} is not a dataset folder (make one with triaged demo --dataset N)",
            file=sys.stderr,
        )
        return 2
    if args.real_slices is not None and not (
        (args.real_slices / "pseudo-label" / "images").is_dir()
        or (args.real_slices / "doctor-label" / "images").is_dir()
    ):
        print(
            f"triaged train: {args.real_slices} is not the medseg-covid-slices folder "
            "(no pseudo-label/images or doctor-label/images in it)",
            file=sys.stderr,
        )
        return 2
    if args.init_from is not None and not (args.init_from / "manifest.yaml").is_file():
        print(
            f"triaged train: {args.init_from} is not a model folder (no manifest.yaml in it)",
            file=sys.stderr,
        )
        return 2
    out = train_from_args(args, command=" ".join(["triaged", *sys.argv[1:]]), progress=not args.quiet)
    print(f"weights and model card in {out}/ (copy to models/{args.model}/ to ship them). {RESEARCH_NOTE}")
    return 0


def _add_eval(sub: Subparsers) -> None:
    p = with_config(
        sub.add_parser(
            "eval",
            help="the papers' metrics for pipelines on a labelled set: phantoms, real slices or real volumes",
        )
    )
    p.add_argument(
        "dataset",
        type=Path,
        help="a phantom dataset (folder with labels.csv), a real slice set "
        "(folder with images/ and infection/ or labels/) or a volume manifest (.csv)",
    )
    p.add_argument(
        "--pipelines", "-p", default="threshold,classical", help="comma-separated (default %(default)s)"
    )
    p.add_argument("--limit", type=int, default=0, help="only the first N cases or slices")
    p.add_argument(
        "--split",
        "--subset",
        choices=["all", "validation", "training"],
        default="all",
        help="doctor-labelled slice sets: the 15 held-out slices (validation) or the others; the "
        "pseudo-label set: the slices of its 4 held-out volumes or of the others",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=None,
        help="data root of a volume manifest's folders "
        "(default: $TRIAGED_REAL_DATA, else ../shared/data/real next to the checkout)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--registry", help="module:function returning the pipeline registry (default: the config's)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def _add_train(sub: Subparsers) -> None:
    p = sub.add_parser(
        "train", help="train a learned model (multitask, consolidation-em) on a labelled dataset"
    )
    p.add_argument("model", choices=["multitask", "consolidation-em"], help="which model to train")
    p.add_argument(
        "--data",
        type=Path,
        help="labelled phantom dataset (triaged demo --dataset N); optional: "
        "without it `multitask` trains on real data only",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, model.pt, manifest.yaml")
    p.add_argument("--epochs", type=int, default=24, help="training epochs (default %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument(
        "--init-from",
        type=Path,
        help="start from the weights of a model folder (e.g. models/multitask; sha256-checked) instead of "
        "random ones: a continuation, recorded in the card",
    )
    p.add_argument("--device", help="cpu or cuda (default: CUDA when present)")
    p.add_argument("--real-slices", type=Path, help="the MedSeg COVID-19 slices folder (CC BY-NC 4.0)")
    p.add_argument(
        "--test-data", type=Path, help="a labelled dataset with unseen seeds for the card's metrics"
    )
    p.add_argument(
        "--real-volumes",
        type=Path,
        metavar="CSV",
        help="a volume manifest (e.g. eval/real-volumes.csv): the card also records the whole pipeline with "
        "the new weights on those real series ($TRIAGED_REAL_DATA, else ../shared/data/real)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def _phantom_options(p: argparse.ArgumentParser) -> None:
    """The phantom options shared by ``demo`` and ``selftest``."""
    p.add_argument(
        "--kind",
        choices=["healthy", "covid", "bacterial", "other"],
        default="covid",
        help="what the phantom shows (default %(default)s)",
    )
    p.add_argument("--severity", type=float, help="affected %% of the worse lung (covid, bacterial)")
    p.add_argument("--matrix", type=int, default=512, help="rows = columns (default %(default)s)")
    p.add_argument("--slice-thickness", type=float, default=2.5, help="mm (0.6-10; default %(default)s)")
    p.add_argument(
        "--vendor",
        choices=["siemens", "ge", "philips", "canon"],
        default="siemens",
        help="whose header conventions to imitate (default %(default)s)",
    )
    p.add_argument("--feet-first", action="store_true", help="patient position FFS instead of HFS")
    p.add_argument("--localizer", action="store_true", help="add a localizer series")
    p.add_argument("--dose-report", action="store_true", help="add a dose-screen image")
    p.add_argument(
        "--transfer-syntax",
        choices=sorted(TRANSFER_SYNTAXES),
        help="encode the images in this transfer syntax (default: explicit VR little endian)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _add_demo(sub: Subparsers) -> None:
    p = sub.add_parser(
        "demo", help="write a synthetic chest CT study (or a labelled dataset) with ground truth"
    )
    _phantom_options(p)
    p.add_argument("--seed", type=int, default=1, help="random seed of the phantom (default %(default)s)")
    p.add_argument(
        "--dataset", type=int, metavar="N", help="write N labelled studies (balanced kinds) instead"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (DICOM files and ground truth)")
    p.set_defaults(func=cmd_demo)


def _add_selftest(sub: Subparsers) -> None:
    p = with_config(
        sub.add_parser(
            "selftest",
            help="send a phantom to a running node, act as its destination, check results",
            description="Checks the node answers C-ECHO, sends it a phantom study, receives its results as a "
            "destination and compares the reported severity with the ground truth.  --config is the node's "
            "config, read only to say where its routing sends results when none arrive.",
        )
    )
    _phantom_options(p)
    p.add_argument("--to", required=True, help="the node as AE@host:port, e.g. TRIAGED@127.0.0.1:11112")
    p.add_argument(
        "--ae", default="TRIAGED_DEMO", help="our AE title as the destination (default %(default)s)"
    )
    p.add_argument(
        "--listen-host",
        default="127.0.0.1",
        help="address we listen on as the destination (default %(default)s)",
    )
    p.add_argument(
        "--listen-port",
        type=int,
        default=11113,
        help="port we listen on as the destination (default %(default)s)",
    )
    p.add_argument("--seed", type=int, help="random seed of the phantom (default: from the clock)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the results")
    p.add_argument("--tolerance", type=float, default=10.0, help="allowed severity error, percentage points")
    p.set_defaults(func=cmd_selftest)


def _add_analyze(sub: Subparsers) -> None:
    p = with_config(sub.add_parser("analyze", help="analyse a DICOM folder or a NIfTI file offline"))
    p.add_argument(
        "path", type=Path, nargs="?", help="DICOM folder (the best series is chosen) or NIfTI in HU"
    )
    p.add_argument("--pipeline", "-p", help="pipeline name (default: analysis.default_pipeline)")
    p.add_argument("--out", "-o", type=Path, help="output folder (default: <name>-triaged)")
    p.add_argument("--list", action="store_true", help="list the pipelines and exit")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)


PARSERS: dict[str, AddParser] = {
    "eval": _add_eval,
    "train": _add_train,
    "demo": _add_demo,
    "selftest": _add_selftest,
    "analyze": _add_analyze,
}
"""Command name -> the function that adds its parser."""
