"""Prompt sources and the seeded prompt sampler of a training run.

A source is ``builtin:NAME`` (a list shipped in align_gen/data/prompts), a ``.txt`` file with one
prompt per line, a ``.jsonl`` file whose lines hold a ``"prompt"`` field, or a (prompt, image)
dataset (a folder or ``hf:<dataset id>``, see :mod:`align_gen.image_datasets`), whose prompts
are used. A vision-language model's prompts come only from such a dataset, as
:class:`~align_gen.types.VisualPrompt` (question, image, answer).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from align_gen.errors import ConfigError
from align_gen.image_datasets import WORLD_PREFIX, is_image_dataset_source, load_image_dataset
from align_gen.types import VisualPrompt

BUILTIN_DIR = Path(__file__).parent / "data" / "prompts"


def builtin_prompt_lists() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.txt"))


def load_prompts(
    source: str, *, visual: bool = False, instruction: str | None = None
) -> list[str] | list[VisualPrompt]:
    """The prompts of ``source`` (VisualPrompts when ``visual``, for a VLM, each asking
    ``instruction`` instead of its own prompt when that is given); errors name the problem
    (missing file, empty list, bad line)."""
    if instruction is not None and not visual:
        raise ConfigError("prompts.instruction is the question a vision-language model is asked about each image; "
                          "a text-to-image model takes its prompts from prompts.source.")
    if visual:
        if not is_image_dataset_source(source):
            raise ConfigError(
                f"a vision-language model answers questions about images, but {source!r} is not a dataset of "
                '(image, prompt) examples; give a folder with metadata.jsonl ({"file_name", "prompt", "answer"}), '
                'a .jsonl file with "image" and "prompt" fields, or hf:<dataset id>.'
            )
        prompts = load_image_dataset(source).visual_prompts()
        return prompts if instruction is None else [dataclasses.replace(p, text=instruction) for p in prompts]
    if source.startswith(("hf:", WORLD_PREFIX)) or Path(source).expanduser().is_dir():
        return load_image_dataset(source).prompts
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        path = BUILTIN_DIR / f"{name}.txt"
        if not path.is_file():
            raise ConfigError(
                f"unknown built-in prompt list {name!r}; built-ins: {', '.join(builtin_prompt_lists())}."
            )
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompts file not found: {source}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, start=1):
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f'{path}:{number}: expected a JSON object with a "prompt" field.') from None
    else:
        prompts = lines
    if not prompts:
        raise ConfigError(f"the prompt list {source} is empty.")
    return prompts


def sample_prompts(
    prompts: list[str] | list[VisualPrompt], batch_size: int, samples_per_prompt: int, generator: torch.Generator
) -> list[str] | list[VisualPrompt]:
    """``batch_size`` prompts: batch_size / samples_per_prompt draws (with replacement), each
    repeated samples_per_prompt times consecutively (the groups REBEL and AWM compare)."""
    draws = torch.randint(len(prompts), (batch_size // samples_per_prompt,), generator=generator)
    return [prompts[i] for i in draws.tolist() for _ in range(samples_per_prompt)]
