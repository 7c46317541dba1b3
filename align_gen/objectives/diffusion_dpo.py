"""Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
Optimization", arXiv 2311.12908): online, the pairs are the policy's own samples ranked by the
reward; offline (``pairs: dataset``), the (preferred, rejected) image pairs of a dataset.

For a pair (x_w, x_l) of one prompt, the winner and the loser, noised at the same timestep t with
the same noise eps:
    d(x) = l_theta(x, t, eps) - l_ref(x, t, eps)
    loss = -log sigmoid(-(beta / 2) (d(x_w) - d(x_l)))
where l is the policy's matching loss (the pre-training denoising / flow-matching error, the mean
over latent elements) and ref the frozen initial model. What it approximates: DPO on the whole
denoising chain, whose intractable log-likelihood ratio log pi_theta(x_0) / pi_ref(x_0) is
replaced by the difference of the two models' denoising errors at one random timestep (an
evidence-lower-bound estimate; the paper's T omega(lambda_t) factor is folded into beta). Lowering
the loss makes the policy denoise the winner better and the loser worse than the reference does.

The scale is the authors' training script's: per-element mean errors and -(beta / 2) times the
margin, beta = 5000 for SD1.5 and SDXL. Any sampler collects the pairs (no log-probs are used,
so the ODE works too). On epsilon-, v- or sample-prediction UNets l is the MSE to that target, on
flow models to the velocity (what each model was pre-trained on); on a VLM l is the answer's mean
token NLL, and the loss is DPO's on the answers (with mean instead of summed token
log-likelihoods, so a beta on the order of 1-10 rather than 5000).

Pairs are consecutive samples of one prompt (``sample.samples_per_prompt`` even, as REBEL's);
the one with the higher reward is the winner, and a pair with equal rewards adds nothing.

Offline (``pairs: dataset``, text-to-image only), as the authors train: the prompts and pairs come
from ``prompts.source``, a dataset with rejected images (Pick-a-Pic's rows, a JSONL file with
``rejected`` fields such as ``align-gen make-pairs`` writes, or the world's ``world:<split>``).
Each pair of consecutive prompts of a batch becomes the (preferred, rejected) images of one of
its examples, encoded as the clean samples of a rollout that samples nothing
(Policy.data_rollout); the dataset decides the winner, and the reward only logs the pairs'
scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from align_gen.errors import ConfigError
from align_gen.image_datasets import PromptImageDataset, is_image_dataset_source, load_image_dataset
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
class DiffusionDPOConfig(ObjectiveConfig):
    name: str = "diffusion_dpo"
    beta: float = 5000.0  # preference sharpness on the per-element mean errors; the loss uses beta / 2 (anchor: 5000)
    # online: pairs of the policy's samples ranked by the reward; dataset: the (preferred,
    # rejected) image pairs of prompts.source (the anchor's offline training)
    pairs: Literal["online", "dataset"] = "online"

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"objective.beta must be > 0, got {self.beta}.")
        if self.pairs not in ("online", "dataset"):
            raise ConfigError(f"objective.pairs must be online or dataset, got {self.pairs!r}.")


def diffusion_dpo_loss(
    first_divergence: Tensor, second_divergence: Tensor, preference: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO's loss for a batch of pairs.

    Args:
        first_divergence: (P,) d of each pair's first sample, l_theta - l_ref, WITH grad.
        second_divergence: (P,) d of its second sample, WITH grad.
        preference: (P,) +1 where the first sample won, -1 where the second did, 0 for a tie.
        beta: the preference sharpness (the loss uses beta / 2).

    Returns:
        The mean over the decided pairs of -log sigmoid(-(beta / 2) (d_w - d_l)) (0 when every
        pair is a tie) and detached statistics: the share of pairs the policy already ranks the
        reward's way (d_w < d_l), the mean margin d_w - d_l, the mean |d| and the share of ties.
    """
    margin = preference * (first_divergence - second_divergence)  # (P,) d_w - d_l; 0 for ties
    decided = (preference != 0).float()  # (P,)
    count = decided.sum().clamp(min=1)
    loss = (-F.logsigmoid(-0.5 * beta * margin) * decided).sum() / count
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "preference_accuracy": ((margin < 0).float() * decided).sum() / count,
            "margin": (margin * decided).sum() / count,
            "divergence_abs": torch.cat([first_divergence, second_divergence]).abs().mean(),
            "tie_rate": 1 - decided.mean(),
        }
    return loss, metrics


@register_objective("diffusion_dpo", DiffusionDPOConfig)
class DiffusionDPO(Objective):
    """Diffusion-DPO over pairs of consecutive samples of the same prompt (online: the policy's
    own, ranked by the reward; offline: a dataset's), against the frozen initial model."""

    config: DiffusionDPOConfig

    def __init__(self, config: DiffusionDPOConfig) -> None:
        super().__init__(config)
        self.dataset: PromptImageDataset | None = None

    def check(self, run: RunConfig) -> None:
        check_paired_run(run, "diffusion_dpo")
        if self.config.pairs == "dataset" and not is_image_dataset_source(run.prompts.source):
            raise ConfigError(
                f"objective.pairs=dataset takes its pairs from prompts.source, but {run.prompts.source!r} is not a "
                "dataset of images: give hf:yuvalkirstain/pickapic_v2, a .jsonl file with \"prompt\", \"image\" "
                'and "rejected" fields (align-gen make-pairs writes one), or world:train.'
            )

    def check_policy_kind(self, takes_images: bool) -> None:
        if self.config.pairs == "dataset" and takes_images:
            raise ConfigError(
                "objective.pairs=dataset trains on (preferred, rejected) image pairs, a text-to-image model's data; "
                "a VLM trains on its own answers: set objective.pairs=online."
            )

    def setup(self, policy: Policy, run: RunConfig) -> None:
        if self.config.pairs == "dataset":
            self.dataset = load_image_dataset(run.prompts.source)
            if not self.dataset.has_pairs:
                raise ConfigError(
                    f"objective.pairs=dataset: the dataset {self.dataset.name} has no rejected images; it needs "
                    "Pick-a-Pic's rows, a JSONL file with \"rejected\" fields, or world:<split>."
                )

    def sample(self, policy: Policy, prompts: Sequence[str], generator: torch.Generator) -> Rollout:
        """Online: the current policy's samples. Offline: for each pair of consecutive prompts
        (one prompt twice), a dataset example's preferred and rejected images, with
        ``extras["winner"]`` (B,) 1 on the preferred rows and 0 on the rejected ones."""
        if self.dataset is None:
            return policy.sample(prompts, generator=generator)
        winners, losers = self.dataset.pairs_for(prompts[0::2], policy.resolution, generator)
        images = torch.stack([winners, losers], dim=1).flatten(0, 1)  # (B, 3, H, W): winner, loser, ...
        rollout = policy.data_rollout(prompts, images)
        rollout.extras["winner"] = torch.tensor([1.0, 0.0], device=rollout.images.device).repeat(len(prompts) // 2)
        return rollout

    def loss_terms(self, policy: Policy, batch: Rollout, generator: torch.Generator) -> Iterator[LossOutput]:
        check_paired_batch(batch, "diffusion_dpo")
        if "winner" in batch.extras:  # offline: the dataset's preference
            preference = batch.extras["winner"][0::2] - batch.extras["winner"][1::2]  # (P,)
        elif batch.rewards is not None:
            rewards = batch.rewards.float()
            preference = torch.sign(rewards[0::2] - rewards[1::2])  # (P,)
        else:
            raise ValueError("diffusion_dpo ranks each pair by its rewards, which are not set on the batch.")
        pairs = len(batch) // 2
        # Both members of a pair are noised at the same timestep with the same noise.
        t = policy.training_timesteps(pairs, generator).repeat_interleave(2)
        noise = policy.training_noise(pairs, generator).repeat_interleave(2, dim=0)
        terms = policy.matching_terms(batch, t=t, noise=noise)
        divergence = terms.loss - terms.reference_loss[0]  # (B,) d(x), WITH grad
        loss, metrics = diffusion_dpo_loss(divergence[0::2], divergence[1::2], preference, self.config.beta)
        yield LossOutput(loss, metrics)
