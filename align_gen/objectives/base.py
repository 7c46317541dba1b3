"""What every objective is: a config class and a generator of backward-able loss pieces.

An objective is written only against the :class:`~align_gen.policy.Policy` protocol and the
:class:`~align_gen.types.Rollout` fields, so it runs on every policy family. It yields its loss
for a minibatch in pieces (:class:`~align_gen.types.LossOutput`), e.g. one per denoising step;
the trainer backpropagates each piece as it comes, so only one piece's activations are alive at
a time. The sum of the pieces is the objective's loss for the minibatch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from align_gen.config import ObjectiveConfig, RunConfig
from align_gen.policy import Policy
from align_gen.types import LossOutput, Rollout


class Objective(Protocol):
    """An RL / preference objective over a policy's rollouts."""

    config: ObjectiveConfig

    def check(self, run: RunConfig) -> None:
        """Raises ConfigError when the run's settings cannot work with this objective."""
        ...

    def loss_terms(
        self, policy: Policy, batch: Rollout, generator: torch.Generator
    ) -> Iterator[LossOutput]:
        """The minibatch's loss in pieces; ``batch.advantages`` is filled in.

        Args:
            policy: the policy being trained (forward passes WITH grad).
            batch: a minibatch of rollouts with ``advantages`` (B,) set.
            generator: the source of any randomness the objective needs (step order, noise).
        """
        ...
