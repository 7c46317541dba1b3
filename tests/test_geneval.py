"""The hermetic ``geneval`` reward: its generated prompt set and the templates it parses back, a
tiny random Mask2Former in transformers' published layout (80 COCO labels) with the world's CLIP
classifying colours, the detection rules GenEval applies (thresholds, per-class cap, overlap),
and ``evaluate --benchmark geneval``. GenEval's verdict rules themselves are tested on hand-made
detections in test_geneval_rules.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align_gen.cli import main
from align_gen.world import shipped_folder
from reward_models import get_reward
from reward_models.errors import RewardConfigError, RewardError
from reward_models.geneval import (
    COCO_CLASSES,
    COLOURS,
    TASKS,
    generate_prompts,
    geneval_task_prompts,
    parse_prompt,
    training_prompts,
)
from tests.stand_ins import mask2former_stand_in

CUP = COCO_CLASSES.index("cup")


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here builds or runs a model on one intra-op thread (see conftest)."""


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mask2former_stand_in(tmp_path_factory.mktemp("detector"), COCO_CLASSES)


def geneval(detector: Path, **options):
    return get_reward("geneval", detector=str(detector), clip={"model": str(shipped_folder("world-clip"))}, **options)


def test_the_generated_prompts_parse_back_to_their_specs() -> None:
    specs = generate_prompts(seed=0, per_task=20)
    assert generate_prompts(seed=0, per_task=20) == specs and generate_prompts(seed=1, per_task=20) != specs
    counts = {tag: sum(spec.tag == tag for spec in specs) for tag in TASKS}
    assert counts["single_object"] == 80 and all(15 <= counts[tag] <= 20 for tag in TASKS[1:])
    assert all(parse_prompt(spec.prompt) == spec for spec in specs)
    assert parse_prompt("a photo of three hot dogs") == next(
        s for s in generate_prompts(seed=0, per_task=500) if s.prompt == "a photo of three hot dogs")
    assert parse_prompt("a cup on a table") is None and "person" not in {c.label for s in specs if s.tag == "colors"
                                                                        for c in s.include}


def test_random_detector_scores_and_a_prompt_it_cannot_read(detector: Path) -> None:
    reward = geneval(detector, threshold=0.0, counting_threshold=0.0)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a cup", "a photo of a red cup", "a photo of a dog right of a cup"]
    strict = reward(images, prompts)
    assert set(strict.tolist()) <= {0.0, 1.0}
    graded = geneval(detector, threshold=0.0, counting_threshold=0.0, mode="graded")(images, prompts)
    assert ((graded >= strict) & (graded <= 1)).all()
    with pytest.raises(RewardError, match="not in the generated prompts' templates"):
        reward(images[:1], ["a cup on a table"])


def test_detections_follow_genevals_rules(detector: Path) -> None:
    """Every query made a sure cup: all detections are cups, boxes are their masks' boxes, at most
    max_objects per class, and with max_overlap 0 a second box of a class never survives."""
    reward = geneval(detector, max_objects=3)
    head = reward.detector.class_predictor
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-20.0)
        head.bias[CUP] = 20.0
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    found = reward.detect(images, [0.0, 0.0])
    assert all(1 <= len(objects) <= 3 and {label for label, _, _ in objects} == {"cup"} for objects in found)
    for _, box, mask in found[0]:
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert box == (float(cols.min()), float(rows.min()), float(cols.max()) + 1, float(rows.max()) + 1)
    reward.max_overlap = 0.0
    assert [len(objects) for objects in reward.detect(images, [0.0, 0.0])] == [1, 1]
    assert reward.detect(images, [1.01, 1.01]) == [[], []]  # no score reaches the threshold
    colours = reward.colours(images[0], found[0])
    assert len(colours) == len(found[0]) and set(colours) <= set(COLOURS)


def test_metadata_records_and_the_prompt_set(tmp_path: Path, detector: Path) -> None:
    path = tmp_path / "evaluation_metadata.jsonl"
    records = [
        {"tag": "counting", "prompt": "a photo of two computer mice", "include": [{"class": "computer mouse", "count": 2}],
         "exclude": [{"class": "computer mouse", "count": 3}]},
        {"tag": "single_object", "prompt": "a photo of a unicorn", "include": [{"class": "unicorn", "count": 1}]},
    ]
    path.write_text(json.dumps(records[0]) + "\n")
    reward = geneval(detector, metadata=str(path))
    assert reward.spec("a photo of two computer mice").include[0].label == "mouse"  # COCO's spelling variant
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(RewardConfigError, match="names classes the detector lacks: unicorn"):
        geneval(detector, metadata=str(path))
    assert geneval_task_prompts(path) == {"counting": ["a photo of two computer mice"], "single_object": ["a photo of a unicorn"]}


def test_evaluate_the_geneval_benchmark_offline(capsys: pytest.CaptureFixture[str], detector: Path, tmp_path: Path) -> None:
    out = tmp_path / "geneval"
    code = main(["evaluate", "align-gen:tiny-random-sd", "--benchmark", "geneval", "--num-prompts", "1", "--seeds", "0",
                 "--steps", "2", "--reward-option", f"geneval.detector={detector}",
                 "--reward-option", "geneval.clip.model=align-gen:world-clip", "--reward-option", "geneval.threshold=0.0",
                 "--grid-prompts", "0", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["A"]["tasks"]) == list(TASKS) and summary["split"] == "all"
    assert all(row["prompts"] == 1 and row["images"] == 1 for row in summary["A"]["tasks"].values())
    assert main(["evaluate", "align-gen:tiny-random-sd", "--benchmark", "world-geneval", "--metadata", "x.jsonl"]) == 2
    assert "--metadata goes with --benchmark geneval" in capsys.readouterr().err


def test_the_training_prompt_list_is_the_generator_s_and_never_an_evaluation_prompt() -> None:
    from align_gen.prompts import load_prompts

    train = load_prompts("builtin:geneval_train")
    assert train == training_prompts() and len(train) == len(set(train))
    assert not set(train) & {spec.prompt for spec in generate_prompts(seed=0)}
    assert all(parse_prompt(prompt) is not None for prompt in train)


def test_prompts_outside_the_templates_and_the_metadata_are_refused_before_the_detector_loads() -> None:
    from reward_models import check_reward_prompts

    check_reward_prompts(["geneval"], {}, ["a photo of a cup", "a photo of three hot dogs"])
    with pytest.raises(RewardError, match="no metadata for 'a cup on a table'"):
        check_reward_prompts(["geneval"], {"geneval": {"detector": "/nowhere"}}, ["a photo of a cup", "a cup on a table"])
