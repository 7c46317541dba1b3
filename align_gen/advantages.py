"""Reward -> advantage normalisation: per prompt (running buffer), per group, or per batch.

Every normaliser computes A = (r - mean) / (std + eps), clamped to [-clip, clip], and differs only
in which rewards the mean and std come from:
- ``per_prompt``: a running buffer of this prompt's recent rewards, as in DDPO (Black et al. 2023);
  it falls back to the whole batch's statistics until the buffer holds ``min_count`` rewards.
- ``group``: the rewards of the same prompt in this batch only (GRPO, AWM); with ``global_std``
  the mean is the group's and the std the whole batch's (Flow-GRPO's and DiffusionNFT's
  ``global_std``: a group whose samples all tie keeps A = 0 without its tiny std inflating
  the others').
- ``batch``: the whole batch.
Standard deviations use the population convention (divide by n, ``unbiased=False``), so a group
of one sample gets std 0 and advantage 0. Statistics are computed in float64; advantages are
returned as float32 on the rewards' device.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any, Literal, Protocol

import torch

from align_gen.errors import ConfigError, RewardError

Tensor = torch.Tensor
AdvantageKind = Literal["per_prompt", "batch", "group"]

__all__ = [
    "AdvantageFn",
    "AdvantageKind",
    "BatchNormalizer",
    "GroupNormalizer",
    "PerPromptNormalizer",
    "batch_normalize",
    "build_advantage_fn",
    "group_normalize",
]


class AdvantageFn(Protocol):
    """What the training loop calls: rewards of a batch in, advantages out, state for resuming."""

    def __call__(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """(B,) rewards for B prompts -> (B,) float32 advantages."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state ({} when stateless)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what ``state_dict`` returned."""
        ...

    def stats(self) -> dict[str, float]:
        """Scalars to log ({} when there is nothing to report)."""
        ...


def _check_settings(eps: float, clip: float) -> None:
    if not eps > 0:
        raise ConfigError(f"eps must be > 0 (it keeps A finite when all rewards tie), got {eps}.")
    if not clip > 0:
        raise ConfigError(f"clip must be > 0 (use float('inf') for no clipping), got {clip}.")


def _check_rewards(rewards: Tensor, batch_size: int | None = None) -> None:
    if rewards.ndim != 1 or rewards.shape[0] == 0:
        raise ValueError(
            f"rewards must be a non-empty (B,) tensor, got shape {tuple(rewards.shape)}."
        )
    if batch_size is not None and rewards.shape[0] != batch_size:
        raise ValueError(f"got {batch_size} prompts/group ids but {rewards.shape[0]} rewards.")
    if not bool(torch.isfinite(rewards).all()):
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise RewardError(
            f"rewards at batch indices {bad} are not finite: {rewards[bad].tolist()}."
        )


def _standardize(rewards: Tensor, mean: Tensor, std: Tensor, eps: float, clip: float) -> Tensor:
    """(r - mean) / (std + eps), clamped; all (B,) or broadcastable -> (B,) float32 on r's device."""
    advantages = (rewards.double() - mean) / (std + eps)  # (B,) float64
    return advantages.clamp(-clip, clip).to(device=rewards.device, dtype=torch.float32)


def batch_normalize(rewards: Tensor, eps: float = 1e-4, clip: float = 5.0) -> Tensor:
    """Normalises rewards with the statistics of the whole batch.

    Args:
        rewards: (B,) finite rewards.
        eps: added to the (population) std so ties give A = 0 instead of 0/0.
        clip: advantages are clamped to [-clip, clip].

    Returns:
        (B,) float32 advantages on ``rewards``' device.
    """
    _check_settings(eps, clip)
    _check_rewards(rewards)
    r = rewards.double()  # (B,)
    return _standardize(rewards, r.mean(), r.std(unbiased=False), eps, clip)


def group_normalize(
    rewards: Tensor,
    group_ids: Tensor | Sequence[Hashable],
    eps: float = 1e-4,
    clip: float = 5.0,
    global_std: bool = False,
) -> Tensor:
    """Normalises each reward with the statistics of its group (same prompt) in this batch only.

    This is the group-relative advantage of GRPO and AWM; nothing is remembered across batches.

    Args:
        rewards: (B,) finite rewards.
        group_ids: (B,) integer tensor, or B hashables (e.g. the prompts); equal ids = one group.
        eps: added to each group's (population) std; a group of one gets A = 0.
        clip: advantages are clamped to [-clip, clip].
        global_std: divide by the whole batch's (population) std instead of the group's.

    Returns:
        (B,) float32 advantages on ``rewards``' device.
    """
    _check_settings(eps, clip)
    _check_rewards(rewards, len(group_ids))
    if isinstance(group_ids, Tensor):
        _, inverse = torch.unique(group_ids.cpu(), return_inverse=True)  # (B,) group index
    else:
        index: dict[Hashable, int] = {}
        inverse = torch.tensor([index.setdefault(g, len(index)) for g in group_ids])
    num_groups = int(inverse.max()) + 1
    r = rewards.detach().double().cpu()  # (B,)
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, r)
    mean = (total / count)[inverse]  # (B,) each sample's group mean
    sq_dev = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, (r - mean) ** 2)
    std = (sq_dev / count).sqrt()[inverse]  # (B,) population std of each sample's group
    if global_std:
        std = r.std(unbiased=False).expand_as(r)  # (B,) the whole batch's
    return _standardize(rewards, mean.to(rewards.device), std.to(rewards.device), eps, clip)


class PerPromptNormalizer:
    """Per-prompt advantages from a running buffer of each prompt's recent rewards (DDPO-style).

    For each prompt in the batch: its rewards from this batch are appended (in batch order) to
    its buffer, a deque of the last ``buffer_size`` rewards. If the buffer then holds fewer than
    ``min_count`` rewards, the mean and std of the WHOLE current batch are used (a new prompt has
    too few samples for its own statistics); otherwise the buffer's mean and std. Stds use the
    population convention (``unbiased=False``). A = (r - mean) / (std + eps), clamped to
    [-clip, clip]. The buffers are the only state; ``state_dict`` makes resuming exact.

    Args:
        buffer_size: rewards remembered per prompt (the anchor's 32).
        min_count: rewards a prompt needs before its own statistics are used (the anchor's 16);
            1 <= min_count <= buffer_size.
        clip: advantages are clamped to [-clip, clip] (DDPO's adv_clip, 5).
        eps: added to the std so ties give A = 0 instead of 0/0.
    """

    def __init__(
        self, buffer_size: int = 32, min_count: int = 16, clip: float = 5.0, eps: float = 1e-4
    ) -> None:
        if buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {buffer_size}.")
        if not 1 <= min_count <= buffer_size:
            raise ConfigError(
                f"min_count must be in [1, buffer_size={buffer_size}] (otherwise a prompt's own "
                f"statistics are never used), got {min_count}."
            )
        _check_settings(eps, clip)
        self.buffer_size, self.min_count, self.clip, self.eps = buffer_size, min_count, clip, eps
        self._buffers: dict[str, deque[float]] = {}
        self._last_fallback_fraction = 0.0

    def __call__(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """Updates the buffers with this batch and returns its advantages.

        Args:
            prompts: B prompts (repeats = several samples of one prompt).
            rewards: (B,) finite rewards, in the order of ``prompts``.

        Returns:
            (B,) float32 advantages on ``rewards``' device.
        """
        _check_rewards(rewards, len(prompts))
        r = rewards.detach().double().cpu()  # (B,)
        mean, std = torch.empty_like(r), torch.empty_like(r)  # (B,) the statistics each r uses
        rows_by_prompt: dict[str, list[int]] = {}
        for row, prompt in enumerate(prompts):
            rows_by_prompt.setdefault(prompt, []).append(row)
        fallback_rows = 0
        for prompt, rows in rows_by_prompt.items():
            buffer = self._buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(r[rows].tolist())
            # A prompt seen fewer than min_count times has too noisy statistics of its own.
            use_batch = len(buffer) < self.min_count
            source = r if use_batch else torch.tensor(list(buffer), dtype=torch.float64)
            fallback_rows += len(rows) if use_batch else 0
            mean[rows] = source.mean()
            std[rows] = source.std(unbiased=False)
        self._last_fallback_fraction = fallback_rows / max(len(prompts), 1)
        return _standardize(
            rewards, mean.to(rewards.device), std.to(rewards.device), self.eps, self.clip
        )

    def state_dict(self) -> dict[str, Any]:
        """The settings and every buffer as plain lists (JSON-serialisable, exact floats)."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            # A VLM's prompt key is (question, image key): JSON objects take strings, so the
            # buffers are stored as [key, values] pairs, a key being a string or a list.
            "buffers": [[prompt, list(buffer)] for prompt, buffer in self._buffers.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the buffers; the saved buffer_size/min_count must equal this object's."""
        for key in ("buffer_size", "min_count"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(
                    f"per-prompt advantage state was saved with {key}={state.get(key)} but this "
                    f"normaliser has {key}={getattr(self, key)}; resume with the saved setting "
                    "or start without the saved state."
                )
        buffers = state["buffers"]
        pairs = buffers.items() if isinstance(buffers, dict) else buffers  # a dict: saved before VLM keys
        self._buffers = {
            tuple(prompt) if isinstance(prompt, list) else str(prompt): deque(
                (float(v) for v in values), maxlen=self.buffer_size
            )
            for prompt, values in pairs
        }

    def stats(self) -> dict[str, float]:
        """num_prompts (tracked), mean_buffer_len, last_fallback_fraction (share of the last
        batch normalised with batch statistics)."""
        lengths = [len(buffer) for buffer in self._buffers.values()]
        return {
            "num_prompts": float(len(lengths)),
            "mean_buffer_len": sum(lengths) / len(lengths) if lengths else 0.0,
            "last_fallback_fraction": self._last_fallback_fraction,
        }


class _Stateless:
    """Shared no-op state handling of the normalisers that remember nothing."""

    def __init__(self, eps: float = 1e-4, clip: float = 5.0) -> None:
        _check_settings(eps, clip)
        self.eps, self.clip = eps, clip

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ConfigError(
                f"{type(self).__name__} is stateless but got state with keys {sorted(state)}; "
                "was it saved by a per_prompt normaliser?"
            )

    def stats(self) -> dict[str, float]:
        return {}


class BatchNormalizer(_Stateless):
    """``batch_normalize`` behind the ``AdvantageFn`` interface (prompts are ignored)."""

    def __call__(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        _check_rewards(rewards, len(prompts))
        return batch_normalize(rewards, self.eps, self.clip)


class GroupNormalizer(_Stateless):
    """``group_normalize`` with the prompts as group ids, behind the ``AdvantageFn`` interface."""

    def __init__(self, eps: float = 1e-4, clip: float = 5.0, global_std: bool = False) -> None:
        super().__init__(eps, clip)
        self.global_std = global_std

    def __call__(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        return group_normalize(rewards, prompts, self.eps, self.clip, self.global_std)


_KINDS: dict[str, type] = {
    "per_prompt": PerPromptNormalizer,
    "batch": BatchNormalizer,
    "group": GroupNormalizer,
}
_SETTINGS: dict[str, tuple[str, ...]] = {
    "per_prompt": ("buffer_size", "min_count", "clip", "eps"),
    "batch": ("eps", "clip"),
    "group": ("eps", "clip", "global_std"),
}


def build_advantage_fn(kind: AdvantageKind, **settings: Any) -> AdvantageFn:
    """Builds the normaliser named ``kind`` with ``settings`` (its constructor's keywords).

    Raises:
        ConfigError: an unknown kind, or a setting that kind does not take (both list the valid).
    """
    if kind not in _KINDS:
        raise ConfigError(f"unknown advantage kind {kind!r}; valid: {sorted(_KINDS)}.")
    unknown = sorted(set(settings) - set(_SETTINGS[kind]))
    if unknown:
        raise ConfigError(
            f"advantage kind {kind!r} takes no setting(s) {unknown}; valid: {list(_SETTINGS[kind])}."
        )
    return _KINDS[kind](**settings)
