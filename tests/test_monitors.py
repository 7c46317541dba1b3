"""Over-optimisation monitors: the diversity and KL formulas by hand, KL 0 before any update and
> 0 after, diversity on real CLIP embeddings, and the monitor keys of a tiny training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from align_gen.builtins.tiny_diffusion import build_tiny_random_sd
from align_gen.config import LoraConfig, ModelConfig, SampleConfig, load_config
from align_gen.errors import ConfigError
from align_gen.monitors import WORLD_CLIP, chain_kl_estimate, kl_to_base, pairwise_cosine_diversity
from align_gen.policies.diffusion import DiffusionPolicy
from align_gen.tracking import read_metrics
from align_gen.train import train

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny" / "ddpo_tiny_compressibility.yaml"
MONITOR_KEYS = {"monitor/train_reward", "monitor/heldout_reward", "monitor/reward_gap", "monitor/diversity", "monitor/kl_to_base"}


def test_diversity_by_hand() -> None:
    """Prompt a: e1 = (1, 0), e2 = (0, 1): cos 0, distance 1. Prompt b: (1, 0), (2, 0) (normalised
    to (1, 0)), (-1, 0): distances 0, 2, 2, mean 4/3. Prompt c has one sample and is left out.
    Diversity = (1 + 4/3) / 2 = 7/6."""
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [-1.0, 0.0], [0.3, 0.4]])
    groups = ["a", "b", "a", "b", "b", "c"]
    assert pairwise_cosine_diversity(embeddings, groups) == pytest.approx(7 / 6, abs=1e-12)
    assert pairwise_cosine_diversity(embeddings[:1], ["a"]) is None  # no prompt with two samples
    with pytest.raises(ValueError, match="group keys"):
        pairwise_cosine_diversity(embeddings, groups[:2])


def test_kl_estimate_by_hand() -> None:
    """Sample 0: steps (0.5 - 0.25) + (-1 - -2) = 1.25 (step 2 masked: its inf is ignored);
    sample 1: (0.1 - 0.3) = -0.2 (steps 1, 2 masked). Scale 4 (the element count): 5.0, -0.8."""
    log_probs = torch.tensor([[0.5, -1.0, float("inf")], [0.1, 7.0, 7.0]])
    base = torch.tensor([[0.25, -2.0, 0.0], [0.3, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    estimate = chain_kl_estimate(log_probs, base, mask, scale=4.0)
    assert estimate.tolist() == pytest.approx([5.0, -0.8], abs=1e-6)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kl_is_zero_before_any_update_and_positive_after(lora: bool) -> None:
    policy = DiffusionPolicy(
        build_tiny_random_sd(),
        ModelConfig(lora=LoraConfig(enabled=lora, rank=4, alpha=4.0)),
        SampleConfig(num_steps=2, guidance_scale=2.0 if lora else 1.0, batch_size=4),
    )
    prompts = ["a red circle", "a blue square"] * 2
    rollout = policy.sample(prompts, generator=torch.Generator().manual_seed(0))
    estimates, steps = kl_to_base(policy, rollout, batch_size=3)  # two batches, 3 + 1
    assert torch.equal(estimates, torch.zeros(4, dtype=torch.float64)) and steps.tolist() == [2] * 4

    optimizer = torch.optim.AdamW(list(policy.trainable_parameters()), lr=1e-2)
    for _ in range(2):  # raise the likelihood of the first samples: any real update moves the chain
        optimizer.zero_grad()
        (-policy.step_log_prob(rollout, torch.arange(2)).mean()).backward()
        optimizer.step()
    rollout = policy.sample(prompts, generator=torch.Generator().manual_seed(1))
    estimates, _ = kl_to_base(policy, rollout, batch_size=4)
    assert estimates.mean() > 0 and torch.isfinite(estimates).all()


@pytest.mark.usefixtures("single_thread")
def test_diversity_is_zero_for_identical_images_and_larger_for_different_ones() -> None:
    import numpy as np

    from align_gen.builtins import resolve_folder
    from align_gen.world.shapes import all_captions, render, scene_for_caption, to_tensor
    from reward_models.hf_clip import TransformersClipEncoder

    encoder = TransformersClipEncoder(resolve_folder(WORLD_CLIP), device="cpu", reward="monitors")
    rng = np.random.default_rng(0)
    captions = all_captions("train")[::300][:4]  # four different compositions
    different = torch.stack([to_tensor(render(scene_for_caption(rng, caption))) for caption in captions])
    same = different[:1].expand(4, -1, -1, -1)
    keys = ["p"] * 4
    with torch.no_grad():
        zero = pairwise_cosine_diversity(encoder.encode_images(same), keys)
        spread = pairwise_cosine_diversity(encoder.encode_images(different), keys)
    assert zero == pytest.approx(0.0, abs=1e-6)
    assert spread > 0.1


def test_monitor_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="Valid keys here: clip_model, diversity, enabled, every, kl_samples"):
        load_config(TINY_CONFIG, ["monitors.kl_sample=3"])
    with pytest.raises(ConfigError, match="monitors.every"):
        load_config(TINY_CONFIG, ["monitors.every=0"])


@pytest.mark.usefixtures("single_thread")
def test_a_tiny_run_logs_the_monitors_and_resumes_them(tmp_path: Path, prompt_file: Path) -> None:
    settings = [
        "sample.num_steps=2",
        "sample.batch_size=4",
        "sample.num_batches_per_epoch=1",
        "sample.samples_per_prompt=2",
        "grid.num_prompts=1",
        "grid.seeds=[0]",
        "grid.every=0",
        "tensorboard=false",
        "save_every=1",
        f"evaluation.prompts={prompt_file}",
        "evaluation.seeds=[0]",
        "evaluation.every=1",
    ]
    straight = train(load_config(TINY_CONFIG, [*settings, f"output_dir={tmp_path / 'a'}", "epochs=2"]))
    rows = read_metrics(straight.metrics)
    assert [row["epoch"] for row in rows] == [0, 1]
    for row in rows:
        assert MONITOR_KEYS <= row.keys(), MONITOR_KEYS - row.keys()
        assert row["monitor/train_reward"] == row["reward_mean"]
        assert row["monitor/reward_gap"] == pytest.approx(row["monitor/train_reward"] - row["monitor/heldout_reward"])
        assert 0 < row["monitor/diversity"] < 2 and math.isfinite(row["monitor/kl_to_base"])
    assert rows[0]["monitor/kl_to_base"] == 0.0 and rows[1]["monitor/kl_to_base"] > 0  # lr 3e-3, full fine-tune
    evaluations = read_metrics(straight.evaluation)  # epochs_done 0, 1, 2: row e gets epochs_done e
    assert [row["monitor/heldout_reward"] for row in rows] == [e["reward_mean"] for e in evaluations[:2]]

    # A resumed run reads the checkpoint's evaluation back and measures the same monitors.
    train(load_config(TINY_CONFIG, [*settings, f"output_dir={tmp_path / 'b'}", "epochs=1"]))
    resumed = train(load_config(TINY_CONFIG, [*settings, f"output_dir={tmp_path / 'b'}", "epochs=2", "resume=latest"]))
    resumed_rows = read_metrics(resumed.metrics)
    for a, b in zip(rows, resumed_rows, strict=True):
        assert {k: v for k, v in a.items() if k.startswith("monitor/")} == {
            k: v for k, v in b.items() if k.startswith("monitor/")
        }

    off = train(load_config(TINY_CONFIG, [*settings[:-3], f"output_dir={tmp_path / 'c'}", "epochs=1", "monitors.enabled=false"]))
    assert not [key for key in read_metrics(off.metrics)[0] if key.startswith("monitor/")]
