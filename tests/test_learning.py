"""Learning tests: REBEL and AWM raise the JPEG compressibility of the tiny SD model because of
their reward, not merely because training moves the weights.

On this random model any weight change tends to smooth its coloured noise a little, so a rise
alone proves little (measured: REBEL trained on the FLIPPED reward, jpeg_incompressibility,
still made images more compressible by ~3 first-epoch stds in 8-10 epochs). The test therefore
runs a control with the same seed and settings and the flipped reward, and asserts that the real
run ends clearly more compressible than the control (REBEL's tiny config at 32 px, one CPU
thread, about 2 minutes for the pair). The DDPO demo's test is in test_train.py.

AWM trains the denoising (matching) loss, which on a model that cannot denoise smooths its
outputs whatever the target: on the random model it did not beat its flipped-reward control
(+1.6 / +0.8 first-epoch stds with the reward, +1.2 with it flipped). Its test therefore first
teaches the tiny model to denoise (200 Adam steps of the plain matching loss on the 18 drawn
shapes of configs/tiny/data/shapes, about 30 s), then runs AWM with the reward and flipped.
Measured (10 epochs): with the reward -1.583 -> -1.333 kB, flipped 1.583 -> 1.607 kB (the
flipped run made images LESS compressible, as its reward asks).

SePPO has no learning test yet: against random-noise winners (its control) it did not separate
on the random model (64 px, 10 epochs: drawings -4.506 -> -4.403 kB, noise -4.506 -> -4.335)
nor on the pre-trained one at beta 10; at beta 300 on the pre-trained one a single seed ended
3.3 stds ahead (8 epochs), not yet checked across seeds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from align_gen.config import load_config
from align_gen.tracking import read_metrics
from align_gen.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
COMMON = ["grid.every=0", "grid.num_prompts=1", "grid.seeds=[0]", "tensorboard=false", "save_every=100"]


def _compressibility(config_name: str, output: Path, *overrides: str, flipped: bool = False) -> tuple[float, float]:
    """(mean JPEG compressibility of the last 3 epochs' samples, first epoch's reward std)."""
    config = load_config(CONFIGS / config_name, [*COMMON, f"output_dir={output}", *overrides])
    rows = read_metrics(train(config).metrics)
    sign = -1.0 if flipped else 1.0  # jpeg_incompressibility = -jpeg_compressibility
    tail = sum(sign * row["reward_mean"] for row in rows[-3:]) / 3
    return tail, rows[0]["reward_std"]


@pytest.mark.slow
def test_rebel_follows_its_reward(tmp_path: Path, single_thread) -> None:
    """Measured (10 epochs, last-3 means): seed 0 real -1.506 vs flipped -1.558 kB (6.4 stds)."""
    real, std = _compressibility("rebel_tiny_compressibility.yaml", tmp_path / "real", "epochs=10")
    control, _ = _compressibility(
        "rebel_tiny_compressibility.yaml",
        tmp_path / "flipped",
        "epochs=10",
        "reward.weights={jpeg_incompressibility: 1.0}",
        flipped=True,
    )
    assert real > control + 2 * std, (real, control, std)


def _pretrained_denoiser(folder: Path) -> Path:
    """The tiny random SD model after 200 Adam steps of its own denoising loss on the drawn
    shapes (at 32 px), saved as a diffusers folder: a model that denoises, cheaply."""
    import torch

    from align_gen.image_datasets import load_image_dataset
    from align_gen.policies import build_policy

    config = load_config(CONFIGS / "awm_tiny_compressibility.yaml", [])
    policy = build_policy(config.model, config.sample, "cpu")
    dataset = load_image_dataset(str(CONFIGS / "data" / "shapes"))
    generator = torch.Generator().manual_seed(0)
    prompts_rollout = policy.sample(dataset.prompts, generator=generator)  # carries the prompts' conditioning
    clean = policy.encode_samples(dataset.images_for(dataset.prompts, policy.resolution, generator))
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-3)
    torch.manual_seed(0)
    for _ in range(200):
        loss = policy.matching_loss(prompts_rollout, clean=clean).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.pipeline.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_awm_follows_its_reward_on_a_model_that_denoises(tmp_path: Path, single_thread) -> None:
    model = f"model.pretrained={_pretrained_denoiser(tmp_path / 'denoiser')}"
    real, std = _compressibility("awm_tiny_compressibility.yaml", tmp_path / "real", "epochs=5", model)
    control, _ = _compressibility(
        "awm_tiny_compressibility.yaml",
        tmp_path / "flipped",
        "epochs=5",
        model,
        "reward.weights={jpeg_incompressibility: 1.0}",
        flipped=True,
    )
    assert real > control + 2 * std, (real, control, std)
