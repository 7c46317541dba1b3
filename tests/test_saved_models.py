"""What is saved is what was trained: a saved LoRA adapter with alpha != rank, reloaded by plain
diffusers or by ``align-gen sample`` / ``evaluate``, and a full fine-tune reloaded with
``from_pretrained``, reproduce the trained model exactly, on every diffusion family.

Before adapters carried their peft config, diffusers rebuilt them at alpha == rank (scale 1),
so a rank 4 / alpha 8 adapter reloaded at half its trained strength.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from align_gen.cli import main
from align_gen.config import LoraConfig, ModelConfig, SampleConfig, load_config
from align_gen.policies import build_policy
from align_gen.policies.loading import load_pipeline
from align_gen.train import train

FAMILIES = ["tiny-random-sd", "tiny-random-sd2", "tiny-random-sdxl", "tiny-random-sd3", "tiny-random-flux"]


def _pipeline_latents(pipeline, resolution: int) -> torch.Tensor:
    """The final latents of the pipeline's own ``__call__`` (plain diffusers), 2 steps, seeded."""
    output = pipeline(
        "a red circle",
        num_inference_steps=2,
        guidance_scale=2.0,
        height=resolution,
        width=resolution,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    return output.images


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_with_alpha_not_rank_reloads_exactly_in_diffusers(family: str, tmp_path: Path) -> None:
    lora = LoraConfig(rank=2, alpha=6.0, target_modules=["to_q", "to_v"])  # scale 3, not the default targets
    policy = build_policy(ModelConfig(pretrained=f"align-gen:{family}", lora=lora), SampleConfig(num_steps=2), "cpu")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "trained" adapter: lora_B starts at zero, which would hide the scale
        for parameter in policy.trainable_parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    policy.save(tmp_path / "final")

    reloaded = load_pipeline(f"align-gen:{family}")  # a fresh copy, as a diffusers user would load it
    base = _pipeline_latents(reloaded, policy.resolution)
    reloaded.load_lora_weights(str(tmp_path / "final"))
    trained = _pipeline_latents(policy.pipeline, policy.resolution)

    assert not torch.equal(trained, base), "the adapter must change the output, or the test proves nothing"
    assert torch.equal(_pipeline_latents(reloaded, policy.resolution), trained)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("family", FAMILIES)
def test_a_full_fine_tune_reloads_exactly_with_from_pretrained(family: str, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    model_config = ModelConfig(pretrained=f"align-gen:{family}", lora=LoraConfig(enabled=False))
    policy = build_policy(model_config, SampleConfig(num_steps=2), "cpu")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    policy.save(tmp_path / "final")

    # The tiny SD3 has no T5 (saved as absent), which diffusers wants said explicitly; a real SD3 has one.
    absent = {"text_encoder_3": None, "tokenizer_3": None} if family == "tiny-random-sd3" else {}
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "final", **absent)
    assert type(reloaded) is type(policy.pipeline)
    trained = _pipeline_latents(policy.pipeline, policy.resolution)
    assert not torch.equal(trained, _pipeline_latents(load_pipeline(f"align-gen:{family}"), policy.resolution))
    assert torch.equal(_pipeline_latents(reloaded, policy.resolution), trained)


def _grid_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.usefixtures("single_thread")
def test_sample_and_evaluate_of_a_run_reproduce_its_trained_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prompt_file: Path, tiny_train_overrides: list[str]
) -> None:
    """``final/`` (diffusers LoRA file) and the last checkpoint (the trained tensors on the run's
    config) give the same pixels and the same scores; the base model gives others."""
    run_dir = tmp_path / "run"
    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "tiny" / "ddpo_tiny_compressibility.yaml",
        [
            *tiny_train_overrides,
            f"output_dir={run_dir}",
            f"prompts.source={prompt_file}",
            "model.lora.enabled=true",
            "model.lora.rank=2",
            "model.lora.alpha=8",
            "train.learning_rate=0.05",  # one step must move the samples visibly
        ],
    )
    train(config)
    checkpoint = run_dir / "checkpoints" / "epoch_000001"
    sampling = f"--prompts {prompt_file} --steps 2 --seeds 0 1"

    grids = {}
    for name, model in (("final", run_dir / "final"), ("checkpoint", checkpoint), ("base", "align-gen:tiny-random-sd")):
        grids[name] = tmp_path / f"{name}.png"
        assert main(["sample", str(model), *sampling.split(), "--out", str(grids[name])]) == 0
    assert np.array_equal(_grid_pixels(grids["final"]), _grid_pixels(grids["checkpoint"]))
    assert np.abs(_grid_pixels(grids["final"]) - _grid_pixels(grids["base"])).max() > 8

    summary_path = tmp_path / "evaluation.json"
    argv = ["evaluate", str(run_dir), "--compare", str(checkpoint), "--reward", "jpeg_compressibility",
            *sampling.split(), "--out", str(summary_path)]
    assert main(argv) == 0
    capsys.readouterr()
    summary = json.loads(summary_path.read_text())
    assert summary["rewards"]["jpeg_compressibility"]["mean"] == summary["compare"]["rewards"]["jpeg_compressibility"]["mean"]
    assert summary["comparison"]["jpeg_compressibility"]["mean_difference"] == 0.0
