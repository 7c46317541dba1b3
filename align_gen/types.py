"""Data passed between the policy, the rewards, the advantages and the objectives.

Every tensor field states its shape. ``B`` is the batch, ``T`` the number of recorded steps
(denoising steps for diffusion, generated tokens for a VLM), ``C, h, w`` the latent shape and
``H, W`` the image size. Tensors on a rollout live on CPU or on the policy's device; the
helpers below never move them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from align_gen.errors import NonFiniteSamplesError

Tensor = torch.Tensor


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Applies ``fn`` to every tensor inside ``value`` (tensors, dicts, lists); keeps the rest."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], Tensor):
        return [fn(item) for item in value]
    return value


def _cat_left_padded(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenates along dim 0; token tensors (B, L) of different lengths L (the prompts of
    a VLM's batches) are first left-padded with zeros to the longest, which their zero
    attention mask marks as padding."""
    length = max(t.shape[1] for t in tensors) if tensors[0].dim() == 2 else None
    if length is not None and any(t.shape[1] != length for t in tensors):
        tensors = [torch.nn.functional.pad(t, (length - t.shape[1], 0)) for t in tensors]
    return torch.cat(list(tensors))


@dataclasses.dataclass(frozen=True)
class VisualPrompt:
    """A vision-language model's prompt: a question about an image, and the dataset's answer
    when it has one.

    Compared and hashed by (text, image_key, answer), never by pixels, so per-prompt advantage
    statistics, REBEL's pairing and SePPO's winners treat it like a text prompt. ``str()`` is
    the question.

    Attributes:
        text: the question or instruction.
        image_key: what identifies the image (a file path, or a dataset name and row).
        open_image: returns the image as a PIL image (opened lazily, when sampled).
        answer: the dataset's answer (rule rewards compare with it; SePPO prefers it), or None.
    """

    text: str
    image_key: str
    open_image: Callable[[], Any] = dataclasses.field(compare=False, repr=False)
    answer: str | None = None

    def __str__(self) -> str:
        return self.text


@dataclasses.dataclass
class Rollout:
    """A batch of samples drawn by a policy, with everything needed to re-score them.

    Attributes:
        prompts: the B prompts: text (diffusion) or :class:`VisualPrompt` (VLM).
        trajectory: (B, T+1, C, h, w) the latents x_T .. x_0 visited by the sampler (diffusion);
            x_0 is ``trajectory[:, -1]``. For a VLM: (B, T) the answer's token ids, -1 after
            the end-of-sequence token (a token sequence is its own trajectory).
        timesteps: (B, T) the scheduler timestep of each recorded transition, in sampling order
            (a VLM: the token position).
        log_probs: (B, T) float32 log pi_old(x_{t-1} | x_t, c) of each transition, as recorded
            at sampling time (per-element mean for diffusion, per token for a VLM).
        step_mask: (B, T) bool, True where a step is a trainable transition (padding tokens and
            excluded steps are False).
        conditioning: tensors the denoiser needs for these prompts, batch first, e.g.
            ``{"prompt_embeds": (B, L, D), "negative_prompt_embeds": (B, L, D)}``.
        images: (B, 3, H, W) float32 in [0, 1]: the decoded samples (diffusion) or the input
            images (VLM).
        texts: the generated answers (VLM) or None.
        rewards: (B,) float32, filled in by the trainer after scoring.
        advantages: (B,) float32, filled in by the trainer after normalisation.
        extras: what an objective attaches to its rollouts, keyed by name: batch-first tensors
            carried through :meth:`select`, :meth:`concatenate` and :meth:`to` like every other
            field. The objective that sets a key documents it (SePPO: ``preferred``,
            ``encoded_images``); policies, the trainer and the other objectives ignore them.
        step_means: (B, T, C, h, w) float32 mean of each step's Gaussian at sampling time, when
            the sampler was asked to keep them (GRPO-Guard's ratio normalisation), else None.
        sde_steps: per sample, the step indices the sampler added noise at, when it did so only
            in a window (Flow-GRPO-Fast, MixGRPO); known on the host, so an objective can visit
            only them without reading the device. None: every step (or a VLM's every token).
    """

    prompts: list[str] | list[VisualPrompt]
    trajectory: Tensor
    timesteps: Tensor
    log_probs: Tensor
    step_mask: Tensor
    conditioning: dict[str, Tensor]
    images: Tensor
    texts: list[str] | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    extras: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    step_means: Tensor | None = None
    sde_steps: list[tuple[int, ...]] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def check_finite(self) -> Rollout:
        """Returns the rollout, or raises :class:`~align_gen.errors.NonFiniteSamplesError` when
        its images or log-probs hold NaN or inf (broken weights; one device read)."""
        if not bool(torch.isfinite(self.images).all() & torch.isfinite(self.log_probs).all()):
            raise NonFiniteSamplesError("the model's samples (or their log-probs) hold NaN or inf: its weights are broken.")
        return self

    @property
    def num_steps(self) -> int:
        """T, the number of recorded transitions."""
        return self.log_probs.shape[1]

    @property
    def final_samples(self) -> Tensor:
        """The clean samples: (B, C, h, w) x_0, the last entry of a latent trajectory, or a
        VLM's (B, T) answer tokens, the whole (2-D) token trajectory."""
        return self.trajectory if self.trajectory.dim() == 2 else self.trajectory[:, -1]

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Rollout:
        """A new rollout with ``fn`` applied to every batch-first tensor."""
        fields = {f.name: _map_tensors(getattr(self, f.name), fn) for f in dataclasses.fields(self)}
        return Rollout(**fields)

    def to(self, device: torch.device | str) -> Rollout:
        return self.map_tensors(lambda tensor: tensor.to(device))

    def select(self, index: Tensor | Sequence[int]) -> Rollout:
        """The rollout restricted to the samples ``index`` (a 1-D index tensor or list; a list
        is never read back from a device)."""
        positions = index.tolist() if isinstance(index, Tensor) else list(index)
        index = torch.as_tensor(positions, dtype=torch.long)
        fields = {
            f.name: _map_tensors(getattr(self, f.name), lambda tensor: tensor[index.to(tensor.device)])
            for f in dataclasses.fields(self)
        }
        fields["prompts"] = [self.prompts[i] for i in positions]
        for name in ("texts", "sde_steps"):
            values = getattr(self, name)
            if values is not None:
                fields[name] = [values[i] for i in positions]
        return Rollout(**fields)

    @staticmethod
    def concatenate(rollouts: Sequence[Rollout]) -> Rollout:
        """Concatenates rollouts along the batch dimension."""
        if not rollouts:
            raise ValueError("Rollout.concatenate needs at least one rollout.")
        first = rollouts[0]
        fields: dict[str, Any] = {}
        for f in dataclasses.fields(first):
            values = [getattr(r, f.name) for r in rollouts]
            if f.name == "sde_steps" and any(value is not None for value in values):
                # a rollout without a window noised every step
                values = [value or [tuple(range(r.num_steps))] * len(r) for value, r in zip(values, rollouts, strict=True)]
            if values[0] is None:
                fields[f.name] = None
            elif isinstance(values[0], Tensor):
                fields[f.name] = torch.cat(values)
            elif isinstance(values[0], dict):
                fields[f.name] = {key: _cat_left_padded([v[key] for v in values]) for key in values[0]}
            else:
                fields[f.name] = [item for value in values for item in value]
        return Rollout(**fields)


@dataclasses.dataclass(frozen=True)
class LossOutput:
    """One backward-able piece of an objective's loss, with detached statistics.

    An objective yields one or more of these per minibatch (for example one per denoising
    step) so that the activations of only one piece are alive at a time; the gradient of the
    objective is the sum of the pieces' gradients.

    Attributes:
        loss: scalar tensor WITH grad.
        metrics: detached statistics of this piece, 0-d tensors left on the device (or floats):
            the trainer averages them over the pieces and reads them back once per update, so a
            piece never waits for the device.
    """

    loss: Tensor
    metrics: dict[str, Tensor | float]


@dataclasses.dataclass(frozen=True)
class StepScores:
    """Stored steps re-scored under the current weights (:meth:`Policy.step_scores`), (B, k)
    float32 each, for k step indices of B samples.

    Attributes:
        log_prob: log pi_theta of each stored transition, WITH grad.
        kl: KL(pi_theta || pi_ref) of each step's transition to the initial model's from the same
            state, WITH grad; None unless asked for.
        normalized_log_ratio: GRPO-Guard's normalised log-ratio to the sampling step (diffusion
            only), WITH grad; None unless asked for.
        gain: |d mean / d model output| of each step's Gaussian kernel, with the normalised
            log-ratio (GRPO-Guard re-weights the steps by it); else None.
    """

    log_prob: Tensor
    kl: Tensor | None = None
    normalized_log_ratio: Tensor | None = None
    gain: Tensor | None = None


@dataclasses.dataclass(frozen=True)
class MatchingTerms:
    """The pre-training loss of clean samples under the current and R reference models.

    All models see the same noisy inputs (the same timesteps and noise), which is what AWM's
    pull toward the reference and SePPO's preference margin need.

    Attributes:
        loss: (B,) the current model's matching loss, WITH grad.
        reference_loss: (R, B) each reference model's matching loss, without grad.
        divergence: (R, B) mean squared difference of the current model's predictions and each
            reference's, WITH grad through the current model's.
        residual: (B, ...) the current model's prediction minus the target, WITH grad, when asked
            for (``residuals=True``; diffusion only), else None.
        reference_residual: (R, B, ...) each reference's prediction minus the target, when asked.
        clean_scale: (B,) |d x0_hat / d prediction| at each sample's timestep, when asked: the
            clean-sample prediction's error is -clean_scale x residual (flow: sigma; epsilon:
            sqrt((1 - abar) / abar); v: sqrt(1 - abar); sample: 1).
    """

    loss: Tensor
    reference_loss: Tensor
    divergence: Tensor
    residual: Tensor | None = None
    reference_residual: Tensor | None = None
    clean_scale: Tensor | None = None
