"""Writes the world captioner's question dataset: two-shape relation scenes of the tiny world,
each asked to be described, with its caption in one house wording as the reference answer.

    python configs/tiny/data/make_world_questions.py   # rewrites configs/tiny/data/world_questions/,
                                                       # world_questions.jsonl, world_questions_heldout.jsonl

"a red circle left of a blue square" draws the same image as "a blue square right of a red
circle": the world captions a relation scene either way, so its captioner
(align_gen/world/weights/captioner) says either. The answers here always say "left of" or
"above" (:data:`HOUSE_WORDING`: name the left or the upper shape first), a preference that
configs/tiny/rebel_world_captioner.yaml teaches the captioner with answer_match.

The scenes: ``COUNT`` relation captions of the train split drawn uniformly (with replacement),
each rendered once at the world's 32 px (:func:`shapes.scene_for_caption`), and
``HELDOUT_COUNT`` of the held-out split (compositions the captioner never saw) for a run's
held-out evaluation. The question is the captioner's own ("describe the image.").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from align_gen.world import captioner, shapes

COUNT = 96  # train-split scenes (world_questions.jsonl)
HELDOUT_COUNT = 48  # held-out scenes (world_questions_heldout.jsonl)
SEED = 0
HOUSE_WORDING = ("left of", "above")


def house_caption(caption: str) -> str:
    """``caption`` with its relation in :data:`HOUSE_WORDING`."""
    return caption if any(f" {relation} " in caption for relation in HOUSE_WORDING) else captioner.mirrored_caption(caption)


def relation_scenes(split: str, count: int) -> list[shapes.Scene]:
    """``count`` scenes of relation captions of ``split``, drawn from a generator seeded by
    (SEED, split)."""
    rng = np.random.default_rng([SEED, shapes.SPLITS.index(split)])
    captions = [c for c in shapes.all_captions(split) if any(f" {r} " in c for r in shapes.RELATIONS)]
    return [shapes.scene_for_caption(rng, captions[int(rng.integers(len(captions)))]) for _ in range(count)]


def main() -> None:
    data = Path(__file__).parent
    folder = data / "world_questions"
    folder.mkdir(exist_ok=True)
    for split, count, listing in (("train", COUNT, "world_questions.jsonl"), ("heldout", HELDOUT_COUNT, "world_questions_heldout.jsonl")):
        rows = []
        for index, scene in enumerate(relation_scenes(split, count)):
            name = f"{split}_{index:03d}.png"
            shapes.render(scene).save(folder / name, optimize=True)
            answer = house_caption(scene.caption)
            rows.append(json.dumps({"image": f"world_questions/{name}", "prompt": captioner.QUESTIONS["caption"], "answer": answer}))
        (data / listing).write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
