"""AWM: the weighted loss by hand, stratified noise levels, and one update in each direction."""

from __future__ import annotations

import pytest
import torch

from align_gen.builtins.tiny_diffusion import build_tiny_random_sd
from align_gen.config import LoraConfig, ModelConfig, SampleConfig
from align_gen.objectives import build_objective
from align_gen.objectives.awm import AWMConfig, awm_loss, stratified_steps, weight_matching_loss
from align_gen.policies.diffusion import DiffusionPolicy


def test_weightings_match_hand_derivation() -> None:
    """l = 0.0625, t = 0.5, p = 0.25: (l + 1e-10)^p ~ 0.5 and (1e-10)^p = 1e-2.5 ~ 0.0031623,
    so huber = (0.5 / 0.25)(0.5 - 0.0031623) = 0.993675; uniform = l; t-weighting = t l."""
    loss, t = torch.tensor([0.0625]), torch.tensor([0.5])
    assert weight_matching_loss(loss, t, "huber", 0.25).item() == pytest.approx(2 * (0.5 - 10**-2.5), rel=1e-5)
    assert weight_matching_loss(loss, t, "uniform").item() == pytest.approx(0.0625)
    assert weight_matching_loss(loss, t, "t").item() == pytest.approx(0.03125)


def test_awm_loss_matches_hand_derivation() -> None:
    """Advantages (10, -2.5) clip to (5, -2.5), scale to (1, -0.5); uniform weighting;
    policy term = (1 * 0.2 + (-0.5) * 0.4) / 2 = 0; divergence term = 0.1 * (0.3 + 0.5) / 2 = 0.04."""
    config = AWMConfig(weighting="uniform", beta=0.1, advantage_clip=5.0)
    loss, metrics = awm_loss(
        torch.tensor([0.2, 0.4]), torch.tensor([0.3, 0.9]), torch.tensor([10.0, -2.5]), torch.tensor([0.3, 0.5]), config
    )
    assert loss.item() == pytest.approx(0.04)
    assert metrics["policy_loss"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["divergence"] == pytest.approx(0.4)


def test_stratified_steps_put_one_draw_in_each_stratum() -> None:
    steps = stratified_steps(num_steps=12, num_strata=4, batch=50, generator=torch.Generator().manual_seed(0))
    assert steps.shape == (50, 4)
    for k in range(4):
        assert ((steps[:, k] >= 3 * k) & (steps[:, k] < 3 * (k + 1))).all()


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_one_update_moves_the_samples_matching_loss_against_its_advantage(lora: bool, sign: float) -> None:
    """A positive advantage lowers the sample's matching loss, a negative one raises it, at the
    noise level and noise the update used (first order: the change is -lr A |grad l|^2)."""
    policy = DiffusionPolicy(
        build_tiny_random_sd(),
        ModelConfig(lora=LoraConfig(enabled=lora, rank=4, alpha=4.0)),
        SampleConfig(num_steps=4, guidance_scale=1.0, batch_size=1),
    )
    batch = policy.sample(["a red circle"], generator=torch.Generator().manual_seed(0))
    batch.advantages = torch.tensor([sign])
    objective = build_objective(AWMConfig(num_timesteps=1, weighting="huber", beta=1e-2))
    # The draws the objective makes from a generator seeded 0: its step, then its noise.
    replay = torch.Generator().manual_seed(0)
    step = stratified_steps(4, 1, 1, replay)[:, 0]
    noise = torch.randn(batch.final_samples.shape, generator=replay)
    t = batch.timesteps[torch.arange(1), step]

    def loss() -> float:
        with torch.no_grad():
            return policy.matching_loss(batch, t=t, noise=noise).item()

    before = loss()
    optimizer = torch.optim.SGD(list(policy.trainable_parameters()), lr=0.1 if lora else 1e-3)
    for term in objective.loss_terms(policy, batch, torch.Generator().manual_seed(0)):
        term.loss.backward()
    optimizer.step()
    assert sign * (loss() - before) < 0


def test_divergence_is_zero_before_any_update_and_has_grad() -> None:
    policy = DiffusionPolicy(
        build_tiny_random_sd(), ModelConfig(), SampleConfig(num_steps=2, guidance_scale=1.0, batch_size=2)
    )
    batch = policy.sample(["a", "b"], generator=torch.Generator().manual_seed(0))
    terms = policy.matching_terms(batch, t=torch.tensor([10, 500]), noise=torch.randn_like(batch.final_samples))
    assert terms.divergence.abs().max() < 1e-10 and terms.divergence.requires_grad and terms.loss.shape == (2,)
    assert terms.divergence.shape == terms.reference_loss.shape == (1, 2)
    assert torch.allclose(terms.reference_loss[0], terms.loss.detach()) and not terms.reference_loss.requires_grad


def test_ema_term_adds_to_the_loss_by_hand() -> None:
    """Uniform weighting, advantages (5, -5) -> (1, -1), l = (0.2, 0.4): policy term -0.1;
    beta 0.1 x mean(0.3, 0.5) = 0.04; ema_beta 2 x mean(0.1, 0.3) = 0.4; total 0.34."""
    config = AWMConfig(weighting="uniform", beta=0.1, ema_beta=2.0)
    loss, metrics = awm_loss(
        torch.tensor([0.2, 0.4]),
        torch.tensor([0.3, 0.9]),
        torch.tensor([5.0, -5.0]),
        torch.tensor([0.3, 0.5]),
        config,
        ema_divergence=torch.tensor([0.1, 0.3]),
    )
    assert loss.item() == pytest.approx(0.34)
    assert metrics["ema_divergence"] == pytest.approx(0.2)


def test_ema_follows_the_weights_and_round_trips(tmp_path) -> None:
    from align_gen.config import load_config

    run = load_config(None, ["objective.name=awm", "objective.ema_beta=1.0", "objective.ema_decay=0.5"])
    policy = DiffusionPolicy(build_tiny_random_sd(), run.model, SampleConfig(num_steps=2, guidance_scale=1.0))
    objective = build_objective(run.objective)
    objective.setup(policy, run)
    start = policy.trainable_state_dict()
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(1.0)
    objective.end_epoch(policy, global_step=1)
    name = next(iter(start))
    assert torch.allclose(objective.ema[name], start[name] + 0.5)  # 0.5 old + 0.5 (old + 1)

    batch = policy.sample(["a", "b"], generator=torch.Generator().manual_seed(0))
    batch.advantages = torch.tensor([1.0, -1.0])
    metrics = [term.metrics for term in objective.loss_terms(policy, batch, torch.Generator().manual_seed(0))]
    assert all(m["ema_divergence"] > 0 for m in metrics)  # the weights moved away from the EMA

    restored = build_objective(run.objective)
    restored.setup(policy, run)
    restored.load_state_dict(objective.state_dict())
    assert torch.equal(restored.ema[name], objective.ema[name])
