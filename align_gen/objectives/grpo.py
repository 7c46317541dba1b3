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
group-relative advantages required and Flow-GRPO's defaults.

KL scale: flow_grpo's ``kl_loss`` divides |mu_theta - mu_ref|^2 by 2 std_t^2 with std_t the SDE's
noise scale a sqrt(sigma / (1 - sigma)), not by the step's variance std_t^2 |dt|, so its beta
multiplies KL_t |dt|. Its 0.04 (GenEval) and 0.01 (PickScore) at 10 steps of SD3.5's schedule
(shift 3; |dt| is 0.11 on average over the 9 trained steps) are about 0.0044 and 0.0011 here.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from align_gen.errors import ConfigError
from align_gen.objectives import register_objective
from align_gen.objectives.ddpo import DDPO, DDPOConfig

if TYPE_CHECKING:
    from align_gen.config import RunConfig


@dataclasses.dataclass
class GRPOConfig(DDPOConfig):
    name: str = "grpo"
    clip_range: float = 1e-4  # PPO's eps on the ratio (flow_grpo: 1e-4)
    # Weight of the exact per-step KL to the initial model (flow_grpo's PickScore 0.01 weighs the
    # KL times the step's length dt: about 0.0011 here at 10 steps; GenEval 0.04, about 0.0044)
    beta: float = 0.001


@register_objective("grpo", GRPOConfig)
class GRPO(DDPO):
    """Flow-GRPO over any policy's recorded steps: DDPO's clipped surrogate on group-relative
    advantages with a KL penalty to the initial model."""

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
