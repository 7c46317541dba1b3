"""A transformers ``CLIPModel`` as an image/text encoder: loading, torch preprocessing, encoding.

Shared by ``pickscore`` (a fine-tuned CLIP-H) and ``clip_score`` / ``clip_text_image`` with a
``model`` folder or hub id (e.g. the tiny world's CLIP). It has the interface of the open_clip
``OpenClipEncoder``: ``preprocess``, ``encode_images``, ``encode_texts``, ``embed_dim``.

Images are preprocessed in torch, without a PIL round trip: the float [0, 1] batch stays on its
device and is not quantised to uint8. It follows the image processor's own steps and settings:
resize (bicubic, antialiased) so the short side is ``size["shortest_edge"]`` (or straight to
``size["height"/"width"]``), centre crop to ``crop_size``, normalise with ``image_mean``/``std``.
That equals the transformers 5 ``CLIPImageProcessor`` (a torchvision backend doing the same
ops) up to float rounding, and the PIL processor of transformers 4 up to uint8 rounding and PIL's
bicubic kernel. Prompts go through the tokenizer (any ``AutoTokenizer``, not only CLIP's BPE),
padded and truncated to min(77, ``tokenizer.model_max_length``) tokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from reward_models import hub
from reward_models.errors import RewardConfigError, RewardError, RewardWeightsMissingError
from reward_models.hub import dtype_keyword, resolve_placement

MAX_TOKENS = 77  # CLIP's text context length; a smaller tokenizer limit wins
# A processor folder has one of these (transformers 5 writes the second, 4 the first).
PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ClipProcessing(NamedTuple):
    """The two halves of a ``CLIPProcessor``, each loaded with its Auto class."""

    tokenizer: Any
    image_processor: Any


def resolve_source(value: str, reward: str, option: str, example: str) -> tuple[str, bool]:
    """(a local folder or hub id, whether it is local) for ``reward``'s ``option`` ``value``.

    Raises ``RewardWeightsMissingError`` for a path that is neither an existing folder nor a hub id.
    """
    if not isinstance(value, str) or not value:
        raise RewardConfigError(f"{reward}: {option} must be a hub id or a local folder, got {value!r}")
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists() or not HUB_ID.match(value):
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise RewardWeightsMissingError(
            f"{reward}: {option} folder {path} {what}; set "
            f"reward.options.{reward}.{option}=/path/to/{example} (a save_pretrained folder)"
        )
    return value, False


def _size_field(size: Any, key: str) -> int | None:
    """A field of a processor size: a dict in transformers 4, a SizeDict in 5."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def clip_features(output: Any) -> torch.Tensor:
    """get_*_features returns the projected tensor (transformers 4) or an output whose
    ``pooler_output`` holds it (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class TransformersClipEncoder:
    """A transformers ``CLIPModel`` that embeds [0, 1] image tensors and prompts, L2-normalised.

    Args:
        model: hub id or local ``save_pretrained`` folder of a ``CLIPModel``.
        processor: hub id or folder holding its tokenizer and image processor; None = the model
            folder when it has an image-processor config, else ``default_processor`` (None: the
            model source itself).
        device: None = CUDA when available, else CPU.
        dtype: the model's own dtype; None = float16 on CUDA, float32 on CPU. Embeddings are
            always float32.
        reward: names the reward in messages, and in the options they tell a user to set.
        model_example, processor_example: folder names shown in ``/path/to/<example>`` fixes.
    """

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        *,
        default_processor: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = torch.float32,
        reward: str = "clip_score",
        model_example: str = "clip_model",
        processor_example: str | None = None,
    ) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.reward = reward
        self.device, self.dtype = resolve_placement(device, dtype, reward)
        self.examples = {"model": model_example, "processor": processor_example or model_example}
        model_source, model_local = resolve_source(model, reward, "model", self.examples["model"])
        # Which option a failure to load the processor names: a hub model's own processor
        # fails with the model (not cached, no such repository), so the fix is the model's.
        processor_option = "processor"
        if processor is None:
            has_config = any((Path(model_source) / n).is_file() for n in PROCESSOR_CONFIGS)
            processor = default_processor or model_source
            if model_local and has_config:
                processor = model_source
            elif default_processor is None and not model_local:
                processor_option = "model"
        processor_source, processor_local = resolve_source(
            processor, reward, "processor", self.examples["processor"]
        )
        source = (processor_source, processor_local, processor_option)
        self.processor = ClipProcessing(  # small: loaded and checked before the model
            tokenizer=self._load(AutoTokenizer, *source),
            image_processor=self._load(AutoImageProcessor, *source),
        )
        self._init_text_settings(processor_source)
        self._init_image_transform()
        # float32 whatever the checkpoint's dtype (transformers 5 would keep a float16 one).
        as_float32 = {dtype_keyword(): torch.float32}
        clip = self._load(CLIPModel, model_source, model_local, "model", **as_float32)
        # Read the temperature before any cast: float16 would move exp(4.6052) = 100 by ~0.2.
        self.logit_scale = clip.logit_scale.detach().float().exp().to(self.device)  # ()
        self.model = clip.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def _load(self, loader: Any, source: str, local: bool, option: str, **kwargs: Any) -> Any:
        """``loader.from_pretrained(source)`` with one-line errors naming ``option``."""
        fix = f"set reward.options.{self.reward}.{option}=/path/to/{self.examples[option]}"
        what = f"{self.reward}: {option}"
        return hub.load_pretrained(loader, source, local, what=what, fix=fix, **kwargs)

    def _init_text_settings(self, source: str) -> None:
        """Padding length min(77, model_max_length); a pad token is needed to batch prompts."""
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token is None:
            raise RewardError(
                f"{self.reward}: the tokenizer of {source} has no pad token, so prompts cannot be "
                "batched; set one (tokenizer.pad_token = tokenizer.eos_token for CLIP) and save "
                "the folder again"
            )
        self.max_tokens = min(MAX_TOKENS, int(tokenizer.model_max_length))

    def _init_image_transform(self) -> None:
        """Read resize / crop / normalisation settings from the image processor."""
        image_processor = self.processor.image_processor
        size, crop = image_processor.size, image_processor.crop_size
        self.shortest_edge = _size_field(size, "shortest_edge")
        resize_hw = (_size_field(size, "height"), _size_field(size, "width"))
        self.resize_hw = None if None in resize_hw else resize_hw
        crop_hw = (_size_field(crop, "height"), _size_field(crop, "width"))
        if None in crop_hw or (self.shortest_edge is None and self.resize_hw is None):
            raise RewardError(
                f"{self.reward}: processor has size {size} / crop_size {crop}; expected a "
                "'shortest_edge' or 'height'/'width' size and a 'height'/'width' crop_size"
            )
        self.image_size: tuple[int, int] = crop_hw  # type: ignore[assignment]  # model input (h, w)
        self.mean = torch.tensor(image_processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, device=self.device).view(1, 3, 1, 1)

    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint embedding space."""
        return int(self.model.config.projection_dim)

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
        (out_h, out_w), (cur_h, cur_w) = self.image_size, images.shape[-2:]
        if cur_h < out_h or cur_w < out_w:
            raise RewardError(
                f"{self.reward}: resized images are {cur_h}x{cur_w}, smaller than the "
                f"processor's crop_size {out_h}x{out_w}"
            )
        top, left = (cur_h - out_h) // 2, (cur_w - out_w) // 2
        images = images[..., top : top + out_h, left : left + out_w]
        return ((images - self.mean) / self.std).to(self.dtype)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """B prompts -> input_ids and attention_mask, each (B, max_tokens), on the model's device."""
        tokens = self.processor.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            return_tensors="pt",
        )
        return {key: tokens[key].to(self.device) for key in ("input_ids", "attention_mask")}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) float32, unit L2 norm."""
        features = clip_features(self.model.get_image_features(pixel_values=self.preprocess(images)))
        return F.normalize(features.float(), dim=-1)

    def encode_texts(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> (B, D) float32, unit L2 norm (prompts past max_tokens are truncated)."""
        features = clip_features(self.model.get_text_features(**self.tokenize(prompts)))
        return F.normalize(features.float(), dim=-1)
