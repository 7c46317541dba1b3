"""AWM: Advantage Weighted Matching (arXiv 2509.25050).

AWM trains on the final clean samples only, with the model's own pre-training loss: each
sample's denoising (or flow-matching) loss is weighted by its advantage, so samples better than
their group are made more likely and worse ones less likely:
    A_hat = clip(A, -c, c) / c
    l_b   = mean (prediction - target)^2 at a noise level t with fresh noise   (policy.matching_loss)
    loss  = mean_b A_hat_b w(l_b, t) + beta * mean_b |prediction_b - reference prediction_b|^2
with the weighting w either uniform (w = l), linear in the noise level (w = t l), or the
paper's generalised Huber w = (t / p)((l + 1e-10)^p - (1e-10)^p). Each sample is trained at K
noise levels drawn stratified over the sampling grid (one per stratum of the rollout's
timesteps), one backward per level. Because it never uses the sampler's log-probs, AWM works
with rollouts from any sampler, a deterministic ODE included.

Simplification: the optional pull toward an EMA copy of the weights is not implemented yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Literal

import torch

from align_gen.config import ObjectiveConfig, RunConfig
from align_gen.errors import ConfigError
from align_gen.objectives import register_objective
from align_gen.policy import Policy
from align_gen.types import LossOutput, Rollout

Tensor = torch.Tensor
_TINY = 1e-10  # keeps (l + tiny)^p differentiable at l = 0


@dataclasses.dataclass
class AWMConfig(ObjectiveConfig):
    name: str = "awm"
    num_timesteps: int = 6  # K noise levels per sample and update (anchor: 6)
    weighting: Literal["huber", "uniform", "t"] = "huber"  # w(l, t); anchor: generalised Huber
    huber_p: float = 0.25  # p of the generalised Huber weighting (anchor: 0.25)
    beta: float = 1e-4  # pull toward the reference model's outputs (anchor: 1e-4 PickScore, 3e-3 OCR)
    advantage_clip: float = 5.0  # A_hat = clip(A, +-c) / c (anchor: 5)

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ConfigError(f"objective.num_timesteps must be >= 1, got {self.num_timesteps}.")
        if not 0 < self.huber_p <= 1:
            raise ConfigError(f"objective.huber_p must be in (0, 1], got {self.huber_p}.")
        if self.beta < 0:
            raise ConfigError(f"objective.beta must be >= 0, got {self.beta}.")
        if not self.advantage_clip > 0:
            raise ConfigError(f"objective.advantage_clip must be > 0, got {self.advantage_clip}.")


def weight_matching_loss(loss: Tensor, noise_level: Tensor, weighting: str, p: float = 0.25) -> Tensor:
    """(B,) w(l, t) for per-sample matching losses ``loss`` (B,) at noise levels (B,) in [0, 1]."""
    if weighting == "uniform":
        return loss
    if weighting == "t":
        return noise_level * loss
    if weighting == "huber":
        return (noise_level / p) * ((loss + _TINY) ** p - _TINY**p)
    raise ValueError(f"unknown weighting {weighting!r}; valid: huber, uniform, t.")


def awm_loss(
    matching_loss: Tensor,
    noise_level: Tensor,
    advantages: Tensor,
    divergence: Tensor | None,
    config: AWMConfig,
) -> tuple[Tensor, dict[str, float]]:
    """AWM's loss at one noise level per sample.

    Args:
        matching_loss: (B,) l_b, WITH grad.
        noise_level: (B,) t in [0, 1].
        advantages: (B,) A, clipped to +-advantage_clip and divided by it.
        divergence: (B,) |prediction - reference prediction|^2 (WITH grad), or None when beta = 0.
        config: weighting, p, beta and the advantage clip.

    Returns:
        mean_b A_hat_b w(l_b, t_b) + beta mean_b divergence_b, and detached statistics.
    """
    scaled = advantages.clamp(-config.advantage_clip, config.advantage_clip) / config.advantage_clip  # (B,)
    weighted = weight_matching_loss(matching_loss, noise_level, config.weighting, config.huber_p)  # (B,)
    policy_term = (scaled * weighted).mean()  # ()
    metrics = {"matching_loss": float(matching_loss.detach().mean()), "policy_loss": float(policy_term.detach())}
    loss = policy_term
    if divergence is not None:
        kl_term = config.beta * divergence.mean()  # ()
        loss = loss + kl_term
        metrics["divergence"] = float(divergence.detach().mean())
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def stratified_steps(num_steps: int, num_strata: int, batch: int, generator: torch.Generator) -> Tensor:
    """(B, K) step indices: for each sample, one uniform draw inside each of K equal strata of
    [0, num_steps) (K may exceed num_steps; strata then repeat steps)."""
    offsets = torch.rand(batch, num_strata, generator=generator)  # (B, K) in [0, 1)
    positions = (torch.arange(num_strata) + offsets) * num_steps / num_strata  # (B, K)
    return positions.floor().long().clamp(max=num_steps - 1)


@register_objective("awm", AWMConfig)
class AWM:
    """Advantage-weighted matching on the clean samples of any policy."""

    def __init__(self, config: AWMConfig) -> None:
        self.config = config

    def check(self, run: RunConfig) -> None:  # any sampler works, a deterministic one included
        return None

    def loss_terms(self, policy: Policy, batch: Rollout, generator: torch.Generator) -> Iterator[LossOutput]:
        num_samples = len(batch)
        device = batch.final_samples.device
        steps = stratified_steps(batch.num_steps, self.config.num_timesteps, num_samples, generator).to(device)
        rows = torch.arange(num_samples, device=device)
        for k in range(self.config.num_timesteps):
            timesteps = batch.timesteps[rows, steps[:, k]]  # (B,)
            noise = torch.randn(batch.final_samples.shape, generator=generator).to(device)
            if self.config.beta > 0:
                matching, divergence = policy.matching_loss_and_divergence(batch, t=timesteps, noise=noise)
            else:
                matching, divergence = policy.matching_loss(batch, t=timesteps, noise=noise), None
            loss, metrics = awm_loss(matching, policy.noise_level(timesteps), batch.advantages, divergence, self.config)
            yield LossOutput(loss / self.config.num_timesteps, metrics)
