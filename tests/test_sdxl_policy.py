"""The SDXL policy on the built-in tiny random SDXL pipeline: added conditioning, re-scoring,
matching loss and saving LoRA weights that diffusers loads back."""

from __future__ import annotations

import pytest
import torch

from align_gen.builtins.tiny_diffusion import build_tiny_random_sdxl
from align_gen.config import LoraConfig, ModelConfig, SampleConfig
from align_gen.policies import build_policy
from align_gen.policies.diffusion import SDXLPolicy

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red circle"]

# What SDXL conditions on (each with a "negative_" twin under guidance).
CONDITIONING_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids")


def make_policy(*, lora: bool, guidance: float, steps: int = 3) -> SDXLPolicy:
    return SDXLPolicy(
        build_tiny_random_sdxl(),
        ModelConfig(pretrained="align-gen:tiny-random-sdxl", lora=LoraConfig(enabled=lora, rank=4, alpha=4.0)),
        SampleConfig(num_steps=steps, guidance_scale=guidance, batch_size=len(PROMPTS)),
    )


def perturb(policy: SDXLPolicy, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def added_conditioning(conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"text_embeds": conditioning["pooled_prompt_embeds"], "time_ids": conditioning["add_time_ids"]}


@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["no_cfg", "cfg"])
def test_rescoring_reproduces_sampling_log_probs(guidance: float) -> None:
    policy = make_policy(lora=True, guidance=guidance)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert rollout.trajectory.shape == (4, 4, 4, 32, 32)
    assert rollout.images.shape == (4, 3, 64, 64)

    rescored = policy.step_log_prob(rollout, torch.arange(3))
    assert (torch.exp(rescored - rollout.log_probs) - 1).abs().max() < 1e-5
    steps = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1]])
    per_sample = policy.step_log_prob(rollout, steps)
    assert torch.allclose(per_sample, rollout.log_probs.gather(1, steps), atol=1e-5, rtol=0)


def test_conditioning_holds_pooled_embeds_and_time_ids() -> None:
    policy = make_policy(lora=True, guidance=3.0)
    conditioning = policy.encode_prompts(PROMPTS)
    assert conditioning["prompt_embeds"].shape == (4, 77, 64)  # 32 + 32 from the two encoders
    assert conditioning["pooled_prompt_embeds"].shape == (4, 32)  # text_encoder_2's projection
    expected_ids = torch.tensor([64.0, 64.0, 0.0, 0.0, 64.0, 64.0]).expand(4, -1)  # size, crop, size
    assert torch.equal(conditioning["add_time_ids"], expected_ids)
    for key in CONDITIONING_KEYS:
        assert conditioning["negative_" + key].shape == conditioning[key].shape
    # the same prompt gives the same embeddings; different prompts different pooled embeds
    assert torch.equal(conditioning["pooled_prompt_embeds"][0], conditioning["pooled_prompt_embeds"][3])
    assert not torch.allclose(conditioning["pooled_prompt_embeds"][0], conditioning["pooled_prompt_embeds"][1])
    assert set(make_policy(lora=True, guidance=1.0).encode_prompts(PROMPTS)) == set(CONDITIONING_KEYS)


def test_guidance_mixes_the_two_branches_with_the_added_conditioning() -> None:
    policy = make_policy(lora=True, guidance=3.0)
    conditioning = policy.encode_prompts(PROMPTS[:2])
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        guided = policy._denoise(latents, t, conditioning)
        negative = {k: conditioning["negative_" + k] for k in CONDITIONING_KEYS}
        uncond = policy.unet(latents, t, negative["prompt_embeds"], added_cond_kwargs=added_conditioning(negative))
        cond = policy.unet(latents, t, conditioning["prompt_embeds"], added_cond_kwargs=added_conditioning(conditioning))
    expected = uncond.sample + 3.0 * (cond.sample - uncond.sample)
    assert torch.allclose(guided, expected, atol=1e-5)


def test_matching_loss_uses_the_added_conditioning() -> None:
    policy = make_policy(lora=True, guidance=3.0)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 200, 500, 900])
    noise = torch.randn(rollout.final_samples.shape, generator=torch.Generator().manual_seed(1))
    loss = policy.matching_loss(rollout, t=t, noise=noise)
    assert loss.shape == (4,) and loss.requires_grad

    abar = policy.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * rollout.final_samples + (1 - abar).sqrt() * noise  # DDPM forward process
    conditioning = rollout.conditioning  # the conditional branch, no CFG
    with torch.no_grad():
        eps = policy.unet(
            noisy, t, conditioning["prompt_embeds"], added_cond_kwargs=added_conditioning(conditioning)
        ).sample
    assert torch.allclose(loss.detach(), (eps - noise).pow(2).mean(dim=(1, 2, 3)), atol=1e-5)


def test_saved_lora_loads_into_a_diffusers_sdxl_pipeline(tmp_path) -> None:
    policy = make_policy(lora=True, guidance=1.0)
    perturb(policy)
    policy.save(tmp_path / "final")
    pipeline = build_tiny_random_sdxl()
    pipeline.load_lora_weights(str(tmp_path / "final"))
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    conditioning = policy.encode_prompts(PROMPTS[:2])
    embeds, added = conditioning["prompt_embeds"], added_conditioning(conditioning)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        ours = policy.unet(latents, t, embeds, added_cond_kwargs=added).sample
        theirs = pipeline.unet(latents, t, embeds, added_cond_kwargs=added).sample
        base = build_tiny_random_sdxl().unet(latents, t, embeds, added_cond_kwargs=added).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-4)


def test_build_policy_picks_sdxl_for_an_sdxl_pipeline() -> None:
    sample = SampleConfig(num_steps=2, guidance_scale=1.0)
    policy = build_policy(ModelConfig(pretrained="align-gen:tiny-random-sdxl"), sample)
    assert type(policy) is SDXLPolicy
