"""Every objective on every diffusion policy, through `train()`: no per-pair code anywhere.

Each cell trains a tiny epoch, checkpoints, resumes for a second, and saves a model that
diffusers loads back (LoRA weights into a fresh pipeline of the same family).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align_gen.builtins import builtins
from align_gen.config import load_config
from align_gen.tracking import read_metrics
from align_gen.train import train

OBJECTIVES = {
    "ddpo": [],
    "grpo": ["objective.beta=0.01"],
    "rebel": [],
    "awm": ["objective.num_timesteps=2", "objective.ema_beta=0.5"],
    "seppo": [
        "objective.beta=50",
        "objective.reference=uniform",
        f"prompts.source={Path(__file__).resolve().parents[1] / 'configs' / 'tiny' / 'data' / 'shapes'}",
    ],
    "diffusion_dpo": [],
    "nft": ["objective.num_timesteps=2"],
}
MODELS = ["tiny-random-sd", "tiny-random-sd2", "tiny-random-sd3", "tiny-random-sdxl", "tiny-random-flux"]

TINY = [
    "sample.num_steps=3",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=1",
    "sample.samples_per_prompt=2",
    "sample.guidance_scale=2.0",
    "advantage.kind=group",
    "model.lora.enabled=true",
    "grid.num_prompts=1",
    "grid.seeds=[0]",
    "grid.every=0",
    "tensorboard=false",
    "prompts.source=builtin:shapes",
    "save_every=1",
]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_objective_trains_resumes_and_saves_on_policy(objective: str, model: str, tmp_path: Path) -> None:
    overrides = [*TINY, f"objective.name={objective}", *OBJECTIVES[objective], f"model.pretrained=align-gen:{model}"]
    output = f"output_dir={tmp_path / 'run'}"
    train(load_config(None, [*overrides, output, "epochs=1"]))
    result = train(load_config(None, [*overrides, output, "epochs=2", "resume=latest"]))

    rows = read_metrics(result.metrics)
    assert [row["epoch"] for row in rows] == [0, 1]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert rows[-1]["global_step"] == 2  # one optimizer step per epoch, none repeated on resume

    pipeline = builtins()[model].load()
    pipeline.load_lora_weights(str(result.final_model))
    denoiser = getattr(pipeline, "unet", None) or pipeline.transformer
    assert any("lora" in name for name, _ in denoiser.named_parameters())
