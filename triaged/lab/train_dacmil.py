"""Train and evaluate seed 002's DA-CMIL (COVID-19 vs bacterial pneumonia) on the bag cache.

``python -m triaged.lab.train_dacmil --bags DIR --out DIR [--epochs N] [--seed S] [--resume]``

* Data: the bag cache of :mod:`triaged.lab.bagcache` (``index.csv`` + one ``.npz`` per case). Labelled
  bags are the phantoms labelled ``covid`` (class 1) and ``bacterial`` (class 0) of the ``train`` split;
  the model is selected on the ``val`` split (bag cross-entropy, then accuracy).  When the cache's
  ``val`` split holds fewer than :data:`MIN_VAL_PER_CLASS` cases of a class, every
  :data:`VAL_EVERY`-th ``train`` case of each class (in index order) is held out as validation instead:
  the choice is deterministic and written to ``train.json``.  ``test`` rows are never read in training.
* Domain adaptation (the paper adapts across hospitals with a domain classifier): here the only other
  domain is the real CT of the ``train`` split (no-pneumonia volumes, no label of this task).  Their bags
  are used as unlabelled target-domain data: they contribute the label-free contrastive term only (and
  their slices pass through the batch norm with the phantoms'), never a class label.
* Per step: :data:`BAGS_PER_STEP` labelled bags of at most ``--slices`` random slices (the paper: 32),
  augmented (intensity scale and shift, Gaussian noise, left-right flip, shifts of a few pixels), loss
  ``0.5 CE + 0.5 contrastive`` (τ = 1; :func:`~triaged.nets.dacmil.dacmil_loss`) + the target bag's
  contrastive term weighted by ``--target-weight``.  Adam, lr × 0.1 at the paper's epochs 10, 15 and 25
  of 30 scaled to ``--epochs``.
* A checkpoint after each epoch (``--resume`` continues from it; epochs draw from ``(seed, epoch)`` so a
  resumed run repeats an uninterrupted one); the best weights as ``model.pt`` (float16 state dict).

``python -m triaged.lab.train_dacmil --bags DIR --evaluate MODEL_DIR`` prints the card's figures: accuracy,
AUC and F1 (COVID-19 positive, threshold 0.5) on the test phantoms and the outputs on every real test
volume (unvalidated: no real bacterial case exists).  Research use only - not for diagnosis.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch

from triaged.lab.metrics import roc_auc
from triaged.nets.bags import PAD_HU, normalise_hu
from triaged.nets.dacmil import DACMIL
from triaged.nets.mil import contrastive_mil_loss
from triaged.nets.paper_dacmil import predict_bag

F32 = npt.NDArray[np.float32]

#: Class indices of the network (class 1 = COVID-19).
CLASSES: Final[dict[str, int]] = {"bacterial": 0, "covid": 1}
#: Labelled bags per optimiser step.
BAGS_PER_STEP: Final[int] = 2
#: Fewer validation cases than this per class → hold out every ``VAL_EVERY``-th training case instead.
MIN_VAL_PER_CLASS: Final[int] = 2
VAL_EVERY: Final[int] = 5
#: Largest shift of the augmentation, bag pixels.
MAX_SHIFT: Final[int] = 6
#: The bag value of air outside the image.
AIR: Final[float] = float(normalise_hu(PAD_HU))


@dataclass(frozen=True)
class Row:
    """One case of the bag cache's index."""

    case_id: str
    source: str
    label: str
    split: str
    severity_pct: str


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of a run (stored in the checkpoint and ``train.json``)."""

    epochs: int = 40
    seed: int = 2
    slices: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    target_weight: float = 0.5
    widths: tuple[int, ...] = (16, 32, 64, 128)


def read_index(bags: Path) -> list[Row]:
    """The cache's ``index.csv``."""
    with (bags / "index.csv").open(newline="") as fh:
        return [
            Row(r["case_id"], r["source"], r["label"], r["split"], r.get("severity_pct", ""))
            for r in csv.DictReader(fh)
        ]


def split_rows(rows: Sequence[Row]) -> tuple[list[Row], list[Row], list[Row]]:
    """(train, val, target-domain) rows of the task (module docstring; test rows are left out)."""
    task = [r for r in rows if r.source == "phantom" and r.label in CLASSES]
    train = [r for r in task if r.split == "train"]
    val = [r for r in task if r.split == "val"]
    if any(sum(r.label == c for r in val) < MIN_VAL_PER_CLASS for c in CLASSES):
        held: list[Row] = []
        for c in CLASSES:
            of_class = [r for r in train if r.label == c]
            held += of_class[VAL_EVERY - 1 :: VAL_EVERY]
        val = val + held
        train = [r for r in train if r not in held]
    target = [r for r in rows if r.source != "phantom" and r.split == "train"]
    return train, val, target


def load_bag(bags: Path, case_id: str) -> tuple[F32, npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """``images`` (float32), ``lung`` and ``z`` of one cached bag."""
    with np.load(bags / f"{case_id}.npz") as d:
        return d["images"].astype(np.float32), d["lung"].astype(np.uint8), d["z"].astype(np.int64)


def augment(rng: np.random.Generator, images: F32) -> F32:
    """Intensity scale/shift, Gaussian noise, left-right flip and a small shift of a whole bag (n, 1, S, S)."""
    x = images * rng.uniform(0.9, 1.1) + rng.uniform(-0.03, 0.03)
    x = x + rng.normal(0.0, rng.uniform(0.0, 0.02), x.shape).astype(np.float32)
    if rng.random() < 0.5:
        x = x[..., ::-1]
    dy, dx = (int(v) for v in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, 2))
    out = np.full_like(x, AIR)
    s = x.shape[-1]
    out[..., max(dy, 0) : s + min(dy, 0), max(dx, 0) : s + min(dx, 0)] = x[
        ..., max(-dy, 0) : s + min(-dy, 0), max(-dx, 0) : s + min(-dx, 0)
    ]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def sample_slices(rng: np.random.Generator, images: F32, lung: npt.NDArray[np.uint8], k: int) -> F32:
    """At most ``k`` random slices (in z order) of those with lung."""
    idx = np.nonzero(lung.reshape(len(lung), -1).any(axis=1))[0]
    if len(idx) == 0:
        idx = np.arange(len(images))
    if len(idx) > k:
        idx = np.sort(rng.choice(idx, k, replace=False))
    return images[idx]


def _pad(bags: list[F32]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(b) for b in bags)
    x = np.full((len(bags), n, *bags[0].shape[1:]), AIR, np.float32)
    mask = np.zeros((len(bags), n), bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


def milestones(epochs: int) -> list[int]:
    """The paper's lr drops (epochs 10, 15, 25 of 30) scaled to ``epochs``."""
    return sorted({max(1, round(epochs * f)) for f in (10 / 30, 15 / 30, 25 / 30)})


def evaluate(
    net: DACMIL,
    data: dict[str, tuple[F32, npt.NDArray[np.uint8], npt.NDArray[np.int64]]],
    rows: Sequence[Row],
) -> dict[str, float]:
    """Bag cross-entropy, accuracy, AUC and F1 (COVID-19 positive, threshold 0.5) of ``rows``."""
    y = np.array([CLASSES[r.label] for r in rows])
    p = np.array([predict_bag(net, data[r.case_id][0], data[r.case_id][1]).p_covid for r in rows])
    return binary_figures(y, p)


def binary_figures(y: npt.ArrayLike, p: npt.ArrayLike) -> dict[str, float]:
    """Cross-entropy, accuracy, AUC, F1, sensitivity and specificity (positive = 1, threshold 0.5)."""
    y = np.asarray(y, int)
    p = np.asarray(p, np.float64)
    pc = np.clip(p, 1e-6, 1 - 1e-6)
    ce = float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)))
    pred = p >= 0.5
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    auc = roc_auc(y.astype(bool), p) if 0 < y.sum() < len(y) else float("nan")
    return {
        "ce": round(ce, 4),
        "accuracy": round(float(np.mean(pred == (y == 1))), 4),
        "auc": round(float(auc), 4),
        "f1": round(f1, 4),
        "sensitivity": round(tp / (tp + fn), 4) if tp + fn else float("nan"),
        "specificity": round(tn / (tn + fp), 4) if tn + fp else float("nan"),
        "n_covid": int(np.sum(y == 1)),
        "n_bacterial": int(np.sum(y == 0)),
    }


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(bags: Path, out: Path, recipe: Recipe, resume: bool = False) -> dict[str, Any]:
    """Train (module docstring); return the summary also written to ``out/train.json``."""
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_index(bags)
    train_rows, val_rows, target_rows = split_rows(rows)
    if not train_rows or not val_rows:
        raise SystemExit(f"{bags / 'index.csv'}: no covid/bacterial phantom bags to train or validate on")
    data = {r.case_id: load_bag(bags, r.case_id) for r in [*train_rows, *val_rows, *target_rows]}
    torch.manual_seed(recipe.seed)
    net = DACMIL(widths=recipe.widths)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones(recipe.epochs), gamma=0.1)
    ckpt_path = out / "checkpoint.pt"
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"key": (float("inf"), 0.0), "epoch": 0, "state": None, "val": {}}
    start = 1
    wall = 0.0
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        history, best, start, wall = ck["history"], ck["best"], ck["epoch"] + 1, ck["wall"]
        best["key"] = tuple(best["key"])
        print(f"resumed after epoch {ck['epoch']}", flush=True)
    for epoch in range(start, recipe.epochs + 1):
        t0 = time.monotonic()
        rng = np.random.default_rng([recipe.seed, epoch])
        torch.manual_seed(recipe.seed * 1000 + epoch)
        net.train()
        order = rng.permutation(len(train_rows))
        losses: list[float] = []
        for s in range(0, len(order) - BAGS_PER_STEP + 1, BAGS_PER_STEP):
            chosen = [train_rows[int(i)] for i in order[s : s + BAGS_PER_STEP]]
            batch = [augment(rng, sample_slices(rng, *data[r.case_id][:2], recipe.slices)) for r in chosen]
            x, mask = _pad(batch)
            y = torch.tensor([CLASSES[r.label] for r in chosen])
            o = net(x, mask)
            feats = [o.instance_features[i][mask[i]] for i in range(len(chosen))]
            bag_term = torch.nn.functional.cross_entropy(o.logits, y)
            contrast = torch.stack(
                [contrastive_mil_loss(f, o.bag_feature[i]) for i, f in enumerate(feats)]
            ).mean()
            loss = 0.5 * bag_term + 0.5 * contrast
            if target_rows and recipe.target_weight > 0:
                tr = target_rows[int(rng.integers(len(target_rows)))]
                tb = augment(rng, sample_slices(rng, *data[tr.case_id][:2], recipe.slices))
                if len(tb) >= 2:
                    to = net(torch.from_numpy(tb)[None])
                    loss = loss + recipe.target_weight * contrastive_mil_loss(
                        to.instance_features[0], to.bag_feature[0]
                    )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
        val = evaluate(net, data, val_rows)
        wall += time.monotonic() - t0
        entry = {
            "epoch": epoch,
            "loss": round(float(np.mean(losses)), 4),
            **{f"val_{k}": v for k, v in val.items()},
        }
        history.append(entry)
        key = (val["ce"], -val["accuracy"])
        if key < best["key"]:
            best = {
                "key": key,
                "epoch": epoch,
                "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
                "val": val,
            }
        print(json.dumps(entry), f"{time.monotonic() - t0:.1f}s", flush=True)
        _atomic_save(
            {
                "model": net.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "history": history,
                "best": best,
                "epoch": epoch,
                "wall": wall,
                "recipe": asdict(recipe),
            },
            ckpt_path,
        )
    state = {
        k: (v.half() if v.is_floating_point() else v) for k, v in (best["state"] or net.state_dict()).items()
    }
    _atomic_save(state, out / "model.pt")
    summary = {
        "recipe": asdict(recipe),
        "train_cases": {c: sum(r.label == c for r in train_rows) for c in CLASSES},
        "val_cases": {c: sum(r.label == c for r in val_rows) for c in CLASSES},
        "val_case_ids": [r.case_id for r in val_rows],
        "target_domain_cases": [r.case_id for r in target_rows],
        "best_epoch": best["epoch"],
        "best_val": best["val"],
        "wall_time_s": round(wall, 1),
        "torch": torch.__version__,
        "history": history,
    }
    (out / "train.json").write_text(json.dumps(summary, indent=1))
    return summary


def load_weights(model_dir: Path, widths: Sequence[int] = Recipe.widths) -> DACMIL:
    """A DA-CMIL with the float16 ``model.pt`` of ``model_dir`` loaded as float32, eval mode."""
    net = DACMIL(widths=tuple(widths))
    state = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net.eval()


def figures(bags: Path, net: DACMIL) -> dict[str, Any]:
    """The card's figures on the cache's test rows (module docstring)."""
    torch.set_num_threads(1)
    rows = [r for r in read_index(bags) if r.split == "test"]
    per_case: list[dict[str, Any]] = []
    for r in rows:
        images, lung, _ = load_bag(bags, r.case_id)
        p = predict_bag(net, images, lung).p_covid
        per_case.append({"case": r.case_id, "source": r.source, "label": r.label, "p_covid": round(p, 4)})
    task = [c for c in per_case if c["source"] == "phantom" and c["label"] in CLASSES]
    result: dict[str, Any] = {
        "test_phantoms": binary_figures([CLASSES[c["label"]] for c in task], [c["p_covid"] for c in task]),
        "other_test_phantoms": {
            lab: [c["p_covid"] for c in per_case if c["source"] == "phantom" and c["label"] == lab]
            for lab in ("healthy", "other")
        },
        "real_test_volumes": [c for c in per_case if c["source"] != "phantom"],
        "per_case": task,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m triaged.lab.train_dacmil", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--bags", type=Path, required=True, help="bag cache folder (python -m triaged.lab.bagcache)"
    )
    ap.add_argument("--out", type=Path, help="run folder (checkpoint.pt, model.pt, train.json)")
    ap.add_argument("--epochs", type=int, default=Recipe.epochs)
    ap.add_argument("--seed", type=int, default=Recipe.seed)
    ap.add_argument("--slices", type=int, default=Recipe.slices, help="slices per training bag")
    ap.add_argument("--lr", type=float, default=Recipe.lr)
    ap.add_argument("--target-weight", type=float, default=Recipe.target_weight)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--evaluate", type=Path, metavar="MODEL_DIR", help="print the test figures of MODEL_DIR")
    args = ap.parse_args(argv)
    if not (args.bags / "index.csv").is_file():
        ap.error(
            f"{args.bags / 'index.csv'} is missing (build the cache with python -m triaged.lab.bagcache)"
        )
    if args.evaluate is not None:
        print(json.dumps(figures(args.bags, load_weights(args.evaluate)), indent=1))
        return 0
    if args.out is None:
        ap.error("--out is required for training")
    recipe = Recipe(args.epochs, args.seed, args.slices, args.lr, target_weight=args.target_weight)
    summary = train(args.bags, args.out, recipe, args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    print("research use only, not for diagnosis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
