"""Training a Bradley-Terry preference head (:mod:`reward_models.preference`) from pairs.

The CLIP is frozen, so every image and prompt is encoded once, and the head then trains on the
cached features: minibatches of pairs drawn with replacement from a seeded generator, AdamW,
``steps`` steps. Pairs come from the tiny world (:mod:`align_gen.world.preference`) or from a
JSONL file of ``{"prompt", "chosen", "rejected"}`` lines whose image paths are relative to the
file (:func:`load_pair_file`); such a file is split into train / held-out pairs by prompt, so no
held-out prompt is seen in training. ``align-gen train-reward`` runs :func:`train_preference_reward`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from reward_models.errors import RewardConfigError, RewardWeightsMissingError
from reward_models.hf_clip import TransformersClipEncoder
from reward_models.hub import hub_offline
from reward_models.images import image_to_tensor
from reward_models.preference import (
    FEATURES,
    PreferenceHead,
    bradley_terry_loss,
    clip_reference,
    head_inputs,
    save_preference_head,
)

METRICS_FILE = "metrics.json"
ENCODE_BATCH = 256  # images per CLIP forward pass when caching features


@dataclasses.dataclass(frozen=True)
class HeadTrainConfig:
    """How the head is trained on cached CLIP features (defaults: what the world head ships with)."""

    # "image": the head sees the image only; "image+text" also the prompt (measured on the world:
    # equal held-out accuracy on fresh pairs, and prompt-dependent preferences need it)
    features: str = "image+text"
    hidden_size: int = 64  # width of the MLP's hidden layer; 0 = a linear head
    steps: int = 2000  # optimiser steps (minibatches drawn with replacement)
    batch_size: int = 256  # pairs per step
    learning_rate: float = 1e-3  # AdamW
    weight_decay: float = 1e-2  # AdamW
    seed: int = 0  # head initialisation and minibatch order

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise RewardConfigError(
                f"features must be one of {', '.join(FEATURES)}, got {self.features!r}"
            )
        if self.hidden_size < 0 or self.steps < 1 or self.batch_size < 1:
            raise RewardConfigError(
                f"need hidden_size >= 0, steps >= 1 and batch_size >= 1; got {self.hidden_size}, "
                f"{self.steps}, {self.batch_size}"
            )
        if not self.learning_rate > 0 or self.weight_decay < 0:
            raise RewardConfigError(
                f"need learning_rate > 0 and weight_decay >= 0, got {self.learning_rate}, {self.weight_decay}"
            )


@dataclasses.dataclass
class PreferencePairs:
    """N pairs: prompts, and the chosen / rejected images as (N, 3, H, W) [0, 1] tensors or as
    N image files each."""

    prompts: list[str]
    chosen: torch.Tensor | list[Path]
    rejected: torch.Tensor | list[Path]

    def __post_init__(self) -> None:
        if not len(self.prompts) == len(self.chosen) == len(self.rejected):
            raise ValueError(
                f"{len(self.prompts)} prompts, {len(self.chosen)} chosen, {len(self.rejected)} rejected"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: list[int]) -> PreferencePairs:
        def take(images: torch.Tensor | list[Path]) -> torch.Tensor | list[Path]:
            return (
                images[indices]
                if isinstance(images, torch.Tensor)
                else [images[i] for i in indices]
            )

        return PreferencePairs(
            [self.prompts[i] for i in indices], take(self.chosen), take(self.rejected)
        )


@dataclasses.dataclass
class EncodedPairs:
    """CLIP features of N pairs, each (N, D) float32 with unit rows."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    text: torch.Tensor

    def inputs(self, features: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's (N, D or 2D) inputs for the chosen and the rejected images."""
        return head_inputs(self.chosen, self.text, features), head_inputs(
            self.rejected, self.text, features
        )


def load_pair_file(path: Path) -> PreferencePairs:
    """Pairs from a JSONL file of ``{"prompt", "chosen", "rejected"}`` lines; image paths are
    relative to the file (or absolute). Errors name the line."""
    if not path.is_file():
        raise RewardConfigError(
            f"pair file {path} does not exist; give a .jsonl file of "
            '{"prompt": ..., "chosen": "image path", "rejected": "image path"} lines'
        )
    prompts, chosen, rejected = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, images = str(row["prompt"]), [Path(row[key]) for key in ("chosen", "rejected")]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RewardConfigError(
                f'{path}:{number}: expected a JSON object with "prompt", "chosen" and "rejected" fields'
            ) from None
        images = [image if image.is_absolute() else path.parent / image for image in images]
        for image in images:
            if not image.is_file():
                raise RewardConfigError(f"{path}:{number}: image file not found: {image}")
        prompts.append(prompt)
        chosen.append(images[0])
        rejected.append(images[1])
    if not prompts:
        raise RewardConfigError(f"pair file {path} holds no pairs")
    return PreferencePairs(prompts, chosen, rejected)


def split_by_prompt(
    pairs: PreferencePairs, heldout_fraction: float, seed: int
) -> tuple[PreferencePairs, PreferencePairs]:
    """(train, held-out): a seeded ``heldout_fraction`` of the distinct prompts, with all their
    pairs, is held out (at least one prompt when the fraction is above 0)."""
    if not 0 <= heldout_fraction < 1:
        raise RewardConfigError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    distinct = sorted(set(pairs.prompts))
    order = np.random.default_rng(seed).permutation(len(distinct))
    count = max(1, round(heldout_fraction * len(distinct))) if heldout_fraction > 0 else 0
    if count >= len(distinct):
        raise RewardConfigError(
            f"only {len(distinct)} distinct prompt(s): holding out {count} leaves none to train on; "
            "add pairs with other prompts or lower --heldout-fraction"
        )
    held = {distinct[i] for i in order[:count]}
    train = [i for i, prompt in enumerate(pairs.prompts) if prompt not in held]
    heldout = [i for i, prompt in enumerate(pairs.prompts) if prompt in held]
    return pairs.subset(train), pairs.subset(heldout)


def _open_images(files: list[Path]) -> list[torch.Tensor]:
    """(3, H, W) float32 [0, 1] tensors of image files."""
    tensors = []
    for file in files:
        with Image.open(file) as image:
            tensors.append(image_to_tensor(image))
    return tensors


@torch.no_grad()
def encode_images(
    encoder: TransformersClipEncoder, images: torch.Tensor | list[Path], desc: str
) -> torch.Tensor:
    """(N, D) features of a (N, 3, H, W) tensor or of N image files (equal sizes are batched)."""
    chunks = []
    for start in tqdm(range(0, len(images), ENCODE_BATCH), desc=desc, unit="batch", leave=False):
        batch = images[start : start + ENCODE_BATCH]
        if isinstance(batch, torch.Tensor):
            chunks.append(encoder.encode_images(batch).cpu())
            continue
        tensors = _open_images(batch)
        features = torch.empty(len(tensors), encoder.embed_dim)
        for shape in {tuple(t.shape) for t in tensors}:
            same = [i for i, t in enumerate(tensors) if tuple(t.shape) == shape]
            features[same] = encoder.encode_images(torch.stack([tensors[i] for i in same])).cpu()
        chunks.append(features)
    return torch.cat(chunks) if chunks else torch.empty(0, encoder.embed_dim)


@torch.no_grad()
def encode_pairs(
    encoder: TransformersClipEncoder, pairs: PreferencePairs, name: str
) -> EncodedPairs:
    """The CLIP features of every chosen and rejected image and every prompt of ``pairs``."""
    distinct = sorted(set(pairs.prompts))
    chunks = [
        encoder.encode_texts(distinct[i : i + ENCODE_BATCH]).cpu()
        for i in range(0, len(distinct), ENCODE_BATCH)
    ]
    text = torch.cat(chunks) if chunks else torch.empty(0, encoder.embed_dim)
    row = {prompt: i for i, prompt in enumerate(distinct)}
    return EncodedPairs(
        chosen=encode_images(encoder, pairs.chosen, f"encoding {name} chosen"),
        rejected=encode_images(encoder, pairs.rejected, f"encoding {name} rejected"),
        text=text[[row[prompt] for prompt in pairs.prompts]],
    )


def fit_head(train: EncodedPairs, config: HeadTrainConfig) -> tuple[PreferenceHead, list[float]]:
    """A head trained by the Bradley-Terry loss on ``train``; returns it and the loss per step."""
    chosen, rejected = train.inputs(config.features)  # (N, F) each
    # A seeded initialisation that leaves the caller's global RNG as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = PreferenceHead(chosen.shape[1], config.hidden_size)
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    bar = tqdm(range(config.steps), desc="training preference head", unit="step", leave=False)
    for _ in bar:
        batch = torch.randint(len(chosen), (config.batch_size,), generator=generator)  # (b,)
        loss, stats = bradley_terry_loss(head(chosen[batch]), head(rejected[batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(
            loss=f"{losses[-1]:.4f}", accuracy=f"{stats['accuracy']:.3f}", refresh=False
        )
    return head.eval().requires_grad_(False), losses


@torch.no_grad()
def pair_accuracy(head: PreferenceHead, pairs: EncodedPairs, features: str) -> float | None:
    """The fraction of pairs the head ranks chosen over rejected (None for no pairs)."""
    if len(pairs.chosen) == 0:
        return None
    chosen, rejected = pairs.inputs(features)
    return float((head(chosen) > head(rejected)).float().mean())


def clip_score_accuracy(pairs: EncodedPairs) -> float | None:
    """The same for CLIP score (cosine of each image with its prompt): the baseline to beat."""
    if len(pairs.chosen) == 0:
        return None
    return float(
        ((pairs.chosen * pairs.text).sum(-1) > (pairs.rejected * pairs.text).sum(-1)).float().mean()
    )


def train_preference_reward(
    train: PreferencePairs,
    heldout: PreferencePairs,
    clip: str,
    out: Path,
    config: HeadTrainConfig,
    device: str | None = None,
    extra: dict | None = None,
) -> dict:
    """Encode the pairs with ``clip`` (a transformers CLIP folder or hub id), train a head, write
    it to ``out`` with ``out/metrics.json``, and return the metrics (``extra`` is added to them)."""
    if len(train) == 0:
        raise RewardConfigError("no training pairs")
    started = time.perf_counter()
    try:
        encoder = TransformersClipEncoder(
            clip, device=device, reward="train-reward", model_example="clip"
        )
    except RewardWeightsMissingError as err:
        offline = " offline (HF_HUB_OFFLINE=1)" if hub_offline() else ""
        raise RewardWeightsMissingError(
            f"cannot load the CLIP {clip!r}: it is neither a transformers CLIP folder here nor a hub id "
            f"available{offline}; give --clip a CLIP folder (the world's: align_gen/world/weights/clip) or hub id"
        ) from err
    encoded = {
        "train": encode_pairs(encoder, train, "train"),
        "heldout": encode_pairs(encoder, heldout, "held-out"),
    }
    encode_seconds = time.perf_counter() - started
    head, losses = fit_head(encoded["train"], config)
    save_preference_head(head, out, clip, config.features)
    metrics = {
        "pairs": {"train": len(train), "heldout": len(heldout)},
        "accuracy": {
            split: pair_accuracy(head, pairs, config.features) for split, pairs in encoded.items()
        },
        "clip_score_accuracy": {
            split: clip_score_accuracy(pairs) for split, pairs in encoded.items()
        },
        "final_loss": float(np.mean(losses[-50:])),
        "seconds": {
            "encode": round(encode_seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        # As config.json names it: a sibling CLIP is "../<name>", not a machine-specific path.
        "clip": clip_reference(clip, out),
        "config": dataclasses.asdict(config),
        **(extra or {}),
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
