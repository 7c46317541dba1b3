"""JPEG compressibility and incompressibility: DDPO's weight-free toy rewards.

Source: Black et al. 2023, "Training Diffusion Models with Reinforcement Learning" (DDPO), whose
reference code scores an image by the size of its JPEG encoding. Each image is rounded to uint8,
encoded by PIL at ``quality`` (default 95, as in DDPO), and measured in kilobytes
(bytes / 1000). ``jpeg_compressibility`` = -size_kb (higher for flat, simple images);
``jpeg_incompressibility`` = +size_kb (higher for busy, detailed images). The scale is image-size
dependent: a 512x512 photo is tens of kB, a flat 64x64 image well under 1 kB. Prompts are ignored.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from reward_models.errors import RewardConfigError
from reward_models.images import to_uint8_pixels
from reward_models.registry import BatchedReward, register_reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B,) float32 JPEG sizes in kB (1 kB = 1000 bytes)."""
    sizes = []
    for array in to_uint8_pixels(images):  # (H, W, 3) each
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class _JpegSize(BatchedReward):
    sign: float = 1.0

    def __init__(self, quality: int = 95, batch_size: int = 32) -> None:
        super().__init__(batch_size=batch_size)
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise RewardConfigError(f"{self.name}: quality must be an int in [1, 100], got {quality!r}")
        self.quality = quality

    def score_chunk(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)


@register_reward("jpeg_compressibility")
class JpegCompressibility(_JpegSize):
    """-(JPEG size in kB): rewards images that compress well."""

    sign = -1.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(_JpegSize):
    """+(JPEG size in kB): rewards images that compress badly."""

    sign = 1.0
