"""CLIP score: how well an image matches its prompt, by an open_clip or a transformers CLIP model.

Score = cosine similarity between the L2-normalised image embedding and the L2-normalised text
embedding, in [-1, 1]. Unlike the "CLIPScore" metric of Hessel et al. 2021 it is NOT multiplied by
100 (nor clipped at 0): a well-matched pair under OpenAI ViT-L/14 scores about 0.25-0.35.
Images are preprocessed in torch (no PIL round trip, so the reward works on GPU batches):
resize (bicubic, antialiased) so the short side matches the model's input size, centre crop,
normalise with the model's mean/std. ``OpenClipEncoder`` (loading + preprocessing + encoding) is
shared with the ``aesthetic`` reward.

The model is an open_clip ``model_name`` + ``pretrained`` (tag or checkpoint file), or, with
``model=<folder or hub id>``, a transformers ``CLIPModel`` with its tokenizer and image processor
(``reward_models.hf_clip.TransformersClipEncoder``, shared with ``pickscore``; e.g. the tiny
world's CLIP). The score is the same cosine for both.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from reward_models.errors import RewardConfigError, RewardError, RewardWeightsMissingError
from reward_models.hub import resolve_device, resolve_dtype
from reward_models.registry import BatchedReward, register_reward

if TYPE_CHECKING:
    from reward_models.hf_clip import TransformersClipEncoder

DEFAULT_MODEL_NAME = "ViT-L-14"
DEFAULT_PRETRAINED = "openai"
RESIZE_MODES = ("shortest", "longest")  # open_clip's names; see clip_preprocess


def load_open_clip(model_name: str, pretrained: str, option: str) -> torch.nn.Module:
    """Build ``model_name`` with weights from an open_clip tag or a local checkpoint file.

    ``option`` names the setting a user changes to fix a missing checkpoint (for messages).
    """
    import open_clip

    if model_name not in open_clip.list_models():
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        raise RewardConfigError(f"unknown open_clip model {model_name!r}; close matches: {close}")
    if not pretrained:
        raise RewardConfigError(f"{option} is required: an open_clip tag such as 'openai' or a file")
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg and not Path(pretrained).expanduser().is_file():
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise RewardWeightsMissingError(
            f"open_clip checkpoint {pretrained} does not exist (and is not a pretrained tag of "
            f"{model_name!r}: {tags}); set {option}=/path/to/checkpoint.pt"
        )
    try:
        model = open_clip.create_model(
            model_name,
            pretrained=pretrained if tag_cfg else str(Path(pretrained).expanduser()),
            # The OpenAI weights were trained with QuickGELU; open_clip only warns on a mismatch.
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
        )
    except (RuntimeError, OSError, AssertionError) as err:  # asserts: some shape mismatches
        # A tag's weights not cached offline: RuntimeError (open_clip 3), FileNotFoundError (2.x).
        if tag_cfg and isinstance(err, RuntimeError | OSError):
            raise RewardWeightsMissingError(
                f"could not load open_clip weights {model_name!r}/{pretrained!r} offline; "
                f"download them once with network access, or set {option}=/path/to/checkpoint.pt"
            ) from err
        raise RewardError(
            f"checkpoint {pretrained} does not fit open_clip model {model_name!r}: "
            f"{(str(err).splitlines() or [type(err).__name__])[0][:300]}"
        ) from err
    return model


def clip_preprocess(
    images: torch.Tensor,
    size: tuple[int, int],
    mean: torch.Tensor,
    std: torch.Tensor,
    resize_mode: str = "shortest",
) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, *size) float, normalised: CLIP-style evaluation
    preprocessing in torch, on the images' device (bicubic, antialiased, clamped to [0, 1]).

    ``resize_mode`` follows open_clip's names: "shortest" resizes the short side to the target
    and centre-crops; "longest" resizes the long side to it and pads the rest with black,
    centred (HPS v2's ``ResizeMaxSize``). ``mean`` / ``std``: (1, 3, 1, 1) on the images' device.
    """
    if resize_mode not in RESIZE_MODES:
        raise RewardConfigError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    (height, width), (out_h, out_w) = images.shape[-2:], size
    if (height, width) != (out_h, out_w):
        if resize_mode == "shortest":
            scale = max(out_h / height, out_w / width)
            new_size = (max(out_h, round(height * scale)), max(out_w, round(width * scale)))
        else:
            scale = min(out_h / height, out_w / width)
            new_size = (min(out_h, round(height * scale)), min(out_w, round(width * scale)))
        if new_size != (height, width):
            images = F.interpolate(images, size=new_size, mode="bicubic", antialias=True)
        images = images.clamp(0.0, 1.0)
        if resize_mode == "shortest":
            top, left = (new_size[0] - out_h) // 2, (new_size[1] - out_w) // 2
            images = images[..., top : top + out_h, left : left + out_w]
        else:
            pad_h, pad_w = out_h - new_size[0], out_w - new_size[1]
            padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            images = F.pad(images, padding, value=0.0)  # (left, right, top, bottom)
    return (images - mean) / std


class OpenClipEncoder:
    """An open_clip model that embeds [0, 1] image tensors and prompts, L2-normalised.

    Built from ``model_name`` + ``pretrained`` (tag or checkpoint path), or from an
    already-built ``model`` (+ ``tokenizer``, needed only for ``encode_texts``), which is moved to
    ``device``/``dtype`` in place and frozen. ``resize_mode``: see ``clip_preprocess``.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str = "openai",
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = torch.float32,
        option: str = "pretrained",
        model: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        resize_mode: str = "shortest",
    ) -> None:
        if resize_mode not in RESIZE_MODES:
            raise RewardConfigError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.resize_mode = resize_mode
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if model is None:
            model = load_open_clip(model_name, pretrained, option)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.model_name = model_name
        self._tokenizer = tokenizer
        visual = self.model.visual
        size = visual.image_size
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        mean = cfg.get("mean", getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN)
        std = cfg.get("std", getattr(visual, "image_std", None) or OPENAI_DATASET_STD)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint embedding space."""
        projection = getattr(self.model.visual, "proj", None)
        if isinstance(projection, torch.Tensor):
            return int(projection.shape[-1])
        probe = torch.zeros(1, 3, *self.image_size, device=self.device)
        return int(self.encode_images(probe).shape[-1])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, h, w) normalised model input on the model's device."""
        images = images.to(device=self.device, dtype=torch.float32)
        pixels = clip_preprocess(images, self.image_size, self.mean, self.std, self.resize_mode)
        return pixels.to(self.dtype)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) float32, unit L2 norm."""
        features = self.model.encode_image(self.preprocess(images))
        return F.normalize(features.float(), dim=-1)

    def encode_texts(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> (B, D) float32, unit L2 norm."""
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        tokens = self._tokenizer(list(prompts)).to(self.device)  # (B, context_length)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


@register_reward("clip_score")
class ClipScore(BatchedReward):
    """Cosine similarity of CLIP image and prompt embeddings, in [-1, 1] (not x100).

    open_clip (the default): ``pretrained`` is an open_clip tag of ``model_name`` (default
    "ViT-L-14" / "openai") or a local checkpoint file. For OpenAI tags QuickGELU is switched on
    automatically; for a local OpenAI checkpoint use a ``-quickgelu`` model name. An
    already-built open_clip module as ``model`` (+ ``tokenizer``) is used as it is.
    transformers: ``model`` is a hub id or ``save_pretrained`` folder of a ``CLIPModel`` with its
    tokenizer and image processor (``processor``: another folder or hub id holding them; None =
    the model's own). Prompts are truncated to min(77, the tokenizer's ``model_max_length``).
    ``dtype`` is the model's own dtype; scores are float32.
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = torch.float32,
        batch_size: int = 32,
        *,
        model: str | torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        processor: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.encoder: OpenClipEncoder | TransformersClipEncoder
        if isinstance(model, str):
            self.encoder = self._transformers_encoder(
                model, model_name, pretrained, tokenizer, processor, device, dtype
            )
            return
        if model is not None and not isinstance(model, torch.nn.Module):
            raise RewardConfigError(
                f"{self.name}: model must be a transformers CLIP folder or hub id (or a built "
                f"open_clip module), got {type(model).__name__} {model!r}"
            )
        if processor is not None:
            raise RewardConfigError(
                f"{self.name}: processor is an option of a transformers CLIP model; give "
                "model=<folder or hub id> with it, or leave it out for open_clip"
            )
        try:
            self.encoder = OpenClipEncoder(
                DEFAULT_MODEL_NAME if model_name is None else model_name,
                DEFAULT_PRETRAINED if pretrained is None else pretrained,
                device=device,
                dtype=dtype,
                option=f"reward options {self.name}.pretrained",
                model=model,
                tokenizer=tokenizer,
            )
        except (RewardConfigError, RewardWeightsMissingError, RewardError) as err:
            raise type(err)(f"{self.name}: {err}") from err

    def _transformers_encoder(
        self,
        model: str,
        model_name: str | None,
        pretrained: str | None,
        tokenizer: Any | None,
        processor: str | None,
        device: str | torch.device | None,
        dtype: str | torch.dtype,
    ) -> TransformersClipEncoder:
        """The encoder for ``model=<folder or hub id>``; the open_clip options must be unset."""
        from reward_models.hf_clip import TransformersClipEncoder

        given = {"model_name": model_name, "pretrained": pretrained, "tokenizer": tokenizer}
        clashing = [name for name, value in given.items() if value is not None]
        if clashing:
            raise RewardConfigError(
                f"{self.name}: model={model!r} (a transformers CLIP) and {' / '.join(clashing)} "
                "(open_clip) were both given; give either model, or model_name + pretrained"
            )
        return TransformersClipEncoder(
            model, processor, device=device, dtype=dtype, reward=self.name
        )

    def score_chunk(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_features = self.encoder.encode_images(images)  # (b, D)
        text_features = self.encoder.encode_texts(prompts)  # (b, D)
        return (image_features * text_features).sum(dim=-1)  # (b,)
