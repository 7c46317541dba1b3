"""Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL",
arXiv 2505.05470).

Each prompt draws a group of G samples (``sample.samples_per_prompt``); a sample's advantage is
its reward relative to its group (``advantage.kind: group``, optionally over the batch's std,
``advantage.global_std``). Every stochastic step is an action, trained with PPO's clipped ratio
and a KL penalty to the initial (reference) model:
    ratio_t = exp(log pi(x_{t-1}|x_t,c) - log pi_old(x_{t-1}|x_t,c))
    loss    = mean_{b,t} [max(-A_b ratio_t, -A_b clip(ratio_t, 1-eps, 1+eps)) + beta KL_t]
    KL_t    = KL(pi(.|x_t,c) || pi_ref(.|x_t,c)) = |mu_theta - mu_ref|^2 / (2 sigma_t^2)
What it approximates: a trust-region policy gradient on the expected reward, with the group
mean as the baseline instead of a value function, regularised toward the base model. The KL is
each step's exact closed form between the two Gaussian steps (which share their std), averaged
over latent elements like the log-probs (Policy.step_log_prob_and_kl); on a VLM, the tokens'
categorical KL at the sampling temperature. The clipped surrogate and the KL are DDPO's
(:mod:`align_gen.objectives.ddpo`, where beta is an option too): GRPO is that objective with
group-relative advantages required, Flow-GRPO's defaults and GRPO-Guard.

GRPO-Guard (Wang et al. 2025, arXiv 2510.22319; ``ratio_norm: true``, diffusion policies only):
with per-element mean log-probs and x_{t-1} = mu_old + s eps, a step's log-ratio is
mean(eps (mu_theta - mu_old)) / s - mean((mu_theta - mu_old)^2) / (2 s^2): its mean is below 0 and
its spread grows as the step's std s shrinks, so at low-noise steps the ratio leaves the clip
range on one side only and positive-advantage samples stop being clipped (the over-optimisation
GRPO-Guard was added to flow_grpo against). RatioNorm takes instead
    log ratio_hat = s (log ratio + mean((mu_theta - mu_old)^2) / (2 s^2)) = mean(eps (mu_theta - mu_old)),
centred at 0 with a spread that no longer carries 1 / s, and divides each step's surrogate by the
gain g_t = |d mu / d model output| of its kernel, so every step's gradient on the model's output
has one scale. The authors divide by |dt|; a flow step's gain is (1 + a^2 / 2) |dt| (|dt| at the
first step, sigma = 1), so their loss is this one times about 1 + a^2 / 2 (1.245 at a = 0.7). It
needs mu_old, each step's mean at sampling: the rollouts keep them (``Rollout.step_means``, one
more latent per step). The authors' recipes use clip ranges of 2e-6 to 4e-6 with it, beta 0 and
lr 1e-4.

KL scale: flow_grpo's ``kl_loss`` divides |mu_theta - mu_ref|^2 by 2 std_t^2 with std_t the SDE's
noise scale a sqrt(sigma / (1 - sigma)), not by the step's variance std_t^2 |dt|, so its beta
multiplies KL_t |dt|. Its 0.04 (GenEval) and 0.01 (PickScore) at 10 steps of SD3.5's schedule
(shift 3; |dt| is 0.11 on average over the 9 trained steps) are about 0.0044 and 0.0011 here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from align_gen.errors import ConfigError
from align_gen.objectives import register_objective
from align_gen.objectives.ddpo import DDPO, DDPOConfig, ddpo_loss
from align_gen.policy import Policy
from align_gen.types import Rollout

if TYPE_CHECKING:
    from align_gen.config import RunConfig

Tensor = torch.Tensor


@dataclasses.dataclass
class GRPOConfig(DDPOConfig):
    name: str = "grpo"
    clip_range: float = 1e-4  # PPO's eps on the ratio (flow_grpo: 1e-4)
    # Weight of the exact per-step KL to the initial model (flow_grpo's PickScore 0.01 weighs the
    # KL times the step's length dt: about 0.0011 here at 10 steps; GenEval 0.04, about 0.0044)
    beta: float = 0.001
    # GRPO-Guard: normalise each step's log-ratio and re-weight the steps by their kernel's gain
    # (diffusion only; the authors' recipes pair it with clip_range 2e-6 to 4e-6 and beta 0)
    ratio_norm: bool = False


@register_objective("grpo", GRPOConfig)
class GRPO(DDPO):
    """Flow-GRPO over any policy's recorded steps: DDPO's clipped surrogate on group-relative
    advantages with a KL penalty to the initial model, and optionally GRPO-Guard."""

    config: GRPOConfig

    def check(self, run: RunConfig) -> None:
        super().check(run)
        if run.sample.samples_per_prompt < 2:
            raise ConfigError(
                "grpo compares each sample with its group: sample.samples_per_prompt must be >= 2 "
                f"(flow_grpo: 24), got {run.sample.samples_per_prompt}."
            )
        if run.advantage.kind != "group":
            raise ConfigError(
                f"grpo's advantages are group-relative: set advantage.kind=group (got {run.advantage.kind})."
            )

    def check_policy_kind(self, takes_images: bool) -> None:
        if self.config.ratio_norm and takes_images:
            raise ConfigError(
                "objective.ratio_norm (GRPO-Guard) normalises Gaussian denoising steps; a VLM's tokens are "
                "categorical, so it is not defined there: set objective.ratio_norm=false."
            )

    def sample(self, policy: Policy, prompts: Sequence[str], generator: torch.Generator) -> Rollout:
        """The current policy's samples, with each step's mean when GRPO-Guard needs them."""
        return policy.sample(prompts, generator=generator, keep_step_means=self.config.ratio_norm)

    def piece_loss(self, policy: Policy, batch: Rollout, steps: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.config.ratio_norm:
            return super().piece_loss(policy, batch, steps, mask)
        scores = policy.step_scores(batch, steps, kl=self.config.beta > 0, normalized_ratio=True)  # (B, c) each
        log_ratio = scores.normalized_log_ratio  # (B, c), log ratio_hat
        advantages = batch.advantages[:, None].expand_as(log_ratio)  # (B, c)
        return ddpo_loss(
            log_ratio.flatten(),
            torch.zeros_like(log_ratio).flatten(),
            advantages.flatten(),
            self.config.clip_range,
            mask.flatten(),
            None if scores.kl is None else scores.kl.flatten(),
            self.config.beta,
            surrogate_weight=1.0 / scores.gain.flatten(),
        )
