"""SePPO: Semi-Policy Preference Optimization (arXiv 2410.05255).

A preference objective that needs no reward model and no human loser: the winner x_w of each
prompt comes from a dataset of (prompt, image) pairs, and the other sample x_ref is drawn from
a reference model, a past checkpoint of the policy itself. With the same noise eps and training
timestep t for both (matching losses l, see ``Policy.matching_terms``):
    d(x) = l_theta(x) - l_ref(x)                       (the policy's fit relative to the reference)
    s    = anchor sign of the winner, detached:
             "sign":      +1 if d(x_w) <= 0 else -1   (x_ref is a loser while the policy fits the
                                                       winner at least as well as the reference;
                                                       otherwise x_ref is treated as a winner too)
             "indicator": +1 if d(x_w) <= 0 else 0    (0 drops the x_ref term: SFT on the winner)
             "none":      +1                          (plain Diffusion-DPO against x_ref)
    loss = -log sigmoid(-beta (d(x_w) - s d(x_ref)))  [+ sft_weight * l_theta(x_w), off by default]
The logged ``flip_rate`` is the share of winners with d(x_w) > 0, where the anchor's sign
flips (or drops) the reference term.

Both members of a pair are compared as images: the winner is a dataset image encoded by the
VAE, and x_ref is the reference's decoded sample encoded back the same way
(``rollout.extras["encoded_images"]``), not the sampler's final latent. Otherwise every pair also differs
by the VAE's round trip (18% of the latent's scale on the tiny world's VAE), a difference the
policy can learn instead of the preference.

The reference model is chosen once per epoch (the same one samples x_ref and scores l_ref):
``initial`` (the base model), ``latest`` (the newest snapshot), or ``uniform`` over a ring of
the last ``ring_size`` snapshots (the initial model included until it is pushed out). A snapshot
of the trainable weights (LoRA adapters, or the full denoiser) is taken at the end of an epoch
in which the number of optimizer updates crossed a multiple of ``reference_every``; snapshots
live on the CPU and are swapped into the model only inside ``policy.reference(...)``, so the
accelerator never holds a second model. They are saved with every checkpoint, so a resumed run
chooses among exactly the references the uninterrupted run had.

On a vision-language model the winner is the dataset's answer to (image, question) and x_ref
the reference model's answer; l is the answer's mean token NLL, so d(x) is the negative
per-token log-ratio of the policy to the reference (DPO's quantity, length-normalised).

The paper's training code was never published; this follows its text. beta = 2500 on
per-element mean losses matches Diffusion-DPO's 5000 with its factor 1/2 inside the sigmoid.
The rewards that the trainer logs for a SePPO run are those of the x_ref samples (the reference
model's, which with ``latest`` lag the policy by at most ``reference_every`` updates).
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
from align_gen.objectives.base import Objective, ObjectiveConfig
from align_gen.policy import Policy
from align_gen.types import LossOutput, Rollout

if TYPE_CHECKING:
    from align_gen.config import RunConfig

Tensor = torch.Tensor
Weights = dict[str, Tensor]


@dataclasses.dataclass
class SePPOConfig(ObjectiveConfig):
    name: str = "seppo"
    beta: float = 2500.0  # preference sharpness on per-element mean losses (Diffusion-DPO scale)
    sign: Literal["sign", "indicator", "none"] = "sign"  # the anchor rule for the x_ref term
    reference: Literal["uniform", "initial", "latest"] = "uniform"  # which past model samples x_ref
    reference_every: int = 1  # optimizer updates between reference snapshots
    ring_size: int = 5  # snapshots kept (CPU memory: ring_size x the trainable weights)
    sft_weight: float = 0.0  # weight of the winner's own matching loss added to the loss (0: the paper's)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"objective.beta must be > 0, got {self.beta}.")
        if self.sign not in ("sign", "indicator", "none"):
            raise ConfigError(f"objective.sign must be one of sign, indicator, none; got {self.sign!r}.")
        if self.reference not in ("uniform", "initial", "latest"):
            raise ConfigError(
                f"objective.reference must be one of uniform, initial, latest; got {self.reference!r}."
            )
        if self.reference_every < 1:
            raise ConfigError(f"objective.reference_every must be >= 1, got {self.reference_every}.")
        if self.ring_size < 1:
            raise ConfigError(f"objective.ring_size must be >= 1, got {self.ring_size}.")
        if self.sft_weight < 0:
            raise ConfigError(f"objective.sft_weight must be >= 0, got {self.sft_weight}.")


def anchor_sign(winner_divergence: Tensor, rule: str) -> Tensor:
    """(B,) s of each pair from d(x_w) (B,): see the module docstring for the rules."""
    fits = winner_divergence <= 0
    if rule == "sign":
        return torch.where(fits, 1.0, -1.0)
    if rule == "indicator":
        return fits.float()
    if rule == "none":
        return torch.ones_like(winner_divergence)
    raise ValueError(f"unknown sign rule {rule!r}; valid: sign, indicator, none.")


def seppo_loss(
    winner_divergence: Tensor, reference_divergence: Tensor, beta: float, rule: str
) -> tuple[Tensor, dict[str, Tensor]]:
    """SePPO's loss for a batch of (winner, reference sample) pairs.

    Args:
        winner_divergence: (B,) d(x_w) = l_theta(x_w) - l_ref(x_w), WITH grad.
        reference_divergence: (B,) d(x_ref), WITH grad.
        beta: the preference sharpness.
        rule: ``sign``, ``indicator`` or ``none``.

    Returns:
        mean_b -log sigmoid(-beta (d_w - s d_ref)) and detached statistics.
    """
    s = anchor_sign(winner_divergence.detach(), rule)  # (B,)
    margin = winner_divergence - s * reference_divergence  # (B,)
    loss = -F.logsigmoid(-beta * margin).mean()
    metrics = {
        "loss": loss.detach(),
        "flip_rate": (winner_divergence.detach() > 0).float().mean(),
        "winner_divergence": winner_divergence.detach().mean(),
        "reference_divergence": reference_divergence.detach().mean(),
        "preference_accuracy": (margin.detach() < 0).float().mean(),
    }
    return loss, metrics


class ReferenceRing:
    """The last ``size`` reference models: the initial one (weights None) and CPU snapshots of
    the trainable weights, each with the optimizer step at which it was taken."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: list[tuple[int, Weights | None]] = [(0, None)]

    def add(self, step: int, weights: Weights) -> None:
        self.entries.append((step, weights))
        del self.entries[: -self.size]

    def choose(self, strategy: str, generator: torch.Generator) -> tuple[int, Weights | None]:
        if strategy == "initial":
            return 0, None
        if strategy == "latest":
            return self.entries[-1]
        return self.entries[int(torch.randint(len(self.entries), (1,), generator=generator))]

    @property
    def last_step(self) -> int:
        return self.entries[-1][0]

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors: ``ring.<step>.<weight name>`` per snapshot; ``ring.initial`` while the
        initial model is still a member."""
        state: dict[str, Tensor] = {}
        for step, weights in self.entries:
            if weights is None:
                state["ring.initial"] = torch.zeros(())
            else:
                state.update({f"ring.{step:010d}.{name}": value for name, value in weights.items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        snapshots: dict[int, Weights] = {}
        for key, value in state.items():
            if key == "ring.initial":
                continue
            _, step, name = key.split(".", 2)
            snapshots.setdefault(int(step), {})[name] = value
        self.entries = [(0, None)] if "ring.initial" in state else []
        self.entries += sorted(snapshots.items())


@register_objective("seppo", SePPOConfig)
class SePPO(Objective):
    """Preference optimisation of dataset winners against samples of past checkpoints."""

    config: SePPOConfig

    def __init__(self, config: SePPOConfig) -> None:
        super().__init__(config)
        self.ring = ReferenceRing(config.ring_size)
        self.dataset: PromptImageDataset | None = None
        self._reference: tuple[int, Weights | None] | None = None  # chosen for the current epoch

    def check(self, run: RunConfig) -> None:
        if not is_image_dataset_source(run.prompts.source):
            raise ConfigError(
                f"objective.name=seppo takes its winners from a dataset of (prompt, image) pairs, but "
                f"prompts.source={run.prompts.source!r} is a prompt list; set it to a folder, a .jsonl "
                'file with "prompt" and "image" fields, or hf:<dataset id> (e.g. hf:yuvalkirstain/pickapic_v2).'
            )

    def setup(self, policy: Policy, run: RunConfig) -> None:
        if not policy.takes_images:  # a VLM's winners are the answers its prompts carry
            self.dataset = load_image_dataset(run.prompts.source)

    def sample(self, policy: Policy, prompts: Sequence[str], generator: torch.Generator) -> Rollout:
        """The reference model's samples of ``prompts``, with SePPO's two ``rollout.extras``:
        ``preferred``, the dataset winner of each prompt in the representation of
        ``final_samples`` ((B, C, h, w) latents, or a VLM's (B, T) answer tokens), and, for
        text-to-image, ``encoded_images``, the (B, C, h, w) decoded samples encoded back to
        latents (the path every dataset image takes)."""
        if self._reference is None:
            self._reference = self.ring.choose(self.config.reference, generator)
        with policy.reference(self._reference[1]):
            rollout = policy.sample(prompts, generator=generator)
        rollout.extras["preferred"] = policy.encode_samples(self._winners(policy, prompts, generator))
        if not policy.takes_images:
            # The winners are images encoded by the VAE; the reference's samples take the same
            # decode-encode path, so that the pair differs in content, not in the VAE's round trip.
            rollout.extras["encoded_images"] = policy.encode_samples(rollout.images)
        return rollout

    def _winners(self, policy: Policy, prompts: Sequence, generator: torch.Generator) -> torch.Tensor | list[str]:
        """The preferred sample of each prompt: a dataset image of it (text-to-image), or the
        dataset's answer that a VLM's prompt carries."""
        if policy.takes_images:
            missing = next((prompt for prompt in prompts if prompt.answer is None), None)
            if missing is not None:
                raise ConfigError(
                    f"SePPO on a vision-language model prefers each example's dataset answer, but {missing!r} has "
                    'none; give every example an "answer" field.'
                )
            return [prompt.answer for prompt in prompts]
        if self.dataset is None:
            raise RuntimeError("SePPO.setup() must run before sample().")
        return self.dataset.images_for(prompts, policy.resolution, generator)

    def loss_terms(self, policy: Policy, batch: Rollout, generator: torch.Generator) -> Iterator[LossOutput]:
        if "preferred" not in batch.extras or self._reference is None:
            raise ValueError("SePPO trains on rollouts from SePPO.sample (they carry the winners).")
        size = len(batch)
        # Winners and reference samples go through the models as one batch of 2B with the same
        # timestep and noise for the two members of a pair.
        pairs = batch.select(list(range(size)) * 2)
        t = policy.training_timesteps(size, generator).repeat(2)
        noise = policy.training_noise(size, generator)
        noise = torch.cat([noise, noise])
        other = batch.extras.get("encoded_images", batch.final_samples)
        clean = torch.cat([batch.extras["preferred"], other])
        terms = policy.matching_terms(pairs, t=t, noise=noise, clean=clean, references=[self._reference[1]])
        divergence = terms.loss - terms.reference_loss[0]  # (2B,) d(x)
        loss, metrics = seppo_loss(divergence[:size], divergence[size:], self.config.beta, self.config.sign)
        winner_loss = terms.loss[:size].mean()  # () l_theta(x_w)
        metrics["winner_loss"] = winner_loss.detach()
        if self.config.sft_weight:
            loss = loss + self.config.sft_weight * winner_loss
            metrics["loss"] = loss.detach()
        metrics["reference_step"] = float(self._reference[0])
        yield LossOutput(loss, metrics)

    def end_epoch(self, policy: Policy, global_step: int) -> dict[str, float]:
        self._reference = None
        every = self.config.reference_every
        if self.config.reference != "initial" and global_step // every > self.ring.last_step // every:
            self.ring.add(global_step, policy.trainable_state_dict())
        return {"reference_ring_size": float(len(self.ring.entries))}

    def state_dict(self) -> dict[str, Tensor]:
        return self.ring.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.ring.load_state_dict(state)
