"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"): a human-preference reward for text-to-image.

The model is CLIP ViT-H/14 (LAION-2B) fine-tuned on Pick-a-Pic preference pairs, in transformers
format (``yuvalkirstain/PickScore_v1``; its processor is the LAION CLIP-H one,
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). Score = exp(logit_scale) * cos(image_embed,
text_embed), the model's own learned temperature (exp(logit_scale) ~ 100 for PickScore_v1): the
x100 scale that the PickScore paper and its reference code report, where SD-class images
typically score about 20-23 and a preference between two images is the softmax of their scores.
The anchors disagree here: some RL code uses the raw cosine instead, which is this score /
exp(logit_scale) (a reward weight of 0.01 gives about that scale for PickScore_v1).

Images are preprocessed in torch, without a PIL round trip: the float [0, 1] batch stays on its
device and is not quantised to uint8. It follows the processor's own steps and settings: resize
(bicubic, antialiased) so the short side is ``size["shortest_edge"]`` (or straight to
``size["height"/"width"]``), centre crop to ``crop_size``, normalise with ``image_mean``/``std``.
That equals the transformers 5 ``CLIPImageProcessor`` (a torchvision backend doing the same
ops) up to float rounding, and the PIL processor of transformers 4 up to uint8 rounding and PIL's
bicubic kernel. Prompts go through the processor's tokenizer, padded to 77 tokens and truncated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from align_gen.errors import ConfigError, MissingWeightsError, RewardError
from reward_models import hub
from reward_models.clip_score import resolve_device, resolve_dtype
from reward_models.registry import BatchedReward, register_reward

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PROCESSOR_EXAMPLE = DEFAULT_PROCESSOR.split("/")[1]  # the folder name in error messages
MAX_TOKENS = 77  # CLIP's text context length
# A processor folder has one of these (transformers 5 writes the second, 4 the first).
PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_source(value: str, option: str, example: str) -> tuple[str, bool]:
    """(a local folder or hub id, whether it is local) for the ``option`` setting ``value``.

    Raises ``MissingWeightsError`` for a path that is neither an existing folder nor a hub id.
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(f"pickscore: {option} must be a hub id or a local folder, got {value!r}")
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists() or not HUB_ID.match(value):
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise MissingWeightsError(
            f"pickscore: {option} folder {path} {what}; set "
            f"reward.options.pickscore.{option}=/path/to/{example} (a save_pretrained folder)"
        )
    return value, False


def load_pretrained(loader: Any, source: str, local: bool, option: str, example: str) -> Any:
    """PickScore's ``option`` (model or processor) from ``source``, with one-line errors."""
    fix = f"set reward.options.pickscore.{option}=/path/to/{example}"
    return hub.load_pretrained(loader, source, local, what=f"pickscore: {option}", fix=fix)


def _size_field(size: Any, key: str) -> int | None:
    """A field of a processor size: a dict in transformers 4, a SizeDict in 5."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _features(output: Any) -> torch.Tensor:
    """get_*_features returns the projected tensor (transformers 4) or an output whose
    ``pooler_output`` holds it (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@register_reward("pickscore")
class PickScore(BatchedReward):
    """exp(logit_scale) * cosine of PickScore CLIP-H image and prompt embeddings (x100 scale).

    ``model``: hub id or local ``save_pretrained`` folder of a ``transformers.CLIPModel``.
    ``processor``: hub id or folder of its ``CLIPProcessor``; ``None`` = the model folder when it
    has a processor config, else the LAION CLIP-H processor. ``dtype``: the reward model's own
    dtype; ``None`` = float16 on CUDA, float32 on CPU. Scores are always float32.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        processor: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(batch_size=batch_size)
        from transformers import CLIPModel, CLIPProcessor

        self.device = resolve_device(device)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.dtype = resolve_dtype(dtype)
        except ConfigError as err:
            raise ConfigError(f"{self.name}: {err}") from err
        model_source, model_local = resolve_source(model, "model", "PickScore_v1")
        if processor is None:
            has_config = any((Path(model_source) / n).is_file() for n in PROCESSOR_CONFIGS)
            processor = model_source if model_local and has_config else DEFAULT_PROCESSOR
        processor_source, processor_local = resolve_source(
            processor, "processor", PROCESSOR_EXAMPLE
        )
        # The processor is small: load and check it before the ~4 GB model.
        self.processor = load_pretrained(
            CLIPProcessor, processor_source, processor_local, "processor", PROCESSOR_EXAMPLE
        )
        clip = load_pretrained(CLIPModel, model_source, model_local, "model", "PickScore_v1")
        # Read the temperature before any cast: float16 would move exp(4.6052) = 100 by ~0.2.
        self.logit_scale = clip.logit_scale.detach().float().exp().to(self.device)  # ()
        self.model = clip.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self._init_image_transform()

    def _init_image_transform(self) -> None:
        """Read resize / crop / normalisation settings from the processor's image processor."""
        image_processor = self.processor.image_processor
        size, crop = image_processor.size, image_processor.crop_size
        self.shortest_edge = _size_field(size, "shortest_edge")
        resize_hw = (_size_field(size, "height"), _size_field(size, "width"))
        self.resize_hw = None if None in resize_hw else resize_hw
        crop_hw = (_size_field(crop, "height"), _size_field(crop, "width"))
        if None in crop_hw or (self.shortest_edge is None and self.resize_hw is None):
            raise RewardError(
                f"pickscore: processor has size {size} / crop_size {crop}; expected a "
                "'shortest_edge' or 'height'/'width' size and a 'height'/'width' crop_size"
            )
        self.crop_hw: tuple[int, int] = crop_hw  # type: ignore[assignment]
        self.mean = torch.tensor(image_processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, h, w) normalised pixel values in the model's dtype."""
        images = images.to(device=self.device, dtype=torch.float32)
        height, width = images.shape[-2:]
        if self.resize_hw is not None:
            new_size = self.resize_hw
        else:
            # transformers' shortest-edge rule: the long side is truncated, not rounded.
            short, target = min(height, width), self.shortest_edge
            long = int(target * max(height, width) / short)
            new_size = (target, long) if height <= width else (long, target)
        if tuple(new_size) != (height, width):
            images = F.interpolate(images, size=new_size, mode="bicubic", antialias=True)
            images = images.clamp(0.0, 1.0)  # bicubic overshoots; uint8 processors clip here
        (out_h, out_w), (cur_h, cur_w) = self.crop_hw, images.shape[-2:]
        if cur_h < out_h or cur_w < out_w:
            raise RewardError(
                f"pickscore: resized images are {cur_h}x{cur_w}, smaller than the processor's "
                f"crop_size {out_h}x{out_w}"
            )
        top, left = (cur_h - out_h) // 2, (cur_w - out_w) // 2
        images = images[..., top : top + out_h, left : left + out_w]
        return ((images - self.mean) / self.std).to(self.dtype)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """B prompts -> input_ids and attention_mask, each (B, 77), on the model's device."""
        tokens = self.processor.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=MAX_TOKENS,
            truncation=True,
            return_tensors="pt",
        )
        return {key: tokens[key].to(self.device) for key in ("input_ids", "attention_mask")}

    def score_chunk(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.preprocess(images)  # (b, 3, h, w)
        image_features = _features(self.model.get_image_features(pixel_values=pixels))  # (b, D)
        text_features = _features(self.model.get_text_features(**self.tokenize(prompts)))  # (b, D)
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        return self.logit_scale * (image_features * text_features).sum(dim=-1)  # (b,)
