"""Preference pairs from a model and a judge (align_gen.pairs, ``align-gen make-pairs``): the best
and the worst candidate of every prompt, reproducible from the seed, readable by both consumers
(SePPO's (prompt, image) datasets and the Bradley-Terry trainer's pair files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align_gen.cli import main
from align_gen.config import ModelConfig, SampleConfig
from align_gen.errors import ConfigError
from align_gen.image_datasets import load_image_dataset
from align_gen.pairs import make_pairs, summarise_pairs
from align_gen.policies import build_policy
from reward_models import get_reward
from reward_models.images import image_to_tensor
from reward_models.preference_training import load_pair_file

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def policy():
    sample = SampleConfig(num_steps=2, guidance_scale=1.0, batch_size=4)
    return build_policy(ModelConfig(pretrained="align-gen:tiny-random-sd"), sample, "cpu", trainable=False)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_chosen_is_the_judges_best_and_the_rejected_its_worst(policy, tmp_path: Path) -> None:
    judge = get_reward("jpeg_compressibility")
    path = make_pairs(policy, judge, PROMPTS, tmp_path, candidates=3, seed=0, prompts_per_batch=2, progress=False)
    lines = read_lines(path)
    assert [line["prompt"] for line in lines] == PROMPTS
    for line in lines:
        assert line["image"] == line["chosen"] != line["rejected"]
        assert len(line["scores"]) == 3
        # The saved PNGs hold the very pixels the judge scored (uint8, lossless): re-scoring
        # them gives back the recorded best and worst scores.
        images = torch.stack([image_to_tensor_of(tmp_path / line[role]) for role in ("chosen", "rejected")])
        rescored = judge(images, [line["prompt"]] * 2)
        assert rescored[0].item() == pytest.approx(max(line["scores"]), abs=1e-6)
        assert rescored[1].item() == pytest.approx(min(line["scores"]), abs=1e-6)
    summary = summarise_pairs(path)
    assert summary["pairs"] == 3
    assert summary["chosen_mean"] >= summary["candidates_mean"] >= summary["rejected_mean"]


def image_to_tensor_of(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return image_to_tensor(image)


def test_pairs_are_reproducible_from_the_seed(policy, tmp_path: Path) -> None:
    judge = get_reward("jpeg_compressibility")
    runs = [
        read_lines(make_pairs(policy, judge, PROMPTS[:2], tmp_path / name, candidates=2, seed=seed, progress=False))
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    assert [line["scores"] for line in runs[0]] == [line["scores"] for line in runs[1]]
    assert [line["scores"] for line in runs[0]] != [line["scores"] for line in runs[2]]


def test_both_consumers_read_the_pairs_file(policy, tmp_path: Path) -> None:
    path = make_pairs(policy, get_reward("jpeg_compressibility"), PROMPTS, tmp_path, candidates=2, progress=False)
    winners = load_image_dataset(str(path))  # SePPO: prompts.source=<dir>/pairs.jsonl
    assert winners.prompts == PROMPTS
    assert tuple(winners.images_for(PROMPTS[:1], 16, torch.Generator().manual_seed(0)).shape) == (1, 3, 16, 16)
    pairs = load_pair_file(path)  # align-gen train-reward --pairs <dir>/pairs.jsonl
    assert pairs.prompts == PROMPTS
    assert all(chosen.is_file() for chosen in pairs.chosen)


def test_bad_requests_are_config_errors(policy, tmp_path: Path) -> None:
    judge = get_reward("jpeg_compressibility")
    with pytest.raises(ConfigError, match="at least 2 candidates"):
        make_pairs(policy, judge, PROMPTS, tmp_path, candidates=1)
    with pytest.raises(ConfigError, match="no prompts"):
        make_pairs(policy, judge, [], tmp_path)

    def nan_judge(images, prompts):
        return torch.full((len(images),), float("nan"))

    with pytest.raises(ConfigError, match="non-finite"):
        make_pairs(policy, nan_judge, PROMPTS, tmp_path, candidates=2, progress=False)


def test_the_command_writes_pairs_and_refuses_two_judges(tmp_path: Path, prompt_file: Path, capsys) -> None:
    out = tmp_path / "pairs"
    common = ["make-pairs", "align-gen:tiny-random-sd", "--prompts", str(prompt_file), "--steps", "2",
              "--guidance-scale", "1", "--candidates", "2", "--out", str(out)]
    assert main([*common, "--reward", "jpeg_compressibility"]) == 0
    printed = capsys.readouterr().out
    assert f"prompts.source={out / 'pairs.jsonl'}" in printed
    assert len(read_lines(out / "pairs.jsonl")) == 2

    code = main([*common, "--reward", "jpeg_compressibility", "--reward", "jpeg_incompressibility"])
    err = capsys.readouterr().err
    assert code == 2 and "one judge" in err and len(err.splitlines()) == 1
