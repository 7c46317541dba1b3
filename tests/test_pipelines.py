"""The log-prob pipelines on their own: loaded like any diffusers pipeline, called like one,
returning images, the latent trajectory and per-step log-probs that their own denoise and
transition reproduce; and the policies sample through them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align_gen.builtins.tiny_diffusion import (
    build_tiny_random_flux,
    build_tiny_random_sd,
    build_tiny_random_sd3,
    build_tiny_random_sdxl,
)
from align_gen.config import ModelConfig, SampleConfig
from align_gen.policies.diffusion import DiffusionPolicy, SDXLPolicy
from align_gen.policies.flow import FlowPolicy
from align_gen.policies.flux import FluxPolicy
from pipelines import (
    FluxLogProbPipeline,
    StableDiffusion3LogProbPipeline,
    StableDiffusionLogProbPipeline,
    StableDiffusionXLLogProbPipeline,
)

PROMPTS = ["a red circle", "a blue square"]


def rescore(pipe, output, guidance_scale: float, stochasticity: float) -> torch.Tensor:
    """(B, T) log-probs of the recorded steps, re-scored by the pipeline's denoise + transition."""
    batch, steps = output.log_probs.shape
    columns = []
    for i in range(steps):
        latents, t = output.latents[:, i], output.timesteps[:, i]
        model_output = pipe.denoise(latents, t, output.conditioning, guidance_scale)
        step = torch.full((batch,), i)
        columns.append(pipe.transition(model_output, latents, step, t, stochasticity, output.latents[:, i + 1])[1])
    return torch.stack(columns, dim=1)


def test_a_saved_pipeline_loads_as_a_log_prob_pipeline_and_its_steps_rescore_exactly(tmp_path: Path) -> None:
    build_tiny_random_sd().save_pretrained(tmp_path / "sd")
    pipe = StableDiffusionLogProbPipeline.from_pretrained(tmp_path / "sd", safety_checker=None)
    output = pipe(PROMPTS, num_inference_steps=3, guidance_scale=2.0, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert output.images.shape == (2, 3, 64, 64) and 0 <= float(output.images.min()) <= float(output.images.max()) <= 1
    assert output.latents.shape == (2, 4, 4, 32, 32) and output.timesteps.shape == output.log_probs.shape == (2, 3)
    assert output.step_mask.all() and set(output.conditioning) == {"prompt_embeds", "negative_prompt_embeds"}
    with torch.no_grad():
        torch.testing.assert_close(rescore(pipe, output, 2.0, 1.0), output.log_probs, atol=0, rtol=0)
    again = pipe(PROMPTS, num_inference_steps=3, guidance_scale=2.0, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.latents, output.latents)  # a seed gives the same trajectory


@pytest.mark.parametrize(
    ("build", "policy_class", "pipeline_class"),
    [
        (build_tiny_random_sd, DiffusionPolicy, StableDiffusionLogProbPipeline),
        (build_tiny_random_sdxl, SDXLPolicy, StableDiffusionXLLogProbPipeline),
        (build_tiny_random_sd3, FlowPolicy, StableDiffusion3LogProbPipeline),
        (build_tiny_random_flux, FluxPolicy, FluxLogProbPipeline),
    ],
)
def test_a_policy_samples_through_its_familys_pipeline(build, policy_class, pipeline_class) -> None:
    """The policy's rollout is the pipeline call's output at the same settings, bit for bit; the
    pipeline shares the loaded pipeline's modules and leaves its scheduler alone."""
    torch.manual_seed(0)
    loaded = build()
    scheduler = loaded.scheduler
    sample = SampleConfig(num_steps=2, guidance_scale=2.0)
    policy = policy_class(loaded, ModelConfig(), sample, trainable=False)
    assert type(policy.sampler) is pipeline_class
    assert policy.sampler.vae is loaded.vae and policy.sampler.denoiser is policy.model
    assert loaded.scheduler is scheduler and policy.sampler.scheduler is not scheduler

    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(1))
    stochasticity = getattr(sample, pipeline_class.stochasticity_name)
    output = policy.sampler.sample_with_log_probs(
        PROMPTS,
        num_inference_steps=2,
        guidance_scale=2.0,
        stochasticity=stochasticity,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(rollout.trajectory, output.latents) and torch.equal(rollout.log_probs, output.log_probs)
    assert torch.equal(rollout.images, output.images) and torch.equal(rollout.step_mask, output.step_mask)


def test_the_flow_ode_has_no_log_density() -> None:
    pipe = FluxLogProbPipeline.from_pipeline(build_tiny_random_flux())
    output = pipe(PROMPTS[:1], num_inference_steps=2, noise_level=0.0, generator=torch.Generator().manual_seed(0))
    assert not output.step_mask.any() and not output.log_probs.any()
    assert "guidance" in output.conditioning  # a guidance-distilled model takes the scale as input
    stochastic = pipe(PROMPTS[:1], num_inference_steps=2, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    assert stochastic.step_mask.tolist() == [[True, False]]  # the last step is too sharp to train on
