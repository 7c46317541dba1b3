"""Full-size architectures with random weights, built from their public configs (no download).

The benchmarks measure cost, and the cost of a forward or backward pass does not depend on the
values of the weights, so a model with the real architecture and random weights times like the
real one. This module writes such models as ordinary folders (a diffusers pipeline folder, or a
transformers model + processor folder) that ``align_gen.policies.build_policy`` loads through the
very code path a downloaded checkpoint takes. The configs below are written out from the public
``config.json`` files of each model (field names as diffusers / transformers spell them).

Names (``--model`` of the benchmark scripts; resolved here, never in the library):
  ``random:sd15``        Stable Diffusion 1.5: UNet2DConditionModel (~860M params), its VAE
                         (AutoencoderKL, 4 latent channels), CLIP ViT-L/14's text encoder
                         (123M) with the real CLIP tokenizer (open_clip's BPE vocabulary), DDIM
                         on SD's training schedule; 512 px images, 64x64x4 latents.
  ``random:sd35m``       Stable Diffusion 3.5 Medium: SD3Transformer2DModel (MMDiT-X, 24 layers,
                         width 1536, dual attention in layers 0-12, ~2.2B params), its 16-channel
                         VAE, FlowMatchEulerDiscreteScheduler(shift=3.0); 512 px images
                         (``sample_size`` 64; the hub config's 128 is 1024 px). The text encoders
                         are SMALL stand-ins (two 2-layer CLIPs with the real projection widths
                         768 + 1280, and a 1-layer T5 of the real width 4096 on a character-level
                         tokenizer): they run once per prompt batch, never per denoising step
                         and never in an update (the rollout stores the embeddings), so the
                         transformer dominates the cost, and it still sees the real 333 text
                         tokens (77 CLIP + 256 T5) of width 4096. (A T5 is included so the
                         folder has the real model's layout; a folder without one loads too.)
  ``random:qwen2vl-2b``  Qwen2-VL-2B: the 28-layer, width-1536 language model (GQA 12/2 heads,
                         M-RoPE, 151,936-token embedding tied to the LM head) and the 32-layer,
                         width-1280 vision transformer (14 px patches, 2x2 merge), ~2.2B params;
                         448 px images (256 image tokens). The tokenizer is the tiny Qwen2-VL's
                         word-level one (Qwen's 151k BPE is not shipped offline): prompts are
                         therefore shorter than with the real tokenizer.
Each takes a scale suffix: ``-mid`` (widths and depths shrunk so a CPU benchmark takes about a
minute) or ``-tiny`` (seconds; for tests); no suffix is full size.

Folders are cached under ``outputs/random_models/<name>`` (gitignored) and reused; a folder
counts only once its ``random_model.json`` (written last) exists. Full-size folders store
bfloat16 weights (about 2 GB for SD1.5, 4.4 GB for SD3.5-M or Qwen2-VL-2B); the scripts'
``--dtype`` converts on load. Building on a GPU machine initialises on the GPU (seconds).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PREFIX = "random:"
SCALES = ("full", "mid", "tiny")
CACHE_ROOT = Path(__file__).resolve().parent.parent / "outputs" / "random_models"
MARKER = "random_model.json"

# --- Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5: unet/, vae/, text_encoder/ configs) --
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,  # latents 64x64 -> 512 px images
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower; bos/eos are the CLIP tokenizer's ids (pooling reads eos).
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# DDIM on SD1.5's training schedule (its hub scheduler is PNDM with these betas; align-gen samples
# with DDIM either way).
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

# --- Stable Diffusion 3.5 Medium (stabilityai/stable-diffusion-3.5-medium: transformer/, vae/) --
SD35M_TRANSFORMER: dict[str, Any] = {
    "sample_size": 64,  # the hub config says 128 (1024 px); 64 = 512 px, as the SD1.5 rows
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
SD35M_VAE: dict[str, Any] = {
    **SD15_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# Small stand-ins for CLIP-L and CLIP-G: 2 layers of width 64 (their hidden states are
# zero-padded to joint_attention_dim), with projections that split pooled_projection_dim as the
# real ones do (768 + 1280 = 2048: 3/8 and 5/8).
# A 1-layer stand-in for T5-XXL's encoder at its real output width (joint_attention_dim).
SD35M_SMALL_T5: dict[str, Any] = {
    "d_model": 4096,
    "d_kv": 16,
    "d_ff": 256,
    "num_layers": 1,
    "num_heads": 4,
}
SD35M_SMALL_TEXT: dict[str, Any] = {
    **CLIP_L_TEXT,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "gelu",
}

# --- Qwen2-VL-2B (Qwen/Qwen2-VL-2B-Instruct: config.json) -------------------------------------
QWEN2VL_2B_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},  # sums to head_dim / 2
    "hidden_act": "silu",
    "tie_word_embeddings": True,
}
QWEN2VL_2B_VISION: dict[str, Any] = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 1536,  # the merger's output: the language model's width
    "num_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_chans": 3,
    "hidden_act": "quick_gelu",
}
QWEN2VL_IMAGE_SIDE = 448  # px: 32x32 patches of 14 -> 256 image tokens after the 2x2 merge

# What each scale changes ({component: {field: value}}); full changes nothing.
SHRINK: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "sd15": {
        "mid": {
            "unet": {
                "sample_size": 16,
                "block_out_channels": (64, 128, 256, 256),
                "layers_per_block": 1,
            },
            "vae": {
                "block_out_channels": (32, 64, 64, 64),
                "layers_per_block": 1,
                "sample_size": 128,
            },
            # The text width stays 768 (the UNet's cross_attention_dim); it runs once per batch.
            "text": {"num_hidden_layers": 2},
        },
        "tiny": {
            "unet": {
                "sample_size": 8,
                "block_out_channels": (32, 32, 64, 64),
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "cross_attention_dim": 32,
            },
            "vae": {
                "block_out_channels": (8, 8, 16, 16),
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "sample_size": 64,
            },
            "text": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "projection_dim": 32,
            },
        },
    },
    "sd35m": {
        "mid": {
            "transformer": {
                "sample_size": 16,
                "num_layers": 6,
                "num_attention_heads": 6,
                "caption_projection_dim": 384,
                "dual_attention_layers": (0, 1, 2),
            },
            "vae": {
                "block_out_channels": (32, 64, 64, 64),
                "layers_per_block": 1,
                "sample_size": 128,
            },
        },
        "tiny": {
            "transformer": {
                "sample_size": 8,
                "num_layers": 2,
                "attention_head_dim": 8,
                "num_attention_heads": 4,
                "caption_projection_dim": 32,
                "dual_attention_layers": (0,),
                "pos_embed_max_size": 16,
                "joint_attention_dim": 128,
                "pooled_projection_dim": 64,
            },
            "vae": {
                "block_out_channels": (8, 8, 16, 16),
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "sample_size": 64,
            },
        },
    },
    "qwen2vl-2b": {
        "mid": {
            "text": {
                "hidden_size": 512,
                "intermediate_size": 1536,
                "num_hidden_layers": 6,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            },
            "vision": {"depth": 4, "embed_dim": 256, "hidden_size": 512, "num_heads": 4},
            "image": {"side": 112},
        },
        "tiny": {
            "text": {
                "vocab_size": 1024,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]},
            },
            "vision": {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2},
            "image": {"side": 56},
        },
    },
}


def scaled(config: dict[str, Any], model: str, scale: str, component: str) -> dict[str, Any]:
    """``config`` with the fields :data:`SHRINK` changes for ``model`` at ``scale`` (a copy)."""
    return {**copy.deepcopy(config), **SHRINK[model].get(scale, {}).get(component, {})}


def build_sd15(scale: str, folder: Path, seed: int = 0) -> dict[str, int]:
    """Writes a StableDiffusionPipeline folder of the SD1.5 architecture at ``scale``; returns
    the parameter count of each component."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from align_gen.builtins.tiny_diffusion import build_clip_tokenizer

    torch.manual_seed(seed)
    with torch.device(_init_device()):
        unet = UNet2DConditionModel(**scaled(SD15_UNET, "sd15", scale, "unet"))
        vae = AutoencoderKL(**scaled(SD15_VAE, "sd15", scale, "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**scaled(CLIP_L_TEXT, "sd15", scale, "text")))
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save_pipeline(pipeline, folder, scale)
    return _counts(unet=unet, vae=vae, text_encoder=text_encoder)


def build_sd35m(scale: str, folder: Path, seed: int = 0) -> dict[str, int]:
    """Writes a StableDiffusion3Pipeline folder of SD3.5 Medium's transformer and VAE at
    ``scale``, with the small stand-in text encoders (see the module docstring)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from align_gen.builtins.tiny_diffusion import build_clip_tokenizer, build_t5_tokenizer

    t5_tokenizer = build_t5_tokenizer()
    transformer_config = scaled(SD35M_TRANSFORMER, "sd35m", scale, "transformer")
    pooled = transformer_config["pooled_projection_dim"]
    projections = (pooled * 3 // 8, pooled - pooled * 3 // 8)  # CLIP-L's 768 + CLIP-G's 1280
    torch.manual_seed(seed)
    with torch.device(_init_device()):
        transformer = SD3Transformer2DModel(**transformer_config)
        vae = AutoencoderKL(**scaled(SD35M_VAE, "sd35m", scale, "vae"))
        encoders = [
            CLIPTextModelWithProjection(
                CLIPTextConfig(**{**SD35M_SMALL_TEXT, "projection_dim": width})
            )
            for width in projections
        ]
        t5_width = {"d_model": transformer_config["joint_attention_dim"]}
        t5 = T5EncoderModel(
            T5Config(vocab_size=len(t5_tokenizer), **{**SD35M_SMALL_T5, **t5_width})
        )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=encoders[1],
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )
    _save_pipeline(pipeline, folder, scale)
    return _counts(
        transformer=transformer,
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        text_encoder_3=t5,
    )


def build_qwen2vl_2b(scale: str, folder: Path, seed: int = 0) -> dict[str, int]:
    """Writes a Qwen2VLForConditionalGeneration + Qwen2VLProcessor folder of Qwen2-VL-2B's
    architecture at ``scale``, with the tiny Qwen2-VL's word-level tokenizer and chat template
    and an image processor fixed at one square size (``QWEN2VL_IMAGE_SIDE`` px at full size)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from align_gen.builtins.tiny_vlms import build_tiny_random_qwen2_vl

    tiny_processor = build_tiny_random_qwen2_vl()[1]
    vocab = tiny_processor.tokenizer.get_vocab()
    vision = scaled(QWEN2VL_2B_VISION, "qwen2vl-2b", scale, "vision")
    text = scaled(QWEN2VL_2B_TEXT, "qwen2vl-2b", scale, "text")
    tie = text.pop("tie_word_embeddings")
    side = SHRINK["qwen2vl-2b"].get(scale, {}).get("image", {}).get("side", QWEN2VL_IMAGE_SIDE)
    sizes = {
        "min_pixels": side * side,
        "max_pixels": side * side,
        "patch_size": vision["patch_size"],
        "merge_size": vision["spatial_merge_size"],
        "temporal_patch_size": vision["temporal_patch_size"],
    }
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tiny_processor.tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
        chat_template=tiny_processor.chat_template,
    )
    special = {
        "pad_token_id": "<pad>",
        "bos_token_id": "<|im_start|>",
        "eos_token_id": "<|im_end|>",
    }
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config={**text, **{key: vocab[token] for key, token in special.items()}},
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    with torch.device(_init_device()):
        model = Qwen2VLForConditionalGeneration(config)
    if scale == "full":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return _counts(model=model)


BUILDERS: dict[str, Callable[[str, Path, int], dict[str, int]]] = {
    "sd15": build_sd15,
    "sd35m": build_sd35m,
    "qwen2vl-2b": build_qwen2vl_2b,
}


def model_names() -> list[str]:
    """Every name :func:`resolve` accepts: ``random:<model>`` and ``random:<model>-<scale>``."""
    return [
        PREFIX + model + ("" if scale == "full" else "-" + scale)
        for model in BUILDERS
        for scale in SCALES
    ]


def parse_name(name: str) -> tuple[str, str]:
    """(model, scale) of ``random:<model>[-mid|-tiny]``; ValueError listing the valid names."""
    body = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    for model in BUILDERS:
        for scale in SCALES:
            if body == model + ("" if scale == "full" else "-" + scale):
                return model, scale
    raise ValueError(f"unknown random model {name!r}; valid: {', '.join(model_names())}")


def resolve(name: str, *, root: Path = CACHE_ROOT, seed: int = 0) -> str:
    """The folder to load for ``name``: ``random:...`` names are built (once) under ``root`` and
    their folder returned; any other name (built-in, hub id, folder) is returned unchanged."""
    if not name.startswith(PREFIX):
        return name
    model, scale = parse_name(name)
    folder = Path(root) / name[len(PREFIX) :]
    if (folder / MARKER).is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".building.", dir=folder.parent))
    try:
        print(f"building {name} (random weights, {scale} size) in {folder} ...", flush=True)
        counts = BUILDERS[model](scale, staging, seed)
        info = {"name": name, "model": model, "scale": scale, "seed": seed, "parameters": counts}
        (staging / MARKER).write_text(json.dumps(info, indent=1))
        if folder.exists():  # an unfinished earlier build (no marker)
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return str(folder)


def _init_device() -> torch.device:
    """Where weights are initialised: the GPU when there is one (random init of 2B parameters
    takes minutes on a CPU core, seconds on a GPU); saving copies them to the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _save_pipeline(pipeline: Any, folder: Path, scale: str) -> None:
    """Saves ``pipeline`` as safetensors: bfloat16 at full size (half the disk), else float32."""
    if scale == "full":
        pipeline.to(dtype=torch.bfloat16)
    pipeline.save_pretrained(folder, safe_serialization=True)


def _counts(**modules: torch.nn.Module) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}


def meta_parameter_count(model: str, component: str, scale: str = "full") -> int:
    """Parameters of one component (``unet``, ``vae``, ``transformer``, ``text_encoder``,
    ``model``) of ``model`` at ``scale``, built on the meta device: no memory, no init time."""
    configs: dict[tuple[str, str], Callable[[], torch.nn.Module]] = {
        ("sd15", "unet"): lambda: _diffusers("UNet2DConditionModel")(
            **scaled(SD15_UNET, model, scale, "unet")
        ),
        ("sd15", "vae"): lambda: _diffusers("AutoencoderKL")(
            **scaled(SD15_VAE, model, scale, "vae")
        ),
        ("sd15", "text_encoder"): lambda: _clip_text(scaled(CLIP_L_TEXT, model, scale, "text")),
        ("sd35m", "transformer"): lambda: _diffusers("SD3Transformer2DModel")(
            **scaled(SD35M_TRANSFORMER, model, scale, "transformer")
        ),
        ("sd35m", "vae"): lambda: _diffusers("AutoencoderKL")(
            **scaled(SD35M_VAE, model, scale, "vae")
        ),
        ("qwen2vl-2b", "model"): lambda: _qwen2vl(scale),
    }
    if (model, component) not in configs:
        raise ValueError(f"no component {component!r} of {model!r}; valid: {sorted(configs)}")
    with torch.device("meta"):
        module = configs[(model, component)]()
    return sum(p.numel() for p in module.parameters())


def _diffusers(class_name: str) -> Callable[..., torch.nn.Module]:
    import diffusers

    return getattr(diffusers, class_name)


def _clip_text(fields: dict[str, Any]) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**fields))


def _qwen2vl(scale: str) -> torch.nn.Module:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = scaled(QWEN2VL_2B_TEXT, "qwen2vl-2b", scale, "text")
    tie = text.pop("tie_word_embeddings")
    vision = scaled(QWEN2VL_2B_VISION, "qwen2vl-2b", scale, "vision")
    return Qwen2VLForConditionalGeneration(
        Qwen2VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=tie)
    )
