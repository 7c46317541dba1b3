"""The per-step KL to the reference model (Policy.step_scores(kl=True)): the closed form against
hand-derived values, zero at the initial weights, positive and differentiable once the weights
move, and the same whatever the chunking of steps into forward passes; on SD, SD3 and a VLM."""

from __future__ import annotations

import pytest
import torch

from align_gen.builtins.tiny_diffusion import build_tiny_random_sd, build_tiny_random_sd3
from align_gen.config import LoraConfig, ModelConfig, SampleConfig
from align_gen.policies import build_policy
from align_gen.policies.diffusion import DiffusionPolicy
from align_gen.policies.flow import FlowPolicy
from align_gen.policies.vlm import vocabulary_log_probs
from pipelines.kernels import DDIMStepTable, gaussian_kl, gaussian_log_prob

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red circle"]
pytestmark = pytest.mark.usefixtures("single_thread")


def test_gaussian_kl_hand_derived() -> None:
    mean = torch.tensor([[1.0, 2.0], [0.0, -1.0]]).view(2, 2, 1, 1)
    reference = torch.zeros_like(mean)
    std = torch.tensor([2.0, 0.5]).view(2, 1, 1, 1)
    # row 0: (1 + 4) / (2 * 4) / 2 elements; row 1: (0 + 1) / (2 * 0.25) / 2 elements
    torch.testing.assert_close(gaussian_kl(mean, reference, std), torch.tensor([5 / 16, 1.0]))
    torch.testing.assert_close(gaussian_kl(mean, reference, std, reduce="sum"), torch.tensor([5 / 8, 2.0]))


def test_gaussian_kl_is_the_log_density_ratio_at_the_mean() -> None:
    # For equal stds, log p(x) - log p_ref(x) at x = mean is exactly the KL.
    generator = torch.Generator().manual_seed(0)
    mean, reference = torch.randn(2, 3, 4, 4, 4, generator=generator)
    std = torch.rand(3, 1, 1, 1, generator=generator) + 0.1
    ratio = gaussian_log_prob(mean, mean, std, "sum") - gaussian_log_prob(mean, reference, std, "sum")
    torch.testing.assert_close(gaussian_kl(mean, reference, std, "sum"), ratio, rtol=1e-5, atol=1e-5)


def test_the_table_step_is_its_gaussian() -> None:
    # step() draws from and scores under exactly the (mean, std) that mean_and_std() reports.
    policy = make_diffusion_policy(lora=True)
    table = DDIMStepTable.from_scheduler(policy.scheduler, 1.0)
    generator = torch.Generator().manual_seed(1)
    sample, output = torch.randn(2, 2, 4, 8, 8, generator=generator)
    index = torch.tensor([0, 3])
    mean, std = table.mean_and_std(output, index, sample)
    prev, log_prob = table.step(output, index, sample, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(prev, mean + std * noise)
    torch.testing.assert_close(log_prob, gaussian_log_prob(prev, mean, std))


def log_prob_and_kl(policy, rollout, steps):
    scores = policy.step_scores(rollout, steps, kl=True)
    return scores.log_prob, scores.kl


def make_diffusion_policy(*, lora: bool) -> DiffusionPolicy:
    return DiffusionPolicy(
        build_tiny_random_sd(),
        ModelConfig(lora=LoraConfig(enabled=lora, rank=4, alpha=4.0)),
        SampleConfig(num_steps=4, guidance_scale=3.0, batch_size=len(PROMPTS)),
    )


def make_flow_policy() -> FlowPolicy:
    return FlowPolicy(
        build_tiny_random_sd3(),
        ModelConfig(pretrained="align-gen:tiny-random-sd3", lora=LoraConfig(enabled=True, rank=4, alpha=4.0)),
        SampleConfig(num_steps=4, guidance_scale=3.0, batch_size=len(PROMPTS), noise_level=0.7),
    )


def perturb(policy, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize(
    "make", [lambda: make_diffusion_policy(lora=True), lambda: make_diffusion_policy(lora=False), make_flow_policy],
    ids=["sd_lora", "sd_full", "sd3_lora"],
)
def test_denoiser_kl_to_reference(make) -> None:
    policy = make()
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([[0, 2], [1, 3], [2, 0], [3, 1]])
    log_prob, kl = log_prob_and_kl(policy, rollout, steps)
    torch.testing.assert_close(log_prob, policy.step_log_prob(rollout, steps))
    assert torch.equal(kl, torch.zeros_like(kl))  # the initial model is the reference

    perturb(policy)
    log_prob, kl = log_prob_and_kl(policy, rollout, steps)
    torch.testing.assert_close(log_prob, policy.step_log_prob(rollout, steps))
    assert (kl > 0).all()
    kl.sum().backward()  # the KL's gradient reaches the trainable weights
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    # The closed form by hand for sample 1, step 3: the guided outputs of both models.
    table = policy.sampler.step_table(policy.stochasticity)
    latents, t = rollout.trajectory[1:2, 3], rollout.timesteps[1:2, 3]
    conditioning = {key: value[1:2] for key, value in rollout.conditioning.items()}
    with torch.no_grad():
        with policy.reference():
            reference_mean = table.mean_and_std(policy._denoise(latents, t, conditioning), torch.tensor([3]), latents)[0]
        mean, std = table.mean_and_std(policy._denoise(latents, t, conditioning), torch.tensor([3]), latents)
    by_hand = ((mean - reference_mean) ** 2 / (2 * std**2)).mean()
    torch.testing.assert_close(kl[1, 1].detach(), by_hand, rtol=1e-4, atol=1e-7)

    policy.set_steps_per_forward(2)  # one forward for both columns: the same numbers
    with torch.no_grad():
        torch.testing.assert_close(log_prob_and_kl(policy, rollout, steps)[1], kl.detach(), rtol=1e-4, atol=1e-6)


def test_vlm_kl_to_reference() -> None:
    from align_gen.image_datasets import load_image_dataset
    from tests.test_vlm_policy import QUESTIONS

    torch.manual_seed(0)
    model = ModelConfig(pretrained="align-gen:tiny-random-llava", lora=LoraConfig(enabled=True, rank=4, alpha=4.0))
    policy = build_policy(model, SampleConfig(max_new_tokens=6, temperature=0.7), "cpu")
    rollout = policy.sample(load_image_dataset(str(QUESTIONS)).visual_prompts()[:3], generator=torch.Generator().manual_seed(0))
    steps = torch.arange(rollout.trajectory.shape[1])
    log_prob, kl = log_prob_and_kl(policy, rollout, steps)
    torch.testing.assert_close(log_prob, rollout.log_probs, atol=1e-5, rtol=0)
    assert torch.equal(kl, torch.zeros_like(kl))

    perturb(policy, 0.2)
    log_prob, kl = log_prob_and_kl(policy, rollout, steps)
    torch.testing.assert_close(log_prob, policy.step_log_prob(rollout, steps))
    answers = rollout.trajectory
    assert torch.equal(kl[answers < 0], torch.zeros_like(kl[answers < 0]))  # padding adds nothing
    assert (kl[answers >= 0] > 0).all()
    # By hand: sum_v p (log p - log p_ref) at the sampling temperature, for sample 0's first token.
    with torch.no_grad():
        with policy.reference():
            reference = vocabulary_log_probs(policy._answer_logits(rollout.conditioning, answers), 0.7, policy.excluded_tokens)
        current = vocabulary_log_probs(policy._answer_logits(rollout.conditioning, answers), 0.7, policy.excluded_tokens)
    by_hand = (current[0, 0].exp() * (current[0, 0] - reference[0, 0])).sum()
    torch.testing.assert_close(kl[0, 0].detach(), by_hand)
    kl.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
