"""REBEL (Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing Relative Rewards").

For two samples y, y' of the same prompt drawn from pi_old, REBEL regresses the difference of
their log-ratios onto the difference of their rewards:
    residual = (1/eta) [(log pi(y) - log pi_old(y)) - (log pi(y') - log pi_old(y'))] - (r(y) - r(y'))
    loss     = mean_pairs residual^2
where log pi(y) is the chain log-likelihood: the sum over steps of the per-step log-probs (for
diffusion, each step's log-prob is the per-element mean the policy records, so 1/eta also
absorbs the 1/(C h w) scale of the mean; for a VLM, the per-token log-probs). Padded or
excluded steps (``step_mask`` False) are left out of the sums.

Memory: the residual is linear in the summed log-probs, so its gradient is
    d loss / d theta = mean_pairs (2 residual / eta) * sum_t [d log pi_t(y) - d log pi_t(y')].
The objective first computes every residual without grad (one forward per step), then yields
one piece per step whose gradient is that step's share, with the residual held fixed: the exact
gradient of the loss, with the activations of one step alive at a time, whatever the number of
steps. It costs one extra forward pass per step over a one-pass implementation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import torch

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
class RebelConfig(ObjectiveConfig):
    name: str = "rebel"
    eta: float = 1.0  # the regression's scale; the paper's image experiment uses 1/eta = 1
    target: Literal["advantage", "reward"] = "advantage"  # regress onto normalised or raw reward gaps

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise ConfigError(f"objective.eta must be > 0, got {self.eta}.")


def rebel_residual(
    log_ratio: Tensor, other_log_ratio: Tensor, reward: Tensor, other_reward: Tensor, eta: float
) -> Tensor:
    """(P,) (1/eta)(log-ratio gap) - (reward gap) for P pairs (y, y').

    Args:
        log_ratio: (P,) log pi(y) - log pi_old(y), chain sums over steps.
        other_log_ratio: (P,) the same for y'.
        reward, other_reward: (P,) r(y) and r(y') (or their normalised advantages).
        eta: the scale; the log-ratio gap is divided by it.
    """
    return (log_ratio - other_log_ratio) / eta - (reward - other_reward)  # (P,)


def rebel_loss(
    log_ratio: Tensor, other_log_ratio: Tensor, reward: Tensor, other_reward: Tensor, eta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """REBEL's mean squared residual over P pairs (arguments as :func:`rebel_residual`), and
    detached statistics: the residual's and the reward gap's mean absolute values."""
    residual = rebel_residual(log_ratio, other_log_ratio, reward, other_reward, eta)  # (P,)
    loss = residual.pow(2).mean()  # ()
    metrics = {
        "loss": loss.detach(),
        "residual_abs": residual.detach().abs().mean(),
        "reward_gap_abs": (reward - other_reward).abs().mean(),
    }
    return loss, metrics


@register_objective("rebel", RebelConfig)
class Rebel(Objective):
    """REBEL over pairs of consecutive samples of the same prompt."""

    config: RebelConfig

    def check(self, run: RunConfig) -> None:
        check_paired_run(run, "rebel")
        if run.sample.eta <= 0:
            raise ConfigError("rebel needs a stochastic sampler: sample.eta must be > 0.")

    def _targets(self, batch: Rollout) -> Tensor:
        values = batch.advantages if self.config.target == "advantage" else batch.rewards
        if values is None:
            raise ValueError(f"rebel target {self.config.target!r} is not set on the batch.")
        return values.float()

    def loss_terms(self, policy: Policy, batch: Rollout, generator: torch.Generator) -> Iterator[LossOutput]:
        check_paired_batch(batch, "rebel")
        all_steps = torch.arange(batch.num_steps, device=batch.log_probs.device)
        mask = batch.step_mask.float()  # (B, T)
        targets = self._targets(batch)  # (B,)

        # Pass 1, no grad: the chain log-ratios and the residual of every pair.
        with torch.no_grad():
            log_probs = policy.step_log_prob(batch, all_steps)  # (B, T)
        log_ratio = ((log_probs - batch.log_probs) * mask).sum(dim=1)  # (B,)
        pairs = (log_ratio[0::2], log_ratio[1::2], targets[0::2], targets[1::2], self.config.eta)
        _, metrics = rebel_loss(*pairs)
        residual = rebel_residual(*pairs)  # (P,)
        # d loss / d log pi_t(y) = 2 residual / (eta P), and the opposite for y'.
        weight = (2 * residual / (self.config.eta * residual.numel())).repeat_interleave(2)  # (B,)
        weight[1::2] *= -1

        # Pass 2: one piece per forward pass the policy scores (all in one piece when one pass
        # scores them all, as a VLM's does); each piece's gradient is its steps' share of the
        # exact gradient.
        for piece, steps in enumerate(policy.step_pieces(all_steps)):  # (c,) each
            step_log_probs = policy.step_log_prob(batch, steps)  # (B, c)
            surrogate = (weight[:, None] * mask[:, steps] * step_log_probs).sum()  # ()
            yield LossOutput(surrogate, metrics if piece == 0 else {})
