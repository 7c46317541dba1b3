"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"): a human-preference reward, through the ``image-reward`` package.

The model is BLIP: a ViT-L/16 image encoder, a BERT-base text encoder that cross-attends to the
image tokens (BLIP's ``med`` BertModel, configured by ``med_config.json``), and an MLP
768 -> 1024 -> 128 -> 64 -> 16 -> 1 on the text encoder's [CLS] state. The released weights are
the hub files ``THUDM/ImageReward``: ``ImageReward.pt`` (a plain state dict of the package's
``ImageReward`` module: ``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.*``, ...) and
``med_config.json``; the tokenizer is ``bert-base-uncased`` plus BLIP's ``[DEC]`` / ``[ENC]``
tokens, prompts padded / truncated to 35 tokens, as ``ImageReward.score`` does.

Score = (mlp(h_cls) - 0.16717...) / 1.03334..., the package's standardised scale (its
``ImageReward.mean`` / ``std`` constants, which ``ImageReward.score`` applies): higher =
preferred, positive = above the mean it was standardised with; only differences between images
of one prompt were trained to mean something.

We build the model from the package's own classes (``VisionTransformer``, ``med.BertModel``,
``MLP``), not with ``ImageReward.ImageReward(...)``: that constructor hard-codes ViT-L and fetches
the ``bert-base-uncased`` tokenizer from the hub itself. The vision tower's size is read from the
checkpoint (patch and width from ``patch_embed``, image size from ``pos_embed``, depth from the
blocks, 64-dim heads as in BLIP's ViT-B and ViT-L), so the real file builds ViT-L/16 at 224 px and
a tiny file builds a tiny model. The forward pass is ``ImageReward.score``'s; images are
preprocessed in torch like its ``_transform`` (short side to the image size, bicubic, centre crop,
OpenAI CLIP mean/std) without the PIL uint8 round trip.

Install: ``pip install 'align-gen[imagereward]'``. image-reward 1.5 (the latest) imports helpers
that transformers removed in 4.56, imports the OpenAI ``clip`` module without declaring it, and
pins timm 0.6.13; the extra adds ``openai-clip`` and ``transformers<4.56``. Importing the package
also silences transformers' logging and Python warnings globally (its BLIP modules do that).
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reward_models import hub
from reward_models.clip_score import clip_preprocess
from reward_models.errors import RewardConfigError, RewardError
from reward_models.hf_clip import resolve_source
from reward_models.hub import resolve_placement
from reward_models.registry import BatchedReward, register_reward

DEFAULT_MODEL = "hub:THUDM/ImageReward/ImageReward.pt"
DEFAULT_MED_CONFIG = "hub:THUDM/ImageReward/med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"
INSTALL = "pip install 'align-gen[imagereward]'"
# ImageReward.__init__'s self.mean / self.std (image-reward 1.5): raw -> normalised reward.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35  # ImageReward.score pads / truncates prompts to 35 tokens
VIT_HEAD_DIM = 64  # BLIP's ViT-B (768 / 12) and ViT-L (1024 / 16)
# ImageReward's _transform normalises with the OpenAI CLIP statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION = "blip.visual_encoder."


def import_image_reward() -> dict[str, Any]:
    """The package's building blocks: {"VisionTransformer", "BertConfig", "BertModel", "MLP"}.

    Raises ``RewardConfigError`` naming the extra when the package is absent or does not import.
    """
    try:
        from ImageReward.ImageReward import MLP
        from ImageReward.models.BLIP.med import BertConfig, BertModel
        from ImageReward.models.BLIP.vit import VisionTransformer
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == "ImageReward":
            raise RewardConfigError(
                f"imagereward needs the image-reward package (module ImageReward): {INSTALL}"
            ) from None
        raise RewardConfigError(
            f"imagereward: the image-reward package is installed but does not import "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); image-reward 1.5 needs "
            f"transformers<4.56 and the OpenAI clip module: {INSTALL}"
        ) from err
    return {
        "VisionTransformer": VisionTransformer,
        "BertConfig": BertConfig,
        "BertModel": BertModel,
        "MLP": MLP,
    }


def vision_config(state: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """VisionTransformer kwargs read from a checkpoint's ``blip.visual_encoder.*`` shapes."""
    try:
        patch = state[f"{VISION}patch_embed.proj.weight"]  # (D, 3, p, p)
        positions = state[f"{VISION}pos_embed"].shape[1] - 1  # (1, 1 + grid^2, D)
        hidden = state[f"{VISION}blocks.0.mlp.fc1.weight"].shape[0]  # (mlp_ratio * D, D)
    except (KeyError, AttributeError, IndexError) as err:
        raise RewardError(
            f"imagereward: {path} is not an ImageReward checkpoint (a state dict with "
            f"{VISION}patch_embed / pos_embed / blocks.*, as ImageReward.pt): missing {err}"
        ) from None
    width, grid = int(patch.shape[0]), math.isqrt(positions)
    blocks = {int(m.group(1)) for k in state if (m := re.match(rf"{VISION}blocks\.(\d+)\.", k))}
    if grid * grid != positions or width % VIT_HEAD_DIM:
        raise RewardError(
            f"imagereward: {path}: a vision tower with {positions} patches of width {width} is "
            f"not a BLIP ViT (square patch grid, {VIT_HEAD_DIM}-dim heads)"
        )
    return {
        "img_size": grid * int(patch.shape[-1]),
        "patch_size": int(patch.shape[-1]),
        "embed_dim": width,
        "depth": max(blocks) + 1,
        "num_heads": width // VIT_HEAD_DIM,
        "mlp_ratio": hidden / width,
    }


def build_image_reward(
    checkpoint: Path, med_config: Path, parts: dict[str, Any]
) -> tuple[nn.Module, int]:
    """(module with ``blip.visual_encoder``, ``blip.text_encoder``, ``mlp`` holding the
    checkpoint's weights, the image size), built from the package's classes (``parts``, from
    ``import_image_reward``); eval mode, float32."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise RewardError(f"imagereward: {checkpoint} is not a torch state dict: {reason}") from err
    if not isinstance(state, dict):
        raise RewardError(
            f"imagereward: {checkpoint} holds a {type(state).__name__}, not a state dict"
        )
    vision = vision_config(state, checkpoint)
    try:
        text_config = parts["BertConfig"].from_json_file(str(med_config))
    except (OSError, ValueError) as err:
        raise RewardError(
            f"imagereward: med_config {med_config} is not a BERT config JSON: {err}"
        ) from err
    text_config.encoder_width = vision["embed_dim"]  # as BLIP_Pretrain sets it
    blip = nn.ModuleDict(
        {
            "visual_encoder": parts["VisionTransformer"](**vision),
            "text_encoder": parts["BertModel"](config=text_config, add_pooling_layer=False),
        }
    )
    model = nn.Module()
    model.blip, model.mlp = blip, parts["MLP"](text_config.hidden_size)
    try:
        result = model.load_state_dict(state, strict=False)  # as the package, minus unused keys
    except RuntimeError as err:
        reason = str(err).splitlines()[1:2] or [str(err)[:300]]
        raise RewardError(
            f"imagereward: {checkpoint} does not fit med_config {med_config}: {reason[0].strip()}"
        ) from err
    # position_ids is a constant buffer that newer BERT checkpoints may omit.
    missing = [key for key in result.missing_keys if not key.endswith("position_ids")]
    if missing:
        raise RewardError(
            f"imagereward: {checkpoint} lacks {len(missing)} weights of the ImageReward model, "
            f"e.g. {missing[:3]}"
        )
    return model.eval().requires_grad_(False), vision["img_size"]


@register_reward("imagereward")
class ImageRewardScore(BatchedReward):
    """ImageReward (BLIP + MLP), normalised as the package does: (B,) about N(0, 1) scores.

    ``model``: ``ImageReward.pt``, a local file or ``hub:<owner>/<repo>/<file>`` (default
    ``hub:THUDM/ImageReward/ImageReward.pt``); ``med_config``: its BERT config JSON, likewise
    (default ``hub:THUDM/ImageReward/med_config.json``); ``tokenizer``: a BERT tokenizer hub id or
    ``save_pretrained`` folder (default ``bert-base-uncased``). ``dtype``: the BLIP's own dtype;
    ``None`` = float16 on CUDA, float32 on CPU; the MLP and the scores are float32. The weight
    files are checked first, then the package is imported, then the tokenizer is loaded.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        med_config: str = DEFAULT_MED_CONFIG,
        tokenizer: str = DEFAULT_TOKENIZER,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.device, self.dtype = resolve_placement(device, dtype, self.name)
        options = f"reward.options.{self.name}"
        checkpoint = hub.resolve_file(
            model, what=f"{self.name}: model", fix=f"set {options}.model=/path/to/ImageReward.pt"
        )
        config_file = hub.resolve_file(
            med_config,
            what=f"{self.name}: med_config",
            fix=f"set {options}.med_config=/path/to/med_config.json",
        )
        parts = import_image_reward()
        self.tokenizer = self._load_tokenizer(tokenizer)
        self.model, size = build_image_reward(checkpoint, config_file, parts)
        self.model.blip.to(device=self.device, dtype=self.dtype)
        self.model.mlp.to(device=self.device)  # float32, as ImageReward.score runs it
        self.image_size = (size, size)
        self.mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)

    def _load_tokenizer(self, source: str) -> Any:
        """BertTokenizer + BLIP's special tokens, as the package's ``init_tokenizer``."""
        from transformers import BertTokenizer

        source, local = resolve_source(source, self.name, "tokenizer", "bert-base-uncased")
        tokenizer = hub.load_pretrained(
            BertTokenizer,
            source,
            local,
            what=f"{self.name}: tokenizer",
            fix=f"set reward.options.{self.name}.tokenizer=/path/to/bert-base-uncased",
        )
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        return tokenizer

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, s, s) normalised pixels in the model's dtype."""
        images = images.to(device=self.device, dtype=torch.float32)
        return clip_preprocess(images, self.image_size, self.mean, self.std).to(self.dtype)

    def score_chunk(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        ).to(self.device)
        image_embeds = self.model.blip.visual_encoder(self.preprocess(images))  # (b, 1 + n, Dv)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text = self.model.blip.text_encoder(
            tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            return_dict=True,
        )
        features = text.last_hidden_state[:, 0, :].float()  # (b, Dt): the [CLS] state
        raw = self.model.mlp(features).squeeze(-1)  # (b,)
        return (raw - REWARD_MEAN) / REWARD_STD
