"""The FLUX policy on the built-in tiny random pipeline: re-scoring with distilled guidance and
with true CFG, the masked last step, the ODE against FluxPipeline itself, the dynamic-shift grid,
the velocity matching loss through packed tokens, the reference, saving and build_policy."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from align_gen.builtins.tiny_diffusion import build_tiny_random_flux, build_tiny_random_sd3
from align_gen.config import LoraConfig, ModelConfig, SampleConfig
from align_gen.errors import ConfigError
from align_gen.policies import build_policy
from align_gen.policies.flow import FlowPolicy
from align_gen.policies.flux import FluxPolicy

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red circle"]
pytestmark = pytest.mark.usefixtures("single_thread")

# (guidance_embeds, guidance_scale): FLUX.1-dev-like distilled guidance; a model without the
# guidance embedding (FLUX.1-schnell-like) unguided and with true CFG.
GUIDANCE = {"distilled": (True, 3.5), "no_cfg": (False, 1.0), "true_cfg": (False, 3.0)}


def make_policy(
    *,
    lora: bool,
    guidance: float,
    embedded: bool = True,
    steps: int = 4,
    noise_level: float = 0.7,
    resolution: int | None = None,
) -> FluxPolicy:
    return FluxPolicy(
        build_tiny_random_flux(guidance_embeds=embedded),
        ModelConfig(pretrained="align-gen:tiny-random-flux", lora=LoraConfig(enabled=lora, rank=4, alpha=4.0)),
        SampleConfig(
            num_steps=steps,
            guidance_scale=guidance,
            batch_size=len(PROMPTS),
            noise_level=noise_level,
            resolution=resolution,
        ),
    )


def perturb(policy: FluxPolicy, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def transformer_inputs(policy: FluxPolicy, latents: torch.Tensor, sigma: torch.Tensor, conditioning: dict) -> dict:
    """The FluxTransformer2DModel call FluxPipeline makes, written out by hand."""
    batch, channels, height, width = latents.shape
    embeds = conditioning["prompt_embeds"]
    return {
        "hidden_states": FluxPipeline._pack_latents(latents, batch, channels, height, width),
        "timestep": sigma,
        "guidance": torch.full((batch,), policy.sample_config.guidance_scale) if policy.guidance_embedded else None,
        "pooled_projections": conditioning["pooled_prompt_embeds"],
        "encoder_hidden_states": embeds,
        "txt_ids": torch.zeros(embeds.shape[1], 3),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32),
    }


def unpack(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, side^2 / 4, 4C) packed tokens -> (B, C, side, side) latents (VAE factor 2)."""
    return FluxPipeline._unpack_latents(tokens, side * 2, side * 2, 2)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("guidance", list(GUIDANCE))
def test_rescoring_reproduces_sampling_log_probs(lora: bool, guidance: str) -> None:
    embedded, scale = GUIDANCE[guidance]
    policy = make_policy(lora=lora, guidance=scale, embedded=embedded)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert rollout.trajectory.shape == (4, 5, 16, 32, 32)  # unpacked latents throughout
    assert rollout.timesteps.shape == (4, 4) and rollout.timesteps[0, 0] == 1000  # sigma * N
    assert rollout.log_probs.shape == (4, 4) and rollout.log_probs.dtype == torch.float32
    assert rollout.step_mask[:, :-1].all() and not rollout.step_mask[:, -1].any()  # last step excluded
    assert rollout.images.shape == (4, 3, 64, 64)
    assert 0 <= rollout.images.min() and rollout.images.max() <= 1
    assert ("negative_prompt_embeds" in rollout.conditioning) == (guidance == "true_cfg")

    rescored = policy.step_log_prob(rollout, torch.arange(4))  # (B, T), all steps
    assert (torch.exp(rescored - rollout.log_probs) - 1).abs().max() < 1e-5
    steps = torch.tensor([[3, 0], [1, 2], [0, 3], [2, 1]])  # per-sample steps, as DDPO visits them
    per_sample = policy.step_log_prob(rollout, steps)
    assert (torch.exp(per_sample - rollout.log_probs.gather(1, steps)) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("embedded", [True, False], ids=["distilled", "true_cfg"])
def test_step_log_prob_has_grad_and_guidance_changes_the_trajectory(embedded: bool) -> None:
    policy = make_policy(lora=True, guidance=3.0, embedded=embedded)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    policy.step_log_prob(rollout, torch.tensor([1])).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    other = make_policy(lora=True, guidance=1.0, embedded=embedded)
    unguided = other.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(unguided.trajectory[:, -1], rollout.trajectory[:, -1])


@pytest.mark.parametrize("guidance", ["distilled", "true_cfg"])
def test_the_ode_is_flux_pipelines_own_sampler(guidance: str) -> None:
    """noise_level = 0: nothing to train, and the final latents are FluxPipeline's, from the same
    initial noise, prompts and guidance (distilled ``guidance_scale`` or ``true_cfg_scale``)."""
    embedded, scale = GUIDANCE[guidance]
    policy = make_policy(lora=True, guidance=scale, embedded=embedded, noise_level=0.0)
    rollout = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    assert not rollout.step_mask.any() and not rollout.log_probs.any()

    noise = rollout.trajectory[:, 0]
    extra = {"guidance_scale": scale} if embedded else {"true_cfg_scale": scale, "negative_prompt": ""}
    with torch.no_grad():
        theirs = policy.pipeline(
            PROMPTS[:2],
            height=64,
            width=64,
            num_inference_steps=4,
            latents=FluxPipeline._pack_latents(noise, 2, 16, 32, 32),
            max_sequence_length=policy.max_sequence_length,
            output_type="latent",
            **extra,
        ).images
    assert torch.allclose(unpack(theirs, 32), rollout.trajectory[:, -1], atol=1e-5)


@pytest.mark.parametrize(("resolution", "steps"), [(32, 3), (64, 4), (128, 6)])
def test_dynamic_shift_grid_is_the_pipelines_for_the_resolution(resolution: int, steps: int) -> None:
    """mu grows with the image's token count ((resolution / 4)^2 here): FluxPipeline's call at
    that size leaves its scheduler on the very grid the policy samples on."""
    policy = make_policy(lora=True, guidance=3.5, steps=steps, resolution=resolution)
    pipeline = policy.pipeline
    with torch.no_grad():
        pipeline(
            "a red circle",
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            max_sequence_length=policy.max_sequence_length,
            output_type="latent",
        )
    assert torch.equal(policy.scheduler.timesteps, pipeline.scheduler.timesteps)
    assert torch.equal(policy.scheduler.sigmas, pipeline.scheduler.sigmas)
    assert policy.scheduler.sigmas[0] == 1 and policy.scheduler.sigmas[-1] == 0
    rollout = policy.sample(PROMPTS[:1], generator=torch.Generator().manual_seed(0))
    assert rollout.images.shape == (1, 3, resolution, resolution)


def test_resolution_must_pack_into_patches_and_sd3_still_refuses_dynamic_shifting() -> None:
    with pytest.raises(ConfigError, match="multiple of 4"):
        make_policy(lora=True, guidance=3.5, resolution=66)
    sd3 = build_tiny_random_sd3()
    sd3.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ConfigError, match="dynamic"):
        FlowPolicy(sd3, ModelConfig(pretrained="align-gen:tiny-random-sd3"), SampleConfig(num_steps=2))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reference_is_the_initial_model(lora: bool) -> None:
    policy = make_policy(lora=lora, guidance=3.5)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([0, 2])
    with torch.no_grad():
        before = policy.step_log_prob(rollout, steps)
        perturb(policy, scale=0.5)  # the tiny transformer's log-probs move little per weight
        moved = policy.step_log_prob(rollout, steps)
        with policy.reference():
            reference = policy.step_log_prob(rollout, steps)
        after = policy.step_log_prob(rollout, steps)
    assert not torch.allclose(moved, before, atol=1e-4)
    assert torch.allclose(reference, before, atol=1e-6)
    assert torch.allclose(after, moved, atol=1e-6)  # leaving the context restores the weights


@pytest.mark.parametrize("embedded", [True, False], ids=["distilled", "undistilled"])
def test_matching_loss_matches_a_hand_computation(embedded: bool) -> None:
    """x_s = (1 - s) x0 + s eps with s = t / 1000, packed into 2x2 tokens; the transformer's
    velocity at sigma s (with the distilled guidance, if any), unpacked; target eps - x0;
    loss = mean (v - target)^2 over (C, h, w)."""
    policy = make_policy(lora=True, guidance=3.5 if embedded else 1.0, embedded=embedded)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 250.0, 500.0, 900.0])
    noise = torch.randn(rollout.final_samples.shape, generator=torch.Generator().manual_seed(1))
    loss = policy.matching_loss(rollout, t=t, noise=noise)
    assert loss.shape == (4,) and loss.requires_grad

    x0 = rollout.final_samples  # (4, 16, 32, 32)
    s = (t / 1000).view(-1, 1, 1, 1)
    with torch.no_grad():
        inputs = transformer_inputs(policy, (1 - s) * x0 + s * noise, t / 1000, rollout.conditioning)
        velocity = unpack(policy.transformer(**inputs).sample, 32)
    expected = (velocity - (noise - x0)).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss.detach(), expected, atol=1e-6)

    terms = policy.matching_terms(rollout, t=t, noise=noise)
    assert torch.allclose(terms.loss.detach(), expected, atol=1e-6)
    assert torch.allclose(terms.reference_loss[0], expected, atol=1e-6)
    assert torch.allclose(terms.divergence, torch.zeros(1, 4), atol=1e-10)  # LoRA B = 0: still the reference


def test_saved_lora_loads_into_a_flux_pipeline(tmp_path) -> None:
    policy = make_policy(lora=True, guidance=3.5)
    perturb(policy)
    policy.save(tmp_path / "final")
    assert (tmp_path / "final" / "align_gen_model.json").is_file()
    pipeline = build_tiny_random_flux()
    pipeline.load_lora_weights(str(tmp_path / "final"))
    latents = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs = transformer_inputs(policy, latents, torch.tensor([0.5, 0.5]), policy.encode_prompts(PROMPTS[:2]))
    with torch.no_grad():
        ours = policy.transformer(**inputs).sample
        theirs = pipeline.transformer(**inputs).sample
        base = build_tiny_random_flux().transformer(**inputs).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-4)


def test_saved_full_model_loads_with_from_pretrained(tmp_path) -> None:
    """The whole pipeline folder, the in-process T5 tokenizer included, loads back."""
    policy = make_policy(lora=False, guidance=3.5, steps=2)
    perturb(policy)
    policy.save(tmp_path / "final")
    pipeline = FluxPipeline.from_pretrained(tmp_path / "final")
    assert pipeline.tokenizer_2("a red circle").input_ids == policy.pipeline.tokenizer_2("a red circle").input_ids
    reloaded = FluxPolicy(
        pipeline, policy.model_config, policy.sample_config, trainable=False
    ).sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    original = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(reloaded.trajectory, original.trajectory, atol=1e-5)


def test_build_policy_picks_flux_from_the_pipeline() -> None:
    policy = build_policy(ModelConfig(pretrained="align-gen:tiny-random-flux"), SampleConfig(num_steps=2))
    assert isinstance(policy, FluxPolicy) and policy.guidance_embedded and policy.resolution == 64
