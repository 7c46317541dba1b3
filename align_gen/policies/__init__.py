"""Policies: one file per model family, and :func:`build_policy`, which picks the family from
the loaded pipeline's class."""

from __future__ import annotations

from pathlib import Path

import torch

from align_gen.config import ModelConfig, SampleConfig
from align_gen.errors import ConfigError, MissingWeightsError
from align_gen.policies.common import DenoiserPolicy
from align_gen.policies.loading import dtype_from_name, is_vlm_source, load_pipeline, load_vlm
from align_gen.policies.vlm import VLMPolicy, load_lora_adapter

__all__ = ["DenoiserPolicy", "VLMPolicy", "build_policy"]


def build_policy(
    model_config: ModelConfig,
    sample_config: SampleConfig,
    device: torch.device | str = "cpu",
    *,
    trainable: bool = True,
    lora_path: str | Path | None = None,
) -> DenoiserPolicy | VLMPolicy:
    """Loads ``model_config.pretrained`` and wraps it in the policy of its family:
    StableDiffusionPipeline -> DiffusionPolicy (UNet, DDIM), StableDiffusionXLPipeline ->
    SDXLPolicy (UNet with added conditioning, DDIM), StableDiffusion3Pipeline -> FlowPolicy
    (flow transformer, flow SDE), FluxPipeline -> FluxPolicy (the same with packed latents, T5
    conditioning and distilled guidance); a transformers image-text-to-text model -> VLMPolicy.
    ``lora_path`` applies trained LoRA weights first.

    Raises:
        MissingWeightsError: the model or ``lora_path`` cannot be found.
        ConfigError: the pipeline's class has no policy.
    """
    if is_vlm_source(model_config.pretrained):
        return _build_vlm_policy(model_config, sample_config, device, trainable=trainable, lora_path=lora_path)
    from diffusers import (
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from align_gen.policies.diffusion import DiffusionPolicy, SDXLPolicy
    from align_gen.policies.flow import FlowPolicy
    from align_gen.policies.flux import FluxPolicy

    pipeline = load_pipeline(
        model_config.pretrained,
        revision=model_config.revision,
        variant=model_config.variant,
        dtype=dtype_from_name(model_config.dtype),
    )
    families = {
        StableDiffusionPipeline: DiffusionPolicy,
        StableDiffusionXLPipeline: SDXLPolicy,
        StableDiffusion3Pipeline: FlowPolicy,
        FluxPipeline: FluxPolicy,
    }
    policy_class = next((policy for kind, policy in families.items() if isinstance(pipeline, kind)), None)
    if policy_class is None:
        raise ConfigError(
            f"model.pretrained={model_config.pretrained!r} is a {type(pipeline).__name__}, which has no "
            f"policy; supported: {', '.join(kind.__name__ for kind in families)}."
        )
    if lora_path is not None:
        if not Path(lora_path).exists():
            raise MissingWeightsError(f"LoRA weights not found: {lora_path}")
        pipeline.load_lora_weights(str(lora_path))
    return policy_class(pipeline, model_config, sample_config, device, trainable=trainable)


def _build_vlm_policy(
    model_config: ModelConfig,
    sample_config: SampleConfig,
    device: torch.device | str,
    *,
    trainable: bool,
    lora_path: str | Path | None,
) -> VLMPolicy:
    model, processor = load_vlm(
        model_config.pretrained, revision=model_config.revision, dtype=dtype_from_name(model_config.dtype)
    )
    if lora_path is not None:
        if not Path(lora_path).exists():
            raise MissingWeightsError(f"LoRA weights not found: {lora_path}")
        load_lora_adapter(model, lora_path)
    return VLMPolicy(model, processor, model_config, sample_config, device, trainable=trainable)
