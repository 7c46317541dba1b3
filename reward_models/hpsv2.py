"""HPS v2 / v2.1 (Human Preference Score v2, Wu et al. 2023): a human-preference reward.

The model is open_clip ViT-H-14 (LAION-2B) fine-tuned on HPD v2's human choices; the released
checkpoints (hub repo ``xswu/HPSv2``: ``HPS_v2_compressed.pt`` for v2.0,
``HPS_v2.1_compressed.pt`` for v2.1) are torch files whose ``state_dict`` entry is that
open_clip model's state dict, which open_clip's own checkpoint loader reads as it is.

Score = cos(image_embed, text_embed) of the L2-normalised embeddings, the raw cosine that the
reference ``hpsv2.score`` returns (SD-class images score about 0.25-0.30). We return that
scale, not a logit: the model's learned ``logit_scale`` is not applied by the reference, and
its benchmark tables print the same cosine x 100 (SD 1.4 about 27 under v2.0), so divide those
numbers by 100 to compare. Like ``clip_score`` it is in [-1, 1].

Preprocessing follows the reference's evaluation transform (``ResizeMaxSize``): resize the LONG
side to 224 (bicubic) and pad the short side with black, centred, then normalise with the
OpenAI CLIP mean/std; square images are simply resized. It runs in torch on the images'
device (``clip_score.clip_preprocess`` with ``resize_mode="longest"``) without the reference's
uint8 round trip. Prompts use open_clip's tokenizer for ``architecture`` (77 tokens, truncated).
Loading, preprocessing and encoding are ``clip_score.OpenClipEncoder``'s.
"""

from __future__ import annotations

import torch

from reward_models.clip_score import OpenClipEncoder
from reward_models.errors import RewardConfigError, RewardError, RewardWeightsMissingError
from reward_models.hub import resolve_file, resolve_placement
from reward_models.registry import BatchedReward, register_reward

DEFAULT_MODEL = "hub:xswu/HPSv2/HPS_v2.1_compressed.pt"
V2_0_MODEL = "hub:xswu/HPSv2/HPS_v2_compressed.pt"
DEFAULT_ARCHITECTURE = "ViT-H-14"


@register_reward("hpsv2")
class HPSv2(BatchedReward):
    """HPS v2 / v2.1: cosine of the HPS CLIP's image and prompt embeddings (raw, in [-1, 1]).

    ``model``: the HPS checkpoint, a local ``.pt`` file or ``hub:<owner>/<repo>/<file>``
    (default v2.1, ``hub:xswu/HPSv2/HPS_v2.1_compressed.pt``; v2.0 is
    ``hub:xswu/HPSv2/HPS_v2_compressed.pt``). ``architecture``: the open_clip model name the
    checkpoint fits (``ViT-H-14`` for the released files). ``dtype``: the model's own dtype;
    ``None`` = float16 on CUDA (the reference scores under fp16 autocast), float32 on CPU.
    Scores are always float32.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        architecture: str = DEFAULT_ARCHITECTURE,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(batch_size=batch_size)
        resolved_device, resolved_dtype = resolve_placement(device, dtype, self.name)
        option = f"reward.options.{self.name}.model"
        checkpoint = resolve_file(
            model,
            what=f"{self.name}: model",
            fix=f"set {option}=/path/to/HPS_v2.1_compressed.pt",
        )
        try:
            self.encoder = OpenClipEncoder(
                architecture,
                str(checkpoint),
                device=resolved_device,
                dtype=resolved_dtype,
                option=option,
                resize_mode="longest",
            )
        except (RewardConfigError, RewardWeightsMissingError, RewardError) as err:
            raise type(err)(f"{self.name}: {err}") from err
        self.model = self.encoder.model

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, s, s) normalised pixels in the model's dtype."""
        return self.encoder.preprocess(images)

    def score_chunk(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_features = self.encoder.encode_images(images)  # (b, D), unit norm, float32
        text_features = self.encoder.encode_texts(prompts)  # (b, D), unit norm, float32
        return (image_features * text_features).sum(dim=-1)  # (b,)
