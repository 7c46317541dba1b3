"""Prompt sources and the seeded prompt sampler of a training run.

A source is ``builtin:NAME`` (a list shipped in align_gen/data/prompts), a ``.txt`` file with one
prompt per line, a ``.jsonl`` file whose lines hold a ``"prompt"`` field, a prompt set on the
Hugging Face hub (below), or a (prompt, image) dataset (a folder or ``hf:<dataset id>``, see
:mod:`align_gen.image_datasets`), whose prompts are used. A vision-language model's prompts come
only from such a dataset, as :class:`~align_gen.types.VisualPrompt` (question, image, answer).

Hub prompt sets are ``hf:<dataset id>[@split]#<column>``: one text column of a dataset, read
with the optional ``datasets`` package. Known sets need no column (:data:`HUB_PROMPT_SETS`):
``hf:nateraw/parti-prompts`` (PartiPrompts), ``hf:sayakpaul/drawbench`` (DrawBench) and
``hf:yuvalkirstain/pickapic_v2@validation_unique`` (Pick-a-Pic's validation captions; plain
``hf:yuvalkirstain/pickapic_v2`` stays the (prompt, preferred image) dataset SePPO learns from).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from align_gen.durable import read_user_text
from align_gen.errors import ConfigError
from align_gen.image_datasets import WORLD_PREFIX, is_image_dataset_source, load_image_dataset
from align_gen.types import VisualPrompt

BUILTIN_DIR = Path(__file__).parent / "data" / "prompts"
HUB_PROMPT_SETS: dict[str, tuple[str, str]] = {  # "id" or "id@split" -> (split, text column)
    "nateraw/parti-prompts": ("train", "Prompt"),
    "sayakpaul/drawbench": ("train", "Prompts"),
    "yuvalkirstain/pickapic_v2@validation_unique": ("validation_unique", "caption"),
}
MAX_HUB_PROMPTS = 20_000  # rows read from a streamed hub prompt set


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
    hub_set = hub_prompt_set(source)
    if hub_set is not None:
        return load_hub_prompts(*hub_set)
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
    lines = [line.strip() for line in read_user_text(path).splitlines() if line.strip()]
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


def hub_prompt_set(source: str) -> tuple[str, str, str] | None:
    """(dataset id, split, column) when ``source`` is a hub prompt set (see the module
    docstring): ``hf:<id>[@split]#<column>``, or a known set of :data:`HUB_PROMPT_SETS`
    (its split unless the source names one). None for any other source."""
    if not source.startswith("hf:"):
        return None
    spec, _, column = source[3:].partition("#")
    dataset_id, _, split = spec.partition("@")
    if "#" in source and not (dataset_id and column):
        raise ConfigError(f"{source!r}: a hub prompt set is hf:<dataset id>[@split]#<text column>.")
    known = HUB_PROMPT_SETS.get(spec) or HUB_PROMPT_SETS.get(dataset_id)
    if not column and known is None:
        return None
    return dataset_id, split or (known[0] if known else "train"), column or known[1]


def load_hub_prompts(dataset_id: str, split: str, column: str, max_prompts: int = MAX_HUB_PROMPTS) -> list[str]:
    """The non-empty texts of ``column`` in a hub dataset's ``split`` (streamed, the first
    ``max_prompts``); errors say how to provide the prompts offline."""
    source = f"hf:{dataset_id}@{split}#{column}"
    offline = "or export the prompts to a .txt file (one per line) and pass that instead."
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"reading {source} needs the `datasets` package: pip install 'align-gen[data]', {offline}") from None
    try:
        rows = datasets.load_dataset(dataset_id, split=split, streaming=True)
        return prompts_from_rows(rows, column, source, max_prompts)
    except ConfigError:
        raise
    except Exception as error:  # the hub client raises many types; all mean "cannot read it"
        raise ConfigError(
            f"cannot load the prompt set {source} ({type(error).__name__}: {error}); without a network "
            f"(HF_HUB_OFFLINE=1) only a cached copy can be read: run once online, {offline}"
        ) from None


def prompts_from_rows(rows, column: str, source: str, max_prompts: int = MAX_HUB_PROMPTS) -> list[str]:
    """The non-empty, stripped texts of ``column`` in an iterable of row dicts (the first
    ``max_prompts``). Raises ConfigError naming the columns a row has when ``column`` is absent."""
    prompts: list[str] = []
    for row in rows:
        if column not in row:
            raise ConfigError(f"{source}: no column {column!r}; the rows have {sorted(row)}. Name one with #<column>.")
        text = str(row[column] or "").strip()
        if text:
            prompts.append(text)
        if len(prompts) >= max_prompts:
            break
    if not prompts:
        raise ConfigError(f"the prompt set {source} is empty.")
    return prompts


def sample_prompts(
    prompts: list[str] | list[VisualPrompt], batch_size: int, samples_per_prompt: int, generator: torch.Generator
) -> list[str] | list[VisualPrompt]:
    """``batch_size`` prompts: batch_size / samples_per_prompt draws (with replacement), each
    repeated samples_per_prompt times consecutively (the groups REBEL and AWM compare)."""
    draws = torch.randint(len(prompts), (batch_size // samples_per_prompt,), generator=generator)
    return [prompts[i] for i in draws.tolist() for _ in range(samples_per_prompt)]
