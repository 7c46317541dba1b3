"""Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
Optimization", arXiv 2311.12908), online: the pairs are the policy's own samples, ranked by the
reward.

For a pair (x_w, x_l) of one prompt, the winner and the loser, noised at the same timestep t with
the same noise eps:
    d(x) = l_theta(x, t, eps) - l_ref(x, t, eps)
    loss = -log sigmoid(-(beta / 2) (d(x_w) - d(x_l)))
where l is the policy's matching loss (the pre-training denoising / flow-matching error, the mean
over latent elements) and ref the frozen initial model. What it approximates: DPO on the whole
denoising chain, whose intractable log-likelihood ratio log pi_theta(x_0) / pi_ref(x_0) is
replaced by the difference of the two models' denoising errors at one random timestep (an
evidence-lower-bound estimate; the paper's T omega(lambda_t) factor is folded into beta). Lowering
the loss makes the policy denoise the winner better and the loser worse than the reference does.

The scale is the authors' training script's: per-element mean errors and -(beta / 2) times the
margin, beta = 5000 for SD1.5 and SDXL. Any sampler collects the pairs (no log-probs are used,
so the ODE works too). On epsilon-, v- or sample-prediction UNets l is the MSE to that target, on
flow models to the velocity (what each model was pre-trained on); on a VLM l is the answer's mean
token NLL, and the loss is DPO's on the answers (with mean instead of summed token
log-likelihoods, so a beta on the order of 1-10 rather than 5000).

Pairs are consecutive samples of one prompt (``sample.samples_per_prompt`` even, as REBEL's);
the one with the higher reward is the winner, and a pair with equal rewards adds nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from align_gen.errors import ConfigError
from align_gen.objectives import register_objective
from align_gen.objectives.base import (
    Objective,
    ObjectiveConfig,
    check_paired_batch,
    check_paired_run,
)
from align_gen.policy import Policy
from align_gen.types import LossOutput, Rollout

if TYPE_CHECKING:
    from align_gen.config import RunConfig

Tensor = torch.Tensor


@dataclasses.dataclass
class DiffusionDPOConfig(ObjectiveConfig):
    name: str = "diffusion_dpo"
    beta: float = 5000.0  # preference sharpness on the per-element mean errors; the loss uses beta / 2 (anchor: 5000)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"objective.beta must be > 0, got {self.beta}.")


def diffusion_dpo_loss(
    first_divergence: Tensor, second_divergence: Tensor, preference: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO's loss for a batch of pairs.

    Args:
        first_divergence: (P,) d of each pair's first sample, l_theta - l_ref, WITH grad.
        second_divergence: (P,) d of its second sample, WITH grad.
        preference: (P,) +1 where the first sample won, -1 where the second did, 0 for a tie.
        beta: the preference sharpness (the loss uses beta / 2).

    Returns:
        The mean over the decided pairs of -log sigmoid(-(beta / 2) (d_w - d_l)) (0 when every
        pair is a tie) and detached statistics: the share of pairs the policy already ranks the
        reward's way (d_w < d_l), the mean margin d_w - d_l, the mean |d| and the share of ties.
    """
    margin = preference * (first_divergence - second_divergence)  # (P,) d_w - d_l; 0 for ties
    decided = (preference != 0).float()  # (P,)
    count = decided.sum().clamp(min=1)
    loss = (-F.logsigmoid(-0.5 * beta * margin) * decided).sum() / count
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "preference_accuracy": ((margin < 0).float() * decided).sum() / count,
            "margin": (margin * decided).sum() / count,
            "divergence_abs": torch.cat([first_divergence, second_divergence]).abs().mean(),
            "tie_rate": 1 - decided.mean(),
        }
    return loss, metrics


@register_objective("diffusion_dpo", DiffusionDPOConfig)
class DiffusionDPO(Objective):
    """Online Diffusion-DPO over pairs of consecutive samples of the same prompt, against the
    frozen initial model."""

    config: DiffusionDPOConfig

    def check(self, run: RunConfig) -> None:
        check_paired_run(run, "diffusion_dpo")

    def loss_terms(self, policy: Policy, batch: Rollout, generator: torch.Generator) -> Iterator[LossOutput]:
        check_paired_batch(batch, "diffusion_dpo")
        if batch.rewards is None:
            raise ValueError("diffusion_dpo ranks each pair by its rewards, which are not set on the batch.")
        pairs = len(batch) // 2
        # Both members of a pair are noised at the same timestep with the same noise.
        t = policy.training_timesteps(pairs, generator).repeat_interleave(2)
        noise = policy.training_noise(pairs, generator).repeat_interleave(2, dim=0)
        terms = policy.matching_terms(batch, t=t, noise=noise)
        divergence = terms.loss - terms.reference_loss[0]  # (B,) d(x), WITH grad
        rewards = batch.rewards.float()
        preference = torch.sign(rewards[0::2] - rewards[1::2])  # (P,)
        loss, metrics = diffusion_dpo_loss(divergence[0::2], divergence[1::2], preference, self.config.beta)
        yield LossOutput(loss, metrics)
