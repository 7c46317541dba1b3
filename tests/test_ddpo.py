"""DDPO: the clipped surrogate against hand-derived numbers, and one update moving the policy."""

from __future__ import annotations

import math

import pytest
import torch

from align_gen.builtins.tiny_diffusion import build_tiny_random_sd
from align_gen.config import LoraConfig, ModelConfig, SampleConfig
from align_gen.objectives import build_objective
from align_gen.objectives.ddpo import DDPOConfig, ddpo_loss
from align_gen.policies.diffusion import DiffusionPolicy
from align_gen.policy import split_steps


def test_ddpo_loss_matches_hand_derivation() -> None:
    """Two samples, eps = 0.2.

    Sample 1: log-ratio 0 -> ratio 1, A = +1: max(-1 * 1, -1 * clip(1)) = -1.
    Sample 2: log-ratio log 1.5 -> ratio 1.5, A = -2: unclipped -(-2)(1.5) = 3,
              clipped -(-2) clip(1.5, 0.8, 1.2) = 2.4, max = 3 (pessimistic bound).
    loss = (-1 + 3) / 2 = 1.
    approx_kl = 0.5 * mean(0, (log 1.5)^2) = 0.25 (log 1.5)^2; clipfrac = 1/2; mean ratio 1.25.
    """
    log_prob = torch.tensor([0.3, 0.3 + math.log(1.5)])
    old = torch.tensor([0.3, 0.3])
    advantages = torch.tensor([1.0, -2.0])
    loss, metrics = ddpo_loss(log_prob, old, advantages, clip_range=0.2)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["approx_kl"] == pytest.approx(0.25 * math.log(1.5) ** 2, rel=1e-5)
    assert metrics["clipfrac"] == pytest.approx(0.5)
    assert metrics["ratio"] == pytest.approx(1.25, rel=1e-6)


def test_ddpo_loss_clipped_branch_has_no_gradient() -> None:
    """A = +1 and ratio 1.5 > 1 + eps: the clipped term -1.2 is the max, so d loss / d logp = 0.
    A = +1 and ratio 1: the unclipped term -exp(logp) is active, so d loss / d logp = -1."""
    log_prob = torch.tensor([math.log(1.5), 0.0], requires_grad=True)
    loss, _ = ddpo_loss(log_prob, torch.zeros(2), torch.ones(2), clip_range=0.2)
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([0.0, -0.5])  # mean over 2 samples


def test_ddpo_loss_mask_drops_samples() -> None:
    loss, _ = ddpo_loss(torch.zeros(3), torch.zeros(3), torch.tensor([1.0, 5.0, 2.0]), 0.1, torch.tensor([True, False, True]))
    assert loss.item() == pytest.approx(-(1.0 + 2.0) / 2)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_one_update_moves_the_trajectory_log_prob_with_the_advantage(sign: float) -> None:
    policy = DiffusionPolicy(
        build_tiny_random_sd(),
        ModelConfig(lora=LoraConfig(enabled=True, rank=4, alpha=4.0)),
        SampleConfig(num_steps=3, guidance_scale=1.0, batch_size=2),
    )
    rollout = policy.sample(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0))
    rollout.advantages = torch.full((2,), sign)
    objective = build_objective(DDPOConfig(clip_range=10.0))  # wide: the first step stays unclipped
    optimizer = torch.optim.SGD(list(policy.trainable_parameters()), lr=0.5)
    for term in objective.loss_terms(policy, rollout, torch.Generator().manual_seed(0)):
        term.loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = policy.step_log_prob(rollout, torch.arange(3)).sum(dim=1)
    change = after - rollout.log_probs.sum(dim=1)
    assert (sign * change > 0).all(), change


def test_timestep_fraction_limits_the_steps_trained() -> None:
    class CountingPolicy:
        def __init__(self) -> None:
            self.calls = 0

        def step_pieces(self, steps):
            return split_steps(steps, 1)  # a diffusion policy: one pass per step

        def step_scores(self, rollout, steps, *, kl=False, normalized_ratio=False):
            self.calls += 1
            return StepScores(rollout.log_probs.gather(1, steps).clone().requires_grad_(True))

    from align_gen.types import Rollout, StepScores

    rollout = Rollout(
        prompts=["a", "b"],
        trajectory=torch.zeros(2, 11, 1),
        timesteps=torch.zeros(2, 10, dtype=torch.long),
        log_probs=torch.zeros(2, 10),
        step_mask=torch.ones(2, 10, dtype=torch.bool),
        conditioning={},
        images=torch.zeros(2, 3, 4, 4),
        advantages=torch.ones(2),
    )
    policy = CountingPolicy()
    terms = list(build_objective(DDPOConfig(timestep_fraction=0.3)).loss_terms(policy, rollout, torch.Generator()))
    assert len(terms) == policy.calls == 3
