"""REBEL: the regression loss by hand, the two-pass gradient against autograd, one update."""

from __future__ import annotations

import pytest
import torch

from align_gen.builtins.tiny_diffusion import build_tiny_random_sd
from align_gen.config import LoraConfig, ModelConfig, SampleConfig
from align_gen.objectives import build_objective
from align_gen.objectives.rebel import RebelConfig, rebel_loss
from align_gen.policies.diffusion import DiffusionPolicy

PROMPTS = ["a red circle", "a red circle", "a blue square", "a blue square"]


def test_rebel_loss_matches_hand_derivation() -> None:
    """Pair 1: eta 0.5, log-ratio gap (0.5 - 0.1) / 0.5 = 0.8, reward gap 1.0 - 0.2 = 0.8:
    residual 0. Pair 2: gap (-0.2 - 0.3) / 0.5 = -1.0, reward gap 0.5 - 0.0 = 0.5: residual -1.5.
    loss = (0^2 + 1.5^2) / 2 = 1.125."""
    loss, metrics = rebel_loss(
        torch.tensor([0.5, -0.2]), torch.tensor([0.1, 0.3]), torch.tensor([1.0, 0.5]), torch.tensor([0.2, 0.0]), eta=0.5
    )
    assert loss.item() == pytest.approx(1.125)
    assert metrics["residual_abs"] == pytest.approx(0.75)
    assert metrics["reward_gap_abs"] == pytest.approx(0.65)


def make_policy_and_batch(steps: int = 3):
    policy = DiffusionPolicy(
        build_tiny_random_sd(),
        ModelConfig(lora=LoraConfig(enabled=True, rank=4, alpha=4.0)),
        SampleConfig(num_steps=steps, guidance_scale=2.0, batch_size=4, samples_per_prompt=2),
    )
    batch = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    batch.advantages = torch.tensor([1.0, -1.0, -0.5, 0.5])
    return policy, batch


def perturb(policy: DiffusionPolicy) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def test_two_pass_gradient_equals_autograd_of_the_one_pass_loss() -> None:
    policy, batch = make_policy_and_batch()
    perturb(policy)  # so that log-ratios (and residuals) are not all zero
    objective = build_objective(RebelConfig(eta=0.01))
    params = list(policy.trainable_parameters())

    for term in objective.loss_terms(policy, batch, torch.Generator()):
        term.loss.backward()
    two_pass = [p.grad.clone() for p in params]
    for param in params:
        param.grad = None

    log_ratio = (policy.step_log_prob(batch, torch.arange(3)) - batch.log_probs).sum(dim=1)
    adv = batch.advantages
    loss, _ = rebel_loss(log_ratio[0::2], log_ratio[1::2], adv[0::2], adv[1::2], eta=0.01)
    loss.backward()
    assert loss.item() > 0
    for ours, reference in zip(two_pass, (p.grad for p in params), strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_one_update_moves_the_log_ratio_gap_toward_the_reward_gap() -> None:
    policy, batch = make_policy_and_batch()
    objective = build_objective(RebelConfig(eta=0.001))
    optimizer = torch.optim.SGD(list(policy.trainable_parameters()), lr=1e-6)

    def residual_size() -> float:
        with torch.no_grad():
            log_ratio = (policy.step_log_prob(batch, torch.arange(3)) - batch.log_probs).sum(dim=1)
        gap = (log_ratio[0::2] - log_ratio[1::2]) / 0.001
        return float((gap - (batch.advantages[0::2] - batch.advantages[1::2])).abs().sum())

    before = residual_size()  # = sum of |reward gaps| = 3 at the un-updated policy
    assert before == pytest.approx(3.0, abs=1e-2)
    for term in objective.loss_terms(policy, batch, torch.Generator()):
        term.loss.backward()
    optimizer.step()
    assert residual_size() < before


def test_rebel_requires_pairs() -> None:
    from align_gen.config import load_config
    from align_gen.errors import ConfigError

    with pytest.raises(ConfigError, match="samples_per_prompt must be even"):
        config = load_config(None, ["objective.name=rebel"])
        build_objective(config.objective).check(config)
    odd_minibatch = load_config(
        None,
        ["objective.name=rebel", "sample.samples_per_prompt=2", "sample.batch_size=6", "train.batch_size=3"],
    )
    with pytest.raises(ConfigError, match="train.batch_size must be even"):
        build_objective(odd_minibatch.objective).check(odd_minibatch)
