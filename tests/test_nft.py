"""DiffusionNFT: the loss and its gradient by hand, the sampling policy's decay schedule and EMA,
the clean-sample scales of each parameterisation, and one update moving each sample's denoising
error with its reward (a flipped reward the other way)."""

from __future__ import annotations

import pytest
import torch

from align_gen.advantages import group_normalize
from align_gen.builtins.tiny_diffusion import build_tiny_random_sd, build_tiny_random_sd3
from align_gen.config import LoraConfig, ModelConfig, SampleConfig
from align_gen.errors import ConfigError
from align_gen.objectives import build_objective
from align_gen.objectives.nft import NFTConfig, nft_loss, sampling_policy_decay
from align_gen.policies.diffusion import DiffusionPolicy
from align_gen.policies.flow import FlowPolicy

pytestmark = pytest.mark.usefixtures("single_thread")
GROUP = ["a red circle"] * 4
REWARDS = torch.tensor([0.0, 3.0, 1.0, 2.0])


def test_loss_and_gradient_by_hand() -> None:
    """At v_theta = v_old (residuals [1, 1], scale 1, beta 1) both implicit errors are [1, 1]:
    L+ = L- = mean(e^2) / mean|e| = 1 and the loss is c = 5 whatever r. The gradient is
    (c / beta) (r dL+/de - (1 - r) dL-/de) = 5 (0.75 - 0.25) [1, 1] for A = 2.5 (r = 0.75),
    i.e. A times the matching loss's own gradient direction."""
    residual = torch.ones(1, 2, requires_grad=True)
    loss, metrics = nft_loss(residual, torch.ones(1, 2), torch.ones(1), torch.tensor([2.5]), NFTConfig())
    assert loss.item() == pytest.approx(5.0)
    assert metrics["optimality"].item() == pytest.approx(0.75)
    loss.backward()
    assert residual.grad.tolist() == [pytest.approx([2.5, 2.5])]
    # Away from v_old, by hand: residual [2, 0], old [0, 0], scale 0.5, beta 1, A = 5 (r = 1):
    # e+ = 0.5 [2, 0] = [1, 0], L+ = 0.5 / 0.5 = 1; loss = 5 * 1 / 1; with kl_beta 0.1 and a
    # divergence of 3, + 0.3.
    loss, metrics = nft_loss(
        torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2), torch.tensor([0.5]), torch.tensor([5.0]),
        NFTConfig(kl_beta=0.1), divergence=torch.tensor([3.0]),
    )
    assert loss.item() == pytest.approx(5.3) and metrics["positive_loss"].item() == pytest.approx(1.0)


def test_sampling_policy_decay_schedules() -> None:
    default = NFTConfig()  # min(0.001 s, 0.5)
    assert [sampling_policy_decay(default, s) for s in (0, 100, 1000)] == pytest.approx([0.0, 0.1, 0.5])
    delayed = NFTConfig(decay_rate=0.0075, decay_max=0.999, decay_start=75)  # the authors' OCR schedule
    assert [sampling_policy_decay(delayed, s) for s in (50, 75, 175, 1000)] == pytest.approx([0.0, 0.0, 0.75, 0.999])
    with pytest.raises(ConfigError, match="decay_max must be in"):
        NFTConfig(decay_max=1.0)
    with pytest.raises(ConfigError, match="not have"):
        build_objective(NFTConfig()).check_policy_kind(takes_images=True)


def make_policy(family: str = "sd", steps: int = 3):
    torch.manual_seed(0)
    sample = SampleConfig(num_steps=steps, guidance_scale=1.0, batch_size=4, samples_per_prompt=4)
    if family == "sd":
        return DiffusionPolicy(build_tiny_random_sd(), ModelConfig(lora=LoraConfig(enabled=True, rank=4, alpha=4.0)), sample)
    model = ModelConfig(pretrained="align-gen:tiny-random-sd3", lora=LoraConfig(enabled=True, rank=4, alpha=4.0))
    return FlowPolicy(build_tiny_random_sd3(), model, sample)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_matching_residuals_and_clean_scales(family: str) -> None:
    policy = make_policy(family)
    batch = policy.sample(GROUP[:2], generator=torch.Generator().manual_seed(0))
    t = batch.timesteps[:, 1]
    noise = policy.training_noise(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        terms = policy.matching_terms(batch, t=t, noise=noise, residuals=True)
    torch.testing.assert_close(terms.residual.pow(2).flatten(1).mean(dim=1), terms.loss)
    assert terms.reference_residual.shape == (1, *terms.residual.shape)
    if family == "sd":  # epsilon: x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        abar = policy.scheduler.alphas_cumprod[t.long()]
        torch.testing.assert_close(terms.clean_scale, ((1 - abar) / abar).sqrt())
    else:  # flow: x0_hat = x_t - sigma v
        torch.testing.assert_close(terms.clean_scale, t.float() / 1000)


@pytest.mark.parametrize("flipped", [False, True], ids=["reward", "flipped-reward"])
def test_one_update_moves_the_errors_with_the_reward(flipped: bool) -> None:
    """The policy starts as its sampling policy; after one update the denoising error of each
    sample (at the noise level and noise of the update) falls the more the higher its reward.
    One sampling step, so every sample trains at the same noise level: the clean-sample scale,
    which weighs each sample's gradient, is then the same for all."""
    policy = make_policy(steps=1)
    objective = build_objective(NFTConfig(num_timesteps=1, kl_beta=0.0))
    objective.setup(policy, None)
    batch = objective.sample(policy, GROUP, torch.Generator().manual_seed(0))
    rewards = -REWARDS if flipped else REWARDS
    batch.rewards, batch.advantages = rewards, group_normalize(rewards, batch.prompts)
    # The noise level and noise the update draws (the same generator draws as loss_terms).
    generator = torch.Generator().manual_seed(0)
    steps = torch.stack([torch.randperm(1, generator=generator)[:1] for _ in range(4)])[:, 0]
    t, noise = batch.timesteps[torch.arange(4), steps], policy.training_noise(4, generator)
    with torch.no_grad():
        before = policy.matching_loss(batch, t=t, noise=noise)
    optimizer = torch.optim.SGD(list(policy.trainable_parameters()), lr=0.5)
    for term in objective.loss_terms(policy, batch, torch.Generator().manual_seed(0)):
        term.loss.backward()
    optimizer.step()
    with torch.no_grad():
        change = policy.matching_loss(batch, t=t, noise=noise) - before
    # Each sample's gradient is weighted by its own 1 / mean |error| (the adaptive weight), so
    # the changes follow the rewards' order loosely: -0.90 here, +0.91 flipped.
    correlation = torch.corrcoef(torch.stack([change, REWARDS]))[0, 1]
    assert (correlation > 0.8) if flipped else (correlation < -0.8), change


def test_the_sampling_policy_is_an_ema_of_the_weights() -> None:
    policy = make_policy()
    objective = build_objective(NFTConfig())
    objective.setup(policy, None)
    initial = {name: value.clone() for name, value in objective.old.items()}
    first = objective.sample(policy, GROUP[:1], torch.Generator().manual_seed(0))
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(0.05)
    again = objective.sample(policy, GROUP[:1], torch.Generator().manual_seed(0))
    assert torch.equal(first.trajectory, again.trajectory)  # drawn with the old weights
    current = policy.trainable_state_dict()
    assert objective.end_epoch(policy, 100) == {"sampling_policy_decay": pytest.approx(0.1)}
    for name, value in objective.old.items():
        torch.testing.assert_close(value, 0.1 * initial[name] + 0.9 * current[name])
    state = objective.state_dict()
    restored = build_objective(NFTConfig())
    restored.load_state_dict(state)
    assert all(torch.equal(restored.old[name], value) for name, value in objective.old.items())
