"""Learning on the tiny VLM: each objective raises the colour-naming rule reward.

The task (configs/tiny/*_tiny_vlm_colour.yaml): answer "What colour is the shape?" about the 18
drawn shapes in one word; ``answer_match`` (exact) pays 1 when the answer is the shape's colour.
The random tiny LLaVA's vocabulary has ~40 words, so it is right ~3% of the time. Each run is
scored the same way before and after training: every question with 16 fixed seeds (288
answers), so the comparison is paired and its noise small (sd of a mean near 0.2 over 288
answers: ~0.024). SePPO uses no reward: its winners are the dataset's answers.

Measured (2 CPU cores, one thread, 20-40 epochs of 32 answers, 5-10 s per run), accuracy
before -> after for seeds 0 / 1 / 2: REBEL 0.031 -> 0.167 / 0.177 / 0.167, DDPO 0.031 -> 0.170 /
0.167 / 0.167, AWM 0.031 -> 0.309 / 0.181 / 0.174, SePPO (two-token answers: word and end of
sequence) 0.010 -> 0.156 / 0.174 / 0.163. About 1/6: the model learns to answer with a colour
word; telling the six colours apart from its random, frozen vision features takes longer (AWM's
seed 0 began to).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align_gen.config import ModelConfig, SampleConfig, load_config
from align_gen.policies import build_policy
from align_gen.prompts import load_prompts
from align_gen.train import train
from reward_models import get_reward

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
QUESTIONS = CONFIGS / "data" / "shape_questions.jsonl"
SEEDS = range(100, 116)


def colour_accuracy(model: str | Path, max_new_tokens: int) -> float:
    """Mean answer_match (exact) of the answers to every question, one per seed."""
    sample = SampleConfig(max_new_tokens=max_new_tokens)
    policy = build_policy(ModelConfig(pretrained=str(model)), sample, "cpu", trainable=False)
    questions = load_prompts(str(QUESTIONS), visual=True)
    reward = get_reward("answer_match", mode="exact")
    scores = []
    for seed in SEEDS:
        rollout = policy.sample(questions, generator=torch.Generator().manual_seed(seed))
        scores.append(reward(rollout.images, rollout.prompts, texts=rollout.texts))
    return float(torch.cat(scores).mean())


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("objective", ["rebel", "ddpo", "awm", "seppo"])
def test_objective_raises_the_tiny_vlm_s_colour_reward(objective: str, tmp_path: Path) -> None:
    config = load_config(
        CONFIGS / f"{objective}_tiny_vlm_colour.yaml",
        [f"output_dir={tmp_path}", "grid.every=0", "grid.num_prompts=1", "grid.seeds=[0]", "tensorboard=false"],
    )
    before = colour_accuracy(config.model.pretrained, config.sample.max_new_tokens)
    result = train(config)
    after = colour_accuracy(result.final_model, config.sample.max_new_tokens)
    assert after > before + 0.08, (before, after)
