"""What every objective is: a config, where its rollouts come from, and its loss in pieces.

An objective is written only against the :class:`~align_gen.policy.Policy` protocol and the
:class:`~align_gen.types.Rollout` fields, so it runs on every policy family. It yields its loss
for a minibatch in pieces (:class:`~align_gen.types.LossOutput`), e.g. one per denoising step;
the trainer backpropagates each piece as it comes, so only one piece's activations are alive at
a time. The sum of the pieces is the objective's loss for the minibatch.

The trainer calls, in this order: :meth:`Objective.check` and
:meth:`Objective.check_policy_kind` (before anything is built),
:meth:`Objective.setup` (once the policy exists), :meth:`Objective.load_state_dict` (when
resuming), then every epoch :meth:`Objective.sample` for each rollout batch,
:meth:`Objective.loss_terms` for each minibatch and :meth:`Objective.end_epoch`;
:meth:`Objective.state_dict` goes into every checkpoint. The defaults make an on-policy
objective (DDPO, REBEL, AWM): rollouts are the current policy's samples and there is no state.
SePPO overrides the hooks: it samples from a past checkpoint and keeps a ring of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from align_gen.errors import ConfigError
from align_gen.policy import Policy
from align_gen.types import LossOutput, Rollout

if TYPE_CHECKING:  # the run's config is read, never built, here (config.py imports this module)
    from align_gen.config import RunConfig


@dataclasses.dataclass
class ObjectiveConfig:
    """Base of every objective's config; ``name`` selects the objective."""

    name: str = "ddpo"  # the objective: ddpo, grpo, rebel, awm, seppo, diffusion_dpo or nft


class Objective:
    """An RL / preference objective over a policy's rollouts; subclasses implement
    :meth:`loss_terms` and override the hooks they need."""

    def __init__(self, config: ObjectiveConfig) -> None:
        self.config = config

    def check(self, run: RunConfig) -> None:
        """Raises ConfigError when the run's settings cannot work with this objective."""
        return None

    def check_policy_kind(self, takes_images: bool) -> None:
        """Raises ConfigError when a setting is not defined for the run's kind of policy (a VLM's
        tokens when ``takes_images``); called before the model loads."""
        return None

    def setup(self, policy: Policy, run: RunConfig) -> None:
        """Called once before the first epoch, after the policy is built."""
        return None

    def sample(self, policy: Policy, prompts: Sequence[str], generator: torch.Generator) -> Rollout:
        """One batch of rollouts for ``prompts`` (no grad). Default: the current policy's samples."""
        return policy.sample(prompts, generator=generator)

    def loss_terms(self, policy: Policy, batch: Rollout, generator: torch.Generator) -> Iterator[LossOutput]:
        """The minibatch's loss in pieces; ``batch.rewards`` and ``batch.advantages`` are filled in.

        Args:
            policy: the policy being trained (forward passes WITH grad).
            batch: a minibatch of rollouts from :meth:`sample`.
            generator: the source of any randomness the objective needs (step order, noise).
        """
        raise NotImplementedError

    def end_epoch(self, policy: Policy, global_step: int) -> dict[str, float]:
        """Called after each epoch's update with the optimizer steps taken so far; returns
        metrics to log."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the objective needs to resume exactly (saved with every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint has {sorted(state)[:3]}.")


def move_average(average: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], decay: float) -> None:
    """``average`` <- decay ``average`` + (1 - decay) ``weights``, in place, tensor by tensor: an
    exponential moving average of the trainable weights (AWM's EMA, NFT's sampling policy)."""
    for name, value in weights.items():
        average[name].mul_(decay).add_(value, alpha=1 - decay)


def check_paired_run(run: RunConfig, name: str) -> None:
    """Raises ConfigError unless the run draws pairs of samples per prompt (consecutive samples,
    ``sample.samples_per_prompt`` even) and trains on whole pairs (``train.batch_size`` even)."""
    if run.sample.samples_per_prompt % 2:
        raise ConfigError(
            f"{name} trains on pairs of samples of one prompt: sample.samples_per_prompt must be even "
            f"(2 is usual), got {run.sample.samples_per_prompt}."
        )
    if run.train.batch_size % 2:
        raise ConfigError(f"{name} trains on whole pairs: train.batch_size must be even, got {run.train.batch_size}.")


def check_paired_batch(batch: Rollout, name: str) -> None:
    """Raises ValueError unless ``batch`` is consecutive pairs of samples of one prompt."""
    if len(batch) % 2:
        raise ValueError(f"{name} needs an even minibatch of consecutive pairs, got {len(batch)} samples.")
    if batch.prompts[0::2] != batch.prompts[1::2]:
        raise ValueError(f"{name} pairs (consecutive samples) must share their prompt.")
