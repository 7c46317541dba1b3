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

Optionally (``ema_beta`` > 0) the loss also pulls toward an exponential moving average of the
trainable weights: + ema_beta * mean_b |prediction_b - EMA prediction_b|^2. The EMA starts at
the initial weights and is updated once per epoch (AWM's settings take one optimizer step per
epoch) as ema = d ema + (1 - d) weights with d = ``ema_decay``; it lives on the CPU, is swapped
into the model only for its no-grad forward pass, and is saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import torch

from align_gen.errors import ConfigError
from align_gen.objectives import register_objective
from align_gen.objectives.base import Objective, ObjectiveConfig, move_average
from align_gen.policy import Policy
from align_gen.types import LossOutput, Rollout

if TYPE_CHECKING:
    from align_gen.config import RunConfig

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
    ema_beta: float = 0.0  # pull toward an EMA of the trainable weights (0 = off)
    ema_decay: float = 0.99  # the EMA's decay per epoch (anchor: 0.99)

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ConfigError(f"objective.num_timesteps must be >= 1, got {self.num_timesteps}.")
        if not 0 < self.huber_p <= 1:
            raise ConfigError(f"objective.huber_p must be in (0, 1], got {self.huber_p}.")
        if self.beta < 0:
            raise ConfigError(f"objective.beta must be >= 0, got {self.beta}.")
        if self.ema_beta < 0:
            raise ConfigError(f"objective.ema_beta must be >= 0, got {self.ema_beta}.")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"objective.ema_decay must be in [0, 1), got {self.ema_decay}.")
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
    ema_divergence: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """AWM's loss at one noise level per sample.

    Args:
        matching_loss: (B,) l_b, WITH grad.
        noise_level: (B,) t in [0, 1].
        advantages: (B,) A, clipped to +-advantage_clip and divided by it.
        divergence: (B,) |prediction - reference prediction|^2 (WITH grad), or None when beta = 0.
        config: weighting, p, beta, ema_beta and the advantage clip.
        ema_divergence: (B,) |prediction - EMA prediction|^2 (WITH grad), or None when off.

    Returns:
        mean_b A_hat_b w(l_b, t_b) + beta mean_b divergence_b (+ ema_beta mean_b
        ema_divergence_b), and detached statistics.
    """
    scaled = advantages.clamp(-config.advantage_clip, config.advantage_clip) / config.advantage_clip  # (B,)
    weighted = weight_matching_loss(matching_loss, noise_level, config.weighting, config.huber_p)  # (B,)
    policy_term = (scaled * weighted).mean()  # ()
    metrics = {"matching_loss": matching_loss.detach().mean(), "policy_loss": policy_term.detach()}
    loss = policy_term
    if divergence is not None:
        kl_term = config.beta * divergence.mean()  # ()
        loss = loss + kl_term
        metrics["divergence"] = divergence.detach().mean()
    if ema_divergence is not None:
        loss = loss + config.ema_beta * ema_divergence.mean()
        metrics["ema_divergence"] = ema_divergence.detach().mean()
    metrics["loss"] = loss.detach()
    return loss, metrics


def stratified_steps(num_steps: int, num_strata: int, batch: int, generator: torch.Generator) -> Tensor:
    """(B, K) step indices: for each sample, one uniform draw inside each of K equal strata of
    [0, num_steps) (K may exceed num_steps; strata then repeat steps)."""
    offsets = torch.rand(batch, num_strata, generator=generator)  # (B, K) in [0, 1)
    positions = (torch.arange(num_strata) + offsets) * num_steps / num_strata  # (B, K)
    return positions.floor().long().clamp(max=num_steps - 1)


@register_objective("awm", AWMConfig)
class AWM(Objective):
    """Advantage-weighted matching on the clean samples of any policy (any sampler works, a
    deterministic one included)."""

    config: AWMConfig

    def __init__(self, config: AWMConfig) -> None:
        super().__init__(config)
        self.ema: dict[str, Tensor] | None = None  # CPU EMA of the trainable weights

    def setup(self, policy: Policy, run: RunConfig) -> None:
        if self.config.ema_beta > 0:
            self.ema = policy.trainable_state_dict()

    def loss_terms(self, policy: Policy, batch: Rollout, generator: torch.Generator) -> Iterator[LossOutput]:
        num_samples = len(batch)
        device = batch.final_samples.device
        steps = stratified_steps(batch.num_steps, self.config.num_timesteps, num_samples, generator).to(device)
        rows = torch.arange(num_samples, device=device)
        # The reference models whose predictions the loss pulls toward: the initial one (beta)
        # and the EMA (ema_beta), each one no-grad forward pass at the same inputs.
        references = ([None] if self.config.beta > 0 else []) + ([self.ema] if self.ema is not None else [])
        for k in range(self.config.num_timesteps):
            timesteps = batch.timesteps[rows, steps[:, k]]  # (B,)
            noise = policy.training_noise(num_samples, generator)
            divergence = ema_divergence = None
            if references:
                terms = policy.matching_terms(batch, t=timesteps, noise=noise, references=references)
                matching = terms.loss
                if self.config.beta > 0:
                    divergence = terms.divergence[0]
                if self.ema is not None:
                    ema_divergence = terms.divergence[-1]
            else:
                matching = policy.matching_loss(batch, t=timesteps, noise=noise)
            loss, metrics = awm_loss(
                matching, policy.noise_level(timesteps), batch.advantages, divergence, self.config, ema_divergence
            )
            yield LossOutput(loss / self.config.num_timesteps, metrics)

    def end_epoch(self, policy: Policy, global_step: int) -> dict[str, float]:
        if self.ema is not None:
            move_average(self.ema, policy.trainable_state_dict(), self.config.ema_decay)
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        return {f"ema.{name}": value for name, value in (self.ema or {}).items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.ema is None:
            super().load_state_dict(state)
        elif state:  # else the checkpoint predates ema_beta > 0: the EMA starts here
            self.ema = {key.removeprefix("ema."): value.clone() for key, value in state.items()}
