"""Coloured shapes on light backgrounds, each with a caption that is exactly true of its image.

A scene is one of three kinds (weights in ``KIND_WEIGHTS``):

- ``single``: one shape, "a large red circle", "a small orange triangle" (size word always there);
- ``relation``: two shapes and where the first is, "a red circle left of a blue square"
  (no size words). The first shape's centre is past the second's along the relation's axis by at
  least half their widths plus ``GAP``, and the centres are at most ``PERPENDICULAR_MAX`` apart
  on the other axis, so the relation holds clearly and the shapes never overlap;
- ``count``: "two green triangles", two shapes of one colour and kind, anywhere, not overlapping.

Geometry is in normalised image coordinates: x to the right, y down, both in [0, 1], so one scene
renders at any resolution. A shape's ``extent`` is the side of its bounding square (the diameter
of a circle, the side of a square, base and height of an upward triangle): small shapes are 8-11
px and large ones 14-17 px at 32 px. Every shape keeps ``MARGIN`` from the border and every two
bounding squares are ``GAP`` apart; two large shapes do not fit side by side at that gap, so a
two-shape scene holds at most one large shape.

Train / held-out split, by composition (stable across runs, machines and Python versions):
a composition's key is the text of its content words, and its score is the first 8 bytes of
``sha256(SPLIT_SALT + "|" + key)`` as a big-endian integer.

- single shapes: one (size, kind) per colour is held out (6 of 36, 16.7%), balanced so that
  each kind is held out once small and once large: with the colours ordered by score, the i-th
  holds out ``(SIZES[i // 3], SHAPES[i % 3])``. Every colour, kind and size stays in training;
- relations: "A right of B" draws the same image as "B left of A" (and "below" mirrors
  "above"), so the unit is the canonical composition "A left of B" / "A above B" (18 x 17 x 2 =
  612): the ``round(HELDOUT_FRACTION * 612)`` = 92 of lowest score are held out together with
  their mirrored captions (184 of 1,224 relation captions, 15.0%);
- counts: every count caption is in both splits.

``"train"`` draws only train compositions and ``"heldout"`` only held-out ones.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from reward_models.images import image_to_tensor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 0),
    "purple": (140, 40, 180),
    "orange": (245, 130, 10),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "heldout")
IMAGE_SIZE = 32

# Extent range of each size, as a fraction of the image width (8-11 px and 14-17 px at 32 px).
SIZE_EXTENTS: dict[str, tuple[float, float]] = {"small": (8 / 32, 11 / 32), "large": (14 / 32, 17 / 32)}
MARGIN = 1 / 32  # free border around every shape's bounding square
GAP = 2 / 32  # least distance between two bounding squares along the relation's axis
PERPENDICULAR_MAX = 3 / 32  # most offset of two related centres across the relation's axis
BACKGROUND_RANGE = (215, 255)  # every background channel lies in here
KIND_WEIGHTS = {"single": 0.3, "relation": 0.5, "count": 0.2}
SPLIT_SALT = "align-gen tiny world v1"
HELDOUT_FRACTION = 0.15


@dataclass(frozen=True)
class Shape:
    """One drawn shape. ``x``, ``y``: its centre in [0, 1] image coordinates (y down);
    ``extent``: side of its bounding square as a fraction of the image width, within
    ``SIZE_EXTENTS[size]`` (None: the middle of that range)."""

    kind: str
    colour: str
    size: str
    x: float
    y: float
    extent: float | None = None

    def __post_init__(self) -> None:
        for field, value, valid in (("kind", self.kind, SHAPES), ("colour", self.colour, tuple(COLOURS)),
                                    ("size", self.size, SIZES)):
            if value not in valid:
                raise ValueError(f"unknown shape {field} {value!r}; valid: {', '.join(valid)}")
        if not (0.0 <= self.x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise ValueError(f"shape centre ({self.x}, {self.y}) is outside the image; use [0, 1] coordinates")
        low, high = SIZE_EXTENTS[self.size]
        if self.extent is not None and not low - 1e-9 <= self.extent <= high + 1e-9:
            raise ValueError(f"extent {self.extent} of a {self.size} shape is outside [{low}, {high}]")

    @property
    def width(self) -> float:
        """Side of the bounding square, as a fraction of the image width."""
        return self.extent if self.extent is not None else sum(SIZE_EXTENTS[self.size]) / 2


@dataclass(frozen=True)
class Scene:
    """Shapes (drawn in order) on a plain ``background`` (RGB, 0-255), and their true caption."""

    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    caption: str


# --- captions and the composition split --------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def single_caption(size: str, colour: str, kind: str) -> str:
    return f"{_article(size)} {size} {colour} {kind}"


def relation_caption(colour1: str, kind1: str, relation: str, colour2: str, kind2: str) -> str:
    return f"{_article(colour1)} {colour1} {kind1} {relation} {_article(colour2)} {colour2} {kind2}"


def _count_caption(colour: str, kind: str) -> str:
    return f"two {colour} {kind}s"


def composition_score(key: str) -> int:
    """The salted, run-independent hash that decides a composition's split (module docstring)."""
    return int.from_bytes(hashlib.sha256(f"{SPLIT_SALT}|{key}".encode()).digest()[:8], "big")


def _split_compositions() -> tuple[dict[str, list[tuple[str, ...]]], dict[str, list[tuple[str, ...]]]]:
    """Single-shape (size, colour, kind) and relation (colour, kind, relation, colour, kind)
    compositions of each split, by the rule in the module docstring."""
    singles: dict[str, list[tuple[str, ...]]] = {split: [] for split in SPLITS}
    for i, colour in enumerate(sorted(COLOURS, key=composition_score)):
        held = (SIZES[i // len(SHAPES) % len(SIZES)], colour, SHAPES[i % len(SHAPES)])
        for option in itertools.product(SIZES, [colour], SHAPES):
            singles["heldout" if option == held else "train"].append(option)
    objects = [(colour, kind) for colour in COLOURS for kind in SHAPES]
    canonical = [(a, relation, b) for a, b in itertools.permutations(objects, 2)
                 for relation in ("left of", "above")]
    ranked = sorted(canonical, key=lambda c: composition_score(f"{' '.join(c[0])}|{c[1]}|{' '.join(c[2])}"))
    held_out = set(ranked[: round(HELDOUT_FRACTION * len(canonical))])
    mirror = {"left of": "right of", "above": "below"}
    relations: dict[str, list[tuple[str, ...]]] = {split: [] for split in SPLITS}
    for a, relation, b in canonical:
        split = "heldout" if (a, relation, b) in held_out else "train"
        relations[split].append((*a, relation, *b))
        relations[split].append((*b, mirror[relation], *a))
    return singles, relations


_SINGLES, _RELATIONS = _split_compositions()
_COUNTS = [(colour, kind) for colour in COLOURS for kind in SHAPES]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(map(repr, SPLITS))}")


def all_captions(split: str) -> list[str]:
    """Every caption of ``split``, sorted (counts captions are in both splits)."""
    _check_split(split)
    captions = [single_caption(*c) for c in _SINGLES[split]]
    captions += [relation_caption(*c) for c in _RELATIONS[split]]
    captions += [_count_caption(*c) for c in _COUNTS]
    return sorted(captions)


def caption_words() -> list[str]:
    """The sorted vocabulary of every word of every caption and zero-shot label prompt
    (:func:`colour_prompt`, :func:`shape_prompt`), for building a tokenizer."""
    texts = all_captions("train") + all_captions("heldout")
    texts += [colour_prompt(c) for c in COLOURS] + [shape_prompt(k) for k in SHAPES]
    return sorted({word for text in texts for word in text.split()})


# --- sampling ----------------------------------------------------------------------------------

def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def _pick(rng: np.random.Generator, options: list) -> tuple:
    return options[int(rng.integers(len(options)))]


def _extent(rng: np.random.Generator, size: str) -> float:
    return _uniform(rng, *SIZE_EXTENTS[size])


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light grey with a slight tint: channels within 16 of each other, all in 215..255."""
    base = _uniform(rng, 228.0, 247.0)
    tint = rng.uniform(-8.0, 8.0, size=3)
    low, high = BACKGROUND_RANGE
    r, g, b = (int(np.clip(round(base + t), low, high)) for t in tint)
    return r, g, b


def _pair_centres(rng: np.random.Generator, w1: float, w2: float,
                  perpendicular_max: float) -> tuple[float, float, float, float]:
    """Centres (a1, b1, a2, b2) of two shapes of widths w1, w2 with a1 + (w1 + w2)/2 + GAP <= a2
    on the main axis a and |b1 - b2| <= perpendicular_max on the other axis b."""
    low1, high1 = MARGIN + w1 / 2, 1 - MARGIN - w1 / 2
    low2, high2 = MARGIN + w2 / 2, 1 - MARGIN - w2 / 2
    separation = _uniform(rng, (w1 + w2) / 2 + GAP, high2 - low1)
    a1 = _uniform(rng, low1, min(high1, high2 - separation))
    b1 = _uniform(rng, max(low1, low2 - perpendicular_max), min(high1, high2 + perpendicular_max))
    b2 = _uniform(rng, max(low2, b1 - perpendicular_max), min(high2, b1 + perpendicular_max))
    return a1, b1, a1 + separation, b2


def _two_shapes(rng: np.random.Generator, first: tuple[str, str], second: tuple[str, str],
                relation: str, perpendicular_max: float) -> tuple[Shape, Shape]:
    """Two (colour, kind) shapes with ``first`` ``relation`` ``second``; one may be large."""
    size1, size2 = _pick(rng, [("small", "small"), ("small", "large"), ("large", "small")])
    w1, w2 = _extent(rng, size1), _extent(rng, size2)
    # Place the shape that comes first along the axis (left / top) as "1".
    leading_is_first = relation in ("left of", "above")
    lead, trail = (w1, w2) if leading_is_first else (w2, w1)
    a1, b1, a2, b2 = _pair_centres(rng, lead, trail, perpendicular_max)
    if not leading_is_first:
        a1, b1, a2, b2 = a2, b2, a1, b1
    horizontal = relation in ("left of", "right of")
    (x1, y1), (x2, y2) = ((a1, b1), (a2, b2)) if horizontal else ((b1, a1), (b2, a2))
    return (Shape(first[1], first[0], size1, x1, y1, w1), Shape(second[1], second[0], size2, x2, y2, w2))


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """One random scene of ``split`` ("train" or "heldout"), kind drawn by ``KIND_WEIGHTS``."""
    _check_split(split)
    u = rng.random()
    if u < KIND_WEIGHTS["single"]:
        return _single_scene(rng, split)
    if u < KIND_WEIGHTS["single"] + KIND_WEIGHTS["relation"]:
        return _relation_scene(rng, _pick(rng, _RELATIONS[split]))
    return _count_scene(rng, _pick(rng, _COUNTS))


def _relation_scene(rng: np.random.Generator, composition: tuple[str, ...]) -> Scene:
    colour1, kind1, relation, colour2, kind2 = composition
    shapes = _two_shapes(rng, (colour1, kind1), (colour2, kind2), relation, PERPENDICULAR_MAX)
    return Scene(shapes, _background(rng), relation_caption(*composition))


def _count_scene(rng: np.random.Generator, composition: tuple[str, ...]) -> Scene:
    colour, kind = composition
    shapes = _two_shapes(rng, (colour, kind), (colour, kind), _pick(rng, list(RELATIONS)), float("inf"))
    return Scene(shapes, _background(rng), _count_caption(colour, kind))


def _single_scene(rng: np.random.Generator, split: str) -> Scene:
    return _single_scene_of(rng, _pick(rng, _SINGLES[split]))


def _single_scene_of(rng: np.random.Generator, composition: tuple[str, ...]) -> Scene:
    size, colour, kind = composition
    width = _extent(rng, size)
    low, high = MARGIN + width / 2, 1 - MARGIN - width / 2
    shape = Shape(kind, colour, size, _uniform(rng, low, high), _uniform(rng, low, high), width)
    return Scene((shape,), _background(rng), single_caption(size, colour, kind))


def single_shape_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """A random one-shape scene of ``split``, for zero-shot colour / shape / size evaluation."""
    _check_split(split)
    return _single_scene(rng, split)


def _caption_compositions() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every caption of both splits -> (scene kind, composition)."""
    table: dict[str, tuple[str, tuple[str, ...]]] = {}
    for split in SPLITS:
        table.update({single_caption(*c): ("single", c) for c in _SINGLES[split]})
        table.update({relation_caption(*c): ("relation", c) for c in _RELATIONS[split]})
    table.update({_count_caption(*c): ("count", c) for c in _COUNTS})
    return table


_CAPTION_COMPOSITIONS = _caption_compositions()
_SCENE_OF_KIND = {"single": _single_scene_of, "relation": _relation_scene, "count": _count_scene}


def caption_composition(caption: str) -> tuple[str, tuple[str, ...]]:
    """The scene kind of a world caption and its words: ("single", (size, colour, kind)),
    ("relation", (colour, kind, relation, colour, kind)) or ("count", (colour, kind))."""
    if caption not in _CAPTION_COMPOSITIONS:
        raise ValueError(f"{caption!r} is not a caption of the world; see all_captions(split)")
    return _CAPTION_COMPOSITIONS[caption]


def scene_for_caption(rng: np.random.Generator, caption: str) -> Scene:
    """A new random scene whose caption is exactly ``caption`` (of either split): the layout,
    extents and background are drawn as :func:`sample_scene` draws them for that composition,
    so two calls give two independent renderings of one caption."""
    kind, composition = caption_composition(caption)
    return _SCENE_OF_KIND[kind](rng, composition)


# --- zero-shot label prompts -------------------------------------------------------------------

def colour_prompt(colour: str) -> str:
    """The zero-shot label of a colour: "a red shape", "an orange shape"."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; valid: {', '.join(COLOURS)}")
    return f"{_article(colour)} {colour} shape"


def shape_prompt(kind: str) -> str:
    """The zero-shot label of a shape kind: "a circle", "a square", "a triangle"."""
    if kind not in SHAPES:
        raise ValueError(f"unknown shape kind {kind!r}; valid: {', '.join(SHAPES)}")
    return f"a {kind}"


# --- rendering ---------------------------------------------------------------------------------

def pixel_box(shape: Shape, size: int) -> tuple[int, int, int, int]:
    """Inclusive pixel bounding box (x0, y0, x1, y1) that ``shape`` is drawn in at ``size`` px."""
    n = max(1, round(shape.width * size))
    x0, y0 = round(shape.x * size - n / 2), round(shape.y * size - n / 2)
    return x0, y0, x0 + n - 1, y0 + n - 1


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene drawn as a ``size`` x ``size`` RGB image (no anti-aliasing)."""
    if size < 16:
        raise ValueError(f"render size {size} is too small: below 16 px a small triangle is under "
                         "4 px and no longer looks like one; use 16 or more")
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x0, y0, x1, y1 = pixel_box(shape, size)
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # an upward triangle: apex at the top middle, base along the bottom
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) float32 tensor in [0, 1], as :meth:`ShapesWorld.batch` gives."""
    return image_to_tensor(image)


# --- batches -----------------------------------------------------------------------------------

class ShapesWorld:
    """A seeded stream of (image, caption, scene) batches.

    ``batch`` continues one numpy Generator seeded from ``seed`` (unless given another), so a run
    is reproducible; ``dataset`` draws from a fresh Generator seeded from (seed, split), so a fixed
    evaluation set is the same whenever it is asked for.
    """

    def __init__(self, seed: int = 0, size: int = IMAGE_SIZE) -> None:
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if size < 16:
            raise ValueError(f"image size {size} is too small; use 16 px or more (default {IMAGE_SIZE})")
        self.seed = int(seed)
        self.size = size
        self._rng = np.random.default_rng(self.seed)

    def batch(self, n: int, split: str = "train", generator: np.random.Generator | None = None,
              ) -> tuple[torch.Tensor, list[str], list[Scene]]:
        """``n`` scenes of ``split``: images (n, 3, size, size) float32 in [0, 1], captions, scenes.
        Draws from ``generator``, or else from the world's own stream."""
        _check_split(split)
        if n < 0:
            raise ValueError(f"batch size must be >= 0, got {n}")
        rng = self._rng if generator is None else generator
        scenes = [sample_scene(rng, split) for _ in range(n)]
        pixels = np.empty((n, self.size, self.size, 3), dtype=np.uint8)  # (n, H, W, 3)
        for i, scene in enumerate(scenes):
            pixels[i] = np.asarray(render(scene, self.size))
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        return images, [scene.caption for scene in scenes], scenes

    def dataset(self, n: int, split: str = "train") -> tuple[torch.Tensor, list[str], list[Scene]]:
        """A fixed set of ``n`` scenes of ``split`` (same seed, split and n: same set), as ``batch``."""
        _check_split(split)
        rng = np.random.default_rng([self.seed, 0xDA7A, SPLITS.index(split)])
        return self.batch(n, split, generator=rng)
