"""VLMs through the same `align-gen train | sample | evaluate` as diffusion models: every
objective trains a tiny LLaVA / Qwen2-VL, resumes, and saves a model that loads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align_gen.cli import main
from align_gen.config import load_config
from align_gen.tracking import read_metrics
from align_gen.train import train
from tests.test_vlm_policy import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT / "configs" / "tiny" / "data" / "shape_questions.jsonl"
OBJECTIVES = {
    "ddpo": ["objective.clip_range=0.2"],
    "grpo": ["objective.clip_range=0.2", "objective.beta=0.05"],
    "rebel": [],
    "awm": ["objective.num_timesteps=1", "objective.weighting=uniform", "objective.ema_beta=0.5"],
    "seppo": ["objective.beta=5", "objective.reference=uniform"],
    "diffusion_dpo": ["objective.beta=5"],
}
TINY = [
    "sample.max_new_tokens=4",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=1",
    "sample.samples_per_prompt=2",
    "advantage.kind=group",
    "model.lora.enabled=true",
    "reward.weights={answer_match: 1.0}",
    f"prompts.source={QUESTIONS}",
    "grid.num_prompts=2",
    "grid.seeds=[0]",
    "grid.every=0",
    "tensorboard=false",
    "save_every=1",
]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_objective_trains_resumes_and_saves_a_vlm(objective: str, family: str, tmp_path: Path) -> None:
    overrides = [*TINY, f"objective.name={objective}", *OBJECTIVES[objective], f"model.pretrained=align-gen:{family}"]
    output = f"output_dir={tmp_path / 'run'}"
    train(load_config(None, [*overrides, output, "epochs=2"]))
    result = train(load_config(None, [*overrides, output, "epochs=3", "resume=latest"]))

    rows = read_metrics(result.metrics)
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert rows[-1]["global_step"] == 3
    assert (result.final_model / "adapter_model.safetensors").is_file()
    assert result.grids[-1].is_file()


@pytest.mark.usefixtures("single_thread")
def test_sample_and_evaluate_a_trained_vlm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = train(
        load_config(
            None,
            [*TINY, "objective.name=rebel", "model.pretrained=align-gen:tiny-random-llava", f"output_dir={tmp_path}", "epochs=1"],
        )
    )
    common = [str(run.final_model), "--prompts", str(QUESTIONS), "--seeds", "0", "1", "--max-new-tokens", "4"]
    assert main(["sample", *common, "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    report = tmp_path / "evaluation.json"
    assert main(["evaluate", *common, "--reward", "answer_match", "--out", str(report)]) == 0
    scores = json.loads(report.read_text())["rewards"]["answer_match"]
    assert scores["n"] == 36 and 0.0 <= scores["mean"] <= 1.0
    assert "answer_match" in capsys.readouterr().out


def test_a_vlm_needs_an_image_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["train", str(ROOT / "configs" / "tiny" / "rebel_tiny_vlm_colour.yaml"), "prompts.source=builtin:shapes", f"output_dir={tmp_path}"]
    )
    assert code == 2
    assert "is not a dataset of (image, prompt) examples" in capsys.readouterr().err


def test_a_text_reward_on_a_diffusion_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            str(ROOT / "configs" / "tiny" / "ddpo_tiny_compressibility.yaml"),
            "reward.weights={answer_match: 1.0}",
            f"output_dir={tmp_path}",
            "epochs=1",
            "sample.num_steps=2",
            "sample.batch_size=2",
            "sample.num_batches_per_epoch=1",
        ]
    )
    assert code == 2
    assert "needs a vision-language policy" in capsys.readouterr().err
