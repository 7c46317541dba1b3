"""The same objective classes that train diffusion models train a VLM: one update of each moves
every tiny VLM family (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3) the right way (no VLM-specific copy of any loss exists)."""

from __future__ import annotations

import pytest
import torch

from align_gen.config import RunConfig, load_config
from align_gen.objectives import build_objective
from align_gen.objectives.awm import AWMConfig
from align_gen.objectives.ddpo import DDPOConfig
from align_gen.objectives.rebel import RebelConfig
from tests.test_vlm_policy import FAMILIES, LENGTH, QUESTIONS, make_policy, questions


def _sum_log_probs(policy, rollout) -> torch.Tensor:
    with torch.no_grad():
        return policy.step_log_prob(rollout, torch.arange(LENGTH)).sum(dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_ddpo_moves_the_answer_log_prob_with_the_advantage(family: str, sign: float) -> None:
    torch.manual_seed(0)
    policy = make_policy(family)
    rollout = policy.sample(questions(3), generator=torch.Generator().manual_seed(0))
    rollout.advantages = torch.full((3,), sign)
    objective = build_objective(DDPOConfig(clip_range=10.0))
    terms = list(objective.loss_terms(policy, rollout, torch.Generator().manual_seed(0)))
    assert len(terms) == 1  # one teacher-forced pass scores every token
    optimizer = torch.optim.SGD(list(policy.trainable_parameters()), lr=0.05)
    terms[0].loss.backward()
    optimizer.step()
    # First order, the batch's total log-prob moves by lr * sign * |grad|^2 (single samples can
    # move the other way through their shared weights).
    change = (_sum_log_probs(policy, rollout) - rollout.log_probs.sum(dim=1)).sum()
    assert sign * change > 0, change


@pytest.mark.parametrize("family", FAMILIES)
def test_rebel_moves_the_log_ratio_gap_toward_the_reward_gap(family: str) -> None:
    torch.manual_seed(0)
    policy = make_policy(family)
    prompts = [p for p in questions(2) for _ in range(2)]  # two pairs
    rollout = policy.sample(prompts, generator=torch.Generator().manual_seed(0))
    rollout.advantages = torch.tensor([1.0, -1.0, -0.5, 0.5])
    eta = 0.01

    def residual_size() -> float:
        log_ratio = _sum_log_probs(policy, rollout) - rollout.log_probs.sum(dim=1)
        gap = (log_ratio[0::2] - log_ratio[1::2]) / eta
        return float((gap - (rollout.advantages[0::2] - rollout.advantages[1::2])).abs().sum())

    before = residual_size()
    assert before == pytest.approx(3.0, abs=1e-3)
    optimizer = torch.optim.SGD(list(policy.trainable_parameters()), lr=1e-7)
    for term in build_objective(RebelConfig(eta=eta)).loss_terms(policy, rollout, torch.Generator()):
        term.loss.backward()
    optimizer.step()
    assert residual_size() < before


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_awm_moves_the_answer_nll_against_its_advantage(family: str, sign: float) -> None:
    torch.manual_seed(0)
    policy = make_policy(family)
    rollout = policy.sample(questions(2), generator=torch.Generator().manual_seed(0))
    rollout.advantages = torch.full((2,), sign)

    def nll() -> torch.Tensor:
        with torch.no_grad():
            return policy.matching_loss(rollout)

    before = nll()
    objective = build_objective(AWMConfig(num_timesteps=1, weighting="uniform", beta=1e-3))
    optimizer = torch.optim.SGD(list(policy.trainable_parameters()), lr=0.05)
    for term in objective.loss_terms(policy, rollout, torch.Generator().manual_seed(0)):
        term.loss.backward()
    optimizer.step()
    assert sign * (nll() - before).sum() < 0


def seppo_run() -> RunConfig:
    return load_config(
        None,
        [
            "model.pretrained=align-gen:tiny-random-llava",
            "objective.name=seppo",
            "objective.beta=5",
            "objective.reference=initial",
            f"prompts.source={QUESTIONS}",
            f"sample.max_new_tokens={LENGTH}",
        ],
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_seppo_lowers_the_dataset_answer_s_divergence(family: str) -> None:
    torch.manual_seed(0)
    policy = make_policy(family)
    run = seppo_run()
    objective = build_objective(run.objective)
    objective.check(run)
    objective.setup(policy, run)
    generator = torch.Generator().manual_seed(0)
    batch = objective.sample(policy, questions(3), generator)
    assert policy.decode(batch.extras["preferred"]) == [p.answer for p in questions(3)]

    def winner_divergence() -> torch.Tensor:
        with torch.no_grad():
            terms = policy.matching_terms(batch, t=policy.training_timesteps(3), noise=policy.training_noise(3), clean=batch.extras["preferred"])
        return terms.loss - terms.reference_loss[0]

    assert winner_divergence().abs().max() < 1e-6
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    for term in objective.loss_terms(policy, batch, generator):
        term.loss.backward()
    optimizer.step()
    assert winner_divergence().mean() < 0


def test_seppo_needs_an_answer_for_every_example(tmp_path) -> None:
    from align_gen.errors import ConfigError

    (tmp_path / "data.jsonl").write_text(
        QUESTIONS.read_text().splitlines()[0].replace('"answer": "red"', '"note": "x"').replace(
            "shapes/", str(QUESTIONS.parent / "shapes") + "/"
        )
        + "\n"
    )
    from align_gen.image_datasets import load_image_dataset

    prompts = load_image_dataset(str(tmp_path / "data.jsonl")).visual_prompts()
    policy = make_policy("tiny-random-llava")
    run = seppo_run()
    objective = build_objective(run.objective)
    objective.setup(policy, run)
    with pytest.raises(ConfigError, match="give every example an \"answer\" field"):
        objective.sample(policy, prompts, torch.Generator())
