"""Reward models: one call signature, a registry by name, and weighted sums.

``reward(images (B, 3, H, W) float in [0, 1], prompts: list[str]) -> (B,) float32``.
Registered names: ``jpeg_compressibility``, ``jpeg_incompressibility``, ``clip_score``,
``aesthetic``; any ``"package.module:attr"`` spec works too. open_clip is imported only when a
CLIP-based reward is built, so importing this package stays cheap.
"""

# Importing registers the built-ins; open_clip / transformers load only when a reward is built.
from reward_models import aesthetic, clip_score, jpeg, pickscore  # noqa: F401
from reward_models.aesthetic import AestheticHead, AestheticScore
from reward_models.clip_score import ClipScore, OpenClipEncoder
from reward_models.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb
from reward_models.registry import (
    BatchedReward,
    FunctionReward,
    RewardFn,
    WeightedSum,
    available_rewards,
    build_reward,
    check_reward_inputs,
    get_reward,
    register_reward,
)

__all__ = [
    "AestheticHead",
    "AestheticScore",
    "BatchedReward",
    "ClipScore",
    "FunctionReward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "OpenClipEncoder",
    "RewardFn",
    "WeightedSum",
    "available_rewards",
    "build_reward",
    "check_reward_inputs",
    "get_reward",
    "jpeg_size_kb",
    "register_reward",
]
