"""Train and evaluate seed 000's M²UNet (lobe decoder + hierarchical-MIL severity head) on the bag cache.

``python -m triaged.lab.train_m2unet --bags DIR --out DIR [--epochs N] [--resume] [--seed S]`` trains on the
``train`` phantoms of a bag cache (:mod:`triaged.lab.bagcache`) and keeps the epoch that scores best on
``val``; ``--evaluate`` instead measures the kept weights on the ``test`` rows (learned lobes against the
non-learned :mod:`triaged.analysis.lobes` on the same cropped grid, severe vs non-severe among COVID-19
phantoms, P(severe) of the real test volumes) and writes ``DIR/figures.json``; ``--export MODEL_DIR``
writes the kept weights (``--weights``, default ``best.pt``) as float16 ``model.pt`` and prints its sha256.

Recipe (He et al. 2021, Section 3, with the deviations of the model card):

* lobes: CE + soft Dice over background + five lobes on the phantoms' ground-truth lobes, cropped like
  the bag; every training phantom contributes a few random slices per epoch;
* severity: COVID-19 phantoms only, severe = ground-truth worse lung > 50 % (CT3–CT4), non-severe =
  CT1–CT2; the bag is a random subset of the case's bag slices (the paper's random patches), class-weighted
  CE (inverse frequency: few severe cases); loss ``w × CE(severity) + (CE + Dice)(lobes)`` with the
  paper's ``w = 0.01`` by default (``--severity-weight``; the shipped model used 1.0, see its card);
* second stage (``--refit-head STEPS``, not in the paper): the MIL head alone refitted on the frozen
  encoder's features, the step with the lowest validation NLL kept (:func:`refit_head`);
* augmentation: contrast and offset of the normalised intensities, Gaussian noise, a small shift of the
  whole bag (no flips: left and right lobes differ);
* Adam with poly learning-rate decay (power 0.75); the paper's SGD does not move the MIL head, whose
  gradients are scaled by the 0.01 loss weight, on this budget.

Deterministic for a given ``--seed`` and thread count.  Research use only - not for diagnosis.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from triaged.lab.metrics import lobe_dices, roc_auc
from triaged.nets.m2unet import LOBE_CLASSES, M2UNet
from triaged.nets.paper_m2unet import bag_indices, severity_probability

#: Worse-lung affected percentage above which a COVID-19 case is severe (CT3–CT4).
SEVERE_PCT: Final[float] = 50.0
#: Paper's weight of the severity CE against the lobe loss.
SEVERITY_WEIGHT: Final[float] = 0.01
#: Slices of a training bag for the severity head (random subset of the case's bag).
TRAIN_BAG: Final[int] = 20
#: Slices per non-COVID-19 phantom for the lobe loss per epoch.
LOBE_SLICES: Final[int] = 8
#: Largest shift of a training bag, pixels of the 128² crop.
MAX_SHIFT: Final[int] = 6
#: Every this-many-th COVID-19 training phantom validates the severity head instead (see split_rows).
COVID_VAL_EVERY: Final[int] = 4
CHECKPOINT: Final[str] = "checkpoint.pt"
#: The weights after :func:`refit_head` (the last epoch's encoder and decoder, the refitted MIL head).
REFIT: Final[str] = "refit.pt"
#: Augmented random bags per COVID-19 phantom whose encoder features :func:`refit_head` fits on.
REFIT_VIEWS: Final[int] = 4
BEST: Final[str] = "best.pt"


@dataclass(frozen=True)
class Row:
    """One row of the bag cache's ``index.csv``."""

    case_id: str
    source: str
    label: str
    severity_pct: float | None
    split: str

    @property
    def covid(self) -> bool:
        return self.label == "covid"

    @property
    def severe(self) -> bool:
        return self.severity_pct is not None and self.severity_pct > SEVERE_PCT


@dataclass
class CaseData:
    """The arrays of one cached case."""

    row: Row
    images: npt.NDArray[np.float16]  # (n, 1, S, S)
    lung: npt.NDArray[np.uint8]  # (n, S, S)
    lobes: npt.NDArray[np.uint8] | None  # (n, S, S), phantoms only


def read_index(bags: Path) -> list[Row]:
    """The rows of ``<bags>/index.csv``."""
    rows: list[Row] = []
    with (bags / "index.csv").open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            pct = r.get("severity_pct") or ""
            rows.append(Row(r["case_id"], r["source"], r["label"], float(pct) if pct else None, r["split"]))
    return rows


def load_case(bags: Path, row: Row) -> CaseData:
    """Load one case's arrays from ``<bags>/<case_id>.npz``."""
    with np.load(bags / f"{row.case_id}.npz") as z:
        lobes = z["lobes"].astype(np.uint8) if "lobes" in z.files else None
        return CaseData(row, z["images"].astype(np.float16), z["lung"].astype(np.uint8), lobes)


def random_subset(rng: np.random.Generator, n: int, k: int) -> npt.NDArray[np.int64]:
    """``k`` sorted random indices of ``range(n)`` (all when ``n <= k``), stratified along z."""
    if n <= k:
        return np.arange(n, dtype=np.int64)
    edges = np.linspace(0, n, k + 1)
    picks = [int(rng.integers(int(edges[i]), max(int(edges[i]) + 1, int(edges[i + 1])))) for i in range(k)]
    return np.unique(np.asarray(picks, np.int64))


def _shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift the last two axes by (dy, dx), filling with zeros (air / background)."""
    if dy == 0 and dx == 0:
        return t
    h, w = t.shape[-2:]
    out = torch.zeros_like(t)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = t[..., ys, xs]
    return out


def augment(
    rng: np.random.Generator, images: torch.Tensor, lobes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Intensity (contrast ×0.9–1.1 about 0.5, offset ±0.03), noise (σ 0–0.02) and one shift per bag."""
    a = float(rng.uniform(0.9, 1.1))
    b = float(rng.uniform(-0.03, 0.03))
    sigma = float(rng.uniform(0.0, 0.02))
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    x = (images - 0.5) * a + 0.5 + b + sigma * torch.randn(images.shape, generator=g)
    dy, dx = (int(v) for v in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2))
    return _shift(x, dy, dx), None if lobes is None else _shift(lobes, dy, dx)


def lobe_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE + soft Dice (mean over the classes present in the target) of ``(N, 6, H, W)`` logits."""
    ce = F.cross_entropy(logits, target)
    p = logits.softmax(1)
    onehot = F.one_hot(target, LOBE_CLASSES).permute(0, 3, 1, 2).to(p.dtype)
    inter = (p * onehot).sum((0, 2, 3))
    denom = p.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + (1.0 - dice[present]).mean()


def predict_lobes(
    model: M2UNet, images: npt.ArrayLike, lung: npt.ArrayLike, chunk: int = 16
) -> npt.NDArray[np.uint8]:
    """Lobe labels (n, S, S) of bag images: the argmax over the five lobes inside the lung labels."""
    x = torch.from_numpy(np.asarray(images, np.float32))
    lung_a = np.asarray(lung)
    out = np.zeros(lung_a.shape, np.uint8)
    with torch.inference_mode():
        for i in range(0, x.shape[0], chunk):
            logits = model.segment(x[i : i + chunk])
            out[i : i + chunk] = (logits[:, 1:].argmax(1) + 1).numpy().astype(np.uint8)
    out[lung_a == 0] = 0
    return out


def _mean_lobe_dice(pred: npt.NDArray[np.uint8], truth: npt.NDArray[np.uint8]) -> tuple[float, ...]:
    return lobe_dices(pred, truth)


def _nanmean(values: Sequence[float]) -> float:
    a = np.asarray(values, np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else math.nan


def validate(model: M2UNet, cases: Sequence[CaseData]) -> dict[str, Any]:
    """Validation figures: mean lobe Dice (every case with lobes), severity AUC/accuracy/NLL (COVID-19)."""
    model.eval()
    dices: list[float] = []
    labels: list[bool] = []
    probs: list[float] = []
    for c in cases:
        if c.lobes is not None:
            idx = bag_indices(len(c.lobes), 12)
            dices.append(
                _nanmean(_mean_lobe_dice(predict_lobes(model, c.images[idx], c.lung[idx]), c.lobes[idx]))
            )
        if c.row.covid and c.row.severity_pct is not None:
            labels.append(c.row.severe)
            probs.append(severity_probability(model, c.images))
    out: dict[str, Any] = {"lobe_dice": _nanmean(dices), "n_lobe_cases": len(dices), "n_covid": len(labels)}
    if labels:
        y = np.asarray(labels)
        p = np.clip(np.asarray(probs), 1e-6, 1 - 1e-6)
        out["severity_nll"] = float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))
        out["severity_accuracy"] = float(np.mean((p > 0.5) == y))
        out["severity_auc"] = roc_auc(y, p) if 0 < y.sum() < len(y) else None
    return out


def score(v: dict[str, Any]) -> float:
    """Model selection on val: mean lobe Dice + severity AUC (0.5 when undefined) − 0.1 × severity NLL."""
    auc = v.get("severity_auc")
    return (
        float(v["lobe_dice"]) + (0.5 if auc is None else float(auc)) - 0.1 * float(v.get("severity_nll", 0.0))
    )


def split_rows(rows: Sequence[Row]) -> tuple[list[Row], list[Row]]:
    """Training and validation phantoms: the cache's ``train`` and ``val`` rows, never a ``test`` row.

    When the cache's ``val`` rows hold no COVID-19 case (a split by position in a dataset that cycles
    through the four kinds can miss them), every :data:`COVID_VAL_EVERY`-th COVID-19 ``train`` phantom
    validates the severity head instead.
    """
    train = [r for r in rows if r.split == "train"]
    val = [r for r in rows if r.split == "val"]
    if any(r.covid for r in val):
        return train, val
    covid = [r for r in train if r.covid]
    held = {r.case_id for i, r in enumerate(covid, 1) if i % COVID_VAL_EVERY == 0}
    return [r for r in train if r.case_id not in held], val + [r for r in train if r.case_id in held]


def poly_lr(base: float, epoch: int, epochs: int, power: float = 0.75) -> float:
    return base * (1.0 - epoch / max(epochs, 1)) ** power


def train(args: argparse.Namespace) -> int:
    """The training loop (module docstring); checkpoints every epoch, ``--resume`` continues."""
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_index(args.bags) if r.source == "phantom"]
    train_rows, val_rows = split_rows(rows)
    t0 = time.monotonic()
    train_cases = [load_case(args.bags, r) for r in train_rows]
    val_cases = [load_case(args.bags, r) for r in val_rows]
    covid = [c for c in train_cases if c.row.covid and c.lobes is not None]
    others = [c for c in train_cases if not c.row.covid and c.lobes is not None]
    n_severe = sum(c.row.severe for c in covid)
    n_non = len(covid) - n_severe
    if not n_severe or not n_non:
        print(
            f"need severe and non-severe COVID-19 training cases (have {n_severe} / {n_non})", file=sys.stderr
        )
        return 2
    # inverse-frequency class weights (non-severe, severe), normalised to mean 1 over the cases
    total = len(covid)
    class_w = torch.tensor([total / (2 * n_non), total / (2 * n_severe)], dtype=torch.float32)
    print(
        f"loaded {len(train_cases)} train / {len(val_cases)} val phantoms in {time.monotonic() - t0:.0f}s; "
        f"COVID-19 train: {n_severe} severe, {n_non} non-severe; class weights {class_w.tolist()}",
        flush=True,
    )
    model = M2UNet()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    state: dict[str, Any] = {"epoch": 0, "history": [], "best": None, "best_score": -math.inf}
    ck = out / CHECKPOINT
    if args.resume and ck.is_file():
        saved = torch.load(ck, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        print(f"resumed after epoch {state['epoch']}", flush=True)
    deadline = time.monotonic() + 60.0 * args.max_minutes if args.max_minutes else math.inf
    for epoch in range(state["epoch"], args.epochs):
        te = time.monotonic()
        rng = np.random.default_rng([args.seed, epoch])
        torch.manual_seed(args.seed * 1000 + epoch)
        lr = poly_lr(args.lr, epoch, args.epochs)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        n_other = min(len(others), args.others_per_epoch)
        picks: list[tuple[CaseData, bool]] = [(c, True) for c in covid]
        picks += [(others[i], False) for i in rng.choice(len(others), size=n_other, replace=False)]
        order = rng.permutation(len(picks))
        sums = {"lobe": 0.0, "severity": 0.0}
        counts = {"lobe": 0, "severity": 0}
        for i in order:
            case, with_severity = picks[int(i)]
            assert case.lobes is not None
            n = len(case.images)
            idx = random_subset(rng, n, TRAIN_BAG if with_severity else LOBE_SLICES)
            x = torch.from_numpy(case.images[idx].astype(np.float32))
            y = torch.from_numpy(case.lobes[idx].astype(np.int64))
            xa, ya = augment(rng, x, y)
            assert ya is not None
            opt.zero_grad(set_to_none=True)
            if with_severity:
                res = model(xa[None])
                l_lobe = lobe_loss(res.lobe_logits[0], ya)
                target = torch.tensor([int(case.row.severe)])
                l_sev = F.cross_entropy(res.severity_logits, target, weight=class_w)
                loss = l_lobe + args.severity_weight * l_sev
                sums["severity"] += float(l_sev.detach())
                counts["severity"] += 1
            else:
                l_lobe = lobe_loss(model.segment(xa), ya)
                loss = l_lobe
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sums["lobe"] += float(l_lobe.detach())
            counts["lobe"] += 1
        val = validate(model, val_cases)
        s = score(val)
        entry = {
            "epoch": epoch + 1,
            "lr": lr,
            "lobe_loss": sums["lobe"] / max(counts["lobe"], 1),
            "severity_loss": sums["severity"] / max(counts["severity"], 1),
            "val": val,
            "score": s,
            "seconds": time.monotonic() - te,
        }
        state["history"].append(entry)
        state["epoch"] = epoch + 1
        if s > state["best_score"]:
            state["best_score"] = s
            state["best"] = epoch + 1
            torch.save(model.state_dict(), out / BEST)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}, ck)
        (out / "history.json").write_text(json.dumps(state["history"], indent=1))
        print(json.dumps(entry), flush=True)
        if time.monotonic() > deadline:
            print(f"stopping after epoch {epoch + 1}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    print(
        f"best epoch {state['best']} (val score {state['best_score']:.4f}); weights {out / BEST}", flush=True
    )
    return 0


def _head_parameters(model: M2UNet) -> list[torch.nn.Parameter]:
    mods = (model.embedding_gcp, model.embedding_fc, model.image_gcp, model.image_fc, model.classifier)
    return [p for m in mods for p in m.parameters()]


def refit_head(args: argparse.Namespace) -> int:
    """Second stage: refit the hierarchical-MIL head on the frozen encoder of the last epoch.

    With 19 COVID-19 bags an epoch gives the head 19 steps, and its max-pooled similarities start out
    nearly constant across bags, so the joint stage leaves it near P = 0.5.  Here the block-5 features
    of :data:`REFIT_VIEWS` augmented random bags per training case are computed once and the head alone
    is trained on them with Adam; every 25 steps it is scored on the validation COVID-19 phantoms and
    the step with the lowest NLL (a proper score; the AUC of 5 cases is too coarse) is kept in
    ``<out>/refit.pt``.
    """
    torch.manual_seed(args.seed)
    saved = torch.load(args.out / CHECKPOINT, map_location="cpu", weights_only=False)
    model = M2UNet()
    model.load_state_dict(saved["model"])
    model.eval()
    train_rows, val_rows = split_rows([r for r in read_index(args.bags) if r.source == "phantom"])
    covid = [load_case(args.bags, r) for r in train_rows if r.covid and r.severity_pct is not None]
    val = [load_case(args.bags, r) for r in val_rows if r.covid and r.severity_pct is not None]
    rng = np.random.default_rng([args.seed, 7])
    feats: list[torch.Tensor] = []
    labels: list[int] = []
    with torch.inference_mode():
        for c in covid:
            for _ in range(REFIT_VIEWS):
                idx = random_subset(rng, len(c.images), TRAIN_BAG)
                x, _ = augment(rng, torch.from_numpy(c.images[idx].astype(np.float32)), None)
                feats.append(model.encode(x)[-1].clone())
                labels.append(int(c.row.severe))
        val_feats = [
            model.encode(torch.from_numpy(c.images[bag_indices(len(c.images))].astype(np.float32)))[
                -1
            ].clone()
            for c in val
        ]
    y_val = np.asarray([c.row.severe for c in val])
    n_severe = sum(labels)
    class_w = torch.tensor([len(labels) / (2 * (len(labels) - n_severe)), len(labels) / (2 * n_severe)])
    opt = torch.optim.Adam(_head_parameters(model), lr=args.lr, weight_decay=1e-4)
    best = math.inf
    history: list[dict[str, Any]] = []
    for step in range(1, args.refit_head + 1):
        i = int(rng.integers(len(feats)))
        logits = model.classify(model.embed_patches(feats[i])[None])
        loss = F.cross_entropy(logits, torch.tensor([labels[i]]), weight=class_w)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if step % 25:
            continue
        with torch.inference_mode():
            pv = np.asarray(
                [float(model.classify(model.embed_patches(f)[None]).softmax(-1)[0, 1]) for f in val_feats]
            )
        pc = np.clip(pv, 1e-6, 1 - 1e-6)
        nll = float(-np.mean(np.where(y_val, np.log(pc), np.log(1 - pc))))
        auc = roc_auc(y_val, pv) if 0 < y_val.sum() < len(y_val) else 0.5
        entry = {"step": step, "val_auc": auc, "val_nll": nll, "val_p": [round(float(v), 3) for v in pv]}
        history.append(entry)
        print(json.dumps(entry), flush=True)
        if nll < best:
            best = nll
            torch.save(model.state_dict(), args.out / REFIT)
            entry["kept"] = True
    (args.out / "refit.json").write_text(json.dumps(history, indent=1))
    print(f"kept the head at val NLL {best:.3f}: {args.out / REFIT}", flush=True)
    return 0


def classical_lobes_on_bag(
    case_dir: Path, bag_box: tuple[int, int, int, int], z: npt.NDArray[np.int64]
) -> npt.NDArray[np.uint8]:
    """The non-learned lobes (:mod:`triaged.analysis.lobes`) of a phantom, cropped like its bag."""
    from triaged.analysis.grid import WorkGrid
    from triaged.analysis.lobes import lobes_for
    from triaged.analysis.lungs import LungParams, segment_lungs_coarse, upsample_labels
    from triaged.lab.datasets import read_dataset
    from triaged.nets.bags import Bag, crop_labels

    (case,) = [c for c in read_dataset(case_dir.parent) if c.case_id == case_dir.name]
    volume = case.volume()
    params = LungParams()
    shape = volume.hu.shape
    grid = WorkGrid.for_volume((shape[0], shape[1], shape[2]), volume.spacing, params.target_mm)
    hu_c = grid.downsample(volume.hu)
    seg = segment_lungs_coarse(hu_c, grid, volume.affine, params)
    lobes, _, _ = lobes_for(hu_c, seg.labels, upsample_labels(seg.labels, grid), grid, volume.affine)
    if lobes is None:
        return np.zeros((len(z), 128, 128), np.uint8)
    bag = Bag(
        images=np.zeros((len(z), 1, 128, 128), np.float32),
        z=z,
        box=bag_box,
        lung=np.zeros((len(z), 128, 128), np.uint8),
    )
    return crop_labels(lobes, bag)


def evaluate(args: argparse.Namespace) -> int:
    """Test figures of the kept weights (module docstring) → ``<out>/figures.json``."""
    model = M2UNet()
    model.load_state_dict(torch.load(args.out / args.weights, map_location="cpu", weights_only=True))
    model.eval()
    rows = [r for r in read_index(args.bags) if r.split == "test"]
    per_case: list[dict[str, Any]] = []
    learned: list[tuple[float, ...]] = []
    classical: list[tuple[float, ...]] = []
    labels: list[bool] = []
    probs: list[float] = []
    real: dict[str, dict[str, Any]] = {}
    for r in rows:
        c = load_case(args.bags, r)
        p = severity_probability(model, c.images)
        if r.source != "phantom":
            real[r.case_id] = {"label": r.label, "p_severe": round(p, 4), "n_slices": len(c.images)}
            continue
        entry: dict[str, Any] = {"case": r.case_id, "label": r.label, "severity_pct": r.severity_pct}
        if r.covid:
            labels.append(r.severe)
            probs.append(p)
            entry.update(severe=r.severe, p_severe=round(p, 4))
        if c.lobes is not None and args.phantoms is not None:
            with np.load(args.bags / f"{r.case_id}.npz") as z:
                box = tuple(int(v) for v in z["box"])
                zz = z["z"].astype(np.int64)
            name = r.case_id.removeprefix(args.phantoms.name + "-")
            cached = args.out / "classical-lobes" / f"{r.case_id}.npy"
            if cached.is_file():
                cl = np.load(cached)
            else:
                cl = classical_lobes_on_bag(args.phantoms / name, box, zz)  # type: ignore[arg-type]
                cached.parent.mkdir(exist_ok=True)
                np.save(cached, cl)
            le = predict_lobes(model, c.images, c.lung)
            learned.append(lobe_dices(le, c.lobes))
            classical.append(lobe_dices(cl, c.lobes))
            entry.update(
                lobe_dice_learned=round(_nanmean(learned[-1]), 4),
                lobe_dice_classical=round(_nanmean(classical[-1]), 4),
            )
        per_case.append(entry)
        print(json.dumps(entry), flush=True)
    y = np.asarray(labels)
    pr = np.asarray(probs)
    names = ("RUL", "RML", "RLL", "LUL", "LLL")

    def lobe_summary(d: list[tuple[float, ...]]) -> dict[str, Any]:
        a = np.asarray(d, np.float64)
        return {
            "n_cases": len(d),
            "mean": round(float(np.nanmean(np.nanmean(a, axis=1))), 4) if len(d) else None,
            "per_lobe": {n: round(float(np.nanmean(a[:, i])), 4) for i, n in enumerate(names)}
            if len(d)
            else {},
        }

    figures = {
        "severity_test_phantoms": {
            "n_covid": int(len(y)),
            "n_severe": int(y.sum()),
            "n_non_severe": int(len(y) - y.sum()),
            "accuracy_at_0.5": round(float(np.mean((pr > 0.5) == y)), 4) if len(y) else None,
            "auc": round(roc_auc(y, pr), 4) if 0 < y.sum() < len(y) else None,
        },
        "lobe_dice_test_phantoms_bag_grid": {
            "learned": lobe_summary(learned),
            "classical": lobe_summary(classical),
        },
        "real_test_p_severe_unvalidated": real,
        "per_case": per_case,
    }
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps({k: v for k, v in figures.items() if k != "per_case"}, indent=1))
    return 0


def export(args: argparse.Namespace) -> int:
    """Write the kept weights as a float16 state dict to ``<export>/model.pt``; print sha256 and size."""
    state = torch.load(args.out / args.weights, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    args.export.mkdir(parents=True, exist_ok=True)
    path = args.export / "model.pt"
    torch.save(half, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(json.dumps({"file": str(path), "sha256": digest, "bytes": path.stat().st_size}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m triaged.lab.train_m2unet", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--bags", type=Path, required=True, help="bag cache folder (python -m triaged.lab.bagcache)"
    )
    ap.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, history, figures)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--severity-weight", type=float, default=SEVERITY_WEIGHT)
    ap.add_argument(
        "--others-per-epoch", type=int, default=24, help="non-COVID-19 phantoms per epoch (lobes)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop after the epoch that passes this")
    ap.add_argument(
        "--evaluate", action="store_true", help="test figures of <out>/best.pt instead of training"
    )
    ap.add_argument(
        "--phantoms", type=Path, help="test phantom dataset (for the non-learned lobes in --evaluate)"
    )
    ap.add_argument("--export", type=Path, help="write <out>/WEIGHTS as float16 <EXPORT>/model.pt")
    ap.add_argument("--weights", default=BEST, help="weights file in --out for --evaluate/--export")
    ap.add_argument(
        "--refit-head", type=int, default=0, metavar="STEPS", help="refit the MIL head (second stage)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.export is not None:
        return export(args)
    if args.refit_head:
        return refit_head(args)
    if args.evaluate:
        return evaluate(args)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
