"""The world's gold checker: reads the shapes in a world image back, with no learned model.

A world image is a light, nearly grey background with flat shapes in six saturated colours, so
what it shows can be measured directly (the rules below, in this order):

1. **Foreground.** A pixel is part of a shape when its chroma, max(R, G, B) - min(R, G, B) on
   0-255, is at least ``CHROMA_MIN`` (48). Backgrounds have chroma 16 at most (their channels
   are within 16 of each other); every palette colour has 175 or more.
2. **Colour** by hue alone: each foreground pixel takes the palette colour of nearest hue
   (red 0, orange 31, yellow 52, green 129, blue 227, purple 283 degrees). Hue, unlike RGB
   distance, survives blending with a grey background: a blurred red edge is a paler red, where
   the nearest colour in RGB would be orange.
3. **Shapes** are the 8-connected components of each colour (split by rule 4); those under
   ``MIN_AREA`` of the image (about 10 pixels at 32 px; the smallest world shape has about 36)
   are noise.
4. **Outline.** A shape's geometry is read from its core: the pixels of its component whose
   chroma is at least half of the component's 90th-percentile chroma (a blurred edge falls off
   there, as an anti-aliased edge does at half intensity), split again into 8-connected parts
   (two shapes of one colour whose blurred edges touch meet in a valley of low chroma); parts
   under ``MIN_AREA`` are dropped. The box is the core's bounding box.
5. **Kind** from two numbers of the core: its vertical centroid within the box
   (``centre_height``: (mean row - top) / height, 0.5 for a symmetric shape, 2/3 for the world's
   upward triangle) and its fill of the box (``fill``: 1 for a square, pi/4 = 0.785 for a
   circle, 1/2 for a triangle). A triangle when ``centre_height`` >= ``TRIANGLE_CENTRE`` (0.583,
   halfway between 1/2 and 2/3) or ``fill`` < ``TRIANGLE_FILL`` (0.64, halfway between 1/2 and
   pi/4); else a square when ``fill`` >= ``SQUARE_FILL`` (0.89, halfway between pi/4 and 1);
   else a circle.
6. **Size**: "large" when the box's longer side is above ``LARGE_EXTENT`` (12.5 / 32 of the
   width, between the world's small shapes, 8-11 px, and large ones, 14-17 px); else "small".
7. **Position**: the box (for relations, as GenEval reads a detection's box) and the core's
   centroid, in [0, 1] image coordinates (x right, y down).

The thresholds are written from the renderer's geometry, not fitted to samples: on rendered
scenes the checker is exact (``docs/world_geneval.md`` gives the accuracy per attribute, on
rendered and on generated images).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from align_gen.world.shapes import COLOURS, SIZE_EXTENTS

CHROMA_MIN = 48
MIN_AREA = 10 / 1024
CORE_FRACTION = 0.5
TRIANGLE_CENTRE = (0.5 + 2 / 3) / 2
TRIANGLE_FILL = (0.5 + np.pi / 4) / 2
SQUARE_FILL = (np.pi / 4 + 1.0) / 2
LARGE_EXTENT = (SIZE_EXTENTS["small"][1] + SIZE_EXTENTS["large"][0]) / 2


@dataclass(frozen=True)
class FoundShape:
    """One shape read from an image. ``box``: (x0, y0, x1, y1), the core's pixel edges as
    fractions of the image width and height; ``x``, ``y``: the core's centroid; ``area``: the
    core's pixels as a fraction of the image; ``fill`` and ``centre_height``: the kind's
    evidence (module docstring, rule 5)."""

    kind: str
    colour: str
    size: str
    x: float
    y: float
    box: tuple[float, float, float, float]
    area: float
    fill: float
    centre_height: float

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


def classify_kind(fill: float, centre_height: float) -> str:
    """The kind a core's ``fill`` of its box and vertical ``centre_height`` say (rule 5)."""
    if centre_height >= TRIANGLE_CENTRE or fill < TRIANGLE_FILL:
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def _cores(pixels: np.ndarray, chroma: np.ndarray) -> list[np.ndarray]:
    """The cores of one colour component (rule 4): its pixels of at least half its 90th-percentile
    chroma, split into their own 8-connected parts (two shapes of one colour whose blurred edges
    touch meet in a valley of low chroma)."""
    values = chroma[pixels[:, 0], pixels[:, 1]]
    strong = pixels[values >= CORE_FRACTION * np.percentile(values, 90)]
    origin = strong.min(axis=0)
    mask = np.zeros(tuple(strong.max(axis=0) - origin + 1), dtype=bool)
    mask[strong[:, 0] - origin[0], strong[:, 1] - origin[1]] = True
    return [part + origin for part in _components(mask)]


def _read_core(core: np.ndarray, colour: str, shape: tuple[int, int]) -> FoundShape:
    height, width = shape
    rows, cols = core[:, 0], core[:, 1]
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box_height, box_width = bottom - top, right - left
    fill = len(core) / (box_height * box_width)
    centre_height = (rows.mean() + 0.5 - top) / box_height
    box = (left / width, top / height, right / width, bottom / height)
    extent = max(box[2] - box[0], box[3] - box[1])
    return FoundShape(
        kind=classify_kind(fill, centre_height),
        colour=colour,
        size="large" if extent > LARGE_EXTENT else "small",
        x=float((cols.mean() + 0.5) / width),
        y=float((rows.mean() + 0.5) / height),
        box=tuple(float(v) for v in box),
        area=len(core) / (height * width),
        fill=float(fill),
        centre_height=float(centre_height),
    )


def read_shapes(image: torch.Tensor | np.ndarray | Image.Image) -> list[FoundShape]:
    """Every shape in one world image (rules 1-7 of the module docstring), largest first."""
    pixels = image_array(image).astype(np.int16)
    height, width = pixels.shape[:2]
    chroma = pixels.max(axis=2) - pixels.min(axis=2)
    foreground = chroma >= CHROMA_MIN
    distance = np.abs(_hue(pixels)[..., None] - PALETTE_HUES)
    labels = np.minimum(distance, 360.0 - distance).argmin(axis=2)
    found = []
    for index, colour in enumerate(PALETTE):
        for component in _components(foreground & (labels == index)):
            for core in _cores(component, chroma):
                if len(core) >= MIN_AREA * height * width:
                    found.append(_read_core(core, colour, (height, width)))
    return sorted(found, key=lambda shape: -shape.area)
