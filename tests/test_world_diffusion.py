"""The tiny world's VAE and UNet training (tiny sizes, a few steps) and the Stable Diffusion
pipeline they make: shapes, resuming, the data-derived latent scale, saving and loading through
diffusers and align-gen's DiffusionPolicy, and the caption dropout that CFG relies on."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from align_gen.world import clip, shapes
from align_gen.world import diffusion as world_diffusion

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_CLIP = clip.ClipTrainConfig(hidden_size=32, text_layers=1, vision_layers=1, heads=2, projection_dim=32)
TINY_VAE = world_diffusion.VaeTrainConfig(
    steps=3, batch_size=4, warmup_steps=1, block_out_channels=(8, 16), norm_groups=4, scale_images=16
)
TINY_UNET = world_diffusion.UnetTrainConfig(
    steps=3, batch_size=4, warmup_steps=1, block_out_channels=(8, 16, 16), norm_groups=4, attention_heads=2
)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised world CLIP saved as the clip stage saves it."""
    tokenizer = clip.build_tokenizer()
    folder = tmp_path_factory.mktemp("world") / "clip"
    clip.save_clip(clip.build_clip(TINY_CLIP, tokenizer), tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def trained(clip_folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(vae, unet) after a few tiny training steps."""
    torch.set_num_threads(1)
    world = shapes.ShapesWorld(0)
    vae = world_diffusion.train_vae(TINY_VAE, world)
    text_encoder, tokenizer = world_diffusion.load_text_encoder(clip_folder)
    return vae, world_diffusion.train_unet(TINY_UNET, world, vae, text_encoder, tokenizer)


def resumed_equals_straight(train, config) -> None:
    """Training ``config.steps`` straight through equals training 2 steps, then resuming."""
    straight = train(config, None, None)
    saved = {}

    def on_step(step: int, loss: float, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step == 2:
            saved.update(model={k: v.clone() for k, v in model.state_dict().items()}, step=step)
            saved["optimizer"] = optimizer.state_dict()

    train(dataclasses.replace(config, steps=2), None, on_step)
    steps_after_resuming = []
    resumed = train(config, saved, lambda step, *_: steps_after_resuming.append(step))
    assert steps_after_resuming == list(range(3, config.steps + 1))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_vae_maps_32px_images_to_16px_latents_with_a_scale_from_the_data(trained) -> None:
    vae, _ = trained
    images, _, _ = shapes.ShapesWorld(0).dataset(TINY_VAE.scale_images, "train")
    with torch.no_grad():
        means = vae.encode(images * 2 - 1).latent_dist.mean
        decoded = vae.decode(means).sample
    assert means.shape == (TINY_VAE.scale_images, 4, 16, 16) and decoded.shape == images.shape
    assert vae.config.scaling_factor == pytest.approx(1 / means.std().item(), rel=1e-5)
    assert math.isfinite(world_diffusion.vae_psnr(vae, shapes.ShapesWorld(0), n=8))


def test_unet_predicts_latent_noise_conditioned_on_the_clip_text_states(trained, clip_folder: Path) -> None:
    _, unet = trained
    text_encoder, tokenizer = world_diffusion.load_text_encoder(clip_folder)
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == TINY_CLIP.hidden_size
    assert unet.config.sample_size == 16 and unet.config.in_channels == unet.config.out_channels == 4
    text = world_diffusion.encode_text(text_encoder, tokenizer, ["a red circle", ""])
    assert text.shape == (2, clip.CONTEXT_LENGTH, TINY_CLIP.hidden_size)
    with torch.no_grad():
        output = unet(torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), text).sample
    assert output.shape == (2, 4, 16, 16)


def test_resumed_vae_training_equals_an_uninterrupted_run() -> None:
    world = shapes.ShapesWorld(0)
    resumed_equals_straight(lambda config, state, on_step: world_diffusion.train_vae(config, world, state, on_step), TINY_VAE)


def test_resumed_unet_training_equals_an_uninterrupted_run(trained, clip_folder: Path) -> None:
    vae, _ = trained
    world = shapes.ShapesWorld(0)
    text_encoder, tokenizer = world_diffusion.load_text_encoder(clip_folder)

    def train(config, state, on_step):
        return world_diffusion.train_unet(config, world, vae, text_encoder, tokenizer, state, on_step)

    resumed_equals_straight(train, TINY_UNET)


def test_text_encoder_is_the_world_clips_text_tower(clip_folder: Path) -> None:
    from transformers import CLIPModel

    clip_model = CLIPModel.from_pretrained(clip_folder, dtype=torch.float32)
    text_encoder, tokenizer = world_diffusion.load_text_encoder(clip_folder)
    assert text_encoder.dtype == torch.float32 and tokenizer.model_max_length == clip.CONTEXT_LENGTH
    expected = clip_model.text_model.state_dict()
    for name, weight in text_encoder.state_dict().items():
        torch.testing.assert_close(weight, expected[name.removeprefix("text_model.")], rtol=0, atol=0, msg=name)


def test_saved_pipeline_loads_in_diffusers_and_samples_through_the_diffusion_policy(
    trained, clip_folder: Path, tmp_path: Path
) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    from align_gen.config import ModelConfig, SampleConfig
    from align_gen.policies import build_policy
    from align_gen.policies.diffusion import DiffusionPolicy

    vae, unet = trained
    pipeline = world_diffusion.assemble_pipeline(vae, unet, clip_folder)
    world_diffusion.save_pipeline(pipeline, tmp_path / "sd")
    assert pipeline.unet.dtype == torch.float32  # saving leaves the pipeline as it was
    stored = load_file(tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {weight.dtype for weight in stored.values()} == {torch.float16}

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert isinstance(loaded.scheduler, DDIMScheduler) and loaded.scheduler.config.steps_offset == 1
    assert loaded.vae.config.scaling_factor == pytest.approx(vae.config.scaling_factor)
    images = loaded(["a red circle"], num_inference_steps=2, guidance_scale=3.0, output_type="pt").images
    assert images.shape == (1, 3, 32, 32)

    policy = build_policy(
        ModelConfig(pretrained=str(tmp_path / "sd")), SampleConfig(num_steps=10, guidance_scale=3.0, resolution=32), "cpu"
    )
    assert isinstance(policy, DiffusionPolicy) and policy.resolution == 32
    rollout = policy.sample(["a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0))
    assert rollout.images.shape == (2, 3, 32, 32) and rollout.log_probs.shape == (2, 10)
    assert torch.isfinite(rollout.log_probs).all()


def test_caption_dropout_trains_the_unconditional_branch_on_the_pipelines_negative_prompt(
    trained, clip_folder: Path
) -> None:
    import numpy as np

    from align_gen.config import SampleConfig

    captions = ["a red circle"] * 1000
    dropped = world_diffusion.drop_captions(captions, 0.1, np.random.default_rng(0))
    assert set(dropped) == {"", "a red circle"} and 70 < dropped.count("") < 130
    assert world_diffusion.drop_captions(captions[:5], 0.0, np.random.default_rng(0)) == captions[:5]
    # The pipeline's and the policy's unconditional branch encodes "" to the same states.
    vae, unet = trained
    pipeline = world_diffusion.assemble_pipeline(vae, unet, clip_folder)
    assert SampleConfig().negative_prompt == ""
    _, negative = pipeline.encode_prompt(["a red circle"], "cpu", 1, True, negative_prompt=None)
    trained_on = world_diffusion.encode_text(pipeline.text_encoder, pipeline.tokenizer, [""])
    torch.testing.assert_close(negative, trained_on, rtol=0, atol=0)
    tokenizer = pipeline.tokenizer
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length).input_ids[0]
    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.eos_token_id] and set(ids[2:]) == {tokenizer.pad_token_id}


def test_prompt_alignment_scores_samples_against_own_and_other_prompts(trained, clip_folder: Path) -> None:
    from transformers import AutoTokenizer, CLIPModel

    vae, unet = trained
    pipeline = world_diffusion.assemble_pipeline(vae, unet, clip_folder)
    clip_model = CLIPModel.from_pretrained(clip_folder, dtype=torch.float32).eval()
    clip_tokenizer = AutoTokenizer.from_pretrained(clip_folder)
    prompts = ["a large red circle", "two blue squares", "a green square above a red circle"]
    scores = world_diffusion.prompt_alignment(pipeline, clip_model, clip_tokenizer, prompts, [0, 1], num_steps=2)
    assert set(scores) == {"matched", "shuffled", "gap", "retrieval"}
    assert -1 <= scores["matched"] <= 1 and -1 <= scores["shuffled"] <= 1 and 0 <= scores["retrieval"] <= 1
    assert scores["gap"] == pytest.approx(scores["matched"] - scores["shuffled"], abs=1e-6)
    with pytest.raises(ValueError, match="two distinct prompts"):
        world_diffusion.prompt_alignment(pipeline, clip_model, clip_tokenizer, ["a", "a"], [0])


def test_unet_refuses_a_clip_of_another_width(trained, tmp_path: Path) -> None:
    tokenizer = clip.build_tokenizer()
    wider = dataclasses.replace(TINY_CLIP, hidden_size=48, projection_dim=48)
    clip.save_clip(clip.build_clip(wider, tokenizer), tokenizer, tmp_path / "clip")
    with pytest.raises(ValueError, match="hidden size 48"):
        world_diffusion.assemble_pipeline(*trained, tmp_path / "clip")


def test_shipped_configs_fit_the_size_budget() -> None:
    """The shipped VAE stays under 1 MB and the UNet under 4 MB in float16."""
    vae = world_diffusion.build_vae(world_diffusion.VaeTrainConfig())
    unet = world_diffusion.build_unet(world_diffusion.UnetTrainConfig(), cross_attention_dim=clip.ClipTrainConfig().hidden_size)
    assert 2 * sum(p.numel() for p in vae.parameters()) < 2**20
    assert 2 * sum(p.numel() for p in unet.parameters()) < 4 * 2**20
    json.dumps(dataclasses.asdict(world_diffusion.UnetTrainConfig()))  # a manifest can record it
