"""Diffusion-DPO: the loss against a hand derivation, and one update ranking the policy's own
pairs the reward's way (a flipped reward ranks them the other way), on SD and a VLM; offline, a
dataset's pairs its way (flipped data the other way), the checks, and training through train()."""

from __future__ import annotations

import math

import pytest
import torch

from align_gen.builtins.tiny_diffusion import build_tiny_random_sd
from align_gen.config import LoraConfig, ModelConfig, SampleConfig, load_config
from align_gen.errors import ConfigError
from align_gen.objectives import build_objective
from align_gen.objectives.diffusion_dpo import DiffusionDPOConfig, diffusion_dpo_loss
from align_gen.policies.diffusion import DiffusionPolicy
from tests.test_vlm_policy import make_policy as make_vlm_policy
from tests.test_vlm_policy import questions

PROMPTS = ["a red circle", "a red circle", "a blue square", "a blue square"]
# Pair 1: the first sample wins; pair 2: the second does.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0])


def test_loss_and_gradient_match_hand_derivation() -> None:
    """Pairs: the first wins (margin d_1 - d_2 = -0.2), the second wins (margin d_2 - d_1 = 0.3),
    a tie (ignored). beta 10, so k = beta / 2 = 5: the loss is the mean over the two decided pairs
    of -log sigmoid(-k m) = log(1 + exp(k m)), and d loss / d m = k sigmoid(k m) / 2."""
    first = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
    second = torch.tensor([0.3, 0.1, 0.3], requires_grad=True)
    loss, metrics = diffusion_dpo_loss(first, second, torch.tensor([1.0, -1.0, 0.0]), beta=10.0)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.5))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    g1, g2 = 5 * sigmoid(-1.0) / 2, 5 * sigmoid(1.5) / 2
    torch.testing.assert_close(first.grad, torch.tensor([g1, -g2, 0.0]))
    torch.testing.assert_close(second.grad, torch.tensor([-g1, g2, 0.0]))
    assert float(metrics["preference_accuracy"]) == 0.5 and float(metrics["tie_rate"]) == pytest.approx(1 / 3)
    assert float(metrics["margin"]) == pytest.approx(0.05)


def test_config_and_pairs_are_checked() -> None:
    with pytest.raises(ConfigError, match="beta must be > 0"):
        DiffusionDPOConfig(beta=0.0)
    config = load_config(None, ["objective.name=diffusion_dpo"])
    with pytest.raises(ConfigError, match="samples_per_prompt must be even"):
        build_objective(config.objective).check(config)


def _margin_after_one_update(policy, batch, train_rewards: torch.Tensor, lr: float, beta: float) -> tuple[float, float]:
    """(before, after): the mean d_w - d_l of ``batch``'s pairs ranked by REWARDS, at one fixed
    draw of timesteps and noise, around one SGD step on the pairs ranked by ``train_rewards``."""
    objective = build_objective(DiffusionDPOConfig(beta=beta))

    def margin() -> float:
        batch.rewards = REWARDS
        with torch.no_grad():
            (term,) = objective.loss_terms(policy, batch, torch.Generator().manual_seed(5))
        return float(term.metrics["margin"])

    before = margin()
    batch.rewards = train_rewards
    optimizer = torch.optim.SGD(list(policy.trainable_parameters()), lr=lr)
    (term,) = objective.loss_terms(policy, batch, torch.Generator().manual_seed(5))
    term.loss.backward()
    optimizer.step()
    return before, margin()


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("flipped", [False, True], ids=["reward", "flipped-reward"])
def test_one_update_ranks_the_pairs_the_reward_s_way(flipped: bool) -> None:
    """The policy starts as the reference (LoRA B = 0), so every d is 0; one update makes the
    winners' denoising error fall below the losers' (margin < 0), and the flipped reward's update
    does the opposite."""
    torch.manual_seed(0)
    policy = DiffusionPolicy(
        build_tiny_random_sd(),
        ModelConfig(lora=LoraConfig(enabled=True, rank=4, alpha=4.0)),
        SampleConfig(num_steps=3, guidance_scale=2.0, batch_size=4, samples_per_prompt=2),
    )
    batch = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    before, after = _margin_after_one_update(policy, batch, -REWARDS if flipped else REWARDS, lr=1e-3, beta=5000.0)
    assert before == 0.0
    assert (after > 0) if flipped else (after < 0), after


@pytest.mark.parametrize("flipped", [False, True], ids=["reward", "flipped-reward"])
def test_on_a_vlm_it_is_dpo_on_the_answers(flipped: bool) -> None:
    torch.manual_seed(0)
    policy = make_vlm_policy("tiny-random-llava")
    prompts = [p for p in questions(2) for _ in range(2)]  # two pairs
    batch = policy.sample(prompts, generator=torch.Generator().manual_seed(0))
    before, after = _margin_after_one_update(policy, batch, -REWARDS if flipped else REWARDS, lr=0.05, beta=5.0)
    assert before == 0.0
    assert (after > 0) if flipped else (after < 0), after


# ----------------------------------------------------------------------------------------------
# offline: dataset pairs


def _write_pairs(folder, flipped: bool = False):
    """A JSONL file of two prompts whose preferred image is red (blue when ``flipped``)."""
    import json

    from PIL import Image

    for name, colour in (("red.png", (230, 20, 20)), ("blue.png", (20, 20, 230))):
        Image.new("RGB", (64, 64), colour).save(folder / name)
    winner, loser = ("blue.png", "red.png") if flipped else ("red.png", "blue.png")
    rows = [{"prompt": prompt, "image": winner, "rejected": loser} for prompt in ("a red circle", "a blue square")]
    path = folder / ("flipped.jsonl" if flipped else "pairs.jsonl")
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def _offline_policy() -> DiffusionPolicy:
    torch.manual_seed(0)
    return DiffusionPolicy(
        build_tiny_random_sd(),
        ModelConfig(lora=LoraConfig(enabled=True, rank=4, alpha=4.0)),
        SampleConfig(num_steps=3, guidance_scale=2.0, batch_size=4, samples_per_prompt=2),
    )


def test_a_data_rollout_holds_the_encoded_images(tmp_path) -> None:
    policy = _offline_policy()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    rollout = policy.data_rollout(["a red circle", "a blue square"], images)
    assert rollout.num_steps == 0 and rollout.trajectory.shape == (2, 1, 4, 32, 32)
    torch.testing.assert_close(rollout.final_samples, policy.encode_samples(images))
    expected = policy.encode_prompts(["a red circle", "a blue square"])
    assert all(torch.equal(rollout.conditioning[key], expected[key]) for key in expected)
    with pytest.raises(ValueError, match="one image per prompt"):
        policy.data_rollout(["a red circle"], images)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("flipped", [False, True], ids=["preference", "flipped-preference"])
def test_offline_one_update_ranks_the_dataset_pairs_its_way(flipped: bool, tmp_path) -> None:
    """Red is preferred to blue in the data (blue in the flipped control's): one update makes the
    red images' denoising error fall below the blue ones' relative to the reference, measured on
    the unflipped pairs (margin < 0), and the flipped data's update does the opposite."""
    policy = _offline_policy()
    measured = build_objective(DiffusionDPOConfig(pairs="dataset"))
    trained = build_objective(DiffusionDPOConfig(pairs="dataset"))
    measured.setup(policy, load_config(None, [f"prompts.source={_write_pairs(tmp_path)}"]))
    trained.setup(policy, load_config(None, [f"prompts.source={_write_pairs(tmp_path, flipped)}"]))
    batch = measured.sample(policy, PROMPTS, torch.Generator().manual_seed(0))
    assert batch.extras["winner"].tolist() == [1.0, 0.0, 1.0, 0.0] and batch.rewards is None

    def margin() -> float:
        with torch.no_grad():
            (term,) = measured.loss_terms(policy, batch, torch.Generator().manual_seed(5))
        return float(term.metrics["margin"])

    assert margin() == 0.0
    training_batch = trained.sample(policy, PROMPTS, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(list(policy.trainable_parameters()), lr=1e-3)
    (term,) = trained.loss_terms(policy, training_batch, torch.Generator().manual_seed(5))
    term.loss.backward()
    optimizer.step()
    assert (margin() > 0) if flipped else (margin() < 0)


def test_offline_settings_are_checked(tmp_path) -> None:
    config = load_config(None, ["objective.name=diffusion_dpo", "objective.pairs=dataset", "sample.samples_per_prompt=2"])
    with pytest.raises(ConfigError, match="is not a dataset of images"):
        build_objective(config.objective).check(config)
    with pytest.raises(ConfigError, match="a VLM trains on its own answers"):
        build_objective(config.objective).check_policy_kind(takes_images=True)
    with pytest.raises(ConfigError, match="objective.pairs must be online or dataset"):
        DiffusionDPOConfig(pairs="offline")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "winners.jsonl").write_text('{"prompt": "p", "image": "a.png"}')
    run = load_config(None, ["sample.samples_per_prompt=2", f"prompts.source={tmp_path / 'winners.jsonl'}"])
    with pytest.raises(ConfigError, match="has no rejected images"):
        build_objective(DiffusionDPOConfig(pairs="dataset")).setup(None, run)


@pytest.mark.usefixtures("single_thread")
def test_offline_training_resumes_and_saves(tmp_path) -> None:
    from align_gen.tracking import read_metrics
    from align_gen.train import train
    from tests.test_matrix import TINY

    overrides = [
        *[o for o in TINY if not o.startswith("prompts.source")],
        "objective.name=diffusion_dpo",
        "objective.pairs=dataset",
        f"prompts.source={_write_pairs(tmp_path)}",
        "model.pretrained=align-gen:tiny-random-sd",
        f"output_dir={tmp_path / 'run'}",
    ]
    train(load_config(None, [*overrides, "epochs=1"]))
    result = train(load_config(None, [*overrides, "epochs=2", "resume=latest"]))
    rows = read_metrics(result.metrics)
    assert [row["epoch"] for row in rows] == [0, 1] and all(math.isfinite(row["loss"]) for row in rows)
    assert rows[-1]["preference_accuracy"] >= 0
