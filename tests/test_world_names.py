"""The shipped world models by name (align-gen:world...), and the world:<split> dataset source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from align_gen import world
from align_gen.builtins import resolve_folder, resolve_folders_in
from align_gen.errors import ConfigError, MissingWeightsError
from align_gen.image_datasets import is_image_dataset_source, load_image_dataset
from align_gen.world import shapes


def test_shipped_names_resolve_to_their_folders_and_others_pass_through() -> None:
    assert Path(resolve_folder("align-gen:world")) == world.WEIGHTS_DIR / "sd"
    assert Path(resolve_folder("align-gen:world-clip")) == world.WEIGHTS_DIR / "clip"
    for other in ("align-gen:tiny-random-sd", "stable-diffusion-v1-5/stable-diffusion-v1-5", "/some/folder"):
        assert resolve_folder(other) == other
    options = resolve_folders_in({"clip_score": {"model": "align-gen:world-clip", "batch_size": 4}})
    assert options == {"clip_score": {"model": str(world.WEIGHTS_DIR / "clip"), "batch_size": 4}}


def test_a_shipped_name_whose_folder_is_missing_says_how_to_build_it(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(world, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(MissingWeightsError, match="align-gen world build"):
        resolve_folder("align-gen:world")


def test_an_unknown_builtin_name_suggests_the_closest() -> None:
    with pytest.raises(MissingWeightsError, match="Did you mean align-gen:world-clip"):
        resolve_folder("align-gen:world-clp")


def test_the_world_model_and_clip_load_by_name(single_thread) -> None:
    from align_gen.config import ModelConfig, SampleConfig
    from align_gen.policies import build_policy
    from align_gen.policies.diffusion import DiffusionPolicy
    from reward_models import get_reward

    policy = build_policy(ModelConfig(pretrained="align-gen:world"), SampleConfig(num_steps=2), trainable=False)
    assert isinstance(policy, DiffusionPolicy)
    reward = get_reward("clip_score", model=resolve_folder("align-gen:world-clip"))
    image = shapes.to_tensor(shapes.render(shapes.single_shape_scene(np.random.default_rng(0))))
    assert reward(image[None], ["a red circle"]).shape == (1,)


def test_world_split_is_a_fixed_prompt_image_dataset_of_that_split() -> None:
    assert is_image_dataset_source("world:train")
    dataset = load_image_dataset("world:heldout:40")
    again = load_image_dataset("world:heldout:40")
    assert len(dataset.prompts) == 40 and dataset.prompts == again.prompts
    assert set(dataset.prompts) <= set(shapes.all_captions("heldout"))
    image = dataset.sources[0]()
    assert image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    assert list(image.getdata()) == list(again.sources[0]().getdata())
    assert len(load_image_dataset("world:train").prompts) == 2048
    from align_gen.prompts import load_prompts

    assert load_prompts("world:heldout:40") == dataset.prompts  # its prompts, as for any dataset


@pytest.mark.parametrize("source", ["world:test", "world:train:0", "world:train:many"])
def test_a_bad_world_source_names_the_valid_form(source: str) -> None:
    with pytest.raises(ConfigError, match="world:<split>"):
        load_image_dataset(source)
