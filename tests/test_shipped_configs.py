"""Every shipped full-size config runs: its model swapped for a tiny one of the same structure.

For each YAML under configs/ that names a hub model, the test keeps everything that decides the
code path (family, pipeline and scheduler class, prediction type, LoRA rank / alpha / targets,
guidance, sampler and noise level, the objective and its settings, the advantage, the reward's
names and option names) and shrinks only sizes: the model (tests/stand_ins.py), the reward
weights, hub datasets, steps, batches, one epoch, float32 on the CPU. It trains that epoch, saves,
and samples the saved model back through ``align-gen sample``. A config that no longer parses,
names a removed key or a reward option that does not exist, or fails at step 1, fails here.
(The offline configs under configs/tiny/ run as they are in test_configs_load.py.)
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from align_gen.builtins import PREFIX as BUILTIN_PREFIX
from align_gen.cli import main
from align_gen.config import RunConfig, load_config, to_dict
from reward_models import check_reward_config
from tests.stand_ins import MODELS, TINY_DATA, RewardStandIns, prompt_source

REPO = Path(__file__).resolve().parents[1]
FULL_SIZE = sorted(p for p in (REPO / "configs").glob("*.yaml") if not load_config(p).model.pretrained.startswith(BUILTIN_PREFIX))


def config_id(path: Path) -> str:
    return path.name


@pytest.fixture(scope="module")
def reward_stand_ins(tmp_path_factory: pytest.TempPathFactory) -> RewardStandIns:
    return RewardStandIns(tmp_path_factory.mktemp("reward_stand_ins"))


def tiny_overrides(config: RunConfig, rewards: RewardStandIns, output_dir: Path) -> list[str]:
    """The overrides that shrink ``config`` without changing its structure."""
    stand_in, _ = MODELS[config.model.pretrained]
    vision_language = "vl" in stand_in or "llava" in stand_in
    group = min(config.sample.samples_per_prompt, 2)
    batch = 2 if group == 1 else group
    pairs = getattr(config.objective, "pairs", "online") == "dataset"  # offline Diffusion-DPO
    source = prompt_source(
        config.prompts.source, vision_language=vision_language, winners=config.objective.name == "seppo", pairs=pairs
    )
    window = ["sample.sde_window.size=1", "sample.sde_window.span=2"] if config.sample.sde_window.size else []
    reward_options = {name: rewards.options(name, config.reward.options.get(name, {})) for name in config.reward.weights}
    return [
        f"model.pretrained={stand_in}",
        "model.dtype=float32",
        "train.mixed_precision='no'",
        "sample.resolution=null",
        "sample.num_steps=2",
        *window,  # a window that fits the 2 steps
        "sample.max_new_tokens=4",
        f"sample.samples_per_prompt={group}",
        f"sample.batch_size={batch}",
        "sample.num_batches_per_epoch=1",
        f"train.batch_size={batch}",
        "train.gradient_accumulation_steps=1",
        f"prompts.source={source}",
        f"reward.options={json.dumps(reward_options)}",
        "epochs=1",
        "save_every=1",
        "grid.num_prompts=1",
        "grid.seeds=[0]",
        "grid.prompts=[]",
        "tensorboard=false",
        f"output_dir={output_dir}",
    ]


def test_every_hub_model_has_a_stand_in_of_its_structure() -> None:
    """The stand-ins are what tests/stand_ins.py says: the same classes and prediction type."""
    from align_gen.policies.loading import is_vlm_source, load_pipeline, load_vlm

    for hub_id, (stand_in, (kind, scheduler, prediction)) in MODELS.items():
        if is_vlm_source(stand_in):
            model, _ = load_vlm(stand_in)
            assert type(model).__name__ == kind, hub_id
            continue
        pipeline = load_pipeline(stand_in)
        assert (type(pipeline).__name__, type(pipeline.scheduler).__name__) == (kind, scheduler), hub_id
        assert pipeline.scheduler.config.get("prediction_type", "flow") == prediction, hub_id
    named = {load_config(path).model.pretrained for path in FULL_SIZE}
    assert named <= MODELS.keys(), f"add stand-ins for {sorted(named - MODELS.keys())} to tests/stand_ins.py"


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("path", FULL_SIZE, ids=config_id)
def test_shipped_config_trains_saves_and_reloads_at_tiny_scale(
    path: Path, tmp_path: Path, reward_stand_ins: RewardStandIns, capsys: pytest.CaptureFixture[str]
) -> None:
    original = load_config(path)
    check_reward_config(original.reward.weights, original.reward.options)  # the real option names
    config = load_config(path, tiny_overrides(original, reward_stand_ins, tmp_path / "run"))
    kept = ("lora", "objective", "advantage")
    for section in kept:  # the structure is untouched
        part = original.model.lora if section == "lora" else getattr(original, section)
        assert to_dict(config.model.lora if section == "lora" else getattr(config, section)) == to_dict(part), section
    assert (config.sample.guidance_scale, config.sample.eta, config.sample.noise_level) == (
        original.sample.guidance_scale, original.sample.eta, original.sample.noise_level)

    train = importlib.import_module("align_gen.train").train
    result = train(config)
    assert result.first_reward is not None

    vision_language = not result.final_model.joinpath("model_index.json").exists() and (
        result.final_model / "adapter_config.json").exists() or (result.final_model / "config.json").exists()
    prompts = TINY_DATA / "shape_questions.jsonl" if vision_language else "builtin:shapes"
    out = tmp_path / "reloaded.png"
    argv = ["sample", str(result.output_dir), "--prompts", str(prompts), "--steps", "2", "--max-new-tokens", "4",
            "--guidance-scale", str(original.sample.guidance_scale), "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert out.is_file()
