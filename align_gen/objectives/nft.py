"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward
Process", arXiv 2509.16117).

Online RL on the forward (noising) process: no log-probs and no sampler in the loss, only the
clean samples and their rewards. Each sample's reward becomes an optimality probability
r = clip(A, -c, c) / (2c) + 1/2, and the model's prediction v_theta, mixed with the sampling
policy's v_old, defines two implicit policies at a noise level t of the forward process:
    v_plus  = beta v_theta + (1 - beta) v_old           (the positive policy)
    v_minus = (1 + beta) v_old - beta v_theta           (the negative policy, its mirror)
    e_pm    = x0_hat(v_pm) - x0                          (their clean-sample errors)
    L_pm    = mean(e_pm^2) / sg(mean |e_pm|)             (adaptively weighted)
    loss    = c mean_b [r L_plus + (1 - r) L_minus] / beta + kl_beta mean_b |v_theta - v_ref|^2
What it approximates: the positive policy is pulled toward the high-reward samples and the
negative one toward the low-reward ones, which moves v_theta along the reward-weighted direction
between them (a policy improvement step, guidance-like, learned without a likelihood); at
v_theta = v_old both losses agree, and the gradient is (2r - 1) = clip(A, -c, c) / c times that
of the matching loss. Any sampler collects the samples (the deterministic ODE included), and no
classifier-free guidance enters the loss (the authors sample without it too).

The sampling policy v_old is an exponential moving average of the trained weights, updated after
each epoch as old = d old + (1 - d) weights, with d = min(decay_rate (s - decay_start), decay_max)
after ``decay_start`` optimizer steps s (0 before: the current weights): the authors' default is
min(0.001 s, 0.5). Rollouts are drawn with it (``Objective.sample``), and it is saved with every
checkpoint.

On every diffusion family: the model's prediction is whatever it was pre-trained to predict, and
x0_hat is affine in it, so the mixtures are taken of the predictions and their clean-sample
errors are the matching residuals (prediction - target) times the slope of x0_hat
(Policy.matching_terms with ``residuals``): flow models x0_hat = x_t - sigma v (slope sigma, the
authors' case); epsilon UNets (x_t - sqrt(1 - abar) eps) / sqrt(abar) (slope sqrt((1 - abar) /
abar)); v-prediction UNets sqrt(abar) x_t - sqrt(1 - abar) v (slope sqrt(1 - abar)); sample
prediction, slope 1. The noise levels are the rollout's own sampling timesteps, each sample
visiting ``num_timesteps`` of them in its own random order. Not defined for a VLM's tokens (no
forward noising process): refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from align_gen.errors import ConfigError
from align_gen.objectives import register_objective
from align_gen.objectives.base import Objective, ObjectiveConfig, move_average
from align_gen.policy import Policy
from align_gen.types import LossOutput, Rollout

if TYPE_CHECKING:
    from align_gen.config import RunConfig

Tensor = torch.Tensor
WEIGHT_FLOOR = 1e-5  # the adaptive weights' lower bound (the authors')


@dataclasses.dataclass
class NFTConfig(ObjectiveConfig):
    name: str = "nft"
    beta: float = 1.0  # mixing strength of the implicit policies (anchor: 1.0; 0.1 for OCR / multi-reward)
    num_timesteps: int = 9  # noise levels per sample and update, from its sampling grid (anchor: 9 of 10)
    advantage_clip: float = 5.0  # r = clip(A, +-c) / 2c + 1/2, the loss scaled by c (anchor: 5)
    kl_beta: float = 1e-4  # pull toward the initial model's predictions (anchor: 1e-4; 0 = no reference pass)
    decay_rate: float = 0.001  # the sampling policy's EMA decay grows by this per optimizer step (anchor: 0.001)
    decay_max: float = 0.5  # ... up to this (anchor: 0.5; 0.999 for OCR)
    decay_start: int = 0  # optimizer steps before the decay starts growing (anchor: 0; 75 for OCR)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"objective.beta must be > 0, got {self.beta}.")
        if self.num_timesteps < 1:
            raise ConfigError(f"objective.num_timesteps must be >= 1, got {self.num_timesteps}.")
        if not self.advantage_clip > 0:
            raise ConfigError(f"objective.advantage_clip must be > 0, got {self.advantage_clip}.")
        if self.kl_beta < 0 or self.decay_rate < 0 or self.decay_start < 0:
            raise ConfigError(
                "objective.kl_beta, decay_rate and decay_start must be >= 0, got "
                f"{self.kl_beta}, {self.decay_rate}, {self.decay_start}."
            )
        if not 0 <= self.decay_max < 1:
            raise ConfigError(f"objective.decay_max must be in [0, 1), got {self.decay_max}.")


def sampling_policy_decay(config: NFTConfig, step: int) -> float:
    """d of the sampling policy's EMA after ``step`` optimizer steps: 0 until ``decay_start``,
    then min(decay_rate (step - decay_start), decay_max)."""
    if step < config.decay_start:
        return 0.0
    return min(config.decay_rate * (step - config.decay_start), config.decay_max)


def nft_loss(
    residual: Tensor,
    old_residual: Tensor,
    clean_scale: Tensor,
    advantages: Tensor,
    config: NFTConfig,
    divergence: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT's loss at one noise level per sample.

    Args:
        residual: (B, ...) v_theta - target, WITH grad.
        old_residual: (B, ...) v_old - target (the sampling policy's), no grad.
        clean_scale: (B,) the slope of x0_hat in the prediction (clean-sample error = slope x
            residual, up to sign).
        advantages: (B,) A.
        config: beta, the advantage clip c and kl_beta.
        divergence: (B,) |v_theta - v_ref|^2 (WITH grad), or None when kl_beta = 0.

    Returns:
        c mean_b [r L_plus + (1 - r) L_minus] / beta (+ kl_beta mean_b divergence) and detached
        statistics: policy_loss, the two losses' means, the mean optimality probability and,
        with a divergence, its mean.
    """
    beta, c = config.beta, config.advantage_clip
    r = advantages.clamp(-c, c) / (2 * c) + 0.5  # (B,) in [0, 1]
    scale = clean_scale.view(-1, *([1] * (residual.dim() - 1)))
    positive = scale * (beta * residual + (1 - beta) * old_residual)  # (B, ...) e_plus
    negative = scale * ((1 + beta) * old_residual - beta * residual)  # (B, ...) e_minus

    def weighted(error: Tensor) -> Tensor:  # (B,) mean(e^2) / sg(mean |e|)
        weight = error.detach().abs().flatten(1).mean(dim=1).clamp(min=WEIGHT_FLOOR)
        return error.pow(2).flatten(1).mean(dim=1) / weight

    positive_loss, negative_loss = weighted(positive), weighted(negative)  # (B,) each
    policy_loss = (c * (r * positive_loss + (1 - r) * negative_loss) / beta).mean()
    loss = policy_loss
    metrics = {
        "policy_loss": policy_loss.detach(),
        "positive_loss": positive_loss.detach().mean(),
        "negative_loss": negative_loss.detach().mean(),
        "optimality": r.mean(),
    }
    if divergence is not None:
        loss = loss + config.kl_beta * divergence.mean()
        metrics["divergence"] = divergence.detach().mean()
    metrics["loss"] = loss.detach()
    return loss, metrics


@register_objective("nft", NFTConfig)
class NFT(Objective):
    """DiffusionNFT on the clean samples of any diffusion policy, drawn by an EMA of the trained
    weights (any sampler, the deterministic ODE included)."""

    config: NFTConfig

    def __init__(self, config: NFTConfig) -> None:
        super().__init__(config)
        self.old: dict[str, Tensor] | None = None  # the sampling policy's weights, on the CPU

    def check_policy_kind(self, takes_images: bool) -> None:
        if takes_images:
            raise ConfigError(
                "objective.name=nft trains on a forward (noising) process, which a VLM's tokens do not have; "
                "use ddpo, grpo, rebel, awm, seppo or diffusion_dpo there."
            )

    def setup(self, policy: Policy, run: RunConfig) -> None:
        self.old = policy.trainable_state_dict()

    def sample(self, policy: Policy, prompts: Sequence[str], generator: torch.Generator) -> Rollout:
        """Samples of the sampling policy (the EMA weights, swapped in for the call)."""
        with policy.reference(self.old):
            return policy.sample(prompts, generator=generator)

    def loss_terms(self, policy: Policy, batch: Rollout, generator: torch.Generator) -> Iterator[LossOutput]:
        num_samples, num_steps = batch.timesteps.shape
        count = min(self.config.num_timesteps, num_steps)
        # Each sample visits its own random `count` of its sampling grid's noise levels.
        order = torch.stack([torch.randperm(num_steps, generator=generator)[:count] for _ in range(num_samples)])
        order = order.to(batch.timesteps.device)
        rows = torch.arange(num_samples, device=batch.timesteps.device)
        references = ([None] if self.config.kl_beta > 0 else []) + [self.old]
        for k in range(count):
            timesteps = batch.timesteps[rows, order[:, k]]  # (B,)
            noise = policy.training_noise(num_samples, generator)
            terms = policy.matching_terms(batch, t=timesteps, noise=noise, references=references, residuals=True)
            divergence = terms.divergence[0] if self.config.kl_beta > 0 else None
            loss, metrics = nft_loss(
                terms.residual, terms.reference_residual[-1], terms.clean_scale, batch.advantages, self.config, divergence
            )
            yield LossOutput(loss / count, metrics)

    def end_epoch(self, policy: Policy, global_step: int) -> dict[str, float]:
        """The sampling policy moves toward the trained weights: old = d old + (1 - d) weights."""
        decay = sampling_policy_decay(self.config, global_step)
        move_average(self.old, policy.trainable_state_dict(), decay)
        return {"sampling_policy_decay": decay}

    def state_dict(self) -> dict[str, Tensor]:
        return {f"old.{name}": value for name, value in (self.old or {}).items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            self.old = {key.removeprefix("old."): value.clone() for key, value in state.items()}
