"""The image format every reward takes: (B, 3, H, W) float in [0, 1], and its conversions to
and from what PIL and JPEG encoders take."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: an image's RGB pixels / 255 (the reward input format)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def to_uint8_pixels(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8 on the CPU, rounded (the inverse of
    :func:`image_to_tensor` up to rounding; what PIL, JPEG encoding and grids take)."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # (B, 3, H, W)
    return np.ascontiguousarray(pixels.permute(0, 2, 3, 1).cpu().numpy())
