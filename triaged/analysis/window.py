"""Display window of an 8-bit CT slice, estimated from anatomical landmarks, and grey → HU.

Exported CT slices (JPG/PNG) were windowed before export and carry no Hounsfield units; different
sources use different windows (e.g. the Ma et al. ``coronacases`` slices put soft tissue at grey ≈ 120
and lung at ≈ 14, the MedSeg/Radiopaedia ones soft tissue at 210–249 and lung at ≈ 43).  One assumed
window for all of them is wrong by hundreds of HU.  Here the window is estimated from the slice itself,
assuming a linear (clipped) grey mapping, from three landmarks:

* **aerated lung** ≈ :data:`LUNG_HU` (−850 HU): the mode of the dark pixels *inside* the body outline
  (the convex hull of the bright pixels, so outside air is excluded even when the slice is cropped);
* **soft tissue** ≈ :data:`SOFT_HU` (+40 HU, muscle/mediastinum): among the bright pixels inside the body
  outline, the highest-grey strong histogram peak below grey :data:`SATURATED` (fat, ≈ −100 HU, is the
  other strong peak, below it), used only when soft tissue is not clipped at white;
* **outside air / trachea** ≈ :data:`AIR_HU` (−1000 HU): the median of the dark pixels outside the body
  outline, when there are enough of them; used for the slope only when soft tissue is not seen.

The slope comes from lung + soft tissue when both are seen, else from air + lung, else from a standard
lung window (W 1500, i.e. 1500/255 HU per grey level) anchored at the lung landmark.  When soft tissue is
clipped at white, the window ends below +40 HU, which caps the slope at 890 / (250 − lung grey).  For a set of slices of
one source (one volume), the landmarks are the medians of the per-slice landmarks.

Research use only: not for diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import ndimage

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

#: Reference HU of the landmarks.
AIR_HU: Final[float] = -1000.0
LUNG_HU: Final[float] = -850.0
SOFT_HU: Final[float] = 40.0
#: Grey level from which a landmark counts as saturated (clipped by the export window).
SATURATED: Final[int] = 250
#: Soft tissue counts as clipped at white when large white regions (grey ≥ :data:`SATURATED`, opened by 3
#: pixels) hold more than this many times the pixels per grey level at the soft-tissue peak.
CLIPPED_RATIO: Final[float] = 20.0
#: Fallback slope, HU per grey level (lung window W 1500).
DEFAULT_SLOPE: Final[float] = 1500.0 / 255.0
#: Plausible slopes, HU per grey level (windows 400 … 4000 HU wide); estimates are clipped to them.
SLOPE_RANGE: Final[tuple[float, float]] = (400.0 / 255.0, 4000.0 / 255.0)
#: Fewest pixels a class must have (fraction of the slice) for its landmark to count.
MIN_FRACTION: Final[float] = 0.01


@dataclass(frozen=True)
class Landmarks:
    """Grey levels of the landmarks in one slice (or medians over a set); None where not seen."""

    lung: float | None
    soft: float | None
    air: float | None
    soft_saturated: bool = False


@dataclass(frozen=True)
class Window:
    """A linear display window: grey 0 ↔ ``lo_hu`` and grey 255 ↔ ``hi_hu``.

    ``method`` says which landmarks fixed it (``lung+soft``, ``air+lung``, ``lung+default-slope`` or
    ``default``); ``landmarks`` are the grey levels used.
    """

    lo_hu: float
    hi_hu: float
    method: str = "lung+soft"
    landmarks: Landmarks | None = None

    @property
    def slope(self) -> float:
        """HU per grey level."""
        return (self.hi_hu - self.lo_hu) / 255.0

    @property
    def width(self) -> float:
        return self.hi_hu - self.lo_hu

    @property
    def level(self) -> float:
        return (self.hi_hu + self.lo_hu) / 2.0


#: The window assumed when nothing can be measured: W 1500 / L −600.
DEFAULT_WINDOW: Final[Window] = Window(-1350.0, 150.0, "default")


def gray_to_hu(gray: npt.ArrayLike, window: Window) -> F32:
    """Map grey levels (0–255, any shape) to HU under ``window`` (linear; clipped values stay clipped)."""
    g = np.asarray(gray, np.float32)
    return (window.lo_hu + g * np.float32(window.slope)).astype(np.float32)


def _smoothed_mode(values: npt.NDArray[np.generic], lo: int = 0, hi: int = 256) -> float:
    hist = np.bincount(np.asarray(values, np.intp).ravel(), minlength=256)[:256].astype(np.float64)
    hist = ndimage.gaussian_filter1d(hist, 2.0, mode="nearest")
    return float(lo + int(np.argmax(hist[lo:hi])))


def _soft_tissue_peak(values: npt.NDArray[np.generic], lo: int) -> float:
    """Grey level of soft tissue among the bright pixels: the highest-grey histogram peak below
    :data:`SATURATED` with at least a quarter of the largest peak's height (fat, ≈ −100 HU, is the other
    large peak below it; in wide windows the two merge into one)."""
    hist = np.bincount(np.asarray(values, np.intp).ravel(), minlength=256)[:256].astype(np.float64)
    hist = ndimage.gaussian_filter1d(hist, 2.0, mode="nearest")
    idx = np.arange(max(lo, 1), SATURATED - 1)
    is_peak = (hist[idx] >= hist[idx - 1]) & (hist[idx] >= hist[idx + 1])
    peaks = idx[is_peak]
    if peaks.size == 0:
        return float(lo + int(np.argmax(hist[lo:SATURATED])))
    strong = peaks[hist[peaks] >= 0.25 * hist[peaks].max()]
    return float(strong.max())


def _otsu(gray: U8) -> int:
    hist = np.bincount(gray.ravel(), minlength=256)[:256].astype(np.float64)
    p = hist / max(1.0, hist.sum())
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    return int(np.argmax(between)) + 1


def _body_hull(bright: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Convex hull of the large bright components (the body outline), eroded by 2 % of the slice."""
    from skimage.morphology import convex_hull_image

    labels, n = ndimage.label(bright)
    if n == 0:
        return np.zeros_like(bright)
    sizes = ndimage.sum(bright, labels, index=np.arange(1, n + 1))
    keep = np.isin(labels, 1 + np.nonzero(sizes >= max(20.0, 0.002 * bright.size))[0])
    if not keep.any():
        return np.zeros_like(bright)
    hull = np.asarray(convex_hull_image(keep), bool)
    r = max(1, round(0.02 * min(bright.shape)))
    return np.asarray(ndimage.binary_erosion(hull, iterations=r), bool)


def find_landmarks(gray: npt.ArrayLike) -> Landmarks:
    """Grey levels of aerated lung, soft tissue and outside air in one 8-bit slice (module docstring)."""
    g = np.asarray(gray)
    if g.ndim == 3:  # RGB(A) export: average the colour channels
        g = g[..., :3].mean(axis=-1)
    g = np.clip(np.round(g), 0, 255).astype(np.uint8)
    if g.ndim != 2 or g.size < 64:
        raise ValueError(f"expected one 2D 8-bit slice, got shape {np.shape(gray)}")
    t = _otsu(g)
    dark, bright = g < t, g >= t
    hull = _body_hull(bright)
    min_px = MIN_FRACTION * g.size
    lung_px = g[dark & hull]
    if lung_px.size < min_px:
        lung_px = g[dark]
    lung = _smoothed_mode(lung_px, 0, t) if lung_px.size >= min_px else None
    soft_px = g[bright & hull]
    soft, saturated = None, False
    if soft_px.size >= min_px:
        # the soft-tissue mode below the clipped top of the range; soft tissue counts as saturated when
        # large white regions hold far more pixels than a grey level at that peak (:data:`CLIPPED_RATIO`)
        s = _soft_tissue_peak(soft_px, t) if t < SATURATED - 2 else float(SATURATED)
        # large white regions (not thin bone or speckle): opened mask of the clipped pixels
        blobs = np.count_nonzero(ndimage.binary_opening(g >= SATURATED, iterations=3) & hull)
        peak_density = np.count_nonzero(np.abs(soft_px.astype(np.float64) - s) <= 2.0) / 5.0
        saturated = bool(s >= SATURATED - 1 or blobs > CLIPPED_RATIO * peak_density)
        soft = None if saturated else s
    air_px = g[dark & ~hull]
    air = float(np.median(air_px)) if air_px.size >= min_px else None
    if air is not None and lung is not None and air >= lung:
        air = None
    return Landmarks(lung, soft, air, saturated)


def _median(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.median(v)) if v else None


def window_from_landmarks(marks: Landmarks) -> Window:
    """The window implied by landmark grey levels (module docstring for the order of preference)."""
    lo_s, hi_s = SLOPE_RANGE
    if marks.lung is None:
        if marks.soft is not None:  # anchor soft tissue under the default slope
            lo = SOFT_HU - DEFAULT_SLOPE * marks.soft
            return Window(lo, lo + 255.0 * DEFAULT_SLOPE, "soft+default-slope", marks)
        return Window(DEFAULT_WINDOW.lo_hu, DEFAULT_WINDOW.hi_hu, "default", marks)
    if marks.soft is not None and marks.soft - marks.lung >= 8.0:
        slope, method = (SOFT_HU - LUNG_HU) / (marks.soft - marks.lung), "lung+soft"
    elif marks.air is not None and not marks.soft_saturated and marks.lung - marks.air >= 15.0:
        slope, method = (LUNG_HU - AIR_HU) / (marks.lung - marks.air), "air+lung"
    else:
        slope, method = DEFAULT_SLOPE, "lung+default-slope"
    if marks.soft is None and marks.soft_saturated and marks.lung < SATURATED - 8:
        # soft tissue clipped at the top: the window ends below +40 HU, which bounds the slope
        hi_s = min(hi_s, (SOFT_HU - LUNG_HU) / (SATURATED - marks.lung))
    slope = float(np.clip(slope, lo_s, min(hi_s, SLOPE_RANGE[1])))
    lo = LUNG_HU - slope * marks.lung
    return Window(float(lo), float(lo + 255.0 * slope), method, marks)


def estimate_window(gray: npt.NDArray[np.generic] | Sequence[npt.ArrayLike]) -> Window:
    """Estimate the display window of one 8-bit slice, or of a set of slices of one source.

    Parameters
    ----------
    gray : array (H, W) or sequence of arrays
        Grey levels 0–255.  A sequence (or a 3D array (N, H, W)) is treated as slices exported with one
        window: the landmarks are the medians of the per-slice landmarks.

    Returns
    -------
    Window
        ``lo_hu`` / ``hi_hu`` (HU of grey 0 / 255), the method and the landmarks used.
    """
    if isinstance(gray, np.ndarray) and gray.ndim == 2:
        return window_from_landmarks(find_landmarks(gray))
    marks = [find_landmarks(s) for s in list(gray)]
    if not marks:
        raise ValueError("no slices")
    return window_from_landmarks(
        Landmarks(
            _median([m.lung for m in marks]),
            _median([m.soft for m in marks]),
            _median([m.air for m in marks]),
            sum(m.soft_saturated for m in marks) * 2 > len(marks),
        )
    )
