"""A PNG-ready overview of an analysis: key axial slices with lung outlines and lesions (pure).

Used by ``triaged analyze``; the result objects for the PACS are built in :mod:`triaged.encode`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from triaged.domain import RESEARCH_NOTE, Findings, Masks, Volume, p_covid_text


def _window(hu: npt.NDArray[np.int16], level: float = -600, width: float = 1500) -> npt.NDArray[np.uint8]:
    lo = level - width / 2
    return (np.clip((hu.astype(np.float32) - lo) / width, 0, 1) * 255).astype(np.uint8)


def _tile(volume: Volume, masks: Masks, z: int) -> npt.NDArray[np.uint8]:
    grey = _window(volume.hu[z])
    rgb = np.stack([grey] * 3, axis=-1).astype(np.float32)
    lesion = masks.lesions[z]
    rgb[lesion] = rgb[lesion] * 0.45 + np.array([255, 40, 40]) * 0.55
    cons = masks.consolidation[z]
    rgb[cons] = rgb[cons] * 0.45 + np.array([255, 200, 0]) * 0.55
    lungs = masks.lungs[z] > 0
    edge = lungs & ~ndimage.binary_erosion(lungs, iterations=2)
    rgb[edge] = (40, 220, 90)
    # Patient's right on the viewer's left (radiological convention): the volume's x runs right→left
    # when the row direction is +x (LPS), which is how axial CT is usually stored.
    if volume.affine[0, 0] < 0:
        rgb = rgb[:, ::-1]
    # Square pixels: stretch rows by the pixel aspect.
    sy, sx = volume.spacing[1], volume.spacing[2]
    if abs(sy - sx) > 1e-3:
        rgb = ndimage.zoom(rgb, (sy / sx, 1, 1), order=1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def render_overview(volume: Volume, masks: Masks, findings: Findings, size: int = 384) -> npt.NDArray[np.uint8]:
    """Up to three key slices side by side with a caption; returns an RGB array (H, W, 3).

    Green: lung outline; red: lesions; yellow: consolidation.  The caption gives the grade and the
    affected percentages, P(COVID-19) ("P(COVID-19): not assessed" when the pipeline gives none) and the
    research-use note.
    """
    from PIL import Image, ImageDraw

    zs = list(findings.key_slices[:3]) or [volume.hu.shape[0] // 2]
    tiles = []
    for z in zs:
        img = Image.fromarray(_tile(volume, masks, z)).resize((size, size), Image.Resampling.BILINEAR)
        ImageDraw.Draw(img).text((6, 6), f"z={z}", fill=(255, 255, 0))
        tiles.append(np.asarray(img))
    strip = np.concatenate(tiles, axis=1)
    caption = Image.new("RGB", (strip.shape[1], 70), (0, 0, 0))
    draw = ImageDraw.Draw(caption)
    draw.text((6, 4), f"{findings.pipeline} {findings.pipeline_version}: {findings.ct_grade.name}; "
              f"right {findings.right.affected_pct:.1f} %, left {findings.left.affected_pct:.1f} %, "
              f"whole lung {findings.whole_lung_pct:.1f} %", fill=(255, 255, 255))
    draw.text((6, 20), p_covid_text(findings.p_covid), fill=(255, 255, 255))
    draw.text((6, 36), "green: lungs  red: lesions  yellow: consolidation", fill=(200, 200, 200))
    draw.text((6, 52), RESEARCH_NOTE.rstrip(".").upper(), fill=(255, 80, 80))
    return np.concatenate([strip, np.asarray(caption)], axis=0)
