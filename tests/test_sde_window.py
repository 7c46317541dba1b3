"""SDE windows (Flow-GRPO-Fast, MixGRPO): where the window sits, sampling with noise only inside
it (the deterministic step elsewhere, only the window trainable), DDPO / GRPO visiting only the
window's steps, training through train() on SD and SD3, and the bad settings refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align_gen.builtins.tiny_diffusion import build_tiny_random_sd, build_tiny_random_sd3
from align_gen.config import LoraConfig, ModelConfig, SampleConfig, SDEWindowConfig, load_config
from align_gen.errors import ConfigError
from align_gen.objectives import build_objective
from align_gen.objectives.ddpo import DDPOConfig, visit_order
from align_gen.policies.diffusion import DiffusionPolicy
from align_gen.policies.flow import FlowPolicy
from align_gen.tracking import read_metrics
from align_gen.train import sde_window_steps, train
from tests.test_matrix import TINY

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a red circle", "a blue square"]


def test_sliding_window_positions_by_hand() -> None:
    """size 2 in a span of 6 steps: starts 0..4; stride 2 gives 0, 2, 4 then back to 0; one move
    every 3 epochs."""
    sample = SampleConfig(num_steps=8, sde_window=SDEWindowConfig(size=2, placement="sliding", span=6, stride=2, shift_every=3))
    starts = [sde_window_steps(sample, epoch, torch.Generator())[0] for epoch in range(10)]
    assert starts == [0, 0, 0, 2, 2, 2, 4, 4, 4, 0]
    assert sde_window_steps(sample, 4, torch.Generator()) == (2, 3)


def test_random_window_stays_in_its_span_and_follows_the_seed() -> None:
    sample = SampleConfig(num_steps=10, sde_window=SDEWindowConfig(size=3, span=5))  # Flow-GRPO-Fast's
    generator = torch.Generator().manual_seed(0)
    windows = [sde_window_steps(sample, 0, generator) for _ in range(60)]
    assert {window[0] for window in windows} == {0, 1, 2}
    assert all(window == tuple(range(window[0], window[0] + 3)) for window in windows)
    again = torch.Generator().manual_seed(0)
    assert windows == [sde_window_steps(sample, 0, again) for _ in range(60)]
    assert sde_window_steps(SampleConfig(), 0, generator) is None  # no window: every step


@pytest.mark.parametrize(
    "override, words",
    [
        ("sample.sde_window.size=-1", "size must be >= 0"),
        ("sample.sde_window.size=5", "size 5 <= span 4"),
        ("sample.sde_window.span=9", "span 9 <= sample.num_steps 4"),
        ("sample.sde_window.stride=0", "stride and shift_every >= 1"),
    ],
)
def test_bad_windows_are_refused(override: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(None, ["sample.num_steps=4", "sample.sde_window.size=2", override])


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_noise_only_in_the_window(family: str) -> None:
    sample = SampleConfig(num_steps=5, guidance_scale=2.0, batch_size=2)
    if family == "sd":
        policy = DiffusionPolicy(build_tiny_random_sd(), ModelConfig(lora=LoraConfig(enabled=True)), sample)
    else:
        model = ModelConfig(pretrained="align-gen:tiny-random-sd3", lora=LoraConfig(enabled=True))
        policy = FlowPolicy(build_tiny_random_sd3(), model, sample)
    with policy.sde_window((1, 2)):
        rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert rollout.sde_steps == [(1, 2), (1, 2)]
    assert rollout.step_mask.tolist() == [[False, True, True, False, False]] * 2
    assert (rollout.log_probs[:, [0, 3, 4]] == 0).all() and (rollout.log_probs[:, 1:3] != 0).all()
    # Outside the window each step is the deterministic one: the Gaussian's mean (DDIM eta 0 /
    # the Euler ODE) from the stored x_t.
    deterministic = policy.sampler.step_table(0.0)
    for step in (0, 3):
        latents, t = rollout.trajectory[:, step], rollout.timesteps[:, step]
        with torch.no_grad():
            output = policy._denoise(latents, t, rollout.conditioning)
        mean = deterministic.mean_and_std(output, torch.full((2,), step), latents)[0]
        torch.testing.assert_close(rollout.trajectory[:, step + 1], mean, rtol=1e-5, atol=1e-6)
    # The window's steps re-score to their recorded log-probs.
    with torch.no_grad():
        torch.testing.assert_close(policy.step_log_prob(rollout, torch.tensor([1, 2])), rollout.log_probs[:, 1:3], atol=1e-5, rtol=0)
    # The window closes with its context: sampling noises every step again.
    assert policy.sample(PROMPTS[:1], generator=torch.Generator().manual_seed(0)).sde_steps is None


def test_ddpo_visits_only_the_window() -> None:
    policy = DiffusionPolicy(build_tiny_random_sd(), ModelConfig(lora=LoraConfig(enabled=True)), SampleConfig(num_steps=6, batch_size=2))
    with policy.sde_window((2, 3, 4)):
        rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    order = visit_order(rollout, 1.0, torch.Generator().manual_seed(0))
    assert order.shape == (2, 3) and all(sorted(row) == [2, 3, 4] for row in order.tolist())
    assert visit_order(rollout, 0.5, torch.Generator()).shape == (2, 2)  # ceil(3 x 0.5)
    rollout.advantages = torch.tensor([1.0, -1.0])
    terms = list(build_objective(DDPOConfig()).loss_terms(policy, rollout, torch.Generator().manual_seed(0)))
    assert len(terms) == 3  # one forward per window step, not per sampling step


@pytest.mark.parametrize("model, placement", [("tiny-random-sd", "random"), ("tiny-random-sd3", "sliding")])
def test_training_with_a_window_resumes_and_saves(model: str, placement: str, tmp_path: Path) -> None:
    overrides = [
        *TINY,
        "objective.name=grpo",
        f"model.pretrained=align-gen:{model}",
        "sample.num_steps=4",
        "sample.sde_window.size=2",
        f"sample.sde_window.placement={placement}",
        f"output_dir={tmp_path / 'run'}",
    ]
    train(load_config(None, [*overrides, "epochs=1"]))
    result = train(load_config(None, [*overrides, "epochs=2", "resume=latest"]))
    rows = read_metrics(result.metrics)
    assert [row["epoch"] for row in rows] == [0, 1] and all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)


def test_a_vlm_has_no_window() -> None:
    from align_gen.policies import build_policy

    model = ModelConfig(pretrained="align-gen:tiny-random-llava", lora=LoraConfig(enabled=True))
    policy = build_policy(model, SampleConfig(max_new_tokens=4), "cpu")
    with pytest.raises(ConfigError, match="a VLM's tokens are all sampled"), policy.sde_window((0, 1)):
        pass
