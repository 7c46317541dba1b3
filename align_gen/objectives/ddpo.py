"""DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning").

PPO's clipped surrogate applied to each denoising step as an MDP action:
    ratio_t = exp(log pi(x_{t-1}|x_t,c) - log pi_old(x_{t-1}|x_t,c))
    loss    = mean_{b,t} max(-A_b ratio_t, -A_b clip(ratio_t, 1-eps, 1+eps))
Like the anchor, each sample visits its trainable steps in its own random order and the loss of
one step (over the minibatch) is backpropagated at a time; ``timestep_fraction`` trains on the
first fraction of that order. When the sampler noised only a window of steps
(``sample.sde_window``, as in Flow-GRPO-Fast and MixGRPO), only the window's steps are visited.
Approximation, as in the paper: the per-step log-prob is the mean over latent elements, not the
sum, which rescales the ratio's log by 1/(C h w).
On a VLM a token is a step: its ratio is the token's, and since one teacher-forced pass scores
every token, all of a minibatch's tokens form one piece (the mean over valid tokens).

Option (not the anchor's): ``beta`` > 0 adds beta times each step's KL to the initial model,
mean_{b,t} KL(pi(.|x_t,c) || pi_ref(.|x_t,c)), in closed form (Policy.step_scores; one
more, no-grad, forward pass of the reference per piece): what Flow-GRPO adds (objective grpo).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from align_gen.errors import ConfigError
from align_gen.objectives import register_objective
from align_gen.objectives.base import Objective, ObjectiveConfig
from align_gen.policy import Policy
from align_gen.types import LossOutput, Rollout

if TYPE_CHECKING:
    from align_gen.config import RunConfig

Tensor = torch.Tensor


@dataclasses.dataclass
class DDPOConfig(ObjectiveConfig):
    name: str = "ddpo"
    clip_range: float = 1e-4  # PPO's eps on the ratio (anchor: 1e-4)
    timestep_fraction: float = 1.0  # fraction of each trajectory's steps trained on (anchor: 1.0)
    # Weight of the per-step KL to the initial model (Policy.step_scores) added to the
    # loss; 0 = off (the anchor), and no reference forward pass is run.
    beta: float = 0.0

    def __post_init__(self) -> None:
        if not self.beta >= 0:
            raise ConfigError(f"objective.beta must be >= 0 (0 = no KL penalty), got {self.beta}.")
        if self.clip_range <= 0:
            raise ConfigError(f"objective.clip_range must be > 0, got {self.clip_range}.")
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(
                f"objective.timestep_fraction must be in (0, 1], got {self.timestep_fraction}."
            )


def ddpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    mask: Tensor | None = None,
    kl: Tensor | None = None,
    beta: float = 0.0,
    surrogate_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate for one step of each sample, plus beta times its KL to the
    reference when ``kl`` is given.

    Args:
        log_prob: (B,) log pi(a|s) under the current weights, WITH grad.
        old_log_prob: (B,) log pi_old(a|s) recorded at sampling time.
        advantages: (B,) advantage of each sample's trajectory.
        clip_range: eps; the ratio is clipped to [1 - eps, 1 + eps].
        mask: (B,) bool, False for samples whose step is not trainable (they add 0).
        kl: (B,) KL of each step to the reference model's (WITH grad), or None (no penalty).
        beta: the KL's weight.
        surrogate_weight: (B,) a weight of each sample's surrogate term (GRPO-Guard's step
            re-weighting), or None (1).

    Returns:
        The mean loss over unmasked samples and detached 0-d statistics (on the device, read
        back by the trainer once per update): approx_kl (0.5 E[(log ratio)^2]), clipfrac (share
        of ratios outside the clip range) and its shares above and below 1, the ratio's mean,
        policy_loss (the surrogate alone) and, with ``kl``, kl (its mean).
    """
    if mask is None:
        mask = torch.ones_like(advantages, dtype=torch.bool)
    weight = mask.float() / mask.float().sum().clamp(min=1)  # (B,)
    log_ratio = log_prob - old_log_prob  # (B,)
    ratio = torch.exp(log_ratio)  # (B,)
    unclipped = -advantages * ratio  # (B,)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B,)
    surrogate = torch.maximum(unclipped, clipped)  # (B,)
    if surrogate_weight is not None:
        surrogate = surrogate * surrogate_weight
    policy_loss = (surrogate * weight).sum()  # ()
    loss = policy_loss
    with torch.no_grad():
        metrics = {
            "policy_loss": policy_loss.detach(),
            "approx_kl": (0.5 * log_ratio.pow(2) * weight).sum(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mul(weight).sum(),
            "clipfrac_above": (ratio - 1.0 > clip_range).float().mul(weight).sum(),
            "clipfrac_below": (1.0 - ratio > clip_range).float().mul(weight).sum(),
            "ratio": (ratio * weight).sum(),
        }
    if kl is not None:
        # Masked steps (a flow sampler's sharp last step) can have huge KLs: drop, not weight, them.
        kl_mean = (torch.where(mask, kl, 0.0) * weight).sum()  # ()
        loss = loss + beta * kl_mean
        metrics["kl"] = kl_mean.detach()
    return loss, metrics


@register_objective("ddpo", DDPOConfig)
class DDPO(Objective):
    """DDPO-clip over any policy's recorded steps."""

    config: DDPOConfig

    def check(self, run: RunConfig) -> None:
        if run.sample.eta <= 0:
            raise ConfigError("ddpo needs a stochastic sampler: sample.eta must be > 0.")

    def loss_terms(self, policy: Policy, batch: Rollout, generator: torch.Generator) -> Iterator[LossOutput]:
        order = visit_order(batch, self.config.timestep_fraction, generator)  # (B, n)
        # One piece per forward pass the policy scores (k steps of each sample as one denoiser
        # forward of k * B rows, or all of them in a VLM's one pass: the loss is then the mean
        # over all valid tokens). The pieces' losses add up to the same loss for any k.
        # Each piece's mean is weighted by its share of the trainable (unmasked) transitions, so
        # the pieces sum to the mean over all of them whatever the chunking.
        trainable = batch.step_mask.gather(1, order).sum().clamp(min=1)  # ()
        for steps in policy.step_pieces(order):  # (B, c) each
            mask = batch.step_mask.gather(1, steps)  # (B, c)
            loss, metrics = self.piece_loss(policy, batch, steps, mask)
            yield LossOutput(loss * mask.sum() / trainable, {"loss": loss.detach(), **metrics})

    def piece_loss(self, policy: Policy, batch: Rollout, steps: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss (mean over the unmasked transitions) and statistics of the steps ``steps``
        (B, c) of one forward pass; ``mask`` (B, c): the trainable ones."""
        scores = policy.step_scores(batch, steps, kl=self.config.beta > 0)  # (B, c) each
        old_log_prob = batch.log_probs.gather(1, steps)  # (B, c)
        advantages = batch.advantages[:, None].expand_as(old_log_prob)  # (B, c)
        return ddpo_loss(
            scores.log_prob.flatten(),
            old_log_prob.flatten(),
            advantages.flatten(),
            self.config.clip_range,
            mask.flatten(),
            None if scores.kl is None else scores.kl.flatten(),
            self.config.beta,
        )


def visit_order(batch: Rollout, fraction: float, generator: torch.Generator) -> Tensor:
    """(B, n) the steps each sample trains on, in its own random order (as in the anchor, so one
    forward pass mixes timesteps and the update is not biased toward any step): the first
    ``fraction`` of a permutation of its steps: every step, or, when the sampler noised only a
    window (``Rollout.sde_steps``), the window's steps only, so an update costs k / T of a full
    one. Drawn on the host from ``generator``, placed on the rollout's device."""
    num_samples, num_steps = batch.log_probs.shape
    if batch.sde_steps is None:
        num_train = max(1, math.ceil(num_steps * fraction))
        order = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(num_samples)])
    else:
        sizes = {len(steps) for steps in batch.sde_steps}
        if len(sizes) != 1:
            raise ValueError(f"the samples of a minibatch must have SDE windows of one size, got sizes {sorted(sizes)}.")
        size = sizes.pop()
        num_train = max(1, math.ceil(size * fraction))
        order = torch.stack(
            [torch.tensor(steps)[torch.randperm(size, generator=generator)] for steps in batch.sde_steps]
        )
    return order[:, :num_train].to(batch.log_probs.device)
