"""Human-readable overview images as RGB Secondary Capture (PS3.3 A.8.1 SC Image IOD).

The first image is an X-ray-like coronal projection computed from the CT (a digitally reconstructed
radiograph), with the lung outlines, a colour map of the lesion fraction and the key figures burned in.
Further images (``OutputContext.key_slice_images``) are axial key slices in a lung window with the
lesion overlay, the boxes of the lesions the SR reports (:func:`triaged.encode.sr.reported_lesions`), the
saliency boxes of a classifier (seed 003, magenta, labelled with class and score), R/L markers and the CT
image's Instance Number.  Every image has a
legend band (lung outline and lesion colours; the overview's colour bar with its printed 0-100 % scale),
carries "NOT FOR DIAGNOSTIC USE" in its pixels and Burned In Annotation = YES.  ``triaged analyze``
writes the same overview (:func:`render_overview`) as ``overview.png``.

Lesion fraction (what the colour means): for each projected pixel, the share of the lung path along
the anterior-posterior ray that is lesion, ``lesion voxels / lung voxels`` on that ray, 0-100 %.  It is
shown with a sequential colour map (:data:`FRACTION_STOPS`) whose opacity grows with the fraction, and
not at all below :data:`FRACTION_MIN` (a few voxels of partial volume).  The area-weighted mean of this
fraction over the projected lung is the affected lung volume fraction, so a study with 3 % of its lung
voxels affected looks faint and one with 40 % looks dense; colouring every ray that crosses any lesion
(the earlier heat map) painted 84 % of the projected lung for 26 % of the voxels.

Projection (why it looks like a chest radiograph): HU are turned into linear attenuation
``mu = mu_water * (1 + HU / 1000)`` (clipped at 0), with the positive part of HU weighted by
:data:`BONE_WEIGHT` because bone attenuates relatively more at radiographic energies than at the CT's
120 kVp.  The line integral of ``mu`` along the anterior-posterior axis is ``-log(I / I0)`` of a
parallel-beam radiograph; a film shows that log-exposure, so brightness is a window of the line
integral: air and lungs dark, mediastinum, spine and ribs bright.  A mild unsharp mask imitates the
edge enhancement of radiographic processing.

Orientation: the image is resampled to square pixels and shown as a PA radiograph is read: the
patient's right on the viewer's left, head at the top (Patient Orientation ``L\\F``, PS3.3 C.7.6.1.1.1),
with "R" and "L" markers burned in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont, features
from pydicom.dataset import Dataset
from scipy import ndimage

from triaged.domain import Findings, Masks, SaliencyBox, Volume, p_covid_text, pct_text
from triaged.encode.context import (
    NOT_FOR_DIAGNOSTIC_USE,
    SC_SERIES_DESCRIPTION,
    OutputContext,
    body_part,
    map_source_images,
    set_content_datetime,
    with_patient_study_defaults,
)
from triaged.encode.sr import p_severe_assessed, provenance_value, reported_lesions
from triaged.encode.uids import OutputUIDs, output_uids

#: Linear attenuation of water at an effective radiographic energy (~60 keV), 1/mm.
MU_WATER_PER_MM = 0.0206
#: Extra weight of positive HU (bone, contrast) relative to water-equivalent tissue.
BONE_WEIGHT = 1.6
#: Width in pixels of the overview image (without the text band).
OVERVIEW_WIDTH = 768
#: Lesion fraction of a ray (lesion / lung voxels along it) below which nothing is drawn.
FRACTION_MIN = 0.05
#: Colour map of the lesion fraction: (fraction, RGB) stops, linear between them.
FRACTION_STOPS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.0, (255, 245, 110)),
    (0.25, (255, 190, 40)),
    (0.5, (255, 120, 0)),
    (0.75, (235, 40, 20)),
    (1.0, (190, 0, 90)),
)
#: Opacity of the colour at fraction 0 and 1 (linear between): the anatomy stays readable.
FRACTION_ALPHA = (0.2, 0.9)
#: Lung window for the axial key slices (centre, width) in HU.
LUNG_WINDOW = (-600.0, 1500.0)

_T = TypeVar("_T", bound=np.generic)
_F32 = npt.NDArray[np.float32]
_RGB = npt.NDArray[np.uint8]

_OUTLINE_RGB = (40, 200, 255)
_BOX_RGB = (255, 235, 0)
#: Saliency boxes (seed 003: where the classifier looked): magenta, distinct from the yellow lesion boxes.
_SALIENCY_RGB = (255, 60, 255)
_LESION_RGB = (255, 150, 0)
_CONSOLIDATION_RGB = (255, 30, 30)
_WARNING_RGB = (255, 70, 70)
_TEXT_RGB = (235, 235, 235)


def build_sc(
    findings: Findings,
    masks: Masks,
    volume: Volume,
    source: Sequence[Dataset],
    ctx: OutputContext,
    *,
    uids: OutputUIDs | None = None,
) -> list[hd.sc.SCImage]:
    """Build the coronal overview and the axial key-slice images as RGB Secondary Capture.

    Parameters
    ----------
    findings, masks, volume
        The analysis result and the volume it was measured on.
    source
        Headers of the analysed series; patient, study and body part come from them.
    ctx
        Output context (revision, priority, series number, how many key-slice images).
    uids
        UIDs to use; derived from the study, pipeline and revision when None.

    Returns
    -------
    list of highdicom.sc.SCImage
        The overview first, then up to ``ctx.key_slice_images`` key slices.

    Notes
    -----
    PS3.3 A.8.1 Secondary Capture Image IOD; C.8.6.1 SC Equipment (Conversion Type WSD); C.7.6.3
    Image Pixel (RGB, 8 bits); C.7.6.1.1.1 Patient Orientation.
    """
    images = map_source_images(volume, source)
    uids = uids or output_uids(
        volume.study_instance_uid, findings.pipeline, findings.pipeline_version, ctx.revision
    )
    ref = with_patient_study_defaults(images.first)

    overview, pixel_mm = render_overview(findings, masks, volume, ctx)
    outputs = [
        _sc_image(
            ref,
            overview,
            uids,
            ctx,
            findings,
            index=0,
            pixel_spacing=(pixel_mm, pixel_mm),
            orientation=("L", "F"),
            description=(
                "Coronal attenuation projection of the CT (X-ray-like), lung outlines, lesion fraction "
                "along each ray (0-100 % colour bar)"
            ),
        )
    ]
    row_dir, col_dir = _in_plane_directions(volume)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in images.datasets}
    for k, z in enumerate(findings.key_slices[: ctx.key_slice_images], start=1):
        image_ref = images.refs[z]
        number = (
            by_uid[image_ref.sop_instance_uid].get("InstanceNumber")
            if image_ref.sop_instance_uid in by_uid
            else None
        )
        label = _image_label(number, image_ref.frame_number)
        rgb = render_key_slice(findings, masks, volume, ctx, z, image_label=label)
        outputs.append(
            _sc_image(
                ref,
                rgb,
                uids,
                ctx,
                findings,
                index=k,
                pixel_spacing=(float(volume.spacing[1]), float(volume.spacing[2])),
                orientation=(_orientation_letters(row_dir), _orientation_letters(col_dir)),
                description=f"Axial key slice {k} ({label}) in lung window with lesion overlay",
                source_sop=(images.refs[z].sop_class_uid, images.refs[z].sop_instance_uid),
            )
        )
    return outputs


# --- rendering (pure numpy / PIL) ------------------------------------------------------------------


def render_overview(
    findings: Findings, masks: Masks, volume: Volume, ctx: OutputContext
) -> tuple[_RGB, float]:
    """The X-ray-like coronal overview with overlays and text, and its square pixel size in mm.

    Returns
    -------
    (ndarray, float)
        RGB uint8 image (rows, columns, 3) and the pixel spacing in mm.
    """
    p = _project(volume, masks)
    spacing, hu_shape = p.spacing, p.shape
    line_integral = p.mu_sum * spacing[1]  # -log(I/I0) along anterior-posterior
    lungs2d, right2d, left2d = p.lungs_any, p.right_any, p.left_any
    lesion_mm = p.lesion_sum * spacing[1]
    lung_mm = p.lung_sum * spacing[1]

    pixel_mm = max(spacing[2] * hu_shape[2] / OVERVIEW_WIDTH, 0.25)
    zoom = (spacing[0] / pixel_mm, spacing[2] / pixel_mm)
    film = _film(
        ndimage.zoom(line_integral, zoom, order=1),
        ndimage.zoom(lungs2d.astype(np.float32), zoom, order=1) > 0.5,
    )
    lesion_zoom = ndimage.zoom(lesion_mm, zoom, order=1)
    depth_mm = ndimage.zoom(lung_mm, zoom, order=1)
    right = ndimage.zoom(right2d.astype(np.uint8), zoom, order=0).astype(bool)
    left = ndimage.zoom(left2d.astype(np.uint8), zoom, order=0).astype(bool)

    rgb = np.repeat((film * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    rgb = _blend_fraction(rgb, lesion_fraction(lesion_zoom, depth_mm))
    for mask in (right, left):
        rgb[_outline(mask, width=2)] = _OUTLINE_RGB
    image = Image.fromarray(rgb, "RGB")
    _side_markers(image, ("R", "L"))
    image = _with_legend(image, colour_bar=True)
    lines = _summary_lines(findings, ctx)
    return np.asarray(_with_text_band(image, lines)), float(pixel_mm)


def lesion_fraction(lesion: _F32, lung: _F32) -> _F32:
    """Per projected pixel, the share of the lung path along the ray that is lesion, in [0, 1].

    ``lesion`` and ``lung`` are voxel counts (or path lengths in the same unit) along each ray; a ray
    through no lung has fraction 0.
    """
    fraction = np.divide(lesion, lung, out=np.zeros_like(lesion, dtype=np.float32), where=lung > 0.5)
    return np.clip(fraction, 0.0, 1.0).astype(np.float32)


def fraction_colour(fraction: _F32) -> _F32:
    """RGB (float, 0-255) of the colour map :data:`FRACTION_STOPS` at each fraction in [0, 1]."""
    xs = [x for x, _ in FRACTION_STOPS]
    return np.stack(
        [np.interp(fraction, xs, [float(c[i]) for _, c in FRACTION_STOPS]) for i in range(3)], axis=-1
    ).astype(np.float32)


def _blend_fraction(rgb: _RGB, fraction: _F32) -> _RGB:
    """Blend the colour map over the film where the fraction reaches :data:`FRACTION_MIN`."""
    shown = fraction >= FRACTION_MIN
    if not shown.any():
        return rgb
    lo, hi = FRACTION_ALPHA
    alpha = ((lo + (hi - lo) * fraction) * shown)[..., None]
    out = rgb.astype(np.float32) * (1.0 - alpha) + fraction_colour(fraction) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _with_legend(image: Image.Image, *, colour_bar: bool, saliency: bool = False) -> Image.Image:
    """Append a black legend band: lung outline and lesion swatches, and (overview) the colour bar.

    ``saliency`` adds the swatch of the saliency boxes (key slices of a pipeline that has them).

    The colour bar shows the colour map from 0 to 100 % with printed ticks every 25 % and says what is
    not drawn (below :data:`FRACTION_MIN`).
    """
    size = max(12, image.width // 45)
    font = _font(size)
    pad = size // 2
    row = int(size * 1.5)
    swatches: list[tuple[str, tuple[int, int, int], bool]] = [("Lung outline", _OUTLINE_RGB, True)]
    if colour_bar:
        swatches.append((f"Lesion fraction >= {100 * FRACTION_MIN:g} % (scale below)", _LESION_RGB, False))
    else:
        swatches += [
            ("Lesion (GGO + consolidation)", _LESION_RGB, False),
            ("Consolidation", _CONSOLIDATION_RGB, False),
            ("Lesion box", _BOX_RGB, True),
        ]
        if saliency:
            swatches.append(("Saliency box (where the classifier looked)", _SALIENCY_RGB, True))
    # Lay the swatches out in rows that fit the image's width (a narrow key slice wraps them).
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed: list[tuple[int, int, str, tuple[int, int, int], bool]] = []
    x, y = pad, pad
    for text, colour, outline in swatches:
        width = size + pad // 2 + int(measure.textlength(text, font=font))
        if placed and x + width > image.width:
            x, y = pad, y + row
        placed.append((x, y, text, colour, outline))
        x += width + 2 * size
    swatch_rows = (y - pad) // row + 1
    height = pad + row * (swatch_rows + (2 if colour_bar else 0)) + pad
    band = Image.new("RGB", (image.width, height), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for x, y, text, colour, outline in placed:
        box = (x, y + 2, x + size, y + 2 + size - 4)
        if outline:
            draw.rectangle(box, outline=colour, width=2)
        else:
            draw.rectangle(box, fill=colour)
        draw.text((x + size + pad // 2, y), text, fill=_TEXT_RGB, font=font)
    pad_rows = row * (swatch_rows - 1)  # the colour bar goes below the swatch rows
    if colour_bar:
        title = "Lesion share of the lung depth along each ray (AP projection):"
        draw.text((pad, pad + row + pad_rows), title, fill=_TEXT_RGB, font=font)
        bar_x0 = pad + int(draw.textlength("0 %", font=font)) // 2
        bar_x1 = image.width - pad - int(draw.textlength("100 %", font=font)) // 2
        y0 = pad + 2 * row + pad_rows
        ramp = np.linspace(0.0, 1.0, max(2, bar_x1 - bar_x0), dtype=np.float32)
        colours = fraction_colour(ramp).astype(np.uint8)
        bar = np.repeat(colours[None], max(4, size // 2), axis=0)
        band.paste(Image.fromarray(bar, "RGB"), (bar_x0, y0))
        draw.rectangle(
            (bar_x0, y0, bar_x0 + int(FRACTION_MIN * (bar_x1 - bar_x0)), y0 + bar.shape[0]), fill=(60, 60, 60)
        )
        tick_y = y0 + bar.shape[0] + 1
        for pct in (0, 25, 50, 75, 100):
            tx = bar_x0 + round(pct / 100 * (bar_x1 - bar_x0 - 1))
            draw.line((tx, y0, tx, tick_y + 2), fill=_TEXT_RGB)
            label = f"{pct} %"
            w = draw.textlength(label, font=font)
            draw.text((tx - w / 2, tick_y + 2), label, fill=_TEXT_RGB, font=font)
        height = tick_y + 2 + size + pad
        band = band.crop((0, 0, image.width, max(height, band.height)))
    out = Image.new("RGB", (image.width, image.height + band.height))
    out.paste(image, (0, 0))
    out.paste(band, (0, image.height))
    return out


def render_key_slice(
    findings: Findings,
    masks: Masks,
    volume: Volume,
    ctx: OutputContext,
    z: int,
    *,
    image_label: str | None = None,
) -> _RGB:
    """Axial slice ``z`` in a lung window with lung outline, lesion overlay, lesion boxes and text.

    ``image_label`` names the CT image it is (e.g. "CT image 57", from its Instance Number) and is
    burned in; without it the slice is named by its position in the analysed stack.  The patient's
    side markers follow the slice's column direction (:func:`_row_side_letters`).
    """
    centre, width = LUNG_WINDOW
    grey = np.clip((volume.hu[z].astype(np.float32) - (centre - width / 2)) / width, 0.0, 1.0)
    rgb = np.repeat((grey * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    lesion = masks.lesions[z].astype(bool)
    overlay = np.array(_LESION_RGB, dtype=np.float32)
    rgb[lesion] = (0.55 * rgb[lesion] + 0.45 * overlay).astype(np.uint8)
    consolidation = masks.consolidation[z].astype(bool)
    rgb[consolidation] = (0.5 * rgb[consolidation] + 0.5 * np.array(_CONSOLIDATION_RGB)).astype(np.uint8)
    rgb[_outline(masks.lungs[z] > 0, width=1)] = _OUTLINE_RGB
    image = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(image)
    # The lesions the SR reports (>= 5 ml, none in a CT0 study): the picture and the report agree.
    for box in reported_lesions(findings):
        if box.z == z:
            draw.rectangle(
                (box.col_min - 2, box.row_min - 2, box.col_max + 2, box.row_max + 2),
                outline=_BOX_RGB,
                width=2,
            )
    font = _font(max(14, image.width // 36))
    small = _font(max(11, image.width // 48))
    for sbox in findings.saliency_boxes:
        if sbox.z == z:
            draw.rectangle(
                (sbox.col_min - 1, sbox.row_min - 1, sbox.col_max + 1, sbox.row_max + 1),
                outline=_SALIENCY_RGB,
                width=2,
            )
            draw.text(
                (sbox.col_min, max(0, sbox.row_min - 3)),
                saliency_label(sbox),
                fill=_SALIENCY_RGB,
                font=small,
                anchor="lb",
                stroke_width=2,
                stroke_fill=(0, 0, 0),
            )
    _side_markers(image, _row_side_letters(volume))
    name = image_label or f"slice {z + 1} of {volume.hu.shape[0]} of the analysed stack"
    draw.text(
        (image.width // 2, max(6, image.width // 80)),
        name,
        fill=_TEXT_RGB,
        font=font,
        anchor="ma",
        stroke_width=2,
        stroke_fill=(0, 0, 0),
    )
    image = _with_legend(image, colour_bar=False, saliency=bool(findings.saliency_boxes))
    lines = _summary_lines(findings, ctx)
    method = provenance_value(findings, "key_slices_by")
    chosen = f"; chosen by {method}" if method else ""
    lines.insert(1, (f"Axial key slice: {name}; lung window{chosen}", _TEXT_RGB))
    return np.asarray(_with_text_band(image, lines))


def saliency_label(box: SaliencyBox) -> str:
    """The burned-in label of a saliency box, e.g. ``"saliency: covid 0.82"`` (class and mean saliency)."""
    return f"saliency: {box.label} {box.score:.2f}"


def _image_label(instance_number: object, frame_number: int | None) -> str:
    """The burned-in name of a key slice's CT image: its Instance Number (and frame), as a viewer shows."""
    text = (
        f"CT image {instance_number}"
        if instance_number not in (None, "")
        else "CT image (no Instance Number)"
    )
    if frame_number is not None:
        text += f", frame {frame_number}"
    return text


def _row_side_letters(volume: Volume) -> tuple[str, str]:
    """Markers for the left and right edge of an axial slice: the patient directions of decreasing and
    increasing column (e.g. ("R", "L") for a standard axial slice, viewed from the feet)."""
    direction = volume.affine[:3, 0]
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # negative, positive LPS direction
    axis = int(np.argmax(np.abs(direction)))
    lo, hi = letters[axis]
    return (lo, hi) if direction[axis] > 0 else (hi, lo)


def _reorient(array: npt.NDArray[_T], volume: Volume) -> tuple[npt.NDArray[_T], tuple[float, float, float]]:
    """Reorder a (z, y, x) array to (superior->inferior, anterior->posterior, right->left).

    Each array axis is assigned to the LPS axis its direction (a column of ``volume.affine``) is
    closest to; the small obliquity of a tilted or rotated acquisition is ignored, which is harmless
    for an overview picture.  Returns the view and the spacing (mm) along its three axes.
    """
    # Affine columns are (column=x, row=y, slice=z) directions; array axes are (z, y, x).
    directions = [volume.affine[:3, 2], volume.affine[:3, 1], volume.affine[:3, 0]]
    lps_axis = [int(np.argmax(np.abs(d))) for d in directions]
    if sorted(lps_axis) != [0, 1, 2]:
        raise ValueError("volume axes are too oblique to reorient for the overview")
    # Target order: LPS z (S), LPS y (P), LPS x (L).
    order = [lps_axis.index(2), lps_axis.index(1), lps_axis.index(0)]
    arr = np.transpose(array, order)
    spacing = tuple(float(np.linalg.norm(directions[a])) for a in order)
    signs = [float(np.sign(directions[a][lps_axis[a]])) for a in order]
    # Flip so that indices run superior->inferior (-LPS z), anterior->posterior (+y), right->left (+x).
    wanted = (-1.0, 1.0, 1.0)
    for axis, (sign, want) in enumerate(zip(signs, wanted, strict=True)):
        if sign != want:
            arr = np.flip(arr, axis=axis)
    return arr, (spacing[0], spacing[1], spacing[2])


#: Rows (superior->inferior) of the reoriented volume projected at a time: the temporaries of one slab
#: are a few MiB whatever the study's length (a whole 600-slice float32 copy was +2.4 GB).
_SLAB_ROWS = 16


class _Projections(NamedTuple):
    """The anterior-posterior projections the overview is drawn from, (superior->inferior, right->left)."""

    shape: tuple[int, int, int]  # of the reoriented volume
    spacing: tuple[float, float, float]
    mu_sum: _F32  # sum of attenuation per mm along anterior-posterior (times spacing: the line integral)
    lungs_any: npt.NDArray[np.bool_]
    right_any: npt.NDArray[np.bool_]
    left_any: npt.NDArray[np.bool_]
    lesion_sum: _F32  # lesion voxels along each ray
    lung_sum: _F32  # lung voxels along each ray


def _project(volume: Volume, masks: Masks) -> _Projections:
    """Project the volume and masks slab by slab; each ray is summed in the same order as one whole pass.

    Axis 1 (anterior-posterior) is reduced within each slab of rows, so every output pixel is the same
    sum of the same values as a projection of the whole volume at once: the pixels are identical.
    """
    hu, spacing = _reorient(volume.hu, volume)
    lungs, _ = _reorient(masks.lungs, volume)
    lesions, _ = _reorient(masks.lesions, volume)
    rows, _, cols = hu.shape
    mu_sum = np.empty((rows, cols), np.float32)
    lesion_sum = np.empty((rows, cols), np.float32)
    lung_sum = np.empty((rows, cols), np.float32)
    lungs_any = np.empty((rows, cols), bool)
    right_any = np.empty((rows, cols), bool)
    left_any = np.empty((rows, cols), bool)
    for a in range(0, rows, _SLAB_ROWS):
        b = min(a + _SLAB_ROWS, rows)
        h = hu[a:b].astype(np.float32)
        mu = MU_WATER_PER_MM * (1.0 + np.minimum(h, 0.0) / 1000.0 + BONE_WEIGHT * np.maximum(h, 0.0) / 1000.0)
        np.maximum(mu, 0.0, out=mu)
        mu_sum[a:b] = mu.sum(axis=1)
        lab = lungs[a:b]
        in_lung = lab > 0
        lungs_any[a:b] = in_lung.any(axis=1)
        right_any[a:b] = (lab == 1).any(axis=1)
        left_any[a:b] = (lab == 2).any(axis=1)
        lung_sum[a:b] = in_lung.sum(axis=1, dtype=np.float32)
        lesion_sum[a:b] = lesions[a:b].sum(axis=1, dtype=np.float32)
    return _Projections(hu.shape, spacing, mu_sum, lungs_any, right_any, left_any, lesion_sum, lung_sum)


def _film(line_integral: _F32, lungs: npt.NDArray[np.bool_]) -> _F32:
    """Map the attenuation line integral to film brightness in [0, 1] (white = attenuating).

    The window runs from the darkest lung (1st percentile inside the lung projection) to the densest
    body part (99.7th percentile inside the body); a gamma above 1 darkens the aerated lung as on a radiograph while the mediastinum and bone stay white.
    """
    body = line_integral > 0.3
    if not body.any():
        return np.zeros_like(line_integral)
    lo = (
        float(np.percentile(line_integral[lungs], 1))
        if lungs.any()
        else float(np.percentile(line_integral[body], 2))
    )
    hi = float(np.percentile(line_integral[body], 99.7))
    lo = min(lo, hi - 1e-3)
    x = np.clip((line_integral - lo) / (hi - lo), 0.0, 1.0)
    # Edge enhancement as in radiographic post-processing (unsharp mask, ~8 mm kernel at 0.4 mm/px).
    x = np.clip(x + 0.6 * (x - ndimage.gaussian_filter(x, 10.0)), 0.0, 1.0)
    film = 0.08 + 0.92 * x**1.5
    film[~body] = np.clip(x[~body], 0.0, 0.08)
    return film.astype(np.float32)


def _outline(mask: npt.NDArray[np.bool_], width: int) -> npt.NDArray[np.bool_]:
    return np.asarray(mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font: scalable when Pillow has FreeType, else its fixed bitmap font."""
    if features.check("freetype2"):
        return ImageFont.load_default(size=size)
    return ImageFont.load_default()


def _side_markers(image: Image.Image, letters: tuple[str, str]) -> None:
    """Burn side markers: ``letters[0]`` at the viewer's left edge, ``letters[1]`` at the right edge.

    On the overview these are the radiographer's markers ("R", "L": the patient's right on the viewer's
    left); they sit half-way down each edge, clear of the text at the top of a key slice.
    """
    draw = ImageDraw.Draw(image)
    font = _font(max(18, image.width // 28))
    margin = max(6, image.width // 80)
    for k, letter in enumerate(letters):
        bbox = draw.textbbox((0, 0), letter, font=font)
        w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
        x = margin if k == 0 else image.width - margin - w
        y = (image.height - h) // 2
        draw.text((x, y), letter, fill=_TEXT_RGB, font=font, stroke_width=2, stroke_fill=(0, 0, 0))


def _summary_lines(findings: Findings, ctx: OutputContext) -> list[tuple[str, tuple[int, int, int]]]:
    """The burned-in text: warning first, then the figures a triaging reader needs.

    P(COVID-19) (or "P(COVID-19): not assessed" when the pipeline has no classifier validated on real
    data) and the priority get a short line of their own, so that a narrow image never cuts them off.
    """
    figures = f"Severity {pct_text(findings.severity_pct)} % (worse lung)   {findings.ct_grade.name}"
    triage = p_covid_text(findings.p_covid)
    if ctx.priority_level:
        triage += f"   Priority {ctx.priority_level}"
    lungs = (
        f"Right {pct_text(findings.right.affected_pct)} %   Left {pct_text(findings.left.affected_pct)} %   "
        f"Both {pct_text(findings.whole_lung_pct)} %   Consolidation {findings.consolidation_pct:.1f} %"
    )
    severe = _p_severe_line(findings)
    origin = f"triaged {ctx.software_version}   {findings.pipeline} {findings.pipeline_version}   revision {ctx.revision}"
    lines = [
        (f"{NOT_FOR_DIAGNOSTIC_USE} - research use only", _WARNING_RGB),
        (figures, _TEXT_RGB),
        (triage, _TEXT_RGB),
        (lungs, _TEXT_RGB),
        (origin, (170, 170, 170)),
    ]
    if severe:
        lines.insert(3, (severe, _TEXT_RGB))
    return lines


def _p_severe_line(findings: Findings) -> str:
    """The P(severe) line (seed 000) with its pipeline and what it was validated on; "" without one."""
    if findings.p_severe is None:
        return ""
    validated = provenance_value(findings, "p_severe_validated_on") or "not stated"
    value = f"{findings.p_severe:.2f}" if p_severe_assessed(findings) else "not available"
    return f"P(severe) {value} ({findings.pipeline}; validated on {validated})"


def _with_text_band(image: Image.Image, lines: list[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    """Append a black band under the image holding ``lines`` (so no text hides anatomy)."""
    size = max(13, image.width // 40)
    font = _font(size)
    spacing = int(size * 1.35)
    band = Image.new("RGB", (image.width, spacing * len(lines) + size), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, (text, colour) in enumerate(lines):
        text = _fit(draw, text, font, image.width - 2 * (size // 2))
        draw.text((size // 2, size // 2 + i * spacing), text, fill=colour, font=font)
    out = Image.new("RGB", (image.width, image.height + band.height))
    out.paste(image, (0, 0))
    out.paste(band, (0, image.height))
    return out


def _fit(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int
) -> str:
    while len(text) > 4 and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if not text.endswith("…") else text[:-2] + "…"
    return text


# --- DICOM -------------------------------------------------------------------------------------------


def _sc_image(
    ref: Dataset,
    rgb: _RGB,
    uids: OutputUIDs,
    ctx: OutputContext,
    findings: Findings,
    *,
    index: int,
    pixel_spacing: tuple[float, float],
    orientation: tuple[str, str],
    description: str,
    source_sop: tuple[str, str] | None = None,
) -> hd.sc.SCImage:
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uids.sc_series,
        series_number=ctx.sc_series_number,
        sop_instance_uid=uids.sc_instance(index),
        instance_number=index + 1,
        manufacturer=ctx.manufacturer,
        pixel_spacing=(round(pixel_spacing[0], 6), round(pixel_spacing[1], 6)),  # type: ignore[arg-type]
        patient_orientation=orientation,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    # from_ref_dataset drops Body Part Examined; without it dciodvfy wants the Type 2C Laterality.
    sc.BodyPartExamined = body_part(ref)
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # workstation-generated (PS3.3 C.8.6.1)
    sc.ImageComments = f"{NOT_FOR_DIAGNOSTIC_USE}. {description}."
    sc.DerivationDescription = (
        f"{description}; triaged {ctx.software_version}, {findings.pipeline} {findings.pipeline_version}"[
            :1024
        ]
    )
    sc.SoftwareVersions = ctx.software_version
    sc.ManufacturerModelName = ctx.model_name(findings.pipeline)
    sc.DeviceSerialNumber = ctx.device_serial_number
    if ctx.institution:
        sc.InstitutionName = ctx.institution
    if source_sop is not None:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = source_sop
        sc.SourceImageSequence = [item]
    set_content_datetime(sc, ctx.stamp())
    return sc


def _in_plane_directions(volume: Volume) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Unit LPS directions of increasing column and increasing row of the axial slices."""
    row = volume.affine[:3, 0] / np.linalg.norm(volume.affine[:3, 0])
    col = volume.affine[:3, 1] / np.linalg.norm(volume.affine[:3, 1])
    return row, col


def _orientation_letters(direction: npt.NDArray[np.float64]) -> str:
    """Patient Orientation letters of a direction (PS3.3 C.7.6.1.1.1), dominant axis first, at most 2."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # negative, positive LPS direction
    order = np.argsort(-np.abs(direction))
    out = ""
    for axis in order[:2]:
        if abs(direction[axis]) > 0.25:
            out += letters[axis][1] if direction[axis] > 0 else letters[axis][0]
    return out or "L"
