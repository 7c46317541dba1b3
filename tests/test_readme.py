"""The README's configuration reference names every config key, and its commands exist."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from align_gen.config import RunConfig
from align_gen.objectives import available_objectives, objective_config_class

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def config_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        path = f"{prefix}{field.name}"
        if field.name == "objective":
            keys.append("objective.name")  # the rest is per objective (tested below)
        elif dataclasses.is_dataclass(hints[field.name]):
            keys += config_keys(hints[field.name], f"{path}.")
        else:
            keys.append(path)
    return keys


def documented(key: str) -> bool:
    """`a.b.c` appears itself, or its leaf appears in a table row that starts with `a.b.`."""
    if f"`{key}`" in README:
        return True
    section, _, leaf = key.rpartition(".")
    rows = [line for line in README.splitlines() if line.startswith(f"| `{section}.")]
    return any(f"`{leaf}`" in row or f" {leaf} " in row or f"/ {leaf}" in row for row in rows)


def test_every_config_key_is_in_the_readme() -> None:
    missing = [key for key in config_keys(RunConfig) if not documented(key)]
    assert not missing, f"README's configuration reference lacks: {missing}"


def test_every_objective_and_its_knobs_are_in_the_readme() -> None:
    for name in available_objectives():
        assert f"### {name.upper()}" in README.upper(), name
        for field in dataclasses.fields(objective_config_class(name)):
            if field.name != "name":
                assert f"`objective.{field.name}`" in README, (name, field.name)


def test_readme_shows_the_two_commands() -> None:
    assert "make demo" in README and "make test" in README


def test_every_shipped_config_is_in_the_readme() -> None:
    configs = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(configs.glob("*.yaml")):
        assert f"configs/{path.name}" in README, path.name
