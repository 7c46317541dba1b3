"""The tiny world's text-to-image model: a VAE and a latent UNet in Stable Diffusion 1.x's format.

:func:`train_vae` trains a diffusers ``AutoencoderKL`` (32 x 32 x 3 images <-> 16 x 16 x 4
latents, one downsampling) with an L1 reconstruction loss and a small KL term, then sets its
``scaling_factor`` to 1 / std of the latents as SD did. :func:`train_unet` trains a
``UNet2DConditionModel`` on those latents with SD's objective: epsilon prediction on SD's noise
schedule (scaled-linear betas 0.00085..0.012 over 1000 steps), conditioned on the frozen world
CLIP text tower's last hidden state, with captions dropped to ``""`` so classifier-free
guidance works. :func:`assemble_pipeline` puts them together with the world CLIP's text tower
into a ``StableDiffusionPipeline``, which align-gen's ``DiffusionPolicy`` runs unchanged.

Simplifications against SD: no perceptual or adversarial VAE loss (the world's flat-coloured
shapes reconstruct well from L1 alone), no EMA of the UNet weights (the learning rate decays to
zero instead), and min-SNR loss weighting (Hang et al., 2023) to converge in fewer steps.
Training style follows :mod:`align_gen.world.clip`: frozen configs whose defaults are what ships,
each step's data drawn from a generator seeded by (seed, step), resumable from a ``state``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from align_gen.world import clip, shapes
from align_gen.world.training import OnStep, resume, warmup_cosine

# Stable Diffusion 1.x's noise schedule (its scheduler_config.json).
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@dataclasses.dataclass(frozen=True)
class VaeTrainConfig:
    """How the world's VAE is trained (the defaults are what ships)."""

    # Measured: 27.2 dB held-out PSNR after 800 steps (205 s on one thread of a busy 2-core CPU);
    # 400 steps at batch 32 and lr 1e-3 gave 22.0 dB in the same time.
    steps: int = 800
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    seed: int = 0
    # Encoder / decoder widths per level: two levels give one 2x downsampling (32 px -> 16).
    block_out_channels: tuple[int, ...] = (32, 48)
    layers_per_block: int = 1
    norm_groups: int = 8  # must divide every width
    latent_channels: int = 4
    # Weight of the KL to N(0, 1), per latent element, against the per-pixel L1 loss (in [-1, 1]
    # units). Small: it only keeps the latents bounded; scaling_factor normalises their spread.
    kl_weight: float = 1e-5
    scale_images: int = 512  # training images whose latents set scaling_factor


@dataclasses.dataclass(frozen=True)
class UnetTrainConfig:
    """How the world's denoising UNet is trained (the defaults are what ships)."""

    # Measured at this size: 1.74M parameters (3.3 MB float16), 0.35 s a step at batch 32 with
    # data, VAE and text encoding (one thread of a busy 2-core CPU): 4000 steps in ~23 min.
    steps: int = 4000
    batch_size: int = 32
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    seed: int = 0
    # Widths per level on the 16 x 16 latents (16, 8, 4 px); cross-attention only where True:
    # at 16 x 16 it made a step ~50% slower (measured on a (64, 128) UNet).
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    cross_attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    attention_heads: int = 4  # diffusers' SD1 ``attention_head_dim`` (a head count for SD1)
    norm_groups: int = 16  # must divide every width
    caption_dropout: float = 0.1  # chance a caption is replaced by "" (the CFG negative prompt)
    snr_gamma: float | None = 5.0  # min-SNR-gamma loss weighting; None: plain MSE as in SD


# --- the VAE -------------------------------------------------------------------------------------

def build_vae(config: VaeTrainConfig) -> torch.nn.Module:
    """A randomly initialised ``AutoencoderKL`` of the world's size (seeded by ``config.seed``)."""
    from diffusers import AutoencoderKL

    levels = len(config.block_out_channels)
    torch.manual_seed(config.seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        sample_size=shapes.IMAGE_SIZE,
    )


def vae_loss(vae, images: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    """L1 reconstruction of a posterior sample plus ``kl_weight`` x the mean KL per latent element.

    Args:
        images: (B, 3, H, W) in [-1, 1].
    """
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample(generator=generator)  # (B, C, H/f, W/f)
    reconstruction = vae.decode(latents).sample  # (B, 3, H, W)
    kl = posterior.kl() / latents[0].numel()  # (B,) mean over latent elements
    return (reconstruction - images).abs().mean() + kl_weight * kl.mean()


def train_vae(
    config: VaeTrainConfig, world: shapes.ShapesWorld, state: dict | None = None, on_step: OnStep | None = None
) -> torch.nn.Module:
    """Trains the world's ``AutoencoderKL`` from scratch, or from ``state`` (``model``,
    ``optimizer`` and ``step`` saved by a caller's ``on_step``), calling
    ``on_step(step, loss, model, optimizer)`` after each step; then sets its ``scaling_factor``
    (:func:`latent_scaling_factor`). Each step's batch and posterior noise come from generators
    seeded by (seed, step), so a resumed run sees the same data."""
    vae = build_vae(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    start = resume(vae, optimizer, state)
    schedule = warmup_cosine(optimizer, config.steps, config.warmup_steps, start)
    vae.train()
    for step in range(start, config.steps):
        rng = np.random.default_rng([config.seed, step])
        images, _, _ = world.batch(config.batch_size, "train", rng)
        loss = vae_loss(vae, images * 2 - 1, config.kl_weight, _torch_generator(rng))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step + 1, loss.item(), vae, optimizer)
    vae.eval()
    images, _, _ = world.dataset(config.scale_images, "train")
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, images))
    return vae


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor) -> float:
    """1 / std of the posterior means of (B, 3, H, W) ``images`` in [0, 1]: the factor that gives
    the diffusion model unit-variance latents (SD1's 0.18215 was found the same way)."""
    return 1.0 / _encode_mean(vae, images).std().item()


@torch.no_grad()
def vae_psnr(vae, world: shapes.ShapesWorld, n: int = 256) -> float:
    """PSNR in dB of ``n`` held-out images reconstructed through the posterior mean (one MSE over
    all pixels, images in [0, 1])."""
    images, _, _ = world.dataset(n, "heldout")
    squared_error = 0.0
    for chunk in images.split(64):
        reconstruction = vae.decode(_encode_mean(vae, chunk)).sample.add(1).div(2).clamp(0, 1)
        squared_error += (reconstruction - chunk).pow(2).sum().item()
    return 10 * math.log10(images.numel() / squared_error)


def _encode_mean(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, C, H/f, W/f) unscaled posterior means of (B, 3, H, W) images in [0, 1]."""
    parameter = next(vae.parameters())
    return vae.encode((images * 2 - 1).to(parameter)).latent_dist.mean.float()


# --- the UNet ------------------------------------------------------------------------------------

def build_unet(config: UnetTrainConfig, cross_attention_dim: int) -> torch.nn.Module:
    """A randomly initialised SD1-style ``UNet2DConditionModel`` on 16 x 16 x 4 latents."""
    from diffusers import UNet2DConditionModel

    if len(config.cross_attention) != len(config.block_out_channels):
        raise ValueError(
            f"cross_attention {config.cross_attention} needs one entry per level of "
            f"block_out_channels {config.block_out_channels}"
        )
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.cross_attention))
    torch.manual_seed(config.seed)
    return UNet2DConditionModel(
        sample_size=shapes.IMAGE_SIZE // 2,  # the VAE's one downsampling
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=config.attention_heads,
        norm_num_groups=config.norm_groups,
    )


def noise_scheduler():
    """SD1's training scheduler: DDPM, scaled-linear betas 0.00085..0.012, 1000 steps, epsilon."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_SCHEDULE, prediction_type="epsilon", clip_sample=False)


def drop_captions(captions: Sequence[str], probability: float, rng: np.random.Generator) -> list[str]:
    """``captions`` with each replaced by ``""`` (the pipeline's default negative prompt) with
    ``probability``, so one model learns the conditional and unconditional predictions."""
    dropped = rng.random(len(captions)) < probability
    return ["" if drop else caption for caption, drop in zip(captions, dropped, strict=True)]


@torch.no_grad()
def encode_text(text_encoder, tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """(B, L, D) last hidden states, tokenised exactly as ``StableDiffusionPipeline`` and
    ``DiffusionPolicy`` do (padded to ``model_max_length``, no attention mask)."""
    ids = tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def denoising_loss(unet, scheduler, latents: torch.Tensor, text: torch.Tensor, generator: torch.Generator,
                   snr_gamma: float | None) -> torch.Tensor:
    """SD's epsilon-prediction loss at uniform timesteps, optionally min-SNR-gamma weighted.

    Args:
        latents: (B, 4, h, w) scaled clean latents x0.
        text: (B, L, D) text-encoder hidden states.
    """
    batch = latents.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)  # (B,)
    noise = torch.randn(latents.shape, generator=generator)  # (B, 4, h, w) epsilon
    noisy = scheduler.add_noise(latents, noise, t)  # sqrt(a_t) x0 + sqrt(1 - a_t) eps
    prediction = unet(noisy, t, text).sample  # (B, 4, h, w)
    per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        alpha_bar = scheduler.alphas_cumprod[t]  # (B,)
        snr = alpha_bar / (1 - alpha_bar)  # (B,)
        per_sample = per_sample * snr.clamp(max=snr_gamma) / snr  # epsilon target: min(SNR, g) / SNR
    return per_sample.mean()


def train_unet(
    config: UnetTrainConfig,
    world: shapes.ShapesWorld,
    vae,
    text_encoder,
    tokenizer,
    state: dict | None = None,
    on_step: OnStep | None = None,
) -> torch.nn.Module:
    """Trains the world's ``UNet2DConditionModel`` on the frozen ``vae``'s scaled posterior means
    and the frozen ``text_encoder``'s hidden states, from scratch or from ``state`` (as
    :func:`train_vae`), calling ``on_step(step, loss, model, optimizer)`` after each step. Each
    step's images, caption dropout, timesteps and noise come from generators seeded by
    (seed, step)."""
    unet = build_unet(config, cross_attention_dim=text_encoder.config.hidden_size)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0)
    start = resume(unet, optimizer, state)
    schedule = warmup_cosine(optimizer, config.steps, config.warmup_steps, start)
    scheduler = noise_scheduler()
    vae.eval()
    text_encoder.eval()
    unet.train()
    for step in range(start, config.steps):
        loss = world_batch_loss(unet, vae, text_encoder, tokenizer, scheduler, world, config,
                                np.random.default_rng([config.seed, step]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step + 1, loss.item(), unet, optimizer)
    unet.eval()
    return unet


# --- shared training pieces ----------------------------------------------------------------------

def world_batch_loss(unet, vae, text_encoder, tokenizer, scheduler, world: shapes.ShapesWorld, config: UnetTrainConfig,
                     rng: np.random.Generator) -> torch.Tensor:
    """The denoising loss of one training batch: ``config.batch_size`` scenes of the world's
    train split drawn from ``rng`` (which also draws the dropped captions, timesteps and noise),
    encoded by the frozen ``vae`` and ``text_encoder``."""
    images, captions, _ = world.batch(config.batch_size, "train", rng)
    text = encode_text(text_encoder, tokenizer, drop_captions(captions, config.caption_dropout, rng)).float()
    with torch.no_grad():
        latents = _encode_mean(vae, images) * vae.config.scaling_factor  # (B, 4, 16, 16)
    return denoising_loss(unet, scheduler, latents, text, _torch_generator(rng), config.snr_gamma)


def _torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A torch generator seeded from ``rng`` (so torch draws follow the step's seed too)."""
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


# --- the pipeline --------------------------------------------------------------------------------

def load_text_encoder(clip_folder: str | Path):
    """(CLIPTextModel in float32, tokenizer) from a world CLIP folder (a full ``CLIPModel``
    checkpoint: its ``text_model`` weights load into the text tower, the rest is unused)."""
    from transformers import AutoTokenizer, CLIPTextModel
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the vision tower's weights are "unexpected" here, by design
    try:
        text_encoder = CLIPTextModel.from_pretrained(clip_folder, dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    return text_encoder.eval(), AutoTokenizer.from_pretrained(clip_folder)


def sd_ddim_scheduler():
    """DDIM on SD1's schedule, with SD1's sampling config (no clipping, steps_offset 1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def assemble_pipeline(vae, unet, clip_folder: str | Path):
    """A ``StableDiffusionPipeline`` of the trained ``vae`` and ``unet`` and the world CLIP's
    text tower and tokenizer from ``clip_folder``, with no safety checker."""
    from diffusers import StableDiffusionPipeline

    text_encoder, tokenizer = load_text_encoder(clip_folder)
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(
            f"the UNet attends to {unet.config.cross_attention_dim}-wide text states but the CLIP in "
            f"{clip_folder} has hidden size {text_encoder.config.hidden_size}; train the UNet on this CLIP"
        )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipeline, folder: Path) -> None:
    """A diffusers folder in float16 safetensors (``StableDiffusionPipeline.from_pretrained``);
    ``pipeline`` itself is left as it was.

    The text encoder's config is marked float32: diffusers loads its own models in float32 when
    no ``torch_dtype`` is given, but transformers' default (``dtype="auto"``) would load the text
    encoder in its stored float16, and the plain ``from_pretrained(folder)`` pipeline would then
    mix dtypes and fail in the UNet."""
    from diffusers.utils import logging

    folder.mkdir(parents=True, exist_ok=True)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # .to(float16) warns about modules kept in float32: there are none
    try:
        copy.deepcopy(pipeline).to(dtype=torch.float16).save_pretrained(folder, safe_serialization=True)
    finally:
        logging.set_verbosity(verbosity)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- quality -------------------------------------------------------------------------------------

@torch.no_grad()
def prompt_alignment(
    pipeline_or_policy,
    clip_model,
    clip_tokenizer,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
) -> dict[str, float]:
    """World-CLIP agreement of samples with their prompts: one image per (seed, prompt).

    Returns ``matched`` (mean cosine of each image with its own prompt), ``shuffled`` (mean cosine
    with every other distinct prompt of the set: a random shuffle's expected score), their
    ``gap`` and ``retrieval`` (share of images whose own prompt scores highest among the distinct
    prompts). A ``DiffusionPolicy`` samples with its own sample config; a pipeline with DDIM
    ``num_steps`` and ``guidance_scale``.
    """
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < 2:
        raise ValueError("prompt_alignment needs at least two distinct prompts to compare against")
    images = torch.cat([_sample(pipeline_or_policy, list(prompts), seed, num_steps, guidance_scale) for seed in seeds])
    own = torch.tensor([distinct.index(p) for p in prompts] * len(seeds))  # (N,)
    image_features, text_features = clip.embed(clip_model, clip_tokenizer, images=images, captions=distinct)
    cosine = image_features @ text_features.T  # (N, P)
    matched = cosine.gather(1, own[:, None]).squeeze(1)  # (N,)
    others = (cosine.sum(dim=1) - matched) / (len(distinct) - 1)  # (N,)
    return {
        "matched": matched.mean().item(),
        "shuffled": others.mean().item(),
        "gap": (matched - others).mean().item(),
        "retrieval": (cosine.argmax(dim=1) == own).float().mean().item(),
    }


def _sample(pipeline_or_policy, prompts: list[str], seed: int, num_steps: int, guidance_scale: float) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] for ``prompts`` from noise seeded by ``seed``."""
    from diffusers import DiffusionPipeline

    if not isinstance(pipeline_or_policy, DiffusionPipeline):  # a policy
        generator = torch.Generator(pipeline_or_policy.device).manual_seed(seed)
        return pipeline_or_policy.sample(prompts, generator=generator).images.float().cpu()
    pipeline = pipeline_or_policy
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    output = pipeline(
        prompts, num_inference_steps=num_steps, guidance_scale=guidance_scale, generator=generator, output_type="pt"
    )
    return output.images.float().cpu()
