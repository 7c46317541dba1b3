"""Reward models: one call signature, a registry by name, and weighted sums.

``reward(images (B, 3, H, W) float in [0, 1], prompts, *, texts=None) -> (B,) float32``, where
prompts are strings or image prompts (``ImagePrompt``: align-gen's ``VisualPrompt``) and ``texts`` are a vision-language policy's
generated answers. Image rewards: ``jpeg_compressibility``, ``jpeg_incompressibility``,
``clip_score``, ``aesthetic``, ``pickscore``, ``hpsv2``, ``imagereward``, ``preference``,
``vlm_judge`` (a VLM's probability of answering "yes" about the image), ``geneval`` (GenEval's
verdict: Mask2Former detections and CLIP colours judged by GenEval's rules). Text
rewards (they need ``texts``): ``clip_text_image``, ``answer_match``, ``sequence_classifier``. Your
own: ``register_reward`` in Python, or an ``align_gen.rewards`` entry point of an installed
package (a config never imports code by naming it). ``clip_score`` / ``clip_text_image`` run an open_clip
model, or a transformers ``CLIPModel`` given as ``model=<folder or hub id>``
(``TransformersClipEncoder``, shared with ``pickscore``). ``hpsv2`` is an open_clip ViT-H-14
with the HPS v2 / v2.1 weights; ``imagereward`` runs the ``image-reward`` package's BLIP (the
optional ``imagereward`` extra). ``preference`` is a Bradley-Terry head on a transformers CLIP's
features (``model=<head folder>``, trained by ``align-gen train-reward``; the tiny world ships one
for its synthetic "larger and more centred shapes" preference at
``align_gen/world/weights/preference``). open_clip, transformers and the ``image-reward`` package
are imported only when a reward that needs them is built, so importing this package stays cheap.
"""

# Importing registers the built-ins; open_clip / transformers / image-reward load only when a
# reward is built.
from reward_models import (  # noqa: F401
    aesthetic,
    clip_score,
    geneval,
    hpsv2,
    imagereward,
    jpeg,
    pickscore,
    preference,
    text,
    vlm_judge,
)
from reward_models.aesthetic import AestheticHead, AestheticScore
from reward_models.clip_score import ClipScore, OpenClipEncoder
from reward_models.hf_clip import TransformersClipEncoder
from reward_models.hpsv2 import HPSv2
from reward_models.imagereward import ImageRewardScore
from reward_models.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb
from reward_models.preference import PreferenceHead, PreferenceReward, bradley_terry_loss
from reward_models.registry import (
    BatchedReward,
    FunctionReward,
    RewardFn,
    WeightedSum,
    available_rewards,
    build_reward,
    check_reward_config,
    check_reward_inputs,
    check_reward_prompts,
    check_reward_texts,
    get_reward,
    register_reward,
)
from reward_models.text import AnswerMatch, ClipTextImage, SequenceClassifier
from reward_models.vlm_judge import VLMJudge

__all__ = [
    "AestheticHead",
    "AestheticScore",
    "AnswerMatch",
    "BatchedReward",
    "ClipScore",
    "ClipTextImage",
    "FunctionReward",
    "HPSv2",
    "ImageRewardScore",
    "JpegCompressibility",
    "JpegIncompressibility",
    "OpenClipEncoder",
    "PreferenceHead",
    "PreferenceReward",
    "RewardFn",
    "SequenceClassifier",
    "TransformersClipEncoder",
    "VLMJudge",
    "WeightedSum",
    "available_rewards",
    "bradley_terry_loss",
    "build_reward",
    "check_reward_config",
    "check_reward_inputs",
    "check_reward_prompts",
    "check_reward_texts",
    "get_reward",
    "jpeg_size_kb",
    "register_reward",
]
