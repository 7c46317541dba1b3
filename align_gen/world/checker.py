"""The world's gold checker: reads the shapes in a world image back, with no learned model.

A world image is a light, nearly grey background with flat shapes in six saturated colours, so
what it shows can be measured directly (the rules below, in this order):

1. **Foreground by ink.** A pixel belongs to a shape when its ink, 255 - min(R, G, B), is at
   least ``INK_MIN`` (100): backgrounds have every channel >= 215 (ink <= 40), every palette
   colour has ink >= 215. Ink, unlike chroma, stays high where a generated shape blends two hues
   (purple into green passes through grey), so two-tone shapes stay whole.
2. **Blobs** are the 8-connected components of the foreground.
3. **Cores and splits.** A blob's core is its pixels of at least half its 90th-percentile ink (a
   blurred edge falls off there, as an anti-aliased edge does at half intensity). The core is
   split into shapes (a) at valleys: its own 8-connected parts (two shapes whose blurred edges
   touch meet in a valley of low ink); (b) at necks: a part that, eroded up to ``NECK_DEPTH``
   times, falls into pieces of at least ``SEED_AREA`` pixels is those pieces, each pixel going
   to the nearest; (c) across elongated parts: a world shape's box is square, so a part whose
   box is more than ``ELONGATED`` times longer than wide is cut at its narrowest cross-section in
   the middle half of its long axis (``SPLIT_DEPTH`` times at most). Parts under ``MIN_AREA`` of
   the image (about 10 pixels at 32 px; the smallest world shape has about 36) are noise.
4. **Colour** by hue, voted: each chromatic pixel of a shape (chroma, max - min channel, at least
   ``CHROMA_MIN`` = 48) takes the palette colour of nearest hue (red 0, orange 31, yellow 52,
   green 129, blue 227, purple 283 degrees); the shape takes the majority colour, or ``MIXED``
   when no colour has ``COLOUR_SHARE`` (60%) of the votes. Hue, unlike RGB distance, survives
   blending with a grey background: a blurred red edge is a paler red, where the nearest colour
   in RGB would be orange.
5. **Kind** from the shape's ``taper`` (its pixels in the top third of its box over those in
   the bottom third: 1 for a circle or a square, 1/5 for the world's upward triangle) and its
   ``fill`` of the box (1 for a square, pi/4 = 0.785 for a circle): a triangle when the taper is
   below ``TRIANGLE_TAPER`` (0.6, halfway between 1/5 and 1); else a square when the fill is at
   least ``SQUARE_FILL`` (0.86: the midpoint of the two shapes' median fills on renders blurred
   by 1.5 px, where a square's corners round off); else a circle.
6. **Size**: "large" when the box's longer side is above ``LARGE_EXTENT`` (12.5 / 32 of the
   width, between the world's small shapes, 8-11 px, and large ones, 14-17 px); else "small".
7. **Position**: the box (for relations, as GenEval reads a detection's box) and the centroid,
   in [0, 1] image coordinates (x right, y down).

The thresholds come from the renderer's geometry, not from generated samples. On rendered
scenes, clean or blurred, the checker is exact; ``benchmarks/world_checker.py`` measures it on
rendered scenes and writes contact sheets of generated samples for a person to check
(``docs/world_geneval.md`` has both results).
"""


from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from align_gen.world.shapes import COLOURS, SIZE_EXTENTS

INK_MIN = 100
CHROMA_MIN = 48
MIN_AREA = 10 / 1024
CORE_FRACTION = 0.5
NECK_DEPTH = 2
SEED_AREA = 4
ELONGATED = 1.4
SPLIT_DEPTH = 2
COLOUR_SHARE = 0.6
MIXED = "mixed"
TRIANGLE_TAPER = (0.2 + 1.0) / 2
SQUARE_FILL = 0.86
LARGE_EXTENT = (SIZE_EXTENTS["small"][1] + SIZE_EXTENTS["large"][0]) / 2


@dataclass(frozen=True)
class FoundShape:
    """One shape read from an image. ``box``: (x0, y0, x1, y1), the core's pixel edges as
    fractions of the image width and height; ``x``, ``y``: the core's centroid; ``area``: the
    core's pixels as a fraction of the image; ``fill`` and ``taper``: the kind's evidence
    (module docstring, rule 5); ``colour``: a palette colour or ``MIXED``, with
    ``colour_share`` the majority colour's share of the votes (rule 4)."""

    kind: str
    colour: str
    size: str
    x: float
    y: float
    box: tuple[float, float, float, float]
    area: float
    fill: float
    taper: float
    colour_share: float = 1.0

    @property
    def extent(self) -> float:
        """The box's longer side, as a fraction of the image."""
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])


def _hue(colour: tuple[int, int, int] | np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of RGB values (..., 3) on any scale."""
    rgb = np.asarray(colour, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)) % 360.0


PALETTE = tuple(COLOURS)
PALETTE_HUES = _hue(np.array([COLOURS[name] for name in PALETTE]))


def image_array(image: torch.Tensor | np.ndarray | Image.Image) -> np.ndarray:
    """An image as an (H, W, 3) uint8 array: a PIL image, a (3, H, W) float tensor in [0, 1]
    (what rewards get) or an (H, W, 3) uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
        pixels = image.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
        return pixels.permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {array.dtype} {array.shape}")
    return array


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean (H, W) mask, each as (n, 2) (row, col) indices."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            row, col = queue.popleft()
            pixels.append((row, col))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    r, c = row + dr, col + dc
                    if 0 <= r < height and 0 <= c < width and mask[r, c] and not seen[r, c]:
                        seen[r, c] = True
                        queue.append((r, c))
        found.append(np.array(pixels))
    return found


def classify_kind(fill: float, taper: float) -> str:
    """The kind a core's ``fill`` of its box and its ``taper`` say (rule 5)."""
    if taper < TRIANGLE_TAPER:
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def _local_mask(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask, origin): ``pixels`` ((n, 2) rows and columns) as a boolean mask of their bounding
    box, padded by one pixel, and the image position of the mask's (0, 0)."""
    origin = pixels.min(axis=0) - 1
    mask = np.zeros(tuple(pixels.max(axis=0) - origin + 2), dtype=bool)
    mask[pixels[:, 0] - origin[0], pixels[:, 1] - origin[1]] = True
    return mask, origin


def _erode(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels whose 8 neighbours are all in the mask (its border padded empty)."""
    padded = np.pad(mask, 1)
    eroded = mask.copy()
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            eroded &= padded[1 + dr : 1 + dr + mask.shape[0], 1 + dc : 1 + dc + mask.shape[1]]
    return eroded


def _split_at_necks(part: np.ndarray) -> list[np.ndarray]:
    """One core part, or the shapes it joins (rule 4): eroded up to ``NECK_DEPTH`` times, a part
    that falls into two or more pieces of at least ``SEED_AREA`` pixels is two or more shapes
    touching through a neck; each pixel goes to the nearest piece."""
    mask, origin = _local_mask(part)
    for _ in range(NECK_DEPTH):
        mask = _erode(mask)
        seeds = [seed for seed in _components(mask) if len(seed) >= SEED_AREA]
        if len(seeds) >= 2:
            local = part - origin
            distances = np.stack(
                [np.min(((local[:, None, :] - seed[None, :, :]) ** 2).sum(axis=2), axis=1) for seed in seeds]
            )
            nearest = distances.argmin(axis=0)
            return [part[nearest == index] for index in range(len(seeds))]
        if not mask.any():
            break
    return [part]


def _split_elongated(part: np.ndarray, depth: int = SPLIT_DEPTH) -> list[np.ndarray]:
    """One part, or, when its box is more than ``ELONGATED`` times longer than wide (a world
    shape's box is square), the parts on either side of its narrowest cross-section in the
    middle half of its long axis, each split again (``depth`` times at most)."""
    extents = part.max(axis=0) - part.min(axis=0) + 1
    if depth == 0 or extents.max() <= ELONGATED * extents.min():
        return [part]
    axis = int(extents.argmax())
    position = part[:, axis] - part[:, axis].min()
    profile = np.bincount(position, minlength=extents[axis])
    middle = np.arange(extents[axis] // 4, extents[axis] - extents[axis] // 4)
    cut = middle[profile[middle].argmin()]
    sides = [side for side in (part[position < cut], part[position >= cut]) if len(side)]
    return [piece for side in sides for piece in _split_elongated(side, depth - 1)]


def _shape_parts(blob: np.ndarray, ink: np.ndarray) -> list[np.ndarray]:
    """The shapes of one foreground blob (rule 4): its core (the pixels of at least half its
    90th-percentile ink), split at ink valleys (8-connected parts), at necks and across
    elongated parts."""
    values = ink[blob[:, 0], blob[:, 1]]
    core = blob[values >= CORE_FRACTION * np.percentile(values, 90)]
    mask, origin = _local_mask(core)
    return [
        piece
        for part in _components(mask)
        for necked in _split_at_necks(part + origin)
        for piece in _split_elongated(necked)
    ]


def _read_part(part: np.ndarray, labels: np.ndarray, chromatic: np.ndarray, shape: tuple[int, int]) -> FoundShape:
    height, width = shape
    rows, cols = part[:, 0], part[:, 1]
    voters = chromatic[rows, cols]
    votes = np.bincount(labels[rows, cols][voters], minlength=len(PALETTE))
    share = votes.max() / max(1, votes.sum())
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box_height, box_width = bottom - top, right - left
    fill = len(part) / (box_height * box_width)
    height_fraction = (rows + 0.5 - top) / box_height  # of each pixel's row centre, 0 top to 1 bottom
    taper = np.sum(height_fraction < 1 / 3) / max(1, np.sum(height_fraction > 2 / 3))
    box = (left / width, top / height, right / width, bottom / height)
    extent = max(box[2] - box[0], box[3] - box[1])
    return FoundShape(
        kind=classify_kind(fill, taper),
        colour=PALETTE[int(votes.argmax())] if share >= COLOUR_SHARE else MIXED,
        size="large" if extent > LARGE_EXTENT else "small",
        x=float((cols.mean() + 0.5) / width),
        y=float((rows.mean() + 0.5) / height),
        box=tuple(float(v) for v in box),
        area=len(part) / (height * width),
        fill=float(fill),
        taper=float(taper),
        colour_share=float(share),
    )


def read_shapes(image: torch.Tensor | np.ndarray | Image.Image) -> list[FoundShape]:
    """Every shape in one world image (rules 1-7 of the module docstring), largest first."""
    pixels = image_array(image).astype(np.int16)
    height, width = pixels.shape[:2]
    ink = 255 - pixels.min(axis=2)
    chromatic = pixels.max(axis=2) - pixels.min(axis=2) >= CHROMA_MIN
    distance = np.abs(_hue(pixels)[..., None] - PALETTE_HUES)
    labels = np.minimum(distance, 360.0 - distance).argmin(axis=2)
    found = [
        _read_part(part, labels, chromatic, (height, width))
        for blob in _components(ink >= INK_MIN)
        for part in _shape_parts(blob, ink)
        if len(part) >= MIN_AREA * height * width
    ]
    return sorted(found, key=lambda shape: -shape.area)
