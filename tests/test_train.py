"""The training loop end to end on the tiny random model: outputs, exact resume, learning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align_gen.checkpoint import list_checkpoints
from align_gen.config import load_config
from align_gen.tracking import read_metrics
from align_gen.train import train

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "tiny" / "ddpo_tiny_compressibility.yaml"
TIMING_KEYS = {"time_sampling_s", "time_update_s"}

# A fast variant of the demo: 3 denoising steps, 4 samples per epoch.
FAST = [
    "sample.num_steps=3",
    "sample.batch_size=2",
    "sample.num_batches_per_epoch=2",
    "grid.num_prompts=1",
    "grid.seeds=[0]",
    "grid.every=0",
    "tensorboard=false",
]


def run(output_dir: Path, *overrides: str):
    config = load_config(DEMO_CONFIG, [*FAST, f"output_dir={output_dir}", *overrides])
    return train(config)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def test_a_run_writes_metrics_grids_checkpoints_and_a_final_model(tmp_path: Path) -> None:
    result = run(tmp_path / "run", "epochs=2", "save_every=1", "keep_checkpoints=1", "model.lora.enabled=true")
    rows = read_metrics(result.metrics)
    assert [row["epoch"] for row in rows] == [0, 1]
    for key in ("reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "grad_norm", "samples"):
        assert key in rows[0], key
    assert rows[0]["samples"] == 4
    assert result.learning_curve.is_file()
    assert [p.name for p in result.grids] == ["epoch_000000.png", "epoch_000002.png"]
    assert all(p.is_file() for p in result.grids)
    assert [p.name for p in list_checkpoints(result.output_dir)] == ["epoch_000002"]
    assert (result.final_model / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((result.final_model / "align_gen_model.json").read_text())["kind"] == "lora"
    assert (result.output_dir / "config.yaml").is_file()


def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    # Per-prompt advantages (their buffers are part of the checkpoint) and CFG on.
    settings = ["save_every=2", "advantage.kind=per_prompt", "advantage.min_count=2", "sample.guidance_scale=2.0"]
    straight = run(tmp_path / "straight", "epochs=4", *settings)
    run(tmp_path / "resumed", "epochs=2", *settings)
    resumed = run(tmp_path / "resumed", "epochs=4", "resume=latest", *settings)

    assert without_timing(read_metrics(straight.metrics)) == without_timing(read_metrics(resumed.metrics))
    weights = [load_file(str(list_checkpoints(r.output_dir)[-1] / "trainable.safetensors")) for r in (straight, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path: Path) -> None:
    result = run(tmp_path / "run", "epochs=1", "resume=latest")
    assert [row["epoch"] for row in read_metrics(result.metrics)] == [0]


@pytest.mark.slow
def test_demo_raises_compressibility(tmp_path: Path) -> None:
    """A shortened `make demo`: the same config, fewer epochs; the reward must clearly rise."""
    epochs = int(os.environ.get("ALIGN_GEN_DEMO_TEST_EPOCHS", "12"))
    config = load_config(DEMO_CONFIG, [f"output_dir={tmp_path}", f"epochs={epochs}", "grid.every=0", "tensorboard=false"])
    result = train(config)
    rows = read_metrics(result.metrics)
    first, last = rows[0], rows[-1]
    # "Clearly above": by more than twice the spread of the first epoch's rewards (which is far
    # more than the uncertainty of its mean, std / sqrt(64)).
    margin = 2 * first["reward_std"]
    assert last["reward_mean"] > first["reward_mean"] + margin, [round(r["reward_mean"], 4) for r in rows]
