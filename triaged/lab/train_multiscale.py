"""Train and evaluate seed 003's multi-scale classifier (pipeline ``multiscale``) on the bag cache.

``python -m triaged.lab.train_multiscale --bags DIR --out DIR [--epochs N] [--seed S] [--resume]`` trains;
``... --evaluate --bags DIR --out DIR`` writes the model card's figures (``figures.json``) from
``DIR/model.pt``.

Data (:mod:`triaged.lab.bagcache`): every case is a bag of lung-cropped 128 × 128 slices.  Classes: phantom
``healthy`` and ``other`` (nodules, masses, effusion, atelectasis, emphysema) → normal, ``bacterial`` →
CAP, ``covid`` → COVID-19; the real no-pneumonia training volumes → normal.  Only ``train`` rows are
trained on, ``val`` rows select the epoch, ``test`` rows are only evaluated.

Weak supervision as Hu et al. 2020 (seed 003): only the case label is known.  Each step takes
``cases`` cases, ``slices`` random slices of each (every bag slice contains lung), augments every slice
(random crop 0.7–1 of the side, rotation ±25°, horizontal flip, contrast about the slice mean), runs the
network on all slices, pools each case's slice scores per class by the mean of the top quarter
(:func:`triaged.nets.paper_multiscale.aggregate`, the pooling the pipeline uses) and applies the
class-balanced focal loss (γ = 1, inverse-frequency weights over the training cases) to the pooled
scores.  Adam (β 0.5, 0.9 as the paper), cosine decay; the real negatives are repeated ``real_repeat``
times per epoch.  Seeded per epoch, checkpointed every epoch (``--resume`` continues exactly).

Research use only - not for diagnosis.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from triaged.lab.metrics import PaperCase, roc_auc, three_way_metrics
from triaged.nets.mil import class_balanced_focal_loss, inverse_frequency_weights
from triaged.nets.multiscale import MultiScaleNet
from triaged.nets.paper_multiscale import (
    CLASS_KEYS,
    TOP_FRACTION,
    aggregate,
    bag_saliency_boxes,
    slice_logits,
    study_probabilities,
)

#: Case label → class index (0 normal, 1 CAP, 2 COVID-19).
CLASS_OF: Final[dict[tuple[str, str], int]] = {
    ("phantom", "healthy"): 0,
    ("phantom", "other"): 0,
    ("phantom", "bacterial"): 1,
    ("phantom", "covid"): 2,
    ("real-volume", "normal"): 0,
    ("real-volume", "covid"): 2,
}
CHECKPOINT: Final[str] = "checkpoint.pt"
BEST: Final[str] = "best.pt"
WEIGHTS: Final[str] = "model.pt"


@dataclass(frozen=True)
class Case:
    """One bag of the cache."""

    case_id: str
    source: str
    label: str
    split: str
    cls: int
    images: npt.NDArray[np.float16]
    lung: npt.NDArray[np.uint8]
    lesions: npt.NDArray[np.uint8] | None
    z: npt.NDArray[np.int64]


def load_cases(bags: Path, splits: tuple[str, ...]) -> list[Case]:
    """The cases of ``splits`` with a class (rows whose source/label has no class are skipped)."""
    cases: list[Case] = []
    with (bags / "index.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            cls = CLASS_OF.get((row["source"], row["label"]))
            if cls is None or row["split"] not in splits:
                continue
            with np.load(bags / f"{row['case_id']}.npz") as a:
                cases.append(
                    Case(
                        row["case_id"],
                        row["source"],
                        row["label"],
                        row["split"],
                        cls,
                        a["images"].astype(np.float16),
                        a["lung"],
                        a["lesions"] if "lesions" in a.files else None,
                        a["z"],
                    )
                )
    return cases


def split_validation(train: list[Case], val: list[Case]) -> tuple[list[Case], list[Case]]:
    """The cache's ``val`` rows plus every sixth ``train`` phantom of each class they lack.

    The cache takes every sixth train phantom as ``val``; the phantom datasets cycle through the four kinds,
    so that picks only healthy and other phantoms and no CAP or COVID-19 one: selecting on it would not
    see the positive classes.  Every sixth train phantom (in index order) of a class absent from ``val``
    moves to ``val``.
    """
    present = {c.cls for c in val}
    seen: dict[int, int] = {}
    keep: list[Case] = []
    moved: list[Case] = []
    for c in train:
        if c.source == "phantom" and c.cls not in present:
            seen[c.cls] = seen.get(c.cls, 0) + 1
            if seen[c.cls] % 6 == 0:
                moved.append(c)
                continue
        keep.append(c)
    return keep, [*val, *moved]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Seed 003's augmentation of slices ``(N, 1, S, S)`` in [0, 1]: random crop of 0.7–1 of the side
    (zoomed back to ``S``), rotation ±25°, horizontal flip, contrast ×0.75–1.33 about the slice mean."""
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    scale = u(0.7, 1.0)
    angle = u(-25.0, 25.0) * math.pi / 180.0
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    tx = (1.0 - scale) * u(-1.0, 1.0)
    ty = (1.0 - scale) * u(-1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = torch.exp(u(math.log(0.75), math.log(1.33))).reshape(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean).clamp(0.0, 1.0)


def case_probabilities(model: MultiScaleNet, case: Case) -> npt.NDArray[np.float32]:
    """The pipeline's study probabilities (normal, CAP, COVID-19) of a cached bag."""
    return study_probabilities(slice_logits(model, case.images.astype(np.float32)))


def three_way(cls: npt.ArrayLike, probs: npt.ArrayLike) -> dict[str, Any]:
    """Seed 003's figures: 3-way accuracy, one-vs-rest and macro AUC, and the per-pair AUCs, computed by
    :func:`triaged.lab.metrics.three_way_metrics` (pair a/b: Hand & Till, the mean of the two one-vs-one
    AUCs on the a and b cases), the definitions of the ``triaged eval`` columns.  Undefined AUCs are None.
    """
    y = np.asarray(cls, np.int64)
    p = np.asarray(probs, np.float64)
    cases = [
        PaperCase(
            str(i), CLASS_KEYS[int(c)], None, None, tuple(zip(CLASS_KEYS, map(float, row), strict=True))
        )
        for i, (c, row) in enumerate(zip(y, p, strict=True))
    ]
    acc, macro, pairs, _ = three_way_metrics(cases)
    out: dict[str, Any] = {
        "n": {k: int((y == i).sum()) for i, k in enumerate(CLASS_KEYS)},
        "accuracy_3way": None if acc.value is None else round(acc.value, 4),
    }
    for i, k in enumerate(CLASS_KEYS):
        try:
            out[f"auc_{k}_vs_rest"] = round(roc_auc(y == i, p[:, i]), 4)
        except ValueError:
            out[f"auc_{k}_vs_rest"] = None
    out["auc_macro_ovr"] = None if macro.value is None else round(macro.value, 4)
    for name, m in pairs:
        out["auc_" + name.replace("/", "_")] = None if m.value is None else round(m.value, 4)
    return out


def _evaluate(model: MultiScaleNet, cases: list[Case]) -> dict[str, Any]:
    model.eval()
    probs = np.stack([case_probabilities(model, c) for c in cases]) if cases else np.zeros((0, 3))
    return three_way([c.cls for c in cases], probs)


def _score(figures: dict[str, Any]) -> float:
    """Selection score on ``val``: macro AUC + 3-way accuracy (missing AUCs count 0)."""
    return float(figures.get("auc_macro_ovr") or 0.0) + float(figures.get("accuracy_3way") or 0.0)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """The training run (module docstring); returns its summary (also ``out/train.json``)."""
    torch.set_num_threads(int(args.threads))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_cases, val_cases = split_validation(
        load_cases(args.bags, ("train",)), load_cases(args.bags, ("val",))
    )
    if not train_cases:
        raise SystemExit(f"{args.bags / 'index.csv'}: no train cases")
    model = MultiScaleNet(width=args.width)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=1e-4)
    labels = torch.tensor([c.cls for c in train_cases])
    weights = inverse_frequency_weights(labels, len(CLASS_KEYS))
    weights = weights / weights[weights > 0].mean()
    history: list[dict[str, Any]] = []
    start_epoch, best, wall = 0, -1.0, 0.0
    ckpt = out / CHECKPOINT
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, best, history, wall = state["epoch"], state["best"], state["history"], state["wall"]
    pool = [
        i for i, c in enumerate(train_cases) for _ in range(args.real_repeat if c.source != "phantom" else 1)
    ]
    steps_per_epoch = math.ceil(len(pool) / args.cases)
    total_steps = steps_per_epoch * args.epochs
    for epoch in range(start_epoch, args.epochs):
        t0 = time.monotonic()
        rng = np.random.default_rng([args.seed, epoch])
        gen = torch.Generator().manual_seed(args.seed * 10_000 + epoch)
        torch.manual_seed(args.seed * 10_000 + epoch)
        model.train()
        order = rng.permutation(pool)
        losses: list[float] = []
        for step in range(steps_per_epoch):
            batch = [train_cases[int(i)] for i in order[step * args.cases : (step + 1) * args.cases]]
            if not batch:
                continue
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps_per_epoch + step) / total_steps))
            for g in opt.param_groups:
                g["lr"] = lr
            xs, counts = [], []
            for c in batch:
                n = len(c.images)
                pick = np.sort(rng.choice(n, size=min(args.slices, n), replace=False))
                xs.append(torch.from_numpy(c.images[pick].astype(np.float32)))
                counts.append(len(pick))
            x = augment(torch.cat(xs), gen)
            logits = model(x).logits
            pooled = torch.stack([aggregate(part, TOP_FRACTION) for part in logits.split(counts)])
            target = torch.tensor([c.cls for c in batch])
            loss = class_balanced_focal_loss(pooled, target, weights, gamma=1.0)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            losses.append(float(loss.detach()))
        val = _evaluate(model, val_cases) if val_cases else {}
        score = _score(val)
        wall += time.monotonic() - t0
        entry = {
            "epoch": epoch + 1,
            "loss": round(float(np.mean(losses)), 5),
            "val": val,
            "score": round(score, 4),
        }
        history.append(entry)
        if score > best:
            best = score
            torch.save(model.state_dict(), out / BEST)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch + 1,
                "best": best,
                "history": history,
                "wall": wall,
            },
            ckpt,
        )
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {entry['loss']:.4f} val acc {val.get('accuracy_3way')} "
            f"auc {val.get('auc_macro_ovr')} ({time.monotonic() - t0:.0f}s)",
            flush=True,
        )
    best_state = torch.load(out / BEST, map_location="cpu", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in best_state.items()}, out / WEIGHTS)
    best_epoch = max(history, key=lambda h: h["score"])["epoch"] if history else None
    summary = {
        "command": "python -m triaged.lab.train_multiscale " + " ".join(sys.argv[1:]),
        "epochs": args.epochs,
        "best_epoch": best_epoch,
        "width": args.width,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_per_epoch": steps_per_epoch,
        "recipe": {
            "cases_per_step": args.cases,
            "slices_per_case": args.slices,
            "lr": args.lr,
            "real_repeat": args.real_repeat,
            "top_fraction": TOP_FRACTION,
            "class_weights": [round(float(w), 4) for w in weights],
        },
        "n_train": {k: sum(c.cls == i for c in train_cases) for i, k in enumerate(CLASS_KEYS)},
        "n_val": {k: sum(c.cls == i for c in val_cases) for i, k in enumerate(CLASS_KEYS)},
        "wall_time_s": round(wall, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "history": history,
    }
    (out / "train.json").write_text(json.dumps(summary, indent=1))
    return summary


def box_hits(case: Case, model: MultiScaleNet, probs: npt.NDArray[np.float32]) -> tuple[int, int]:
    """(boxes, boxes overlapping a ground-truth lesion on their slice) of the pipeline's saliency step."""
    cls = int(np.argmax(probs))
    if cls == 0 or case.lesions is None:
        return 0, 0
    images = case.images.astype(np.float32)
    logits = slice_logits(model, images)
    slice_p = torch.from_numpy(logits).softmax(-1)[:, cls].numpy()
    boxes = bag_saliency_boxes(model, images, case.lung, cls, slice_p)
    hits = sum(bool(case.lesions[b.index, b.row0 : b.row1, b.col0 : b.col1].any()) for b in boxes)
    return len(boxes), hits


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The card's figures from ``out/model.pt`` on the ``test`` rows (also ``out/figures.json``)."""
    torch.set_num_threads(int(args.threads))
    model = MultiScaleNet(width=args.width)
    state = torch.load(args.out / WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval()
    test = load_cases(args.bags, ("test",))
    phantoms = [c for c in test if c.source == "phantom"]
    real = [c for c in test if c.source != "phantom"]
    p_ph = np.stack([case_probabilities(model, c) for c in phantoms]) if phantoms else np.zeros((0, 3))
    figures: dict[str, Any] = {"test_phantoms": three_way([c.cls for c in phantoms], p_ph)}
    n_boxes = n_hits = 0
    per_case = []
    for c, p in zip(phantoms, p_ph, strict=True):
        nb, nh = box_hits(c, model, p) if c.cls != 0 else (0, 0)
        n_boxes += nb
        n_hits += nh
        per_case.append(
            {
                "case": c.case_id,
                "label": c.label,
                "probabilities": [round(float(v), 4) for v in p],
                "boxes": nb,
                "box_hits": nh,
            }
        )
    figures["test_phantoms"]["box_hit_rate"] = round(n_hits / n_boxes, 4) if n_boxes else None
    figures["test_phantoms"]["boxes"] = n_boxes
    figures["test_phantoms"]["per_case"] = per_case
    figures["real_test_volumes"] = [
        {
            "case": c.case_id,
            "label": c.label,
            "probabilities": dict(
                zip(CLASS_KEYS, (round(float(v), 4) for v in case_probabilities(model, c)), strict=True)
            ),
        }
        for c in real
    ]
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1))
    return figures


#: Phantoms the card's reproduction figures (and tests/test_paper_multiscale.py) regenerate.
REPRO_SPEC: Final[dict[str, Any]] = {"matrix": 128, "slice_thickness": 5.0}
REPRO_PHANTOMS: Final[tuple[tuple[str, int], ...]] = (("covid", 3001), ("healthy", 3003))
REPRO_REAL: Final[tuple[str, ...]] = ("ricord-1a-covid-001012",)
REPRO_TOLERANCE: Final[float] = 0.03

LIMITS: Final[list[str]] = [
    "trained and tested on synthetic phantoms only (plus three real no-pneumonia volumes as negatives); the real "
    "test set is 1 COVID-19 volume and 2 no-pneumonia volumes, no CAP: no validation on real data",
    "the class probabilities are research outputs; P(COVID-19) is not reported (p_covid_validated_on: null), so "
    "triage uses severity",
    "saliency boxes show where the classifier looked, not segmented lesions; their hit rate is measured on phantoms",
    "CAP is the weak class (1.0.0 on the 24 test phantoms: normal-CAP AUC 0.64, 2 of 6 bacterial phantoms called "
    "CAP, and none of the 10 boxes on bacterial phantoms hit a lesion); COVID-19 vs normal is the strong pair "
    "(AUC 0.99), but the 3 milder of the 6 COVID-19 phantoms (worse lung 10-25 %) are called CAP or normal; the "
    "3 with more than 50 % are called COVID-19",
    "validation set of 24 phantoms (16 normal, 4 CAP, 4 COVID-19): the selected epoch (17) is a noisy choice",
    "Research use only - not for diagnosis.",
]
DEVIATIONS: Final[list[str]] = [
    "channel widths x0.25 of the paper's (8-16-32-64-64); 128 x 128 lung-cropped bag slices (triaged.nets.bags, "
    "classical lungs) instead of 224 x 224 slices with a multi-view U-Net lung mask",
    "study-level multiple-instance training: slice scores pooled per class by the mean of the top quarter of slices, "
    "then the class-balanced focal loss (gamma 1) on the pooled scores; the paper trains on slices carrying the case "
    "label",
    "Adam lr 1e-3 with cosine decay (paper 1e-4), beta (0.5, 0.9) as the paper; contrast augmentation x0.75-1.33 "
    "(paper 0.5-1.5) to keep HU meaning; crop 0.7-1, rotation +-25 deg and flips as the paper",
    "integrated gradients on at most 5 slices per study (the top-scoring ones for the predicted class)",
    "weights stored as float16",
]


def write_card(args: argparse.Namespace) -> Path:
    """``--card DIR``: copy ``out/model.pt`` to DIR, write ``DIR/manifest.yaml`` from ``out/train.json`` and
    ``out/figures.json``, then run the pipeline on the reproduction phantoms (and real volumes present) and
    record their outputs in the card."""
    import shutil

    from triaged.lab.cards import HEADER_WITH_NOTE, save_card
    from triaged.lab.paths import real_data_root
    from triaged.lab.phantom import PhantomSpec, generate, to_volume
    from triaged.nets.paper_multiscale import MultiScalePipeline
    from triaged.nets.weights import sha256_of
    from triaged.volume import load_series_folder

    torch.set_num_threads(int(args.threads))
    dest: Path = args.card
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.out / WEIGHTS, dest / WEIGHTS)
    summary = json.loads((args.out / "train.json").read_text())
    figures = json.loads((args.out / "figures.json").read_text())
    manifest: dict[str, Any] = {
        "name": "multiscale",
        "version": args.version,
        "intended_use": "Research use only - not for diagnosis. Not a medical device.",
        "seed_paper": "Hu et al. 2020, weakly supervised multi-scale learning, normal / CAP / COVID-19 with "
        "integrated-gradient localisation (seed 003)",
        "architecture": {
            "name": "MultiScaleNet",
            "kwargs": {"classes": 3, "width": summary["width"]},
            "parameters": summary["parameters"],
        },
        "classes": list(CLASS_KEYS),
        "p_covid_validated_on": None,
        "p_covid_note": "P(COVID-19) not assessed: trained and tested on phantoms; the real data here (1 COVID-19 "
        "volume, 0 CAP) cannot validate a classifier. class_probabilities are research outputs.",
        "weights": {
            "file": WEIGHTS,
            "sha256": sha256_of(dest / WEIGHTS),
            "bytes": (dest / WEIGHTS).stat().st_size,
            "format": "torch.save state_dict, float16 tensors (load with weights_only=True into float32)",
        },
        "split": {
            "train": "phantoms of train96 (`triaged demo --dataset 96 --matrix 160 --seed 14014`) (96 phantoms, 160 x 160, seed 14014) except every sixth "
            "(val); real no-pneumonia volumes lidc-idri-0002, lidc-idri-0003, lung-pet-ct-dx",
            "val": "the cache's val rows (every sixth train96 phantom: 8 healthy, 8 other) plus every sixth "
            "train96 covid and bacterial phantom (4 + 4; the cache's val has none), selecting the epoch",
            "test": "the 24 phantoms of ph24 (`triaged demo --dataset 24 --matrix 192 --seed 20261130`) (192 x 192); real volumes ricord-1a-001012 (covid), "
            "lidc-idri-0001 and cmb-crc-01068 (normal); never trained on",
            "class_mapping": "phantom healthy + other -> normal, bacterial -> cap, covid -> covid; real normal -> "
            "normal",
        },
        "training": {
            "command": summary["command"],
            "data": "bag cache python -m triaged.lab.bagcache --out BAGS --train train96 --test ph24 --real "
            "eval/real-volumes.csv (lungs = classical's for real volumes, ground truth for phantoms; 128 x 128 slices every ~5 mm, at most 64)",
            "n_train": summary["n_train"],
            "n_val": summary["n_val"],
            "epochs": summary["epochs"],
            "best_epoch": summary["best_epoch"],
            "steps_per_epoch": summary["steps_per_epoch"],
            "recipe": summary["recipe"],
            "wall_time_s": summary["wall_time_s"],
            "threads": summary["threads"],
            "device": "cpu (1 thread, 2-core machine shared with other jobs)",
            "torch": summary["torch"],
            "python": summary["python"],
            "history": [
                {"epoch": h["epoch"], "loss": h["loss"], "val_score": h["score"]} for h in summary["history"]
            ],
        },
        "figures": {
            "test_phantoms": {
                "what": "24 test phantoms of ph24 (`triaged demo --dataset 24 --matrix 192 --seed 20261130`) (192 x 192, never trained on); study-level outputs "
                "of the pipeline's bag step from the cache; triaged.lab.metrics.three_way_metrics (pair AUC a-b: Hand & "
                "Till, mean of the two one-vs-one AUCs on the a and b cases); "
                "box hit rate = share of saliency boxes on predicted-positive covid/cap phantoms that overlap a "
                "ground-truth lesion on their slice",
                **{k: v for k, v in figures["test_phantoms"].items() if k != "per_case"},
                "per_case": figures["test_phantoms"]["per_case"],
            },
            "real_test_volumes": {
                "what": "real test volumes (never trained on): n = 1 COVID-19 (RICORD 1a) vs 2 no-pneumonia "
                "(LIDC-IDRI-0001, CMB-CRC); values reported, not a validation (n = 1 vs 2, no CAP)",
                "cases": figures["real_test_volumes"],
            },
        },
        "limits": LIMITS,
        "deviations_from_seed_paper": DEVIATIONS,
    }
    save_card(dest / "manifest.yaml", manifest, HEADER_WITH_NOTE)
    pipeline = MultiScalePipeline(dest)
    repro: dict[str, Any] = {
        "what": "the whole pipeline on these inputs (tests/test_paper_multiscale.py checks them)",
        "tolerance": REPRO_TOLERANCE,
        "phantom_spec": REPRO_SPEC,
        "phantoms": [],
        "real": {},
    }
    for kind, seed in REPRO_PHANTOMS:
        volume = to_volume(generate(PhantomSpec(kind=kind, seed=seed, **REPRO_SPEC)))  # type: ignore[arg-type]
        f = pipeline.run(volume).findings
        probs = {k: round(float(v), 4) for k, v in f.class_probabilities}
        repro["phantoms"].append(
            {
                "kind": kind,
                "seed": seed,
                "probabilities": probs,
                "predicted": max(probs, key=lambda k: probs[k]),
                "boxes": len(f.saliency_boxes),
            }
        )
    root = real_data_root()
    from triaged.config import SeriesSelectionConfig

    for name in REPRO_REAL:
        if (root / name).is_dir():
            volume, _ = load_series_folder(root / name, SeriesSelectionConfig())
            t0 = time.process_time()
            f = pipeline.run(volume).findings
            repro["real"][name] = {k: round(float(v), 4) for k, v in f.class_probabilities}
            repro.setdefault("cpu_s", {})[name] = round(time.process_time() - t0, 1)
    manifest["reproduce"] = repro
    save_card(dest / "manifest.yaml", manifest, HEADER_WITH_NOTE)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m triaged.lab.train_multiscale", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--bags", type=Path, required=True, help="bag cache (python -m triaged.lab.bagcache)")
    ap.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, model.pt, train.json)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--width", type=float, default=0.25, help="multiplier of the paper's channel counts")
    ap.add_argument("--cases", type=int, default=4, help="cases per step")
    ap.add_argument("--slices", type=int, default=12, help="random slices per case and step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--real-repeat", type=int, default=3, help="times each real negative is seen per epoch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="continue from out/checkpoint.pt")
    ap.add_argument("--evaluate", action="store_true", help="write out/figures.json from out/model.pt")
    ap.add_argument("--card", type=Path, help="write the model folder (model.pt + manifest.yaml) here")
    ap.add_argument("--version", default="1.0.0", help="model version for --card")
    args = ap.parse_args(argv)
    if args.card:
        print(write_card(args))
    elif args.evaluate:
        print(json.dumps(evaluate(args), indent=1))
    else:
        train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
