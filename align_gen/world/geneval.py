"""World-GenEval: GenEval's six tasks in the tiny world's language, judged by the gold checker.

GenEval (Ghosh et al. 2023) scores a text-to-image model on six tasks by detecting the objects in
its images and checking what each prompt asks for. The world can be read back exactly
(:mod:`align_gen.world.checker`), so the same tasks and rules (:mod:`reward_models.geneval_rules`)
give a gold score with no learned model in the loop. The prompts are the world's own captions
(the only language its models know); each caption kind serves the tasks it can test:

====================  =========================  =========================================================
task (GenEval tag)    captions                   correct when (the shapes read from the image)
====================  =========================  =========================================================
``single_object``     "a large red circle"       at least one circle
``colors``            "a large red circle"       at least one red circle
``counting``          "two green triangles"      at least two green triangles and no third triangle
``two_object``        "a red circle left of a    a circle and a square (two circles when both shapes
                      blue square"               are circles)
``color_attr``        (the same)                 a red circle and a blue square
``position``          (the same)                 a red circle left of a blue square (GenEval's relation
                                                 rule on the two boxes)
====================  =========================  =========================================================

Where this differs from GenEval, and why: colours are read exactly, so a clause with a colour
takes the shapes of its kind with that colour first (``colour_first``; GenEval takes the most
confident objects of the class, then checks their colours with CLIP), which lets the world ask
for a red and a blue circle in one prompt; counting prompts name a colour, as every world count caption
does; sizes are not scored by the tasks (GenEval has no size task).

The **reward** ``world_geneval`` reads the whole caption (the ``exact`` spec): every shape it
names, with colour and size (single shapes), the relation (two shapes), and nothing else: no
shape of a kind the caption does not name, and no more shapes of a named kind than it names.
``mode: graded`` (the default, for training) is the fraction of those checks that hold
(:attr:`reward_models.geneval_rules.Verdict.graded`): a binary reward gives a group of samples
that all fail (the hard prompts, early in training) no advantage to learn from, while partial
credit still ranks "a red circle right of the square" above "a blue circle". ``mode: strict``
is 1 when every check holds, else 0 (GenEval's per-image correctness).

**Splits**, by composition: single and relation captions follow the world's own split
(:mod:`align_gen.world.shapes`, so the world model never saw a held-out single or relation
caption); the world's count captions are in both of its splits, so the benchmark holds out one
count per colour, each kind twice (with the colours ordered by their composition score, the i-th
holds out its ``SHAPES[i % 3]``): 6 of 18, never trained on by RL with ``world_geneval_train``.
"""

from __future__ import annotations

import torch

from align_gen.world.checker import read_shapes
from align_gen.world.shapes import (
    COLOURS,
    SHAPES,
    SPLITS,
    all_captions,
    caption_composition,
    composition_score,
)
from reward_models.errors import RewardConfigError, RewardError
from reward_models.geneval_rules import Detection, Exclude, Include, PromptSpec, Verdict, judge
from reward_models.registry import BatchedReward

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TASKS_OF_KIND = {
    "single": ("single_object", "colors"),
    "count": ("counting",),
    "relation": ("two_object", "color_attr", "position"),
}
MODES = ("graded", "strict")


def held_out_counts() -> list[tuple[str, str]]:
    """The (colour, kind) count compositions of the benchmark's held-out split (module docstring)."""
    ordered = sorted(COLOURS, key=lambda colour: composition_score(f"count|{colour}"))
    return [(colour, SHAPES[i % len(SHAPES)]) for i, colour in enumerate(ordered)]


def benchmark_captions(split: str) -> list[str]:
    """The benchmark's captions of ``split`` ("train" or "heldout"), sorted."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    held_out = set(held_out_counts())
    captions = []
    for caption in all_captions(split):
        kind, composition = caption_composition(caption)
        if kind == "count" and (composition in held_out) != (split == "heldout"):
            continue
        captions.append(caption)
    return captions


def _world_composition(caption: str) -> tuple[str, tuple[str, ...]]:
    try:
        return caption_composition(str(caption))
    except ValueError as err:
        raise RewardError(f"world_geneval scores the tiny world's captions only: {err}") from None


def _only(named: dict[str, int]) -> tuple[Exclude, ...]:
    """No shape of a kind beyond the ``named`` counts (kind -> count)."""
    return tuple(Exclude(kind, named.get(kind, 0) + 1) for kind in SHAPES)


def task_specs(caption: str) -> list[PromptSpec]:
    """The specs of every task a world caption serves (module docstring's table)."""
    kind, words = _world_composition(caption)
    if kind == "single":
        _, colour, shape = words
        return [PromptSpec("single_object", caption, (Include(shape),)),
                PromptSpec("colors", caption, (Include(shape, colour=colour),))]
    if kind == "count":
        colour, shape = words
        return [PromptSpec("counting", caption, (Include(shape, 2, colour=colour),), (Exclude(shape, 3),))]
    colour1, shape1, relation, colour2, shape2 = words
    both = (Include(shape1, 2),) if shape1 == shape2 else (Include(shape1), Include(shape2))
    return [
        PromptSpec("two_object", caption, both),
        PromptSpec("color_attr", caption, (Include(shape1, colour=colour1), Include(shape2, colour=colour2))),
        PromptSpec("position", caption,
                   (Include(shape2, colour=colour2), Include(shape1, colour=colour1, position=(relation, 0)))),
    ]


def exact_spec(caption: str) -> PromptSpec:
    """Everything a world caption says and nothing else (the reward's reading; module docstring)."""
    kind, words = _world_composition(caption)
    if kind == "single":
        size, colour, shape = words
        return PromptSpec("exact", caption, (Include(shape, colour=colour, size=size),), _only({shape: 1}))
    if kind == "count":
        colour, shape = words
        return PromptSpec("exact", caption, (Include(shape, 2, colour=colour),), _only({shape: 2}))
    colour1, shape1, relation, colour2, shape2 = words
    named = {shape1: 1} | {shape2: 2 if shape1 == shape2 else 1}
    include = (Include(shape2, colour=colour2), Include(shape1, colour=colour1, position=(relation, 0)))
    return PromptSpec("exact", caption, include, _only(named))


def shape_detections(image: torch.Tensor) -> list[Detection]:
    """The checker's shapes of one (3, H, W) image in [0, 1] as detections (largest first)."""
    return [Detection(shape.kind, shape.box, shape.colour, shape.size) for shape in read_shapes(image)]


def judge_world(spec: PromptSpec, detections: list[Detection]) -> Verdict:
    """GenEval's rules on the checker's detections, colours matched first (module docstring)."""
    return judge(spec, detections, colour_first=True)


class WorldGenEval(BatchedReward):
    """The ``world_geneval`` reward: each image judged against its caption by the gold checker.

    Options: ``task``, what is judged: "exact" (default: everything the caption says and nothing
    else) or one GenEval task of :data:`TASKS` (the caption must serve it); ``mode`` "graded"
    (default: the fraction of the checks that hold) or "strict" (1 when all hold, else 0).
    """

    name = "world_geneval"

    def __init__(self, task: str = "exact", mode: str = "graded", batch_size: int = 64) -> None:
        super().__init__(batch_size)
        if mode not in MODES:
            raise RewardConfigError(f"world_geneval: unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if task != "exact" and task not in TASKS:
            raise RewardConfigError(f"world_geneval: unknown task {task!r}; valid: exact, {', '.join(TASKS)}")
        self.task, self.mode = task, mode

    @classmethod
    def check_prompts(cls, prompts: list, task: str = "exact", **options) -> None:
        """A ``RewardError`` naming the first prompt this reward cannot judge (before any
        sampling: see :func:`reward_models.check_reward_prompts`)."""
        for prompt in prompts:
            cls.spec_of(str(prompt), task)

    @staticmethod
    def spec_of(caption: str, task: str) -> PromptSpec:
        """What the reward with ``task`` judges of ``caption``."""
        if task == "exact":
            return exact_spec(caption)
        specs = {spec.tag: spec for spec in task_specs(caption)}
        if task not in specs:
            raise RewardError(f"world_geneval: {caption!r} does not serve the task {task!r} (it serves "
                              f"{', '.join(specs)})")
        return specs[task]

    def spec(self, caption: str) -> PromptSpec:
        """What this reward judges of ``caption``."""
        return self.spec_of(caption, self.task)

    def score_chunk(self, images: torch.Tensor, prompts: list) -> torch.Tensor:
        scores = []
        for image, prompt in zip(images, prompts, strict=True):
            verdict = judge_world(self.spec(str(prompt)), shape_detections(image))
            scores.append(verdict.graded if self.mode == "graded" else float(verdict.correct))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def task_prompts(split: str) -> dict[str, list[str]]:
    """Each GenEval task's benchmark captions of ``split`` (every caption serving the task)."""
    prompts: dict[str, list[str]] = {task: [] for task in TASKS}
    for caption in benchmark_captions(split):
        for spec in task_specs(caption):
            prompts[spec.tag].append(caption)
    return prompts
