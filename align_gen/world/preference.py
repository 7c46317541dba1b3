"""The tiny world's synthetic preference: larger and more centred shapes are better.

CLIP score cannot see it: two renders of one caption match that caption equally well whatever
their sizes and positions (a size word only fixes a range). A Bradley-Terry head on the world
CLIP's features (:mod:`reward_models.preference`) learns it from pairs; the world ships one at
``align_gen/world/weights/preference``, the ``preference`` reward's world model.

The utility of a scene, with geometry in image widths (:mod:`align_gen.world.shapes`):

    utility = sqrt(coverage) - distance

- ``coverage``: the fraction of the image the shapes cover, the sum of their areas (a circle
  pi/4 e^2, a square e^2, a triangle e^2 / 2 for extent e; shapes never overlap);
- ``distance``: from the mean of the shapes' centres to the image centre (0.5, 0.5).

Both terms are lengths: sqrt(coverage) is the side of a square of the same area, so growing the
shapes' equivalent side by one pixel is worth moving them one pixel closer to the centre. Over
pairs of one caption the two terms differ by similar amounts (mean |difference| 0.06 and 0.08).

A pair is one caption drawn twice (:func:`shapes.scene_for_caption`); the scene of higher utility
is chosen. Pairs closer than ``margin`` (default 0.05, 1.6 px at 32 px; about 29% of draws) are
near-ties and are skipped. Train pairs use train-split captions and held-out pairs held-out-split
captions (count captions such as "two red circles" are in both splits; their renders differ).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from align_gen.errors import ConfigError
from align_gen.world import shapes
from reward_models.preference_training import (
    HeadTrainConfig,
    PreferencePairs,
    train_preference_reward,
)

WORLD_CLIP = Path(__file__).parent / "weights" / "clip"
AREA_PER_EXTENT_SQUARED = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
PAIR_STREAM = 0x9AE5  # separates the pair generators' seeds from the world's other streams


@dataclasses.dataclass(frozen=True)
class PreferenceTrainConfig:
    """The world's preference head: its pairs and its training (the defaults are what ships)."""

    seed: int = 0  # the pairs' generator; the head's own seed is head.seed
    train_pairs: int = 8000  # train-split pairs kept after skipping near-ties
    heldout_pairs: int = 1000  # held-out-split pairs, for the reported accuracy
    margin: float = 0.05  # least utility gap of a kept pair (see the module docstring)
    head: HeadTrainConfig = dataclasses.field(default_factory=HeadTrainConfig)

    def __post_init__(self) -> None:
        if self.train_pairs < 1 or self.heldout_pairs < 0 or self.seed < 0:
            raise ConfigError(
                f"need train_pairs >= 1, heldout_pairs >= 0 and seed >= 0; got {self.train_pairs}, "
                f"{self.heldout_pairs}, {self.seed}"
            )
        if not 0 <= self.margin < 0.5:
            raise ConfigError(
                f"margin must be in [0, 0.5) (a utility gap in image widths), got {self.margin}"
            )

    def quick(self) -> PreferenceTrainConfig:
        """A few pairs and steps: checks the pipeline end to end (not for shipping)."""
        return dataclasses.replace(
            self,
            train_pairs=32,
            heldout_pairs=16,
            head=dataclasses.replace(self.head, steps=20, batch_size=16),
        )


def coverage(scene: shapes.Scene) -> float:
    """The fraction of the image the scene's shapes cover."""
    return sum(AREA_PER_EXTENT_SQUARED[shape.kind] * shape.width**2 for shape in scene.shapes)


def centre_distance(scene: shapes.Scene) -> float:
    """Distance from the mean of the shapes' centres to the image centre, in image widths."""
    x = sum(shape.x for shape in scene.shapes) / len(scene.shapes)
    y = sum(shape.y for shape in scene.shapes) / len(scene.shapes)
    return math.hypot(x - 0.5, y - 0.5)


def utility(scene: shapes.Scene) -> float:
    """sqrt(coverage) - centre distance: higher is preferred (see the module docstring)."""
    return math.sqrt(coverage(scene)) - centre_distance(scene)


def preference_pairs(
    count: int, split: str, seed: int, margin: float = 0.05
) -> list[tuple[shapes.Scene, shapes.Scene]]:
    """``count`` (chosen, rejected) scene pairs of ``split``, each two renders of one caption
    whose utilities differ by at least ``margin``; the same arguments give the same pairs."""
    rng = np.random.default_rng([seed, PAIR_STREAM, shapes.SPLITS.index(split)])
    pairs = []
    while len(pairs) < count:
        first = shapes.sample_scene(rng, split)
        second = shapes.scene_for_caption(rng, first.caption)
        gap = utility(first) - utility(second)
        if abs(gap) >= margin and gap != 0:
            pairs.append((first, second) if gap > 0 else (second, first))
    return pairs


def render_pairs(
    pairs: list[tuple[shapes.Scene, shapes.Scene]], desc: str = "rendering pairs"
) -> PreferencePairs:
    """The pairs as prompts and (N, 3, 32, 32) chosen / rejected image tensors."""
    images = [
        torch.stack([shapes.to_tensor(shapes.render(scene)) for scene in pair])
        for pair in tqdm(pairs, desc=desc, unit="pair", leave=False)
    ]  # N x (2, 3, 32, 32)
    stacked = (
        torch.stack(images)
        if images
        else torch.empty(0, 2, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    )
    return PreferencePairs([chosen.caption for chosen, _ in pairs], stacked[:, 0], stacked[:, 1])


def world_pairs(config: PreferenceTrainConfig) -> tuple[PreferencePairs, PreferencePairs]:
    """(train, held-out) rendered pairs for ``config``."""
    train = preference_pairs(config.train_pairs, "train", config.seed, config.margin)
    heldout = preference_pairs(config.heldout_pairs, "heldout", config.seed, config.margin)
    rendered = render_pairs(train, "rendering train pairs")
    return rendered, render_pairs(heldout, "rendering held-out pairs")


def train_world_preference(
    out: Path,
    config: PreferenceTrainConfig = PreferenceTrainConfig(),
    clip: str | Path = WORLD_CLIP,
    device: str | None = None,
) -> dict:
    """Trains the world's preference head on ``clip``'s features into ``out`` (head, config and
    ``metrics.json``); returns its quality: train / held-out pair accuracy of the head and of CLIP
    score, and the seconds it took."""
    started = time.perf_counter()
    train, heldout = world_pairs(config)
    world = {key: value for key, value in dataclasses.asdict(config).items() if key != "head"}
    world["render_seconds"] = round(time.perf_counter() - started, 1)
    metrics = train_preference_reward(
        train, heldout, str(clip), out, config.head, device, extra={"world": world}
    )
    return {
        "train_accuracy": metrics["accuracy"]["train"],
        "heldout_accuracy": metrics["accuracy"]["heldout"],
        "clip_score_heldout_accuracy": metrics["clip_score_accuracy"]["heldout"],
        "seconds": round(time.perf_counter() - started, 1),
    }
