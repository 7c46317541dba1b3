"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"): a human-preference reward for text-to-image.

The model is CLIP ViT-H/14 (LAION-2B) fine-tuned on Pick-a-Pic preference pairs, in transformers
format (``yuvalkirstain/PickScore_v1``; its processor is the LAION CLIP-H one,
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). Score = exp(logit_scale) * cos(image_embed,
text_embed), the model's own learned temperature (exp(logit_scale) ~ 100 for PickScore_v1): the
x100 scale that the PickScore paper and its reference code report, where SD-class images
typically score about 20-23 and a preference between two images is the softmax of their scores.
The anchors disagree here: some RL code uses the raw cosine instead, which is this score /
exp(logit_scale) (a reward weight of 0.01 gives about that scale for PickScore_v1).

Loading, preprocessing (in torch, on the images' device, following the processor's resize / crop
/ normalisation) and encoding are ``reward_models.hf_clip.TransformersClipEncoder``'s, shared
with ``clip_score``'s transformers backend; prompts are padded to 77 tokens and truncated.
"""

from __future__ import annotations

import torch

from reward_models.hf_clip import HUB_ID, TransformersClipEncoder
from reward_models.registry import BatchedReward, register_reward

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PROCESSOR_EXAMPLE = DEFAULT_PROCESSOR.split("/")[1]  # the folder name in error messages
# HUB_ID is re-exported: reward_models.text imports it from here.
__all__ = ["DEFAULT_MODEL", "DEFAULT_PROCESSOR", "HUB_ID", "PickScore"]


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
        self.encoder = TransformersClipEncoder(
            model,
            processor,
            default_processor=DEFAULT_PROCESSOR,
            device=device,
            dtype=dtype,
            reward=self.name,
            model_example="PickScore_v1",
            processor_example=PROCESSOR_EXAMPLE,
        )
        self.logit_scale = self.encoder.logit_scale  # () float32, read before the dtype cast
        self.model, self.processor = self.encoder.model, self.encoder.processor

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, h, w) normalised pixel values in the model's dtype."""
        return self.encoder.preprocess(images)

    def score_chunk(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_features = self.encoder.encode_images(images)  # (b, D), unit norm
        text_features = self.encoder.encode_texts(prompts)  # (b, D), unit norm
        return self.logit_scale * (image_features * text_features).sum(dim=-1)  # (b,)
