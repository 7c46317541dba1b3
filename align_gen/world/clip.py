"""The tiny world's CLIP: a transformers ``CLIPModel`` trained contrastively on the shapes world.

It is the world's ``clip_score`` reward (``reward.options: {clip_score: {model: <folder>}}``) and
the source of the world's diffusion text encoder (its ``text_model`` is a ``CLIPTextModel``), so
the code paths that run a real CLIP ViT-L/14 and SD1.5 run it too. Sizes: hidden 128, 3 text / 4
vision layers, 4 px patches on 32 px images (a prototype measured to learn the world in minutes).

The tokenizer is a word-level vocabulary over the world's caption words (plus ``<unk>`` for
anything else), lower-cased, ``<bos> words <eos>`` padded to :data:`CONTEXT_LENGTH` tokens: a
full CLIP BPE vocabulary (49,408 tokens) would be most of the weights of a model this small. The
text tower pools at the first ``<eos>`` (its config's ``eos_token_id``), as CLIP does.

Training: InfoNCE over in-batch pairs in both directions, with every pair whose captions are
equal counted as a positive (duplicates are common among one-shape captions), AdamW with a
cosine schedule; zero-shot evaluation classifies held-out one-shape images by colour and by
shape against label prompts.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from align_gen.world import shapes
from align_gen.world.training import OnStep, resume, warmup_cosine
from reward_models.hf_clip import clip_features

CONTEXT_LENGTH = 16  # tokens, <bos> and <eos> included: the longest caption is ~9 words
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
PUNCTUATION = (".", ",")
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class ClipTrainConfig:
    """How the world's CLIP is trained (the defaults are what ships)."""

    steps: int = 400
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0
    hidden_size: int = 128
    text_layers: int = 3
    vision_layers: int = 4
    heads: int = 4
    patch_size: int = 4
    projection_dim: int = 128


def build_tokenizer():
    """The world's word-level ``PreTrainedTokenizerFast`` (see the module docstring)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *PUNCTUATION, *shapes.caption_words()]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=CONTEXT_LENGTH,
    )


def build_clip(config: ClipTrainConfig, tokenizer) -> torch.nn.Module:
    """A randomly initialised ``CLIPModel`` of the world's size for ``tokenizer``."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    common = {
        "hidden_size": config.hidden_size,
        "intermediate_size": 4 * config.hidden_size,
        "num_attention_heads": config.heads,
        "projection_dim": config.projection_dim,
    }
    text = CLIPTextConfig(
        **common,
        vocab_size=len(tokenizer),
        num_hidden_layers=config.text_layers,
        max_position_embeddings=CONTEXT_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = CLIPVisionConfig(
        **common, num_hidden_layers=config.vision_layers, image_size=shapes.IMAGE_SIZE, patch_size=config.patch_size
    )
    torch.manual_seed(config.seed)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=config.projection_dim))


def build_image_processor():
    """A ``CLIPImageProcessor`` for the world's 32 px images (no resize needed, mean/std 0.5)."""
    from transformers import CLIPImageProcessor

    side = shapes.IMAGE_SIZE
    return CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) in [0, 1] -> the CLIP vision tower's pixel values."""
    mean = torch.tensor(IMAGE_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def tokenize(tokenizer, captions: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    tokens = tokenizer(captions, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt")
    return {"input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device)}


def embed(model, tokenizer, images: torch.Tensor | None = None, captions: list[str] | None = None):
    """L2-normalised (B, D) image and / or text embeddings."""
    device = next(model.parameters()).device
    image_features = text_features = None
    if images is not None:
        image_features = clip_features(model.get_image_features(pixel_values=normalise_images(images.to(device))))
        image_features = F.normalize(image_features, dim=-1)
    if captions is not None:
        text_features = clip_features(model.get_text_features(**tokenize(tokenizer, captions, device)))
        text_features = F.normalize(text_features, dim=-1)
    return image_features, text_features


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE where every pair with equal captions is a positive.

    Args:
        image_features, text_features: (B, D) L2-normalised.
        logit_scale: the learned log temperature (scalar).
        captions: the B captions (equal captions make extra positives).
    """
    logits = logit_scale.exp() * image_features @ text_features.T  # (B, B)
    index = {caption: i for i, caption in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions], device=logits.device)
    targets = (ids[:, None] == ids[None, :]).float()
    targets = targets / targets.sum(dim=1, keepdim=True)  # symmetric: rows == columns
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def train_clip(
    config: ClipTrainConfig,
    world: shapes.ShapesWorld,
    state: dict | None = None,
    on_step: OnStep | None = None,
) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer): trains the world's CLIP from scratch, or from ``state`` (``model``,
    ``optimizer`` and ``step`` saved by a caller's ``on_step``), calling
    ``on_step(step, loss, model, optimizer)`` after each step. Each step's batch is drawn from
    a generator seeded by (seed, step), so a resumed run sees the same data."""
    tokenizer = build_tokenizer()
    model = build_clip(config, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    start = resume(model, optimizer, state)
    schedule = warmup_cosine(optimizer, config.steps, config.warmup_steps, start)
    model.train()
    for step in range(start, config.steps):
        generator = np.random.default_rng([config.seed, step])
        images, captions, _ = world.batch(config.batch_size, "train", generator)
        image_features, text_features = embed(model, tokenizer, images, captions)
        loss = contrastive_loss(image_features, text_features, model.logit_scale, captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if on_step is not None:
            on_step(step + 1, loss.item(), model, optimizer)
    model.eval()
    return model, tokenizer


def label_prompts(label: str) -> list[str]:
    """The one-shape captions that contain ``label`` (a colour or a shape): zero-shot prompts
    averaged per label, made only of words the captions train (``"a red shape"`` would use an
    untrained word)."""
    return [
        shapes.single_caption(size, colour, kind)
        for size in shapes.SIZES
        for colour in shapes.COLOURS
        for kind in shapes.SHAPES
        if label in (colour, kind)
    ]


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, world: shapes.ShapesWorld, count: int = 600) -> dict[str, float]:
    """Held-out one-shape images classified by colour and by shape: each label is the mean
    embedding of the one-shape captions that name it."""
    rng = np.random.default_rng(12345)
    scenes = [shapes.single_shape_scene(rng, "heldout") for _ in range(count)]
    images = torch.stack([shapes.to_tensor(shapes.render(scene)) for scene in scenes])
    image_features, _ = embed(model, tokenizer, images=images)
    results = {}
    for name, labels, truth in (
        ("colour", list(shapes.COLOURS), [scene.shapes[0].colour for scene in scenes]),
        ("shape", list(shapes.SHAPES), [scene.shapes[0].kind for scene in scenes]),
    ):
        label_features = torch.stack(
            [F.normalize(embed(model, tokenizer, captions=label_prompts(label))[1].mean(dim=0), dim=0) for label in labels]
        )
        predicted = (image_features @ label_features.T).argmax(dim=1).tolist()
        results[name] = float(np.mean([labels[p] == t for p, t in zip(predicted, truth, strict=True)]))
    return results


def load_clip(folder: Path) -> tuple[torch.nn.Module, object]:
    """(``CLIPModel`` in float32, tokenizer) from a folder :func:`save_clip` wrote."""
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def save_clip(model, tokenizer, folder: Path) -> None:
    """A transformers folder: ``CLIPModel`` weights (float16), tokenizer, image processor."""
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(folder)
    build_image_processor().save_pretrained(folder)
