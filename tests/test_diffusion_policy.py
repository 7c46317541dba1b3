"""The SD policy on the built-in tiny random pipeline: re-scoring, matching loss, reference, saving."""

from __future__ import annotations

import pytest
import torch

from align_gen.builtins.tiny_diffusion import build_tiny_random_sd
from align_gen.config import LoraConfig, ModelConfig, SampleConfig
from align_gen.policies.diffusion import DiffusionPolicy

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red circle"]


def make_policy(*, lora: bool, guidance: float, steps: int = 4) -> DiffusionPolicy:
    return DiffusionPolicy(
        build_tiny_random_sd(),
        ModelConfig(lora=LoraConfig(enabled=lora, rank=4, alpha=4.0)),
        SampleConfig(num_steps=steps, guidance_scale=guidance, batch_size=len(PROMPTS)),
    )


def perturb(policy: DiffusionPolicy, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["no_cfg", "cfg"])
def test_rescoring_reproduces_sampling_log_probs(lora: bool, guidance: float) -> None:
    policy = make_policy(lora=lora, guidance=guidance)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert rollout.trajectory.shape == (4, 5, 4, 32, 32)
    assert rollout.log_probs.shape == (4, 4) and rollout.log_probs.dtype == torch.float32
    assert rollout.images.shape == (4, 3, 64, 64)
    assert 0 <= rollout.images.min() and rollout.images.max() <= 1

    shared = policy.step_log_prob(rollout, torch.arange(4))  # (B, T), all steps
    assert torch.allclose(shared, rollout.log_probs, atol=1e-5, rtol=0)
    ratio = torch.exp(shared - rollout.log_probs)
    assert (ratio - 1).abs().max() < 1e-5

    # Per-sample step indices (how DDPO visits steps) give each sample's own recorded value.
    steps = torch.tensor([[3, 0], [1, 2], [0, 3], [2, 1]])
    per_sample = policy.step_log_prob(rollout, steps)
    assert torch.allclose(per_sample, rollout.log_probs.gather(1, steps), atol=1e-5, rtol=0)


def test_step_log_prob_has_grad_and_changes_with_weights() -> None:
    policy = make_policy(lora=True, guidance=3.0)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    log_prob = policy.step_log_prob(rollout, torch.tensor([1]))
    log_prob.sum().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    perturb(policy)
    with torch.no_grad():
        assert not torch.allclose(policy.step_log_prob(rollout, torch.tensor([1])), log_prob.detach())


def test_sampling_is_reproducible_from_a_seed() -> None:
    policy = make_policy(lora=True, guidance=3.0)
    first = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(3))
    second = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(3))
    assert torch.equal(first.trajectory, second.trajectory)
    assert torch.equal(first.log_probs, second.log_probs)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reference_is_the_initial_model(lora: bool) -> None:
    policy = make_policy(lora=lora, guidance=3.0)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([0, 2])
    with torch.no_grad():
        before = policy.step_log_prob(rollout, steps)
        perturb(policy)
        moved = policy.step_log_prob(rollout, steps)
        with policy.reference():
            reference = policy.step_log_prob(rollout, steps)
        after = policy.step_log_prob(rollout, steps)
    assert not torch.allclose(moved, before, atol=1e-4)
    assert torch.allclose(reference, before, atol=1e-6)
    assert torch.allclose(after, moved, atol=1e-6)  # leaving the context restores the weights


def test_matching_loss_matches_a_hand_computation() -> None:
    policy = make_policy(lora=True, guidance=1.0)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 200, 500, 900])
    noise = torch.randn(rollout.final_samples.shape, generator=torch.Generator().manual_seed(1))
    loss = policy.matching_loss(rollout, t=t, noise=noise)
    assert loss.shape == (4,) and loss.requires_grad

    abar = policy.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * rollout.final_samples + (1 - abar).sqrt() * noise  # DDPM forward process
    with torch.no_grad():
        eps = policy.unet(noisy, t, rollout.conditioning["prompt_embeds"]).sample
    expected = (eps - noise).pow(2).mean(dim=(1, 2, 3))  # epsilon prediction target
    assert torch.allclose(loss.detach(), expected, atol=1e-5)


def test_saved_lora_loads_into_a_diffusers_pipeline(tmp_path) -> None:
    policy = make_policy(lora=True, guidance=1.0)
    perturb(policy)
    policy.save(tmp_path / "final")
    pipeline = build_tiny_random_sd()
    pipeline.load_lora_weights(str(tmp_path / "final"))
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    embeds = policy.encode_prompts(PROMPTS[:2])["prompt_embeds"]
    t = torch.tensor([500, 500])
    with torch.no_grad():
        ours = policy.unet(latents, t, embeds).sample
        theirs = pipeline.unet(latents, t, embeds).sample
        base = build_tiny_random_sd().unet(latents, t, embeds).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-4)


def test_saved_full_model_loads_with_from_pretrained(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    policy = make_policy(lora=False, guidance=1.0)
    perturb(policy)
    policy.save(tmp_path / "final")
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "final")
    for name, param in policy.unet.state_dict().items():
        assert torch.equal(param, pipeline.unet.state_dict()[name]), name


def test_text_to_image_policy_rejects_input_images() -> None:
    policy = make_policy(lora=True, guidance=1.0, steps=2)
    with pytest.raises(ValueError, match="no input images"):
        policy.sample(PROMPTS, images=torch.zeros(4, 3, 8, 8))


def test_v_prediction_models_like_sd2_rescore_and_match_on_velocity() -> None:
    from diffusers import DDIMScheduler

    pipeline = build_tiny_random_sd()
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, prediction_type="v_prediction")
    policy = DiffusionPolicy(
        pipeline, ModelConfig(lora=LoraConfig(enabled=True)), SampleConfig(num_steps=3, guidance_scale=2.0)
    )
    rollout = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(policy.step_log_prob(rollout, torch.arange(3)), rollout.log_probs, atol=1e-5, rtol=0)

    t = torch.tensor([100, 700])
    noise = torch.randn(rollout.final_samples.shape, generator=torch.Generator().manual_seed(1))
    abar = policy.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    clean = rollout.final_samples
    noisy = abar.sqrt() * clean + (1 - abar).sqrt() * noise
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * clean  # v = sqrt(abar) eps - sqrt(1-abar) x0
    with torch.no_grad():
        prediction = policy.unet(noisy, t, rollout.conditioning["prompt_embeds"]).sample
        loss = policy.matching_loss(rollout, t=t, noise=noise)
    assert torch.allclose(loss, (prediction - velocity).pow(2).mean(dim=(1, 2, 3)), atol=1e-5)
