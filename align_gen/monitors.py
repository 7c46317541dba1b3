"""Over-optimisation monitors: is the policy learning the task, or hacking the reward?

Reward hacking is the most reported failure of RL on generative models: the training reward
climbs while held-out prompts stop improving, the samples of a prompt collapse onto one image,
and the policy drifts far from the base model. Each epoch's row of ``metrics.jsonl`` gets:

- ``monitor/train_reward``: the mean reward of the epoch's samples (``reward_mean`` again, so
  that the ``monitor/`` keys read on their own). Free.
- ``monitor/heldout_reward``: the held-out evaluation (``evaluation:``) of the SAME weights that
  drew the epoch's samples, i.e. the ``evaluation.jsonl`` row with ``epochs_done`` equal to the
  epoch (the base model's for epoch 0, then every ``evaluation.every`` epochs). Reused, never
  re-scored; absent in epochs without such an evaluation.
- ``monitor/reward_gap``: train minus held-out, when both exist. A gap that widens while the
  training reward rises is over-fitting to the training prompts.
- ``monitor/diversity``: per prompt, the mean pairwise cosine distance (1 - cos) of CLIP
  embeddings of that prompt's samples in the epoch, averaged over prompts with >= 2 samples
  (absent when no prompt has two). Images for text-to-image policies; for a VLM, whose rollout
  images are its inputs, the generated answers through the same CLIP's text tower (truncated to
  its context). Falling diversity is mode collapse.
- ``monitor/kl_to_base``: drift from the initial model in nats, see :func:`kl_to_base`.

Diversity and KL cost forward passes, so they run on epochs 0, ``every``, 2 ``every``, ... .
Nothing here draws from the training's random generators, so runs and resumes are unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from align_gen.config import MonitorConfig, RunConfig
from align_gen.errors import ConfigError, MissingWeightsError
from align_gen.objectives.base import Objective
from align_gen.policy import Policy
from align_gen.types import Rollout, VisualPrompt
from reward_models.errors import RewardModelError, RewardWeightsMissingError

Tensor = torch.Tensor
PREFIX = "monitor/"
WORLD_CLIP = "align-gen:world-clip"


def pairwise_cosine_diversity(embeddings: Tensor, groups: Sequence[Hashable]) -> float | None:
    """Mean over groups (of >= 2 members) of the mean pairwise cosine distance within the group.

    Args:
        embeddings: (N, D) one embedding per sample (normalised here).
        groups: N keys; samples with equal keys are one prompt's.

    Returns:
        The average over groups of mean_{i<j} (1 - cos(e_i, e_j)), in [0, 2]; None when no group
        has two members.
    """
    if embeddings.shape[0] != len(groups):
        raise ValueError(f"{embeddings.shape[0]} embeddings for {len(groups)} group keys.")
    members: dict[Hashable, list[int]] = defaultdict(list)
    for index, key in enumerate(groups):
        members[key].append(index)
    unit = F.normalize(embeddings.double(), dim=-1)  # (N, D)
    per_group = []
    for indices in members.values():
        n = len(indices)
        if n < 2:
            continue
        vectors = unit[indices]  # (n, D)
        distance = 1 - vectors @ vectors.T  # (n, n), zero diagonal
        per_group.append(float(distance.sum()) / (n * (n - 1)))  # mean over ordered pairs i != j
    return sum(per_group) / len(per_group) if per_group else None


def chain_kl_estimate(log_probs: Tensor, base_log_probs: Tensor, step_mask: Tensor, scale: float = 1.0) -> Tensor:
    """(B,) per-sample sum over trainable steps of (log p_theta - log p_base), times ``scale``.

    Args:
        log_probs: (B, T) log p_theta of each recorded step under the current weights.
        base_log_probs: (B, T) the same steps under the base model.
        step_mask: (B, T) bool, the steps that count (padding and excluded steps are False;
            their values are ignored even when not finite).
        scale: multiplies the sum; the number of latent elements turns a diffusion policy's
            per-element mean log-probs into the joint log-density of each step.
    """
    difference = torch.where(step_mask, log_probs.double() - base_log_probs.double(), 0.0)  # (B, T)
    return difference.sum(dim=1) * scale  # (B,)


def log_prob_scale(rollout: Rollout) -> int:
    """What turns a recorded step log-prob into the step's joint log-density: a diffusion
    policy records the mean over the latent's elements (the kernels' convention), so the element
    count of one latent; a VLM's token log-prob is already exact, so 1."""
    return 1 if rollout.trajectory.dim() == 2 else rollout.trajectory[0, 0].numel()


@torch.no_grad()
def kl_to_base(policy: Policy, rollout: Rollout, batch_size: int) -> tuple[Tensor, Tensor]:
    """Per-sample estimates of KL(p_theta || p_base) of the whole sampling chain, in nats.

    For samples x_{0:T} drawn from the current policy p_theta, log p_theta(x) - log p_base(x) =
    sum_t [log p_theta(x_{t-1}|x_t) - log p_base(x_{t-1}|x_t)] is an unbiased estimate of
    KL(p_theta || p_base) of the chain (the expectation of the log-ratio under p_theta). On the
    diffusion Gaussian kernels each term is the exact Gaussian log-density (the per-element
    mean the policy records times the element count); on a VLM it is the answer's token
    log-prob. p_base is the initial model (``policy.reference(None)``). Steps masked out of
    training (a flow policy's last step, padding tokens) are left out, so the estimate is then
    that of the chain without them. One sample's estimate can be negative; the mean cannot
    drift below zero beyond noise.

    Both log-probs are re-scored here, in the same batches (of at most ``batch_size``), rather
    than taking log p_theta as recorded at sampling: float kernels differ between batch sizes,
    and those differences, multiplied by the latent size, would bury a small KL. An un-updated
    policy therefore gives exactly 0. Cost: two forward passes per step and sample.

    Returns:
        ((B,) float64 estimates, (B,) number of steps counted per sample).
    """
    if not bool(rollout.step_mask.any()):  # a deterministic sampler (the flow ODE): no step has a density
        return torch.zeros(len(rollout), dtype=torch.float64), torch.zeros(len(rollout), dtype=torch.long)
    steps = torch.arange(rollout.num_steps)
    scale = log_prob_scale(rollout)
    estimates, counts = [], []
    for start in range(0, len(rollout), batch_size):
        part = rollout.select(list(range(start, min(start + batch_size, len(rollout)))))
        current = policy.step_log_prob(part, steps.to(part.log_probs.device))  # (b, T)
        with policy.reference(None):
            base = policy.step_log_prob(part, steps.to(part.log_probs.device))  # (b, T)
        mask = part.step_mask.to(current.device)
        estimates.append(chain_kl_estimate(current, base, mask, scale).cpu())
        counts.append(mask.sum(dim=1).cpu())
    return torch.cat(estimates), torch.cat(counts)


def prompt_key(prompt: str | VisualPrompt) -> Hashable:
    """What makes two samples the same prompt's (a VisualPrompt's text and image)."""
    return (prompt.text, prompt.image_key) if isinstance(prompt, VisualPrompt) else prompt


class Monitors:
    """The monitors of one run: built once, called every epoch by the trainer.

    Args:
        config: the run (``monitors:`` configures this; ``seed`` and ``model`` are read).
        policy: the policy being trained.
        objective: the run's objective; when it overrides ``Objective.sample`` (SePPO samples a
            past checkpoint), the epoch's rollouts are not the current policy's, so the KL
            monitor draws ``kl_samples`` of its own from the current policy, with its own
            generator.
        accelerator: gathers per-process values; every process must call :meth:`measure`.
    """

    def __init__(self, config: RunConfig, policy: Policy, objective: Objective, accelerator: Any) -> None:
        self.config: MonitorConfig = config.monitors
        self.seed = config.seed
        self.sample_batch_size = config.sample.batch_size
        self.accelerator = accelerator
        self.on_policy = type(objective).sample is Objective.sample
        self.heldout: dict[int, float] = {}
        self.notes: list[str] = []  # printed once by the trainer
        self.warned_deterministic = False
        self.encoder = None
        if self.config.enabled and self.config.diversity:
            self.encoder = self._diversity_encoder(config.model.pretrained)

    # ----------------------------------------------------------------------------------------
    # set-up

    def _diversity_encoder(self, pretrained: str):
        """The CLIP of ``monitors.clip_model``; by default the world CLIP for built-in models
        (None, with a note, for other models or when the world CLIP is not built)."""
        from align_gen.builtins import PREFIX as BUILTIN
        from align_gen.builtins import resolve_folder
        from reward_models.hf_clip import TransformersClipEncoder

        name = self.config.clip_model
        if name is None:
            if not pretrained.startswith(BUILTIN):
                self.notes.append(
                    f"monitor/diversity is off: no CLIP for {pretrained!r} was named; set monitors.clip_model to a "
                    "transformers CLIP folder or hub id (e.g. openai/clip-vit-large-patch14) to measure it."
                )
                return None
            name = WORLD_CLIP
        try:
            return TransformersClipEncoder(resolve_folder(name), device=self.accelerator.device, reward="monitors")
        except (MissingWeightsError, RewardWeightsMissingError) as error:
            if self.config.clip_model is None:
                self.notes.append(f"monitor/diversity is off: the default {WORLD_CLIP} is not available ({error}).")
                return None
            raise MissingWeightsError(self._clip_fix(name, error)) from error
        except (RewardModelError, OSError) as error:
            raise ConfigError(self._clip_fix(name, error)) from error

    @staticmethod
    def _clip_fix(name: str, error: Exception) -> str:
        return (
            f"monitors.clip_model={name!r} cannot be loaded ({error}); set monitors.clip_model to a "
            "transformers CLIPModel folder or hub id that is available, or monitors.diversity=false."
        )

    def record_heldout(self, epochs_done: int, mean: float | None) -> None:
        """Keeps a held-out evaluation's mean reward for the row of epoch ``epochs_done``."""
        if mean is not None:
            self.heldout[epochs_done] = mean

    def read_heldout(self, evaluation_path: Path, epochs_done: int) -> None:
        """On resume: the evaluation made before the checkpoint of ``epochs_done`` epochs."""
        if not evaluation_path.is_file():
            return
        from align_gen.tracking import read_metrics

        for row in read_metrics(evaluation_path):
            if row["epochs_done"] == epochs_done:
                self.record_heldout(epochs_done, row["reward_mean"])

    # ----------------------------------------------------------------------------------------
    # every epoch

    def due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` measures diversity and KL (the cheap monitors run always)."""
        return self.config.enabled and epoch % self.config.every == 0

    def measure(self, epoch: int, policy: Policy, rollouts: Rollout, train_reward: float) -> dict[str, float]:
        """The ``monitor/*`` values of epoch ``epoch``, before its update.

        Args:
            rollouts: this process's rollouts of the epoch, sampled by the current weights
                (unless the objective samples elsewhere, see the class docstring).
            train_reward: the mean reward over all processes' rollouts.
        """
        if not self.config.enabled:
            return {}
        metrics = {PREFIX + "train_reward": train_reward}
        heldout = self.heldout.get(epoch)
        if heldout is not None:
            metrics[PREFIX + "heldout_reward"] = heldout
            metrics[PREFIX + "reward_gap"] = train_reward - heldout
        if not self.due(epoch):
            return metrics
        if self.encoder is not None:
            diversity = self._diversity(rollouts)
            if diversity is not None:
                metrics[PREFIX + "diversity"] = diversity
        if self.config.kl_samples > 0:
            kl = self._kl(policy, rollouts, epoch)
            if kl is not None:
                metrics[PREFIX + "kl_to_base"] = kl
            elif not self.warned_deterministic:
                self.warned_deterministic = True
                self.accelerator.print(
                    "monitor/kl_to_base is not logged: the sampler is deterministic (no step has a log-density)."
                )
        return metrics

    @torch.no_grad()
    def _diversity(self, rollouts: Rollout) -> float | None:
        """Over all processes' rollouts (a prompt's samples may be spread over processes)."""
        from accelerate.utils import gather_object

        if rollouts.texts is not None:  # a VLM: its answers
            embeddings = self.encoder.encode_texts(list(rollouts.texts))
        else:
            embeddings = torch.cat(
                [
                    self.encoder.encode_images(rollouts.images[start : start + self.sample_batch_size])
                    for start in range(0, len(rollouts), self.sample_batch_size)
                ]
            )
        embeddings = self.accelerator.gather(embeddings.to(self.accelerator.device)).cpu()  # (N, D)
        keys = gather_object([prompt_key(prompt) for prompt in rollouts.prompts])
        return pairwise_cosine_diversity(embeddings, keys)

    def _kl(self, policy: Policy, rollouts: Rollout, epoch: int) -> float | None:
        """The mean over all processes' first ``kl_samples`` samples; None when no step has a
        log-density (a deterministic sampler)."""
        count = min(self.config.kl_samples, len(rollouts))
        samples = rollouts.select(list(range(count)))
        if not self.on_policy:
            # Its own stream: offset past the seeds of the trainer's epoch generators.
            process = self.accelerator.process_index
            generator = torch.Generator().manual_seed(2**40 + self.seed * 1_000_003 + epoch * 1009 + process)
            samples = policy.sample(samples.prompts, generator=generator)
        estimates, steps = kl_to_base(policy, samples, self.sample_batch_size)
        gathered = self.accelerator.gather(torch.stack([estimates, steps.double()], dim=1).to(self.accelerator.device))
        gathered = gathered.cpu()  # (P * count, 2)
        if not bool((gathered[:, 1] > 0).any()):
            return None
        return float(gathered[:, 0].mean())
