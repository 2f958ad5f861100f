"""Integrated gradients (Sundararajan et al. 2017) and seed 003's saliency → bounding boxes.

:func:`integrated_gradients` attributes a class score to the input or, with ``layer``, to a module's
activation (Hu et al. 2020 take it at Conv3, Conv4 and Conv5)::

    φ_i = (x_i − x'_i) · Σ_k w_k ∂S(x' + α_k (x − x')) / ∂x_i

with the right Riemann sum of the paper's eq. 3 (``α_k = k/m``, ``w_k = 1/m``, k = 1…m) or the
trapezoid rule; the ``m`` interpolated inputs go through the model as one batch (or chunks of
``batch_size``).  Completeness: ``Σ φ ≈ S(x) − S(x')``, exactly for a model linear in what is
attributed.

:func:`saliency_boxes` is seed 003's post-processing, pure numpy/scipy/scikit-image: the product of
the per-scale ``|attributions|`` up-sampled to the slice → 5 × 5 Gaussian → Isodata threshold →
binary closing → 8-connected components of at least ``min_area`` pixels → bounding boxes.

A pipeline takes the per-scale maps from :func:`triaged.nets.multiscale.scale_saliency` and hands the
boxes to the SR as planar ROIs (rows/columns of the slice it was computed on).
Research use only - not for diagnosis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import threshold_isodata
from skimage.transform import resize
from torch import nn

#: Integration rules of :func:`integrated_gradients`.
METHODS: tuple[str, ...] = ("riemann_right", "trapezoid")


def _alphas(steps: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if method == "riemann_right":
        alphas = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    elif method == "trapezoid":
        alphas = torch.arange(0, steps + 1, dtype=torch.float64) / steps
        weights = torch.full((steps + 1,), 1.0 / steps, dtype=torch.float64)
        weights[0] = weights[-1] = 0.5 / steps
    else:
        raise ValueError(f"unknown integration method {method!r}; expected one of {METHODS}")
    return alphas, weights


def _select(out: torch.Tensor, target: int | Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    if callable(target):
        score = target(out)
    elif target is None:
        score = out.reshape(out.shape[0], -1)
        if score.shape[1] != 1:
            raise ValueError(
                f"target is None but the model returns {tuple(out.shape)}, not one score per input"
            )
        score = score[:, 0]
    else:
        score = out[:, int(target)]
    return score.reshape(-1)


def _capture(
    module: nn.Module, model_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        seen.append(out.detach())

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model_fn(x)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError(f"the layer ran {len(seen)} times in one forward pass; it must run exactly once")
    return seen[0]


def _replace_output(value: torch.Tensor) -> Callable[[nn.Module, object, object], torch.Tensor]:
    def hook(_m: nn.Module, _i: object, _o: object) -> torch.Tensor:
        return value

    return hook


def _ig_one(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    target: int | Callable[[torch.Tensor], torch.Tensor] | None,
    baseline: torch.Tensor | None,
    alphas: torch.Tensor,
    weights: torch.Tensor,
    layer: nn.Module | None,
    chunk: int,
    expand_input: bool,
) -> torch.Tensor:
    start = _capture(layer, model_fn, x) if layer is not None else x.detach()
    base = torch.zeros_like(start) if baseline is None else baseline.to(start).expand_as(start)
    delta = start - base
    total = torch.zeros_like(start, dtype=torch.float64)
    for i in range(0, len(alphas), chunk):
        a = alphas[i : i + chunk].to(start.dtype).reshape(-1, *([1] * (start.dim() - 1)))
        w = weights[i : i + chunk].reshape(-1, *([1] * (start.dim() - 1)))
        interp = (base + a * delta).detach().requires_grad_(True)
        with torch.enable_grad():
            if layer is None:
                out = model_fn(interp)
            else:
                handle = layer.register_forward_hook(_replace_output(interp))
                try:
                    out = model_fn(x.expand(len(a), *x.shape[1:]) if expand_input else x)
                finally:
                    handle.remove()
            score = _select(out, target)
            if score.shape[0] != len(a):
                raise ValueError(f"the model gave {score.shape[0]} scores for {len(a)} interpolation steps")
            (grad,) = torch.autograd.grad(score.sum(), interp)
        total += (grad.double() * w).sum(0, keepdim=True)
    return (delta.double() * total).to(start.dtype)


def integrated_gradients(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    target: int | Callable[[torch.Tensor], torch.Tensor] | None,
    baseline: torch.Tensor | None = None,
    steps: int = 25,
    layer: nn.Module | None = None,
    method: str = "riemann_right",
    batch_size: int | None = None,
    expand_input: bool = True,
) -> torch.Tensor:
    """Integrated gradients of ``target``'s score for each sample of ``x``.

    Parameters
    ----------
    model_fn : callable
        Batch ``(n, ...)`` → scores ``(n, K)`` (or ``(n,)`` with ``target=None``); put the model in
        eval mode first (batch normalisation must not use batch statistics).
    x : tensor
        Inputs ``(B, ...)``; each sample is attributed on its own.
    target : int, callable or None
        Class index into the scores, a function scores → ``(n,)``, or None for single-score models.
    baseline : tensor, optional
        ``x'`` (zeros when omitted, as in seed 003), broadcastable to one sample ``(1, ...)``; with
        ``layer`` it is a baseline *activation* of that layer.
    steps : int
        ``m`` (seed 003: 25).
    layer : nn.Module, optional
        Attribute to this module's output instead of the input: the module (run exactly once per
        forward pass) has its output replaced by the interpolated activations.
    method : {"riemann_right", "trapezoid"}
        Integration rule.
    batch_size : int, optional
        Interpolated inputs per forward pass (all at once when omitted).
    expand_input : bool
        With ``layer``: feed ``model_fn`` the sample repeated once per interpolation step (True), or
        the single sample (False), so the part before the layer runs once and only what follows the
        layer sees the ``m`` steps; False needs a model whose pre-layer branches broadcast against
        the post-layer batch (:class:`~triaged.nets.multiscale.MultiScaleNet` does).

    Returns
    -------
    tensor
        Attributions shaped like ``x`` (or like the layer's output for ``B`` samples), detached.
    """
    alphas, weights = _alphas(int(steps), method)
    chunk = len(alphas) if not batch_size else int(batch_size)
    parts = [
        _ig_one(model_fn, x[i : i + 1], target, baseline, alphas, weights, layer, chunk, expand_input)
        for i in range(x.shape[0])
    ]
    return torch.cat(parts).detach()


@dataclass(frozen=True)
class SaliencyBox:
    """A box in pixel rows/columns of the slice: rows ``row0 ≤ r < row1``, columns ``col0 ≤ c < col1``.

    ``score`` is the peak of the blurred joint saliency inside the component, ``area`` its pixels.
    """

    row0: int
    col0: int
    row1: int
    col1: int
    score: float
    area: int

    def contains(self, row: float, col: float) -> bool:
        """Whether the point (row, col) lies inside the box."""
        return self.row0 <= row < self.row1 and self.col0 <= col < self.col1


def joint_saliency(maps: Sequence[np.ndarray] | np.ndarray, shape: Sequence[int] | None = None) -> np.ndarray:
    """Product of the per-scale ``|maps|``, each bilinearly up-sampled to ``shape``.

    ``shape`` defaults to the largest map's; one 2-D array is one scale.
    """
    if isinstance(maps, np.ndarray) and maps.ndim == 2:
        arrays = [maps.astype(np.float64)]
    else:
        arrays = [np.asarray(m, dtype=np.float64) for m in maps]
    if not arrays or any(a.ndim != 2 for a in arrays):
        raise ValueError("saliency maps must be a non-empty sequence of 2-D arrays")
    out_shape = (
        tuple(int(s) for s in shape) if shape is not None else max((a.shape for a in arrays), key=np.prod)
    )
    joint = np.ones(out_shape, dtype=np.float64)
    for a in arrays:
        up = a if a.shape == out_shape else resize(np.abs(a), out_shape, order=1, anti_aliasing=False)
        joint *= np.abs(up)
    return joint


def saliency_boxes(
    maps: Sequence[np.ndarray] | np.ndarray,
    shape: Sequence[int] | None = None,
    min_area: int = 16,
    floor: float = 0.0,
    closing_iterations: int = 1,
    sigma: float = 1.0,
) -> list[SaliencyBox]:
    """Seed 003's boxes from per-scale saliency maps, highest score first.

    Parameters
    ----------
    maps : 2-D array or sequence of 2-D arrays
        Per-scale attributions (signed or not); see :func:`joint_saliency`.
    shape : (rows, cols), optional
        Slice size the boxes refer to.
    min_area : int
        Smallest component kept, in pixels.
    floor : float
        Joint-saliency level below which nothing is foreground, whatever Isodata says (Isodata always
        splits a map in two, so a map of noise alone needs an absolute floor to give no box).
    closing_iterations : int
        Iterations of the 3 × 3 binary closing (dilation then erosion).
    sigma : float
        Gaussian σ in pixels; the kernel is truncated at 2σ, a 5 × 5 kernel for σ = 1 (the paper).
    """
    joint = joint_saliency(maps, shape)
    blurred = ndimage.gaussian_filter(joint, sigma=sigma, truncate=2.0, mode="nearest")
    if not np.isfinite(blurred).all():
        raise ValueError("saliency maps contain NaN or infinite values")
    if blurred.max() <= floor or blurred.max() == blurred.min():
        return []
    level = max(float(threshold_isodata(blurred)), float(floor))
    fg = blurred > level
    if closing_iterations > 0:
        fg = ndimage.binary_closing(fg, structure=np.ones((3, 3), bool), iterations=closing_iterations)
    labels, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    boxes: list[SaliencyBox] = []
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = labels[sl] == idx
        area = int(comp.sum())
        if area < min_area:
            continue
        peak = float(blurred[sl][comp].max())
        boxes.append(SaliencyBox(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop, peak, area))
    return sorted(boxes, key=lambda b: -b.score)
