"""GenEval's scoring rules on hand-made detections, each verdict derived by hand from the rules in
reward_models/geneval_rules.py (GenEval's evaluate_images.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reward_models.errors import RewardConfigError
from reward_models.geneval_rules import (
    Detection,
    Exclude,
    Include,
    PromptSpec,
    judge,
    read_geneval_metadata,
    relative_position,
)


def box(x0: float, y0: float, size: float = 10.0) -> tuple[float, float, float, float]:
    return (x0, y0, x0 + size, y0 + size)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # offset (-20, 0), both boxes 10 wide: x shrinks to -(20 - 0.1 * 20) = -18; dx = -18 / 20 = -0.9
        (box(0, 0), box(20, 0), {"left of"}),
        (box(20, 0), box(0, 0), {"right of"}),
        (box(0, 30), box(0, 0), {"below"}),
        # offset (-20, -20): each axis -18, over the length 28.3: -0.64 on both
        (box(0, 0), box(20, 20), {"left of", "above"}),
        # offset (-20, -5): x -18, y -(5 - 2) = -3, over 20.6: dx -0.87, dy -0.15
        (box(0, 0), box(20, 5), {"left of"}),
        # offset (-1, -1): both shrink to 0 (1 - 0.1 * 20 < 0): no relation
        (box(0, 0), box(1, 1), set()),
    ],
)
def test_relative_position_by_hand(a, b, expected) -> None:
    assert relative_position(Detection("x", a), Detection("y", b)) == expected


def test_counting_takes_at_least_count_and_excludes_one_more() -> None:
    spec = PromptSpec("counting", "three cups", (Include("cup", 3),), (Exclude("cup", 4),))
    cups = [Detection("cup", box(20 * i, 0)) for i in range(5)]
    assert judge(spec, cups[:3]).correct
    too_few, too_many = judge(spec, cups[:2]), judge(spec, cups[:4])
    assert not too_few.correct and too_few.reasons == ("expected cup >= 3, found 2",)
    assert not too_many.correct and too_many.reasons == ("expected cup < 4, found 4",)
    assert (too_few.passed, too_few.checks, too_many.passed) == (1, 2, 1)  # presence fails / exclusion fails


def test_colour_is_checked_on_the_most_confident_objects_unless_colour_first() -> None:
    """GenEval takes the first ``count`` cars (most confident first) and then checks their colour;
    colour_first takes the first red car."""
    spec = PromptSpec("colors", "a red car", (Include("car", colour="red"),))
    cars = [Detection("car", box(0, 0), colour="blue"), Detection("car", box(30, 0), colour="red")]
    geneval = judge(spec, cars)
    assert not geneval.correct and geneval.reasons == ("expected red car >= 1, found blue",)
    assert (geneval.passed, geneval.checks) == (1, 2)
    assert judge(spec, cars, colour_first=True).correct


def test_position_needs_its_target_and_every_pair_in_relation() -> None:
    spec = PromptSpec("position", "a dog right of a cup", (Include("cup"), Include("dog", position=("right of", 0))))
    cup = Detection("cup", box(0, 0))
    assert judge(spec, [cup, Detection("dog", box(30, 0))]).correct
    wrong = judge(spec, [cup, Detection("dog", box(0, 30))])
    assert not wrong.correct and wrong.reasons == ("expected dog right of target, found below",)
    no_cup = judge(spec, [Detection("dog", box(30, 0))])
    assert no_cup.reasons == ("expected cup >= 1, found 0", "no target for dog to be right of")
    assert (no_cup.passed, no_cup.checks) == (1, 3)  # the dog is there; the cup and the relation fail


def test_the_graded_score_counts_every_check() -> None:
    """A red circle right of (instead of left of) a blue square, nothing else: present x 2,
    colours x 2 and the exclusion pass, the relation fails: 5 of 6 checks; with the circle moved
    left all pass; a triangle beside them fails the exclusion: 5 of 6 again."""
    spec = PromptSpec(
        "position", "a red circle left of a blue square",
        (Include("square", colour="blue"), Include("circle", colour="red", position=("left of", 0))),
        (Exclude("triangle", 1),),
    )
    square, circle = Detection("square", box(0, 0), "blue"), Detection("circle", box(30, 0), "red")
    verdict = judge(spec, [square, circle], colour_first=True)
    assert (verdict.passed, verdict.checks, verdict.graded, verdict.correct) == (5, 6, 5 / 6, False)
    moved = Detection("circle", box(-30, 0), "red")
    assert judge(spec, [square, moved], colour_first=True).graded == 1.0
    extra = judge(spec, [square, moved, Detection("triangle", box(60, 0), "red")], colour_first=True)
    assert extra.graded == 5 / 6 and not extra.correct


def test_size_is_an_attribute_like_colour() -> None:
    spec = PromptSpec("exact", "a large red circle", (Include("circle", colour="red", size="large"),))
    assert judge(spec, [Detection("circle", box(0, 0), "red", "large")]).correct
    small = judge(spec, [Detection("circle", box(0, 0), "red", "small")])
    assert small.reasons == ("expected large circle, found small",) and small.graded == 2 / 3


def test_geneval_metadata_reads_and_bad_records_say_why(tmp_path: Path) -> None:
    records = [
        {"tag": "position", "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
         "prompt": "a photo of a dog right of a cup"},
        {"tag": "counting", "include": [{"class": "clock", "count": 3}], "exclude": [{"class": "clock", "count": 4}],
         "prompt": "a photo of three clocks"},
    ]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    position, counting = read_geneval_metadata(path)
    assert position.include[1] == Include("dog", 1, position=("right of", 0)) and position.checks == 3
    assert counting.exclude == (Exclude("clock", 4),) and counting.prompt == "a photo of three clocks"
    with pytest.raises(RewardConfigError, match="not a GenEval metadata record"):
        PromptSpec.from_geneval({"tag": "x", "prompt": "y"})
    with pytest.raises(RewardConfigError, match="must come before it"):
        PromptSpec("position", "p", (Include("dog", position=("left of", 0)),))
    with pytest.raises(RewardConfigError, match="unknown relation"):
        PromptSpec("position", "p", (Include("cup"), Include("dog", position=("near", 0))))
    path.write_text("{not json\n")
    with pytest.raises(RewardConfigError, match="not JSON"):
        read_geneval_metadata(path)
