"""Tiny random diffusion pipelines, built offline: ``align-gen:tiny-random-sd`` and its siblings.

``align-gen:tiny-random-sd`` is a Stable-Diffusion-architecture pipeline (CLIP text encoder,
AutoencoderKL, UNet2DConditionModel, DDIM scheduler) of about 1M parameters with random
weights, built deterministically from a seed and with no download. Tests, CI and the offline
demo use it: every code path is the one a real SD1.5 checkpoint takes, only smaller. Its
tokenizer is a transformers CLIPTokenizer built from the BPE vocabulary that open_clip ships,
so it produces the same ids as the real SD tokenizer. ``align-gen:tiny-random-sd2``,
``-sd3``, ``-sdxl`` and ``-flux`` are the same idea for Stable Diffusion 2.x (v-prediction),
Stable Diffusion 3, Stable Diffusion XL and FLUX.1.
"""

from __future__ import annotations

import atexit
import gzip
import json
import shutil
import string
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from align_gen.builtins import register_builtin


@lru_cache(maxsize=1)
def clip_tokenizer_files() -> tuple[str, str]:
    """Writes vocab.json / merges.txt of the CLIP BPE (from open_clip's copy) once per process, into
    a temporary folder removed when the process exits."""
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merge_pairs = [tuple(line.split()) for line in merges]
    # The CLIP vocabulary: 256 byte symbols, the same with an end-of-word marker, the merges,
    # then the two special tokens (ids 49406 and 49407 in the real tokenizer).
    byte_symbols = list(_bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(p) for p in merge_pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="align_gen_clip_tokenizer_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in merge_pairs))
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map used by GPT-2/CLIP BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def build_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = clip_tokenizer_files()
    return CLIPTokenizer(vocab, merges, model_max_length=77)


def _tiny_clip_text_config():
    """A 2-layer, width-32 CLIP text encoder on the real CLIP vocabulary (projection 32)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _tiny_vae(latent_channels: int, sample_size: int, **options):
    """A two-level AutoencoderKL (widths 16, 32): images of ``sample_size`` px, latents half that."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
        **options,
    )


def _tiny_unet(sample_size: int, cross_attention_dim: int, **extra):
    """A ~1M-parameter UNet2DConditionModel; ``extra`` adds e.g. SDXL's size conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # Cross-attention only at the lowest resolution keeps attention cheap on a CPU.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    )


def _sd_ddim_scheduler(prediction_type: str = "epsilon"):
    """DDIM on Stable Diffusion's training schedule (scaled-linear betas, no clipping)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


@register_builtin("tiny-random-sd", "diffusers")
def build_tiny_random_sd(seed: int = 0, sample_size: int = 32):
    """A random tiny SD pipeline: 64 px images, 32x32x4 latents, ~1M parameters."""
    from diffusers import (
        StableDiffusionPipeline,
    )
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = _tiny_unet(sample_size, cross_attention_dim=32)
    vae = _tiny_vae(latent_channels=4, sample_size=sample_size * 2)
    text_encoder = CLIPTextModel(_tiny_clip_text_config())
    scheduler = _sd_ddim_scheduler()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@register_builtin("tiny-random-sd2", "diffusers")
def build_tiny_random_sd2(seed: int = 0, sample_size: int = 32):
    """A random tiny SD 2.x pipeline with SD 2.1's structure: a v-prediction DDIM schedule,
    linear projections in the UNet's transformer blocks, attention upcast to float32, and a
    GELU text encoder (OpenCLIP's activation); 64 px images, 32x32x4 latents, ~1M parameters."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = _tiny_unet(sample_size, cross_attention_dim=32, use_linear_projection=True, upcast_attention=True)
    vae = _tiny_vae(latent_channels=4, sample_size=sample_size * 2)
    text_config = _tiny_clip_text_config()
    text_config.hidden_act = "gelu"
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=_sd_ddim_scheduler(prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_clip_with_projection(seed: int):
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_tiny_clip_text_config())


@register_builtin("tiny-random-sd3", "diffusers")
def build_tiny_random_sd3(seed: int = 0, sample_size: int = 32):
    """A random tiny SD3 pipeline: 64 px images, 32x32x16 latents, ~0.5M parameters.

    Two CLIP text encoders with projection (their pooled outputs, 32 + 32, make the
    transformer's pooled_projection_dim 64; their concatenated hidden states fill
    joint_attention_dim 64) and no T5 (``text_encoder_3=None``: diffusers' ``encode_prompt``
    then uses zeros for the T5 tokens, as a real SD3 loaded without T5 does).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=sample_size,
    )
    # SD3's VAE: 16 latent channels, shifted and scaled latents (SD3's own factors), no quant convs.
    vae = _tiny_vae(
        latent_channels=16,
        sample_size=sample_size * 2,
        shift_factor=0.0609,
        scaling_factor=1.5305,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_tiny_clip_with_projection(seed + 1),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=_tiny_clip_with_projection(seed + 2),
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


@register_builtin("tiny-random-sdxl", "diffusers")
def build_tiny_random_sdxl(seed: int = 0, sample_size: int = 32):
    """A random tiny SDXL pipeline: 64 px images, 32x32x4 latents, ~1.5M parameters.

    Two CLIP text encoders (the second with projection), whose hidden states, 32 + 32, fill the
    UNet's cross_attention_dim 64 and whose pooled output (32) joins the six size / crop time
    ids (8 each) in the UNet's "text_time" added embedding (6 * 8 + 32 = 80 inputs). The
    scheduler is DDIM on SD's schedule, which the policy samples with anyway.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = _tiny_unet(
        sample_size,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    vae = _tiny_vae(latent_channels=4, sample_size=sample_size * 2)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_tiny_clip_text_config())
    scheduler = _sd_ddim_scheduler()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=_tiny_clip_with_projection(seed + 2),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_t5_tokenizer(model_max_length: int = 77):
    """A T5 tokenizer (Unigram, T5's <pad>=0 </s>=1 <unk>=2 layout) over single characters,
    built in-process: T5's real vocabulary is a 32k-piece sentencepiece model we do not ship."""
    from transformers import T5Tokenizer

    characters = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]  # U+2581: T5's word start
    vocab += [(c, -3.0) for c in characters] + [("\u2581" + c, -3.0) for c in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


@register_builtin("tiny-random-flux", "diffusers")
def build_tiny_random_flux(seed: int = 0, sample_size: int = 32, guidance_embeds: bool = True):
    """A random tiny FLUX.1 pipeline: 64 px images, 32x32x16 latents (16x16 tokens of 64), a
    27k-parameter transformer (1.8M in all, mostly the CLIP vocabulary's embedding).

    A 1-layer T5 encoder (width 32, fills joint_attention_dim) on a character-level T5 tokenizer
    of 77 tokens, the tiny CLIP text encoder (its pooled output, 32, is pooled_projection_dim),
    one double and one single transformer block (2 heads of 8, rope axes 2 + 2 + 4),
    FLUX's VAE factors and FLUX's resolution-dependent scheduler. ``guidance_embeds=True`` is a
    guidance-distilled model like FLUX.1-dev; False, one like FLUX.1-schnell (true CFG).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * 4,  # 16 latent channels in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    # FLUX's VAE: 16 latent channels, shifted and scaled latents (FLUX's own factors).
    vae = _tiny_vae(
        latent_channels=16,
        sample_size=sample_size * 2,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    tokenizer_2 = build_t5_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_tiny_clip_text_config())
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    )
    # FLUX.1-dev's scheduler config: the shift follows the image's token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
