"""The typed run config: defaults, YAML + ``key.sub=value`` overrides, and the errors a user sees
for unknown keys, wrong types, bad choices and inconsistent batch sizes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from align_gen.config import (
    ObjectiveConfig,
    RunConfig,
    apply_override,
    load_config,
    save_config,
    to_dict,
)
from align_gen.errors import AlignGenError, ConfigError
from align_gen.objectives.ddpo import DDPOConfig

TINY_CONFIG = (
    Path(__file__).resolve().parents[1] / "configs" / "tiny" / "ddpo_tiny_compressibility.yaml"
)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# defaults and overrides


def test_defaults_are_the_anchor_values() -> None:
    config = load_config(None)
    assert isinstance(config, RunConfig)
    assert config.sample.num_steps == 50
    assert config.sample.eta == 1.0
    assert config.sample.guidance_scale == 5.0
    assert config.train.learning_rate == 3e-4
    assert config.train.weight_decay == 1e-4
    assert config.train.max_grad_norm == 1.0
    assert config.model.lora.enabled is True and config.model.lora.rank == 4
    assert config.model.pretrained == "align-gen:tiny-random-sd"
    assert config.reward.weights == {"jpeg_compressibility": 1.0}
    assert config.objective.name == "ddpo"
    # train.batch_size defaults to the sampling batch (re-scoring in the sampling composition).
    assert config.train.batch_size == config.sample.batch_size == 8


def test_default_objective_section_is_typed_by_its_objective() -> None:
    config = load_config(None)
    assert isinstance(config.objective, DDPOConfig)
    assert config.objective.clip_range == 1e-4
    assert config.objective.timestep_fraction == 1.0


def test_yaml_values_and_overrides(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "epochs: 3\nsample:\n  num_steps: 7\n  batch_size: 4\ntrain:\n  learning_rate: 1.0e-3\n",
    )
    config = load_config(
        path,
        [
            "train.learning_rate=1e-4",  # YAML 1.1 reads 1e-4 (no dot) as a string: still a float
            "model.lora.enabled=false",
            "grid.seeds=[0,1]",
            "sample.num_steps=5",  # an override beats the YAML value
            "train.max_grad_norm=2",  # an int where a float is expected becomes a float
            "model.lora.target_modules=[to_q, to_v]",
            "sample.resolution=null",
            "prompts.source=builtin:shapes",
        ],
    )
    assert config.epochs == 3  # from the YAML, untouched
    assert config.sample.batch_size == 4
    assert config.sample.num_steps == 5
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert isinstance(config.train.learning_rate, float)
    assert config.train.max_grad_norm == 2.0 and isinstance(config.train.max_grad_norm, float)
    assert config.model.lora.enabled is False
    assert config.grid.seeds == [0, 1]
    assert config.model.lora.target_modules == ["to_q", "to_v"]
    assert config.sample.resolution is None
    assert config.prompts.source == "builtin:shapes"
    assert config.train.batch_size == 4  # resolved from the YAML's sample.batch_size


def test_dict_overrides_replace_or_extend_mappings() -> None:
    replaced = load_config(None, ["reward.weights={aesthetic: 0.5, clip_score: 2}"])
    assert replaced.reward.weights == {"aesthetic": 0.5, "clip_score": 2.0}
    # a dotted key adds to the YAML's mapping instead of replacing it
    extended = load_config(
        TINY_CONFIG, ["reward.weights.clip_score=0.25", "reward.options.clip_score.model=ViT-B-32"]
    )
    assert extended.reward.weights == {"jpeg_compressibility": 1.0, "clip_score": 0.25}
    assert extended.reward.options == {"clip_score": {"model": "ViT-B-32"}}


def test_apply_override_builds_nested_sections() -> None:
    data: dict = {}
    apply_override(data, "model.lora.rank=8")
    apply_override(data, "output_dir=runs/a=b")  # only the first '=' splits
    apply_override(data, "model.revision=")  # an empty value is None
    assert data == {"model": {"lora": {"rank": 8}, "revision": None}, "output_dir": "runs/a=b"}


@pytest.mark.parametrize("override", ["no_equals_sign", "=3", " =3"])
def test_malformed_override(override: str) -> None:
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, [override])


def test_override_into_a_value_is_an_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "epochs: 3\n")
    with pytest.raises(ConfigError, match="'epochs' is a value, not a section"):
        load_config(path, ["epochs.sub=1"])


# --------------------------------------------------------------------------------------------
# errors


def test_config_error_is_an_align_gen_error_and_a_value_error() -> None:
    assert issubclass(ConfigError, AlignGenError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("override", "key", "suggestion", "valid"),
    [
        (
            "train.learning_rat=1e-4",
            "train.learning_rat",
            "learning_rate",
            ["adam_beta1", "max_grad_norm"],
        ),
        ("model.lora.rnk=8", "model.lora.rnk", "rank", ["alpha", "target_modules"]),
        ("epoch=3", "epoch", "epochs", ["save_every", "output_dir"]),
        ("sample.num_step=3", "sample.num_step", "num_steps", ["eta", "guidance_scale"]),
    ],
)
def test_unknown_key_names_the_key_the_valid_keys_and_a_suggestion(
    override: str, key: str, suggestion: str, valid: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert f"unknown config key {key!r}" in message
    assert f"Did you mean {suggestion!r}?" in message
    assert "Valid keys here:" in message
    for name in valid:
        assert name in message


def test_unknown_key_in_a_yaml_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "sample:\n  guidance: 3.0\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'sample\.guidance'.*guidance_scale"):
        load_config(path)


def test_unknown_key_without_a_close_match_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.zzzzzz=1"])
    assert "Did you mean" not in str(info.value)
    assert "Valid keys here: adam_beta1" in str(info.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sample.num_steps=abc", "sample.num_steps must be of type int, got 'abc' (str)"),
        ("sample.num_steps=2.5", "sample.num_steps must be of type int"),
        ("sample.num_steps=true", "sample.num_steps must be of type int, got True (bool)"),
        ("model.lora.enabled=3", "model.lora.enabled must be of type bool, got 3 (int)"),
        ("model.lora.enabled=yes please", "model.lora.enabled must be of type bool"),
        ("train.learning_rate=fast", "train.learning_rate must be of type float"),
        ("train.learning_rate=true", "train.learning_rate must be of type float"),
        ("grid.seeds=[0, x]", "grid.seeds[1] must be of type int"),
        ("grid.seeds=3", "grid.seeds must be a list"),
        ("reward.weights={a: b}", "reward.weights.a must be of type float"),
        ("reward.weights=[a]", "reward.weights must be a mapping"),
        ("model=3", "model must be a mapping"),
        ("sample.resolution=big", "sample.resolution must be of type int"),
        ("output_dir=[1]", "output_dir must be of type str"),
    ],
)
def test_wrong_type_names_the_key_and_the_type(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


@pytest.mark.parametrize("value", ["nan", ".nan", "inf"])
def test_non_finite_float_is_an_error(value: str) -> None:
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(None, [f"train.learning_rate={value}"])


@pytest.mark.parametrize(
    ("override", "choices"),
    [
        ("model.dtype=float64", "'float32', 'float16', 'bfloat16'"),
        ("model.attention=flash", "'sdpa', 'sdpa_flash', 'sdpa_efficient', 'sdpa_cudnn', 'sdpa_math', 'xformers'"),
        ("train.mixed_precision=fp8", "'no', 'fp16', 'bf16'"),
        ("advantage.kind=global", "'per_prompt', 'batch', 'group'"),
    ],
)
def test_bad_choice_names_the_choices(override: str, choices: str) -> None:
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == f"{key} must be one of {choices}; got {value!r}."


def test_unknown_objective_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["objective.name=ddpoo"])
    message = str(info.value)
    assert message.startswith("objective.name: unknown objective 'ddpoo'.")
    assert "Did you mean 'ddpo'?" in message
    assert "Valid: " in message and "ddpo" in message.split("Valid: ")[1]


def test_objective_keys_are_typed_by_the_objective_config() -> None:
    config = load_config(
        None, ["objective.name=ddpo", "objective.clip_range=0.2", "objective.timestep_fraction=1"]
    )
    assert type(config.objective) is DDPOConfig
    assert isinstance(config.objective, ObjectiveConfig)
    assert config.objective.clip_range == 0.2
    assert config.objective.timestep_fraction == 1.0 and isinstance(
        config.objective.timestep_fraction, float
    )
    # name defaults to ddpo when only the objective's knobs are given
    assert type(load_config(None, ["objective.clip_range=1e-3"]).objective) is DDPOConfig

    with pytest.raises(
        ConfigError, match=r"objective\.clip_range must be of type float, got 'wide'"
    ):
        load_config(None, ["objective.clip_range=wide"])
    with pytest.raises(ConfigError) as info:
        load_config(None, ["objective.clip_rang=0.1"])
    assert "unknown config key 'objective.clip_rang'" in str(info.value)
    assert "Did you mean 'clip_range'?" in str(info.value)
    assert "clip_range, name, timestep_fraction" in str(info.value)


def test_objective_config_checks_its_ranges() -> None:
    with pytest.raises(ConfigError, match="objective.clip_range must be > 0"):
        load_config(None, ["objective.clip_range=0"])
    with pytest.raises(ConfigError, match=r"objective.timestep_fraction must be in \(0, 1\]"):
        load_config(None, ["objective.timestep_fraction=1.5"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["epochs=0"], "epochs must be > 0, got 0."),
        (["sample.num_steps=-1"], "sample.num_steps must be > 0, got -1."),
        (["train.learning_rate=0"], "train.learning_rate must be > 0, got 0.0."),
        (
            ["sample.batch_size=3", "sample.samples_per_prompt=2"],
            "sample.batch_size (3) must be a multiple of sample.samples_per_prompt (2).",
        ),
        (
            ["sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=3"],
            "train.batch_size (3) must divide the rollouts per epoch per process "
            "(sample.batch_size x sample.num_batches_per_epoch = 8).",
        ),
        (["train.batch_size=0"], "train.batch_size (0) must divide"),
    ],
)
def test_inconsistent_values(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value).startswith(expected)


def test_train_batch_may_be_a_divisor_of_the_epoch() -> None:
    config = load_config(
        None, ["sample.batch_size=4", "sample.num_batches_per_epoch=3", "train.batch_size=6"]
    )
    assert config.train.batch_size == 6


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping of config keys, got list"):
        load_config(write_yaml(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write_yaml(tmp_path, "a: [1, 2\n"))
    assert load_config(write_yaml(tmp_path, "# only a comment\n")) == load_config(None)


# --------------------------------------------------------------------------------------------
# round trip


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    config = load_config(
        TINY_CONFIG,
        [
            "train.learning_rate=1e-4",
            "grid.seeds=[0,1,2]",
            "reward.weights={jpeg_compressibility: 1.0, clip_score: 0.5}",
            "reward.options.clip_score.pretrained=/ckpt.pt",
            "model.revision=main",
            "resume=latest",
        ],
    )
    path = tmp_path / "saved.yaml"
    save_config(config, path)
    loaded = load_config(path)
    assert loaded == config
    assert type(loaded.objective) is DDPOConfig
    assert to_dict(loaded) == to_dict(config)
    # the saved file is complete: every field of every section is written out
    assert set(to_dict(config)) == {f.name for f in dataclasses.fields(RunConfig)}
