"""The SD3 flow policy on the built-in tiny random pipeline: re-scoring, the masked last step,
the velocity matching loss, the reference, saving, build_policy, and one DDPO update."""

from __future__ import annotations

import pytest
import torch

from align_gen.builtins.tiny_diffusion import build_tiny_random_sd3
from align_gen.config import LoraConfig, ModelConfig, SampleConfig
from align_gen.objectives import build_objective
from align_gen.objectives.ddpo import DDPOConfig
from align_gen.policies import build_policy
from align_gen.policies.diffusion import DiffusionPolicy
from align_gen.policies.flow import FlowPolicy

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red circle"]
pytestmark = pytest.mark.usefixtures("single_thread")


def make_policy(*, lora: bool, guidance: float, steps: int = 4, noise_level: float = 0.7) -> FlowPolicy:
    return FlowPolicy(
        build_tiny_random_sd3(),
        ModelConfig(pretrained="align-gen:tiny-random-sd3", lora=LoraConfig(enabled=lora, rank=4, alpha=4.0)),
        SampleConfig(num_steps=steps, guidance_scale=guidance, batch_size=len(PROMPTS), noise_level=noise_level),
    )


def perturb(policy: FlowPolicy, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["no_cfg", "cfg"])
def test_rescoring_reproduces_sampling_log_probs(lora: bool, guidance: float) -> None:
    policy = make_policy(lora=lora, guidance=guidance)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert rollout.trajectory.shape == (4, 5, 16, 32, 32)
    assert rollout.timesteps.shape == (4, 4) and rollout.timesteps[0, 0] == 1000  # sigma * N
    assert rollout.log_probs.shape == (4, 4) and rollout.log_probs.dtype == torch.float32
    assert rollout.step_mask[:, :-1].all() and not rollout.step_mask[:, -1].any()  # last step excluded
    assert rollout.images.shape == (4, 3, 64, 64)
    assert 0 <= rollout.images.min() and rollout.images.max() <= 1
    assert ("negative_pooled_prompt_embeds" in rollout.conditioning) == (guidance > 1)

    rescored = policy.step_log_prob(rollout, torch.arange(4))  # (B, T), all steps
    assert (torch.exp(rescored - rollout.log_probs) - 1).abs().max() < 1e-5
    steps = torch.tensor([[3, 0], [1, 2], [0, 3], [2, 1]])  # per-sample steps, as DDPO visits them
    per_sample = policy.step_log_prob(rollout, steps)
    assert (torch.exp(per_sample - rollout.log_probs.gather(1, steps)) - 1).abs().max() < 1e-5


def test_step_log_prob_has_grad_and_guidance_changes_the_trajectory() -> None:
    policy = make_policy(lora=True, guidance=3.0)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    policy.step_log_prob(rollout, torch.tensor([1])).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    unguided = make_policy(lora=True, guidance=1.0).sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(unguided.trajectory[:, -1], rollout.trajectory[:, -1])


def test_noise_level_zero_is_the_ode_with_nothing_to_train() -> None:
    policy = make_policy(lora=True, guidance=1.0, noise_level=0.0)
    rollout = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    assert not rollout.step_mask.any() and not rollout.log_probs.any()
    x, sigmas = rollout.trajectory[:, 0], policy.scheduler.sigmas
    with torch.no_grad():
        velocity = policy._denoise(x, rollout.timesteps[:, 0], rollout.conditioning)
    euler = x + velocity * (sigmas[1] - sigmas[0])  # the first ODE step, x + v dt
    assert torch.allclose(rollout.trajectory[:, 1], euler, atol=1e-6)


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
    """x_s = (1 - s) x0 + s eps with s = t / 1000; target eps - x0; loss = mean (v - target)^2."""
    policy = make_policy(lora=True, guidance=1.0)
    rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 250.0, 500.0, 900.0])
    noise = torch.randn(rollout.final_samples.shape, generator=torch.Generator().manual_seed(1))
    loss = policy.matching_loss(rollout, t=t, noise=noise)
    assert loss.shape == (4,) and loss.requires_grad
    assert torch.allclose(policy.noise_level(t), torch.tensor([0.01, 0.25, 0.5, 0.9]))

    x0 = rollout.final_samples
    s = (t / 1000).view(-1, 1, 1, 1)
    with torch.no_grad():
        velocity = policy.transformer(
            hidden_states=(1 - s) * x0 + s * noise,
            timestep=t,
            encoder_hidden_states=rollout.conditioning["prompt_embeds"],
            pooled_projections=rollout.conditioning["pooled_prompt_embeds"],
        ).sample
    expected = (velocity - (noise - x0)).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss.detach(), expected, atol=1e-6)

    terms = policy.matching_terms(rollout, t=t, noise=noise)
    assert torch.allclose(terms.loss.detach(), expected, atol=1e-6)
    assert torch.allclose(terms.reference_loss[0], expected, atol=1e-6)
    assert torch.allclose(terms.divergence, torch.zeros(1, 4), atol=1e-10)  # LoRA B = 0: still the reference


def test_saved_lora_loads_into_a_diffusers_pipeline(tmp_path) -> None:
    policy = make_policy(lora=True, guidance=1.0)
    perturb(policy)
    policy.save(tmp_path / "final")
    assert (tmp_path / "final" / "align_gen_model.json").is_file()
    pipeline = build_tiny_random_sd3()
    pipeline.load_lora_weights(str(tmp_path / "final"))
    latents = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    conditioning = policy.encode_prompts(PROMPTS[:2])
    inputs = {
        "hidden_states": latents,
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": conditioning["prompt_embeds"],
        "pooled_projections": conditioning["pooled_prompt_embeds"],
    }
    with torch.no_grad():
        ours = policy.transformer(**inputs).sample
        theirs = pipeline.transformer(**inputs).sample
        base = build_tiny_random_sd3().transformer(**inputs).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-4)


def test_trainable_state_dict_round_trips() -> None:
    policy = make_policy(lora=True, guidance=1.0)
    perturb(policy)
    state = policy.trainable_state_dict()
    fresh = make_policy(lora=True, guidance=1.0)
    fresh.load_trainable_state_dict(state)
    assert all(torch.equal(value, fresh.trainable_state_dict()[name]) for name, value in state.items())


def test_build_policy_picks_the_family_from_the_pipeline() -> None:
    sample = SampleConfig(num_steps=2, guidance_scale=1.0)
    assert isinstance(build_policy(ModelConfig(pretrained="align-gen:tiny-random-sd3"), sample), FlowPolicy)
    assert isinstance(build_policy(ModelConfig(pretrained="align-gen:tiny-random-sd"), sample), DiffusionPolicy)


@pytest.mark.parametrize(("lora", "lr"), [(True, 100.0), (False, 1.0)], ids=["lora", "full"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_one_ddpo_update_moves_the_trajectory_log_prob_with_the_advantage(sign: float, lora: bool, lr: float) -> None:
    """The SD objective unchanged: summed log-prob over the trainable (masked) steps moves with A.
    The per-element mean log-prob's gradient is small on the random tiny transformer (LoRA's
    starts at B = 0), hence the large learning rates."""
    policy = make_policy(lora=lora, guidance=1.0, steps=3)
    rollout = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    rollout.advantages = torch.full((2,), sign)
    objective = build_objective(DDPOConfig(clip_range=10.0))  # wide: the first step stays unclipped
    optimizer = torch.optim.SGD(list(policy.trainable_parameters()), lr=lr)
    for term in objective.loss_terms(policy, rollout, torch.Generator().manual_seed(0)):
        term.loss.backward()
    optimizer.step()
    mask = rollout.step_mask.float()
    with torch.no_grad():
        after = (policy.step_log_prob(rollout, torch.arange(3)) * mask).sum(dim=1)
    change = after - (rollout.log_probs * mask).sum(dim=1)
    assert (sign * change > 0).all(), change


def test_a_saved_sd3_folder_without_t5_loads_back(tmp_path) -> None:
    """SD3 saved with text_encoder_3=None (model_index.json: [null, null]) loads through
    build_policy: diffusers needs the absent components passed as None."""
    pipeline = build_tiny_random_sd3()
    assert pipeline.text_encoder_3 is None
    pipeline.save_pretrained(tmp_path)
    policy = build_policy(ModelConfig(pretrained=str(tmp_path)), SampleConfig(num_steps=2), "cpu", trainable=False)
    assert isinstance(policy, FlowPolicy)
    assert policy.sample(["a red circle"], generator=torch.Generator().manual_seed(0)).images.shape[0] == 1
