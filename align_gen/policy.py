"""The Policy protocol: the one likelihood interface every objective is written against.

A policy wraps a generative model (a Stable Diffusion UNet, a flow-matching transformer, a
vision-language model) and exposes exactly what RL objectives need: draw samples while
recording the log-likelihood of every step, re-score stored steps under the current weights
through the same code, compute the model's pre-training loss on clean samples, and evaluate the
frozen reference model. DDPO, REBEL, AWM and SePPO use nothing else, which is why each of them
runs on every model family without per-pair code.

The protocol is the whole contract: the trainer and the objectives touch nothing of a policy
that is not declared here (a test reads their code to hold them to it), so a new model family is
one class that implements these members, plus a line in the family registry of
:func:`align_gen.policies.build_policy`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from align_gen.types import MatchingTerms, Rollout, StepScores


@runtime_checkable
class Policy(Protocol):
    """What an objective may ask of a generative model."""

    device: torch.device
    resolution: int  # side in pixels of the images the policy generates (or takes, for a VLM)
    # True for a VLM: its prompts are VisualPrompts (an image and a question).
    takes_images: bool
    # The module that holds every trainable weight: what the trainer hands to accelerate and
    # checks for NaN after each update. Forward passes go through use_forward_module's module.
    model: torch.nn.Module

    def sample(
        self,
        prompts: Sequence[str],
        *,
        generator: torch.Generator | None = None,
        images: torch.Tensor | None = None,
        keep_step_means: bool = False,
    ) -> Rollout:
        """Runs the stochastic sampler without grad and records trajectory and log-probs.

        Args:
            prompts: B text prompts, or a VLM's B :class:`~align_gen.types.VisualPrompt`.
            generator: makes the sample reproducible.
            images: (B, 3, H, W) in [0, 1], the input images of a VLM whose ``prompts`` are
                strings; None for text-to-image (and for VisualPrompts, which carry their own).
            keep_step_means: also record each step's Gaussian mean (``Rollout.step_means``;
                diffusion only).
        """
        ...

    def data_rollout(self, prompts: Sequence[str], images: torch.Tensor) -> Rollout:
        """A rollout of given images instead of sampled ones (no grad): the prompts'
        conditioning as :meth:`sample` records it, and ``images`` (B, 3, H, W) in [0, 1] encoded
        as the clean samples (:meth:`encode_samples`); no steps (T = 0). What objectives that
        train on data (offline Diffusion-DPO) pass to :meth:`matching_terms`. Diffusion only: a
        VLM raises ValueError."""
        ...

    def sde_window(self, steps: Sequence[int] | None) -> AbstractContextManager[None]:
        """Inside this context :meth:`sample` adds noise only at the step indices ``steps`` (a
        window, as in Flow-GRPO-Fast and MixGRPO) and takes the deterministic step (the ODE)
        elsewhere; only the noised steps have log-probs (``step_mask``) and they are recorded in
        ``Rollout.sde_steps``. None: every step. Diffusion only: a VLM raises ConfigError for
        a window."""
        ...

    def step_pieces(self, steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``steps`` ((k,) or (B, k) step indices) cut along the last dimension into the pieces
        one forward pass scores: :meth:`set_steps_per_forward`'s number of columns each for a
        diffusion policy, all of them in one piece for a policy whose one forward pass scores
        every step (a VLM's teacher-forced pass). An objective that backpropagates step by step
        re-scores one piece per :meth:`step_log_prob` call (see :func:`split_steps`)."""
        ...

    def set_steps_per_forward(self, steps: int) -> None:
        """Re-scores ``steps`` denoising steps per forward pass (``train.steps_per_forward``;
        1 = one step per forward); ignored by a policy whose one pass scores every step."""
        ...

    def step_log_prob(self, rollout: Rollout, steps: torch.Tensor) -> torch.Tensor:
        """Re-scores stored transitions under the current weights, WITH grad.

        Args:
            rollout: samples from :meth:`sample` (possibly a minibatch of them).
            steps: (k,) step indices shared by the batch, or (B, k) per sample.

        Returns:
            (B, k) float32 log-probs, computed by the same code as at sampling time, so an
            un-updated policy reproduces ``rollout.log_probs`` at those steps.
        """
        ...

    def step_scores(
        self, rollout: Rollout, steps: torch.Tensor, *, kl: bool = False, normalized_ratio: bool = False
    ) -> StepScores:
        """:meth:`step_log_prob`'s (B, k) log-probs and, on request, more of each step (all
        WITH grad; see :class:`~align_gen.types.StepScores`):

        - ``kl``: KL(pi_theta || pi_ref) of the step's transition to the initial model's
          (:meth:`reference`) from the same state: what a KL penalty to the reference adds to a
          policy-gradient loss. Diffusion: the two Gaussian steps share their std, so it is in
          closed form, |mean_theta - mean_ref|^2 / (2 std^2), averaged over latent elements like
          the log-probs; VLM: the categorical KL of the token's distribution at the sampling
          temperature, summed over the vocabulary. One more forward pass of the reference model
          per piece, without grad.
        - ``normalized_ratio`` (diffusion only; the rollout must have ``step_means``):
          GRPO-Guard's normalised log-ratio to the sampling step, and each step's ``gain``
          (d mean / d model output), by which GRPO-Guard re-weights the steps.
        """
        ...

    def matching_loss(
        self,
        rollout: Rollout,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        clean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B,) the pre-training loss on clean samples, WITH grad.

        Diffusion: the epsilon / v / flow-matching MSE of ``clean`` (default
        ``rollout.final_samples``; the prompts are the rollout's) at training timesteps ``t``
        (B,) with ``noise`` (both drawn when None); VLM: the answer's token NLL.
        """
        ...

    def matching_terms(
        self,
        rollout: Rollout,
        *,
        t: torch.Tensor,
        noise: torch.Tensor,
        clean: torch.Tensor | None = None,
        references: Sequence[dict[str, torch.Tensor] | None] = (None,),
        residuals: bool = False,
    ) -> MatchingTerms:
        """The matching loss of the current model (WITH grad) and of R reference models (no
        grad) at the same inputs, and the divergence of their predictions. Each reference is
        None (the initial model, see :meth:`reference`) or a :meth:`trainable_state_dict`
        snapshot (SePPO's past checkpoints, AWM's EMA). One forward pass of each model.
        ``residuals`` (diffusion only): also each model's prediction minus the target, element
        by element, and the scale that turns them into clean-sample errors (DiffusionNFT)."""
        ...

    def training_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) timesteps drawn uniformly over the model's training range (what pre-training
        draws), for losses that need fresh noise levels."""
        ...

    def training_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, ...) standard normal noise shaped like the clean samples, for
        :meth:`matching_loss`; a VLM, which adds no noise, returns (B, 0)."""
        ...

    def encode_samples(self, samples: torch.Tensor | Sequence[str]) -> torch.Tensor:
        """Data samples in the representation :meth:`matching_loss` takes as ``clean``:
        diffusion: (B, C, h, w) latents of (B, 3, H, W) images in [0, 1]; VLM: (B, T) answer
        tokens of B texts."""
        ...

    def noise_level(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) float in [0, 1]: the noise level of the policy's timesteps (t / N for DDPM
        schedules, sigma for flow matching, 1 for a VLM's tokens); objectives weight by it."""
        ...

    def reference(self, weights: dict[str, torch.Tensor] | None = None) -> AbstractContextManager[None]:
        """Inside this context every forward pass uses reference weights: the initial model
        (None), or a snapshot of the trainable weights taken earlier with
        :meth:`trainable_state_dict` (SePPO's past checkpoints)."""
        ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable weights, keyed by parameter name."""
        ...

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copies a :meth:`trainable_state_dict` (a checkpoint's weights) into the model."""
        ...

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters the optimizer updates (LoRA adapters or the full denoiser)."""
        ...

    def use_forward_module(self, module: torch.nn.Module) -> None:
        """Sends every forward pass through ``module``, :attr:`model` wrapped for training: the
        wrapper accelerate puts around it (DDP, FSDP), or ``torch.compile`` of that."""
        ...

    def set_training_mode(self, training: bool) -> None:
        """Training (True) or evaluation (False) mode of :attr:`model` (dropout and the like);
        a policy samples in evaluation mode."""
        ...

    def save(self, path: str | Path) -> None:
        """Writes the trained weights in the format the underlying library loads."""
        ...


def split_steps(steps: torch.Tensor, per_forward: int | None) -> tuple[torch.Tensor, ...]:
    """``steps`` ((k,) or (B, k)) cut along the last dimension into pieces of ``per_forward``
    columns (the last one shorter), or one piece when ``per_forward`` is None: the one place
    where re-scored steps are grouped into forward passes (:meth:`Policy.step_pieces`)."""
    return steps.split(per_forward or max(1, steps.shape[-1]), dim=-1)
