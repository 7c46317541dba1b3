"""The tiny world's captioned shapes: seeded, true captions (checked against the drawn pixels by an
independent caption parser), no overlaps, light backgrounds, and a stable composition split."""

import re

import numpy as np
import pytest
import torch

from align_gen.world import shapes
from align_gen.world.shapes import (
    COLOURS,
    GAP,
    PERPENDICULAR_MAX,
    SHAPES,
    SIZES,
    Scene,
    ShapesWorld,
    all_captions,
    caption_words,
    colour_prompt,
    pixel_box,
    render,
    sample_scene,
    shape_prompt,
    single_shape_scene,
    to_tensor,
)

_KIND = "(circle|square|triangle)"
_SINGLE = re.compile(rf"^(a|an) (small|large) (\w+) {_KIND}$")
_RELATION = re.compile(rf"^(a|an) (\w+) {_KIND} (left of|right of|above|below) (a|an) (\w+) {_KIND}$")
_COUNT = re.compile(rf"^two (\w+) {_KIND}s$")


def parse(caption: str) -> dict:
    """What a caption claims, read without the module's own caption code."""
    if m := _SINGLE.match(caption):
        return {"objects": [(m[3], m[4])], "size": m[2]}
    if m := _RELATION.match(caption):
        return {"objects": [(m[2], m[3]), (m[6], m[7])], "relation": m[4]}
    if m := _COUNT.match(caption):
        return {"objects": [(m[1], m[2])] * 2, "count": 2}
    raise AssertionError(f"caption {caption!r} has none of the three forms")


def mixed_scenes(n: int = 150, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(n) for split in ("train", "heldout")]


def test_same_seed_same_batches_and_the_stream_continues():
    images, captions, scenes = ShapesWorld(seed=3).batch(12)
    again, captions_again, _ = ShapesWorld(seed=3).batch(12)
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert torch.equal(images, again) and captions == captions_again
    other, other_captions, _ = ShapesWorld(seed=4).batch(12)
    assert not torch.equal(images, other) and captions != other_captions
    world = ShapesWorld(seed=3)
    first, second = world.batch(6)[0], world.batch(6)[0]
    assert torch.equal(torch.cat([first, second]), images)  # two calls continue one stream
    # The images are the scenes rendered, scaled to [0, 1].
    expected = torch.from_numpy(np.array(render(scenes[0]))).permute(2, 0, 1).float() / 255
    assert torch.equal(images[0], expected)
    assert torch.equal(to_tensor(render(scenes[1])), images[1])


def test_dataset_is_fixed_whatever_was_drawn_before():
    world = ShapesWorld(seed=5)
    evaluation = world.dataset(8, "heldout")
    world.batch(10)
    assert torch.equal(world.dataset(8, "heldout")[0], evaluation[0])
    assert ShapesWorld(seed=5).dataset(8, "heldout")[1] == evaluation[1]
    assert ShapesWorld(seed=5).dataset(8, "train")[1] != evaluation[1]
    custom = ShapesWorld(seed=5).batch(4, generator=np.random.default_rng(9))[1]
    assert custom == ShapesWorld(seed=6).batch(4, generator=np.random.default_rng(9))[1]


def test_captions_parse_back_to_their_scenes():
    kinds_seen = set()
    for scene in mixed_scenes():
        claim = parse(scene.caption)
        assert [(s.colour, s.kind) for s in scene.shapes] == claim["objects"]
        kinds_seen.add("size" if "size" in claim else "relation" if "relation" in claim else "count")
        if "size" in claim:
            assert scene.shapes[0].size == claim["size"]
        if "relation" in claim:
            first, second = scene.shapes
            along, across = ("x", "y") if claim["relation"] in ("left of", "right of") else ("y", "x")
            sign = 1 if claim["relation"] in ("left of", "above") else -1
            gap = sign * (getattr(second, along) - getattr(first, along))
            assert gap >= (first.width + second.width) / 2 + GAP - 1e-9  # clearly past it
            assert abs(getattr(second, across) - getattr(first, across)) <= PERPENDICULAR_MAX + 1e-9
        words = scene.caption.split()
        for article, word in zip(words, words[1:], strict=False):
            if article in ("a", "an"):
                assert article == ("an" if word[0] in "aeiou" else "a"), scene.caption
    assert kinds_seen == {"size", "relation", "count"}


@pytest.mark.parametrize("size", [32, 64])
def test_drawn_pixels_agree_with_the_caption(size):
    fill = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    for scene in mixed_scenes(60, seed=1):
        pixels = np.asarray(render(scene, size)).astype(int)  # (size, size, 3)
        assert pixels.shape == (size, size, 3)
        for shape in scene.shapes:
            rgb = COLOURS[shape.colour]
            centre = pixels[min(int(shape.y * size), size - 1), min(int(shape.x * size), size - 1)]
            assert tuple(centre) == rgb, scene.caption
            x0, y0, x1, y1 = pixel_box(shape, size)
            box = pixels[y0:y1 + 1, x0:x1 + 1]
            ratio = np.all(box == rgb, axis=-1).mean()
            closest = min(fill, key=lambda kind: abs(fill[kind] - ratio))
            assert closest == shape.kind, (scene.caption, ratio)
            side = (x1 - x0 + 1) * 32 / size  # in 32-px units
            assert (8 <= side <= 11) if shape.size == "small" else (14 <= side <= 17)
        claim = parse(scene.caption)
        if "relation" in claim and claim["objects"][0][0] != claim["objects"][1][0]:
            # Centroids of each colour's pixels hold the relation too.
            (ya, xa), (yb, xb) = (np.argwhere(np.all(pixels == COLOURS[c], -1)).mean(0)
                                  for c, _ in claim["objects"])
            relation = claim["relation"]
            holds = {"left of": xa < xb, "right of": xa > xb, "above": ya < yb, "below": ya > yb}
            assert holds[relation], scene.caption


def test_shapes_stay_inside_and_apart():
    for scene in mixed_scenes():
        boxes = [pixel_box(shape, 32) for shape in scene.shapes]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 and 0 <= y0 and x1 < 32 and y1 < 32
        if len(boxes) == 2:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
            apart_x = max(bx0 - ax1, ax0 - bx1) - 1  # free pixels between the boxes
            apart_y = max(by0 - ay1, ay0 - by1) - 1
            assert max(apart_x, apart_y) >= 1, scene.caption


def test_backgrounds_are_light_grey_and_unlike_every_shape_colour():
    for scene in mixed_scenes(100):
        background = np.array(scene.background)
        assert background.min() >= 215 and background.max() <= 255
        assert background.max() - background.min() <= 16  # low saturation
        for rgb in COLOURS.values():
            assert np.abs(background - np.array(rgb)).max() >= 100
        pixels = np.asarray(render(scene))
        assert np.all(pixels == background, axis=-1).mean() > 0.3


def composition(caption: str) -> str:
    """'single' / 'relation' / 'count'."""
    claim = parse(caption)
    return "single" if "size" in claim else "relation" if "relation" in claim else "count"


def test_split_by_composition():
    train, heldout = set(all_captions("train")), set(all_captions("heldout"))
    assert all_captions("train") == sorted(train)
    both = train & heldout
    assert both and all(composition(c) == "count" for c in both)
    assert {composition(c) for c in heldout - both} == {"single", "relation"}
    for kind, low, high in (("single", 0.10, 0.20), ("relation", 0.10, 0.20)):
        n_train = sum(composition(c) == kind for c in train)
        n_held = sum(composition(c) == kind for c in heldout)
        assert low <= n_held / (n_train + n_held) <= high, kind
    # Mirrored captions draw the same image and so share a split.
    mirror = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for caption in heldout:
        if m := _RELATION.match(caption):
            mirrored = f"{m[5]} {m[6]} {m[7]} {mirror[m[4]]} {m[1]} {m[2]} {m[3]}"
            assert mirrored in heldout
    # Held-out singles cover every colour and kind; training keeps every (colour, kind, size) word.
    held_singles = [parse(c) for c in heldout if composition(c) == "single"]
    assert {o[0][0] for o in (h["objects"] for h in held_singles)} == set(COLOURS)
    assert {o[0][1] for o in (h["objects"] for h in held_singles)} == set(SHAPES)
    train_singles = [parse(c) for c in train if composition(c) == "single"]
    assert {(h["objects"][0][0], h["objects"][0][1]) for h in train_singles} == {
        (c, k) for c in COLOURS for k in SHAPES}
    assert {h["size"] for h in train_singles} == set(SIZES)


def test_the_split_rule_is_stable():
    """Golden: the salted sha256 rule gives the same held-out singles on every run and machine."""
    singles = sorted(c for c in all_captions("heldout") if composition(c) == "single")
    assert singles == ["a large orange triangle", "a large red circle", "a large yellow square",
                       "a small blue circle", "a small green triangle", "a small purple square"]
    assert len(all_captions("train")) == 1088 and len(all_captions("heldout")) == 208


def test_sampling_respects_the_split():
    rng = np.random.default_rng(0)
    for split in ("train", "heldout"):
        allowed = set(all_captions(split))
        for _ in range(300):
            assert sample_scene(rng, split).caption in allowed
        for _ in range(50):
            scene = single_shape_scene(rng, split)
            assert len(scene.shapes) == 1 and scene.caption in allowed


def test_a_bad_split_name_is_an_error_naming_the_valid_ones():
    rng = np.random.default_rng(0)
    for call in (lambda: sample_scene(rng, "test"), lambda: all_captions("val"),
                 lambda: ShapesWorld().batch(2, "eval"), lambda: ShapesWorld().dataset(2, "dev"),
                 lambda: single_shape_scene(rng, "validation")):
        with pytest.raises(ValueError, match="'train', 'heldout'"):
            call()


def test_render_at_64_px():
    images, _, scenes = ShapesWorld(seed=2, size=64).batch(3)
    assert images.shape == (3, 3, 64, 64)
    assert render(scenes[0], 64).size == (64, 64)
    with pytest.raises(ValueError, match="16"):
        render(scenes[0], 8)


def test_caption_words_cover_every_caption_and_label():
    vocabulary = set(caption_words())
    assert caption_words() == sorted(vocabulary)
    rng = np.random.default_rng(7)
    sampled = [sample_scene(rng, split).caption for _ in range(300) for split in ("train", "heldout")]
    texts = sampled + all_captions("train") + all_captions("heldout")
    texts += [colour_prompt(c) for c in COLOURS] + [shape_prompt(k) for k in SHAPES]
    assert {word for text in texts for word in text.split()} == vocabulary


def test_zero_shot_label_prompts():
    assert colour_prompt("red") == "a red shape" and colour_prompt("orange") == "an orange shape"
    assert [shape_prompt(k) for k in SHAPES] == ["a circle", "a square", "a triangle"]
    with pytest.raises(ValueError, match="red"):
        colour_prompt("pink")
    with pytest.raises(ValueError, match="circle"):
        shape_prompt("hexagon")


def test_bad_shapes_and_worlds_are_errors():
    with pytest.raises(ValueError, match="kind"):
        shapes.Shape("hexagon", "red", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="outside"):
        shapes.Shape("circle", "red", "small", 1.5, 0.5)
    with pytest.raises(ValueError, match="extent"):
        shapes.Shape("circle", "red", "small", 0.5, 0.5, extent=0.5)
    with pytest.raises(ValueError, match="seed"):
        ShapesWorld(seed=-1)


def test_the_world_prompt_lists_are_the_caption_split() -> None:
    """builtin:world_train is every train caption; builtin:world_heldout the held-out compositions
    only (the count captions, in both splits, are left out so an evaluation on it is unseen)."""
    from align_gen.prompts import load_prompts

    train = shapes.all_captions("train")
    assert load_prompts("builtin:world_train") == train
    heldout = load_prompts("builtin:world_heldout")
    assert heldout == [caption for caption in shapes.all_captions("heldout") if caption not in set(train)]
    assert len(heldout) > 150 and not set(heldout) & set(train)
