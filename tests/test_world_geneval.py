"""World-GenEval: the gold checker against the renderer's ground truth, the world's task specs, the
``world_geneval`` reward, the benchmark's splits and statistics, and ``evaluate --benchmark``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import ImageFilter

from align_gen.benchmark import TaskResult, task_comparison, task_statistics
from align_gen.cli import main
from align_gen.evaluation import ScoredSamples
from align_gen.prompts import load_prompts
from align_gen.world.checker import classify_kind, read_shapes
from align_gen.world.geneval import (
    TASKS,
    WorldGenEval,
    benchmark_captions,
    exact_spec,
    held_out_counts,
    task_prompts,
    task_specs,
)
from align_gen.world.shapes import (
    COLOURS,
    SHAPES,
    Scene,
    Shape,
    ShapesWorld,
    all_captions,
    render,
    to_tensor,
)
from reward_models import get_reward
from reward_models.errors import RewardConfigError, RewardError

BLANK = (240, 240, 240)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here samples or builds on one intra-op thread (see conftest)."""


def attribute_errors(images: torch.Tensor, scenes: list[Scene]) -> dict[str, int]:
    """Per attribute, the scenes (count) or shapes (colour, kind, size) the checker reads wrong;
    each true shape is matched to the found shape of nearest centre."""
    errors = {"count": 0, "colour": 0, "kind": 0, "size": 0}
    for image, scene in zip(images, scenes, strict=True):
        found = read_shapes(image)
        if len(found) != len(scene.shapes):
            errors["count"] += 1
            continue
        for shape in scene.shapes:
            match = min(found, key=lambda f: (f.x - shape.x) ** 2 + (f.y - shape.y) ** 2)
            for attribute in ("colour", "kind", "size"):
                errors[attribute] += getattr(match, attribute) != getattr(shape, attribute)
    return errors


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_the_checker_reads_rendered_scenes_exactly(split: str) -> None:
    """Every colour, kind, size and count of 300 rendered scenes (about 500 shapes)."""
    images, _, scenes = ShapesWorld(seed=3).dataset(300, split)
    assert attribute_errors(images, scenes) == {"count": 0, "colour": 0, "kind": 0, "size": 0}


def test_the_checker_survives_blur_where_rgb_distance_would_not() -> None:
    """A Gaussian blur (radius 1 px) blends each shape's edge with the background: hue keeps the
    colour (a paler red is still red; by RGB distance it would be orange), the half-chroma core
    keeps the outline and splits two same-coloured shapes whose blurred edges touch."""
    _, _, scenes = ShapesWorld(seed=4).dataset(200, "heldout")
    blurred = torch.stack([to_tensor(render(s).filter(ImageFilter.GaussianBlur(1.0))) for s in scenes])
    assert attribute_errors(blurred, scenes) == {"count": 0, "colour": 0, "kind": 0, "size": 0}


def test_kind_thresholds_sit_between_the_ideal_shapes() -> None:
    """Square fill 1, circle pi/4, triangle 1/2 with its centroid at 2/3 of its height."""
    assert classify_kind(1.0, 1.0) == "square" and classify_kind(math.pi / 4, 1.0) == "circle"
    assert classify_kind(0.5, 0.2) == "triangle" and classify_kind(0.8, 0.5) == "triangle"


def test_a_blank_image_has_no_shapes_and_specs_say_what_captions_ask() -> None:
    blank = to_tensor(render(Scene((), BLANK, "")))
    assert read_shapes(blank) == []
    (single, colors) = task_specs("a large red circle")
    assert (single.tag, single.include[0].label, single.include[0].colour) == ("single_object", "circle", None)
    assert (colors.tag, colors.include[0].colour) == ("colors", "red")
    two, _, position = task_specs("a red circle left of a blue circle")
    assert two.include[0].label == "circle" and two.include[0].count == 2  # two shapes of one kind
    assert position.include[1].position == ("left of", 0)
    exact = exact_spec("two green triangles")
    assert [(c.label, c.count) for c in exact.exclude] == [("circle", 1), ("square", 1), ("triangle", 3)]


def test_the_reward_is_one_on_true_images_and_graded_by_hand() -> None:
    images, captions, _ = ShapesWorld(seed=5).dataset(64, "train")
    strict = get_reward("world_geneval", mode="strict")  # found by name: the package's entry point
    assert isinstance(strict, WorldGenEval) and strict(images, captions).tolist() == [1.0] * 64
    shifted = captions[1:] + captions[:1]
    assert strict(images, shifted).mean() < 0.2
    blank = to_tensor(render(Scene((), BLANK, ""))).unsqueeze(0)
    # "a large red circle" on a blank image: present, colour and size fail, the three exclusions hold
    assert WorldGenEval()(blank, ["a large red circle"]).item() == pytest.approx(3 / 6)
    # a large blue circle: present and size hold, colour fails (no red circle), exclusions hold: 5 / 6
    blue = Scene((Shape("circle", "blue", "large", 0.5, 0.5),), BLANK, "")
    assert WorldGenEval()(to_tensor(render(blue)).unsqueeze(0), ["a large red circle"]).item() == pytest.approx(5 / 6)


def test_task_rewards_and_their_errors() -> None:
    scene = Scene((Shape("circle", "blue", "small", 0.25, 0.5), Shape("square", "red", "small", 0.75, 0.5)), BLANK, "")
    image = to_tensor(render(scene)).unsqueeze(0)
    caption = "a red circle left of a blue square"  # colours swapped: both kinds there, nothing else right
    scores = {task: WorldGenEval(task=task, mode="strict")(image, [caption]).item()
              for task in ("two_object", "color_attr", "position")}
    assert scores == {"two_object": 1.0, "color_attr": 0.0, "position": 0.0}
    with pytest.raises(RewardError, match="does not serve the task 'counting'"):
        WorldGenEval(task="counting")(image, [caption])
    with pytest.raises(RewardError, match="tiny world's captions only"):
        WorldGenEval()(image, ["a photo of a cat"])
    with pytest.raises(RewardConfigError, match="unknown mode"):
        WorldGenEval(mode="soft")
    with pytest.raises(RewardConfigError, match="unknown task"):
        WorldGenEval(task="size")


def test_the_benchmark_splits_by_composition() -> None:
    train, heldout = benchmark_captions("train"), benchmark_captions("heldout")
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(all_captions("train")) | set(all_captions("heldout"))
    counts = held_out_counts()
    assert sorted(colour for colour, _ in counts) == sorted(COLOURS)
    assert sorted(kind for _, kind in counts) == sorted(SHAPES * 2)
    assert set(heldout) == set(load_prompts("builtin:world_heldout")) | {f"two {c} {k}s" for c, k in counts}
    assert load_prompts("builtin:world_geneval_train") == train
    assert load_prompts("builtin:world_geneval_heldout") == heldout
    sizes = {task: len(prompts) for task, prompts in task_prompts("heldout").items()}
    assert sizes == {"single_object": 6, "two_object": 184, "counting": 6, "colors": 6, "position": 184, "color_attr": 184}


def result(task: str, prompts: int, correct: list[float]) -> TaskResult:
    return TaskResult(task, [f"p{i}" for i in range(prompts)], ScoredSamples({"correct": torch.tensor(correct)}))


def test_task_statistics_by_hand() -> None:
    """Task a: 2 seeds x 2 prompts, prompt means 1 and 0.5: accuracy 0.75, se = sd(1, 0.5) / sqrt(2)
    = 0.25; task b: prompt means 0 and 0.5: 0.25, se 0.25. Overall (0.75 + 0.25) / 2 = 0.5 with
    se sqrt(0.25^2 + 0.25^2) / 2 and Welch-Satterthwaite df (v + v)^2 / (v^2 + v^2) = 2."""
    a, b = result("a", 2, [1, 1, 1, 0]), result("b", 2, [0, 1, 0, 0])  # seed-major
    stats = task_statistics([a, b])
    assert stats["tasks"]["a"]["accuracy"] == 0.75 and stats["tasks"]["a"]["se"] == pytest.approx(0.25)
    assert stats["tasks"]["a"]["ci_high"] == 1.0  # 0.75 + 12.7 x 0.25 clipped to 1
    assert stats["overall"]["accuracy"] == 0.5 and stats["overall"]["se"] == pytest.approx(math.sqrt(0.125) / 2)
    assert stats["overall"]["df"] == pytest.approx(2.0)
    comparison = task_comparison([a, b], [b, a])
    assert comparison["tasks"]["a"]["mean_difference"] == -0.5 and comparison["overall"]["mean_difference"] == 0.0


def test_evaluate_a_benchmark_and_compare_a_model_with_itself(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = main(["evaluate", "align-gen:world", "--compare", "align-gen:world", "--benchmark", "world-geneval",
                 "--num-prompts", "2", "--seeds", "0", "--steps", "2", "--guidance-scale", "3", "--grid-prompts", "1",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["A"]["tasks"]) == list(TASKS) and summary["split"] == "heldout"
    assert all(row["prompts"] == 2 and row["images"] == 2 for row in summary["A"]["tasks"].values())
    assert summary["A"]["tasks"] == summary["B"]["tasks"]  # the same model, prompts and seeds
    assert all(c["mean_difference"] == 0 for c in summary["comparison"]["tasks"].values())
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 6 * 2 and {r["task"] for r in records} == set(TASKS)
    assert "overall" in printed and (out / "samples_position.png").is_file() and "world-geneval" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--benchmark", "geneval-xl"], "unknown benchmark"),
        (["--benchmark", "world-geneval", "--split", "test"], "has the splits heldout, train"),
        (["--benchmark", "world-geneval", "--reward", "clip_score"], "drop --prompts, --reward"),
        (["--benchmark", "world-geneval", "--out", "x.json"], "give --out a folder"),
        (["--split", "train", "--prompts", "builtin:shapes", "--reward", "jpeg_compressibility"], "--split goes with --benchmark"),
        ([], "give --prompts (with --reward) or --benchmark"),
    ],
)
def test_bad_benchmark_arguments(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    assert main(["evaluate", "align-gen:world", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_a_prompt_the_reward_cannot_judge_stops_training_and_evaluation_before_any_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    from align_gen.config import load_config
    from align_gen.train import train
    from reward_models import check_reward_prompts

    with pytest.raises(RewardError, match="'a photo of a cat' is not a caption of the world"):
        check_reward_prompts(["world_geneval"], {}, ["a large red circle", "a photo of a cat"])
    with pytest.raises(RewardError, match="does not serve the task 'counting'"):
        check_reward_prompts(["world_geneval"], {"world_geneval": {"task": "counting"}}, ["a large red circle"])
    config = load_config(Path("configs/tiny/awm_world_preference.yaml"), [
        f"output_dir={tmp_path / 'run'}", "reward.weights={world_geneval: 1.0}", "reward.options={}",
        "prompts.source=builtin:shapes", "evaluation.prompts=null"])
    with pytest.raises(RewardError, match="is not a caption of the world"):
        train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    code = main(["evaluate", "align-gen:world", "--prompts", "builtin:shapes", "--reward", "world_geneval",
                 "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a caption of the world" in err
