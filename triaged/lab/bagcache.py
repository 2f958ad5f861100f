"""The training/evaluation cache of slice bags for the seed 000/002/003 networks (research use only).

``python -m triaged.lab.bagcache --out DIR [--train PHANTOMS] [--test PHANTOMS] [--real MANIFEST]`` cuts
every case's bag (:func:`triaged.nets.bags.make_bag`) around its lungs: for real volumes the lungs of the
``classical`` pipeline (the lungs the pipelines use at inference), for phantoms their ground-truth lungs
(``classical`` costs 15–60 s per phantom on a busy 2-core machine and finds the same lungs there: lung
Dice ≥ 0.97 on phantoms; ``--phantom-lungs classical`` uses it anyway).  It writes

* ``DIR/<case_id>.npz``: ``images`` (n, 1, 128, 128) float16, ``z``, ``box``, ``lung`` (n, 128, 128) uint8,
  ``pred_lesions`` (classical's lesions, cropped; only where classical ran), and for phantoms the ground
  truth ``lesions`` and ``lobes`` cropped the same way;
* ``DIR/index.csv``: ``case_id,set,source,label,severity_pct,ct_grade,whole_lung_pct,split,n``;
* ``DIR/DONE`` when every case is written.

Splits: the ``--train`` phantoms are ``train`` except every fifth case (``val``: the kinds cycle by four, so every kind gets some); the ``--test`` phantoms
are ``test``; real volumes of :data:`REAL_TRAIN` are ``train`` (no-pneumonia negatives, as the multitask
card), the other real volumes of ``eval/real-volumes.csv`` are ``test``.  Cases already written are kept
(the build resumes).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Final

import numpy as np

from triaged.analysis.registry import default_registry
from triaged.config.schema import SeriesSelectionConfig
from triaged.domain import Volume
from triaged.lab.datasets import Case, read_dataset
from triaged.lab.realsets import ManifestEntry
from triaged.nets.bags import crop_labels, make_bag
from triaged.volume import load_series_folder

#: Real volumes (eval/real-volumes.csv case ids) the networks may train on (as negatives); the rest are test.
REAL_TRAIN: Final[frozenset[str]] = frozenset({"lidc-idri-0002", "lidc-idri-0003", "lung-pet-ct-dx"})
#: The manifest names each folder on purpose: short stacks the node would refuse are read too (as eval does).
_ALL_SERIES: Final = SeriesSelectionConfig().model_copy(update={"min_slices": 1, "min_coverage_mm": 0.0})
FIELDS: Final[tuple[str, ...]] = (
    "case_id",
    "set",
    "source",
    "label",
    "severity_pct",
    "ct_grade",
    "whole_lung_pct",
    "split",
    "n",
)


def _write_case(
    out: Path, case_id: str, volume: Volume, extra: dict[str, np.ndarray], lungs: np.ndarray | None
) -> int:
    """Cut and write one case's bag; ``lungs`` None: the lungs (and lesions) of ``classical``."""
    arrays: dict[str, np.ndarray] = {}
    if lungs is None:
        result = default_registry().get("classical").run(volume)
        lungs = result.masks.lungs
        extra = {**extra, "pred_lesions": result.masks.lesions}
    bag = make_bag(volume.hu, lungs, volume.spacing)
    arrays = {"images": bag.images.astype(np.float16), "z": bag.z, "box": np.asarray(bag.box, np.int64)}
    arrays["lung"] = bag.lung
    arrays.update({k: crop_labels(v, bag) for k, v in extra.items()})
    if "pred_lesions" in arrays:
        arrays["pred_lesions"] = arrays["pred_lesions"].astype(bool)
    tmp = out / f".{case_id}.tmp.npz"
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(out / f"{case_id}.npz")
    return len(bag.z)


def build(
    out: Path,
    train: Path | None,
    test: Path | None,
    real_manifest: Path | None,
    real_root: Path | None,
    phantom_lungs: str = "truth",
) -> int:
    """Write the cache (module docstring); return the number of cases in the index."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    jobs: list[tuple[str, str, Case | ManifestEntry]] = []
    for root, split in ((train, "train"), (test, "test")):
        if root is None:
            continue
        for i, case in enumerate(read_dataset(root)):
            s = ("val" if i % 5 == 4 else "train") if split == "train" else "test"  # kinds cycle by 4
            jobs.append((f"{root.name}-{case.case_id}", s, case))
    if real_manifest is not None:
        from triaged.lab.realsets import default_data_root, read_manifest

        for e in read_manifest(real_manifest, default_data_root(real_root)):
            jobs.append((e.case_id, "train" if e.case_id in REAL_TRAIN else "test", e))
    for n_done, (case_id, split, item) in enumerate(jobs, 1):
        t0 = time.monotonic()
        extra: dict[str, np.ndarray] = {}
        lungs: np.ndarray | None = None
        if isinstance(item, ManifestEntry):
            volume, _ = load_series_folder(item.folder, _ALL_SERIES)
            row = {"set": "real", "source": "real-volume", "label": item.diagnosis}
            row.update(severity_pct="", ct_grade="", whole_lung_pct="")
        else:
            assert isinstance(item, Case)
            volume = item.volume()
            row = {"set": item.directory.parent.name, "source": "phantom", "label": item.label}
            row.update(severity_pct=f"{item.affected_pct_max:.3f}", ct_grade=str(item.ct_grade))
            row.update(whole_lung_pct=f"{item.whole_lung_pct:.3f}")
            extra = {"lesions": item.mask("lesions"), "lobes": item.mask("lobes")}
            if phantom_lungs == "truth":
                lungs = item.mask("lungs")
        path = out / f"{case_id}.npz"
        if path.is_file():
            n = int(np.load(path)["z"].shape[0])
        else:
            n = _write_case(out, case_id, volume, extra, lungs)
        rows.append({"case_id": case_id, **row, "split": split, "n": str(n)})
        print(f"[{n_done}/{len(jobs)}] {case_id} {split} n={n} {time.monotonic() - t0:.1f}s", flush=True)
    with (out / "index.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    (out / "DONE").write_text(f"{len(rows)} cases\n")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m triaged.lab.bagcache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="cache folder")
    ap.add_argument("--train", type=Path, help="phantom dataset for train/val (triaged demo --dataset)")
    ap.add_argument("--test", type=Path, help="phantom dataset for test")
    ap.add_argument("--real", type=Path, help="real volume manifest (eval/real-volumes.csv)")
    ap.add_argument(
        "--root", type=Path, help="real data root (default $TRIAGED_REAL_DATA or ../shared/data/real)"
    )
    ap.add_argument(
        "--phantom-lungs",
        choices=("truth", "classical"),
        default="truth",
        help="lungs the phantom bags are cut around",
    )
    args = ap.parse_args(argv)
    n = build(args.out, args.train, args.test, args.real, args.root, args.phantom_lungs)
    print(f"{n} cases in {args.out / 'index.csv'} (research use only, not for diagnosis)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
