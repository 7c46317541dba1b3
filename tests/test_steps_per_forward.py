"""Several denoising steps per forward pass (``train.steps_per_forward``): the same log-probs,
losses and gradients as one step per forward, on every diffusion family, only in fewer, larger
forward passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align_gen.config import ModelConfig, SampleConfig, load_config
from align_gen.errors import ConfigError
from align_gen.objectives import build_objective
from align_gen.objectives.ddpo import DDPOConfig
from align_gen.objectives.rebel import RebelConfig
from align_gen.policies import build_policy
from align_gen.tracking import read_metrics
from align_gen.train import train

PROMPTS = ["a red circle", "a red circle", "a blue square", "a blue square"]
FAMILIES = ["tiny-random-sd", "tiny-random-sdxl", "tiny-random-sd3", "tiny-random-flux"]


def make_policy(family: str):
    sample = SampleConfig(num_steps=4, guidance_scale=2.0, batch_size=len(PROMPTS))
    torch.manual_seed(0)  # the same LoRA initialisation for every policy built here
    return build_policy(ModelConfig(pretrained=f"align-gen:{family}"), sample, "cpu")


def perturb(policy, scale: float = 0.05) -> None:
    """Moves the (zero-initialised) LoRA weights so re-scoring differs from sampling."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("family", FAMILIES)
def test_rescoring_k_steps_per_forward_reproduces_sampling(family: str) -> None:
    policy = make_policy(family)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([[3, 0, 2], [1, 2, 0], [0, 3, 1], [2, 1, 3]])  # per-sample orders, as DDPO visits them
    expected = rollout.log_probs.gather(1, steps)
    mask = rollout.step_mask.gather(1, steps)
    for k in (1, 2, 3):
        policy.steps_per_forward = k
        with torch.no_grad():
            scored = policy.step_log_prob(rollout, steps)  # (B, 3)
        assert scored.shape == (4, 3)
        ratio = torch.exp(scored - expected)[mask]  # the flow families' last step is masked (log-prob 0)
        assert (ratio - 1).abs().max() < 1e-5, (k, ratio)


def _gradient(policy, objective, rollout) -> torch.Tensor:
    policy.model.zero_grad()
    for term in objective.loss_terms(policy, rollout, torch.Generator().manual_seed(3)):
        term.loss.backward()
    return torch.cat([param.grad.flatten() for param in policy.trainable_parameters()])


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("family", ["tiny-random-sd", "tiny-random-sd3"])
@pytest.mark.parametrize("objective_config", [DDPOConfig(clip_range=0.2), RebelConfig()], ids=["ddpo", "rebel"])
def test_the_gradient_does_not_depend_on_steps_per_forward(family: str, objective_config) -> None:
    policy = make_policy(family)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    rollout.rewards = torch.tensor([1.0, -0.5, 0.25, 0.75])
    rollout.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    perturb(policy)  # ratios away from 1, inside DDPO's clip range of 0.2
    objective = build_objective(objective_config)
    policy.steps_per_forward = 1
    one = _gradient(policy, objective, rollout)
    policy.steps_per_forward = 3  # 4 steps: pieces of 3 and 1
    three = _gradient(policy, objective, rollout)
    assert one.abs().max() > 0
    # Float rounding of different batch shapes only: measured relative error ~1e-6.
    assert (three - one).norm() / one.norm() < 1e-4


def test_steps_per_forward_reaches_the_policy_and_is_checked(tmp_path: Path, tiny_train_overrides) -> None:
    with pytest.raises(ConfigError, match="train.steps_per_forward must be > 0"):
        load_config(None, ["train.steps_per_forward=0"])
    overrides = [*tiny_train_overrides, "train.steps_per_forward=2", f"output_dir={tmp_path}"]
    result = train(load_config(None, overrides))
    assert read_metrics(result.metrics)[0]["epoch"] == 0


def test_prepare_model_sets_the_steps_per_forward_of_a_diffusion_policy_only() -> None:
    """align_gen.train.prepare_model gives a diffusion policy train.steps_per_forward; a VLM's
    one teacher-forced pass keeps scoring every token (None)."""
    from accelerate import Accelerator

    from align_gen.optimizers import build_optimizer
    from align_gen.train import prepare_model

    for model, expected in (("align-gen:tiny-random-sd", 3), ("align-gen:tiny-random-llava", None)):
        config = load_config(None, [f"model.pretrained={model}", "train.steps_per_forward=3"])
        policy = build_policy(config.model, config.sample, "cpu")
        prepare_model(policy, build_optimizer(policy, config.train), config, Accelerator(cpu=True))
        assert policy.steps_per_forward == expected, model
