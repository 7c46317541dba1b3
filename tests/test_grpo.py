"""Flow-GRPO: the clipped surrogate with its KL penalty against hand-derived numbers, the KL
pulling toward the reference, the run checks, and one update ranking a group's samples the
reward's way (the flipped reward ranks them the other way), on SD and a VLM."""

from __future__ import annotations

import math

import pytest
import torch

from align_gen.advantages import group_normalize
from align_gen.builtins.tiny_diffusion import build_tiny_random_sd
from align_gen.config import LoraConfig, ModelConfig, SampleConfig, load_config
from align_gen.errors import ConfigError
from align_gen.objectives import build_objective
from align_gen.objectives.ddpo import ddpo_loss
from align_gen.objectives.grpo import GRPOConfig
from align_gen.policies.diffusion import DiffusionPolicy

pytestmark = pytest.mark.usefixtures("single_thread")
GROUP = ["a red circle"] * 4
REWARDS = torch.tensor([0.0, 3.0, 1.0, 2.0])


def test_loss_with_kl_matches_hand_derivation() -> None:
    """The DDPO test's two samples (surrogate (-1 + 3) / 2 = 1) plus beta = 0.1 times the mean KL
    (0.5 + 2) / 2 = 1.25: loss 1.125. A masked step's KL is dropped, even an infinite one."""
    log_prob = torch.tensor([0.3, 0.3 + math.log(1.5)])
    old = torch.tensor([0.3, 0.3])
    advantages = torch.tensor([1.0, -2.0])
    kl = torch.tensor([0.5, 2.0], requires_grad=True)
    loss, metrics = ddpo_loss(log_prob, old, advantages, 0.2, None, kl, 0.1)
    assert loss.item() == pytest.approx(1.125, abs=1e-6)
    assert metrics["policy_loss"].item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(1.25)
    assert metrics["clipfrac_above"].item() == pytest.approx(0.5) and metrics["clipfrac_below"].item() == 0
    loss.backward()
    assert kl.grad.tolist() == pytest.approx([0.05, 0.05])  # beta / 2 samples

    masked, _ = ddpo_loss(log_prob, old, advantages, 0.2, torch.tensor([True, False]), torch.tensor([0.5, math.inf]), 0.1)
    assert masked.item() == pytest.approx(-1.0 + 0.1 * 0.5)


def test_run_checks() -> None:
    base = ["objective.name=grpo", "sample.samples_per_prompt=4", "advantage.kind=group"]
    build_objective(load_config(None, base).objective).check(load_config(None, base))
    for bad, words in [
        ("sample.samples_per_prompt=1", "samples_per_prompt must be >= 2"),
        ("advantage.kind=per_prompt", "advantage.kind=group"),
    ]:
        config = load_config(None, [*base, bad])
        with pytest.raises(ConfigError, match=words):
            build_objective(config.objective).check(config)
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        load_config(None, [*base, "objective.beta=-1"])
    with pytest.raises(ConfigError, match="global_std applies to advantage.kind=group"):
        load_config(None, [*base, "advantage.kind=batch", "advantage.global_std=true"])


def make_policy() -> DiffusionPolicy:
    torch.manual_seed(0)
    return DiffusionPolicy(
        build_tiny_random_sd(),
        ModelConfig(lora=LoraConfig(enabled=True, rank=4, alpha=4.0)),
        SampleConfig(num_steps=3, guidance_scale=1.0, batch_size=4, samples_per_prompt=4),
    )


def one_update(policy, batch, config: GRPOConfig, lr: float) -> None:
    optimizer = torch.optim.SGD(list(policy.trainable_parameters()), lr=lr)
    for term in build_objective(config).loss_terms(policy, batch, torch.Generator().manual_seed(0)):
        term.loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("flipped", [False, True], ids=["reward", "flipped-reward"])
def test_one_update_ranks_the_group_the_reward_s_way(flipped: bool) -> None:
    """Each sample's trajectory log-prob moves with its group-relative advantage: the change
    correlates positively with the reward, and negatively under the flipped reward."""
    policy = make_policy()
    batch = policy.sample(GROUP, generator=torch.Generator().manual_seed(0))
    rewards = -REWARDS if flipped else REWARDS
    batch.rewards, batch.advantages = rewards, group_normalize(rewards, batch.prompts)
    one_update(policy, batch, GRPOConfig(clip_range=10.0, beta=0.01), lr=0.5)
    with torch.no_grad():
        change = (policy.step_log_prob(batch, torch.arange(3)) - batch.log_probs).sum(dim=1)
    correlation = torch.corrcoef(torch.stack([change, REWARDS]))[0, 1]
    assert (correlation < -0.9) if flipped else (correlation > 0.9), change


def test_the_kl_term_pulls_toward_the_reference() -> None:
    """With zero advantages only the KL acts: one update lowers every step's KL to the initial
    model; with beta = 0 nothing moves."""
    policy = make_policy()
    batch = policy.sample(GROUP, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(7)))
    batch.advantages = torch.zeros(4)
    steps = torch.arange(3)
    with torch.no_grad():
        before = policy.step_scores(batch, steps, kl=True).kl
    one_update(policy, batch, GRPOConfig(beta=0.0), lr=0.5)
    with torch.no_grad():
        assert torch.equal(policy.step_scores(batch, steps, kl=True).kl, before)
    one_update(policy, batch, GRPOConfig(beta=1.0), lr=0.5)
    with torch.no_grad():
        after = policy.step_scores(batch, steps, kl=True).kl
    assert (after < before).all(), (before, after)


@pytest.mark.parametrize("flipped", [False, True], ids=["reward", "flipped-reward"])
def test_on_a_vlm_the_answers_move_with_the_reward(flipped: bool) -> None:
    from align_gen.image_datasets import load_image_dataset
    from align_gen.policies import build_policy
    from tests.test_vlm_policy import QUESTIONS

    torch.manual_seed(0)
    model = ModelConfig(pretrained="align-gen:tiny-random-llava", lora=LoraConfig(enabled=True, rank=4, alpha=4.0))
    policy = build_policy(model, SampleConfig(max_new_tokens=4, samples_per_prompt=4), "cpu")
    batch = policy.sample(load_image_dataset(str(QUESTIONS)).visual_prompts()[:1] * 4, generator=torch.Generator().manual_seed(0))
    rewards = -REWARDS if flipped else REWARDS
    batch.rewards, batch.advantages = rewards, group_normalize(rewards, [str(p) for p in batch.prompts])
    steps = torch.arange(batch.trajectory.shape[1])
    one_update(policy, batch, GRPOConfig(clip_range=10.0, beta=0.01), lr=0.05)
    with torch.no_grad():
        change = ((policy.step_log_prob(batch, steps) - batch.log_probs) * batch.step_mask).sum(dim=1)
    correlation = torch.corrcoef(torch.stack([change, REWARDS]))[0, 1]
    assert (correlation < -0.9) if flipped else (correlation > 0.9), change


# ----------------------------------------------------------------------------------------------
# GRPO-Guard


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "flow"])
def test_the_gain_is_the_kernel_s_slope(kind: str) -> None:
    """The step's mean is affine in the model output: mean(out + 1) - mean(out) = gain."""
    from pipelines.kernels import DDIMStepTable, FlowSDEStepTable, flow_sigmas  # noqa: F401
    from tests.test_kernels import make_scheduler

    if kind == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(10)
        table = FlowSDEStepTable.from_scheduler(scheduler, 0.7)
    else:
        scheduler = make_scheduler(kind)
        scheduler.set_timesteps(10)
        table = DDIMStepTable.from_scheduler(scheduler, 1.0)
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 10, 4, 8, 8, generator=generator, dtype=torch.float64).float()
    index = torch.arange(10)
    slope = table.mean_and_std(output + 1, index, sample)[0] - table.mean_and_std(output, index, sample)[0]
    gain = table.output_gain(index)
    torch.testing.assert_close(slope.abs(), gain.view(-1, 1, 1, 1).expand_as(slope), rtol=1e-4, atol=1e-5)
    if kind == "flow":  # (1 + a^2 / 2) |dt| after the first step, |dt| at sigma = 1
        dt = (scheduler.sigmas[:-1] - scheduler.sigmas[1:]).float()
        torch.testing.assert_close(gain[1:-1], (1 + 0.7**2 / 2) * dt[1:-1], rtol=1e-5, atol=0)
        torch.testing.assert_close(gain[0], dt[0], rtol=1e-5, atol=0)


def test_the_normalized_ratio_by_hand() -> None:
    """0 at the sampling weights; after a change, s (log ratio + mean(dmu^2) / (2 s^2)) with
    the log-probs, the means and the std computed by hand, and also mean(eps dmu)."""
    policy = make_policy()
    batch = policy.sample(GROUP, generator=torch.Generator().manual_seed(0), keep_step_means=True)
    assert batch.step_means.shape == batch.trajectory[:, 1:].shape
    steps = torch.arange(3)
    with torch.no_grad():
        assert torch.equal(policy.step_scores(batch, steps, normalized_ratio=True).normalized_log_ratio, torch.zeros(4, 3))
        for param in policy.trainable_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(7)))
        scores = policy.step_scores(batch, steps, normalized_ratio=True)
        table = policy.sampler.step_table(policy.stochasticity)
        step = 1
        latents, t = batch.trajectory[:, step], batch.timesteps[:, step]
        index = torch.full((4,), step)
        mean, std = table.mean_and_std(policy._denoise(latents, t, batch.conditioning), index, latents)
    old_mean, prev = batch.step_means[:, step], batch.trajectory[:, step + 1]
    shift = (mean - old_mean).pow(2).flatten(1).mean(dim=1)
    s = std.flatten()
    by_hand = s * (scores.log_prob[:, step] - batch.log_probs[:, step] + shift / (2 * s**2))
    torch.testing.assert_close(scores.normalized_log_ratio[:, step], by_hand, rtol=1e-3, atol=1e-7)
    eps = (prev - old_mean) / std
    torch.testing.assert_close(scores.normalized_log_ratio[:, step], (eps * (mean - old_mean)).flatten(1).mean(dim=1))
    assert (scores.normalized_log_ratio != 0).all()
    torch.testing.assert_close(scores.gain[:, step], table.output_gain(index))


@pytest.mark.parametrize("flipped", [False, True], ids=["reward", "flipped-reward"])
def test_with_grpo_guard_one_update_ranks_the_group_the_reward_s_way(flipped: bool) -> None:
    """The normalised log-ratios (0 before the update) move with the group-relative advantage."""
    policy = make_policy()
    objective = build_objective(GRPOConfig(clip_range=10.0, beta=0.0, ratio_norm=True))
    batch = objective.sample(policy, GROUP, torch.Generator().manual_seed(0))
    rewards = -REWARDS if flipped else REWARDS
    batch.rewards, batch.advantages = rewards, group_normalize(rewards, batch.prompts)
    one_update(policy, batch, GRPOConfig(clip_range=10.0, beta=0.0, ratio_norm=True), lr=0.5)
    with torch.no_grad():  # what the surrogate raises: each step's normalised log-ratio over its gain
        scores = policy.step_scores(batch, torch.arange(3), normalized_ratio=True)
    change = (scores.normalized_log_ratio / scores.gain).sum(dim=1)
    correlation = torch.corrcoef(torch.stack([change, REWARDS]))[0, 1]
    assert (correlation < -0.9) if flipped else (correlation > 0.9), change


def test_grpo_guard_is_refused_on_a_vlm() -> None:
    with pytest.raises(ConfigError, match="not defined there"):
        build_objective(GRPOConfig(ratio_norm=True)).check_policy_kind(takes_images=True)
    build_objective(GRPOConfig(ratio_norm=True)).check_policy_kind(takes_images=False)
