"""Datasets of (prompt, image[, answer]) examples: a folder, a JSONL file, or a Hugging Face
dataset id.

Three uses: SePPO's winners for a text-to-image model (a run that uses one takes its prompts from
it too, so every prompt drawn has an image), and a vision-language model's inputs, where each
example becomes a :class:`~align_gen.types.VisualPrompt` (the prompt is the question about the
image; an optional ``answer`` field is the reference answer rule rewards and SePPO use), and
offline Diffusion-DPO's (preferred, rejected) pairs.

Sources:
- a folder: ``metadata.jsonl`` with ``{"file_name": ..., "prompt": ...}`` lines (the Hugging
  Face imagefolder layout; ``text`` or ``caption`` also name the prompt), or else image files
  each with a caption file of the same stem (``cat.png`` + ``cat.txt``);
- a ``.jsonl`` file with ``{"prompt": ..., "image": "path"}`` lines (paths relative to the file),
  optionally with ``"rejected": "path"``, the image not preferred (``align-gen make-pairs``
  writes such a file);
- ``hf:<dataset id>`` or ``hf:<dataset id>@<split>`` (default split ``train``), read with the
  ``datasets`` package (an optional extra) in streaming mode, the first ``max_examples`` usable
  rows. Pick-a-Pic's layout (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``) yields each row's
  preferred image and its rejected one (ties are skipped); other datasets need a prompt column (``prompt``,
  ``caption`` or ``text``) and an image column (``image``, ``jpg`` or ``png``).
- ``world:<split>`` or ``world:<split>:<count>`` (default 2,048): the tiny world's drawn scenes of
  that caption split (``train`` or ``heldout``), rendered on demand; the same scenes every time
  (:meth:`align_gen.world.shapes.ShapesWorld.dataset`). SePPO's winners on the world model; each
  example's rejected image is the next example's scene (a drawing of another caption).
The rejected images make (preferred, rejected) pairs for offline Diffusion-DPO.
Every layout may add an answer (``answer``, VQAv2's ``multiple_choice_answer``, or the first of
a list in ``answers``, whose items may be ``{"answer": ...}`` records).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from align_gen.durable import read_user_text
from align_gen.errors import ConfigError
from align_gen.types import VisualPrompt
from reward_models.images import image_to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPT_FIELDS = ("prompt", "caption", "text", "question")
IMAGE_FIELDS = ("image", "jpg", "png")
ANSWER_FIELDS = ("answer", "multiple_choice_answer", "answers")  # VQAv2 has the last two
DEFAULT_MAX_EXAMPLES = 20_000  # rows read from a streamed hub dataset
WORLD_PREFIX = "world:"
WORLD_DEFAULT_COUNT = 2048  # drawn scenes of a world:<split> source

ImageSource = Callable[[], Image.Image]


@dataclasses.dataclass
class PromptImageDataset:
    """Prompts and a lazily opened image for each, with a lookup of the images of a prompt.

    Attributes:
        prompts: one prompt per example (a prompt may repeat).
        sources: one zero-argument image opener per example.
        name: where the examples came from, for error messages.
        answers: one reference answer (or None) per example, or None when the dataset has none.
        rejected: one opener of the example's rejected image (or None) per example, or None when
            the dataset has none: the pairs of offline preference objectives (Diffusion-DPO).
    """

    prompts: list[str]
    sources: list[ImageSource]
    name: str
    answers: list[str | None] | None = None
    rejected: list[ImageSource | None] | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError(f"the dataset {self.name} has no (prompt, image) examples.")
        self._by_prompt: dict[str, list[int]] = {}
        for index, prompt in enumerate(self.prompts):
            self._by_prompt.setdefault(prompt, []).append(index)

    def __len__(self) -> int:
        return len(self.prompts)

    def images_for(self, prompts: Sequence[str], size: int, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, size, size) float32 images in [0, 1]: for each prompt, one of its images drawn
        uniformly (centre-cropped to a square and resized)."""
        images = []
        for prompt in prompts:
            choices = self._by_prompt.get(prompt)
            if choices is None:
                raise KeyError(f"the dataset {self.name} has no image for the prompt {prompt!r}.")
            index = choices[int(torch.randint(len(choices), (1,), generator=generator))]
            images.append(to_square_tensor(self._open(index), size))
        return torch.stack(images)

    @property
    def has_pairs(self) -> bool:
        """True when some example has a rejected image."""
        return self.rejected is not None and any(opener is not None for opener in self.rejected)

    def pairs_for(self, prompts: Sequence[str], size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, 3, size, size), (B, 3, size, size)) float32 images in [0, 1]: for each prompt, the
        preferred and the rejected image of one of its examples that has both, drawn uniformly."""
        rejected = self.rejected or [None] * len(self)
        winners, losers = [], []
        for prompt in prompts:
            choices = [index for index in self._by_prompt.get(prompt, []) if rejected[index] is not None]
            if not choices:
                raise ConfigError(f"the dataset {self.name} has no (preferred, rejected) pair for the prompt {prompt!r}.")
            index = choices[int(torch.randint(len(choices), (1,), generator=generator))]
            winners.append(to_square_tensor(self._open(index), size))
            losers.append(to_square_tensor(self._open(index, rejected[index]), size))
        return torch.stack(winners), torch.stack(losers)

    def _open(self, index: int, opener: ImageSource | None = None) -> Image.Image:
        try:
            return (opener or self.sources[index])().convert("RGB")
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"cannot read the image of example {index} ({self.prompts[index]!r}) in {self.name}: {error}"
            ) from None

    def visual_prompts(self) -> list[VisualPrompt]:
        """The examples as a vision-language model's prompts (question, image, answer)."""
        answers = self.answers or [None] * len(self)
        return [
            VisualPrompt(prompt, f"{self.name}#{index}", functools.partial(self._open, index), answer)
            for index, (prompt, answer) in enumerate(zip(self.prompts, answers, strict=True))
        ]


def load_prompt_images(prompts: Sequence[VisualPrompt], size: int) -> torch.Tensor:
    """(B, 3, size, size) float32 in [0, 1]: the images of ``prompts``, centre-cropped to a
    square and resized."""
    return torch.stack([to_square_tensor(prompt.open_image().convert("RGB"), size) for prompt in prompts])


def row_answer(row: dict[str, Any]) -> str | None:
    """A row's reference answer (see the module docstring); None when absent."""
    value = next((row[key] for key in ANSWER_FIELDS if key in row), None)
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("answer")
    return None if value is None else str(value)


def to_square_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) float32 in [0, 1]: the centre square of ``image``, resized (bicubic)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image_to_tensor(image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC))


def is_image_dataset_source(source: str) -> bool:
    """Whether ``source`` names a (prompt, image) dataset rather than a plain prompt list."""
    if source.startswith(("hf:", WORLD_PREFIX)):
        return True
    path = Path(source).expanduser()
    if path.is_dir():
        return True
    if path.suffix == ".jsonl" and path.is_file():
        first = next((line for line in read_user_text(path).splitlines() if line.strip()), "")
        try:
            return "image" in json.loads(first)
        except (json.JSONDecodeError, TypeError):
            return False
    return False


def load_image_dataset(source: str, max_examples: int = DEFAULT_MAX_EXAMPLES) -> PromptImageDataset:
    """The (prompt, image) dataset named by ``source`` (see the module docstring); errors name
    the file, line or column that is missing."""
    if source.startswith("hf:"):
        return _load_hub_dataset(source[3:], max_examples)
    if source.startswith(WORLD_PREFIX):
        return _load_world(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.suffix == ".jsonl" and path.is_file():
        return _load_jsonl(path)
    raise ConfigError(
        f"{source} is not a (prompt, image) dataset: give a folder, a .jsonl file with "
        '"prompt" and "image" fields, hf:<dataset id>, or world:<split>.'
    )


def _load_world(source: str) -> PromptImageDataset:
    from align_gen.world import shapes

    split, _, count = source[len(WORLD_PREFIX) :].partition(":")
    if split not in shapes.SPLITS or (count and not (count.isdigit() and int(count) > 0)):
        raise ConfigError(
            f"{source!r}: a world dataset is world:<split> or world:<split>:<count> with split one of "
            f"{', '.join(shapes.SPLITS)} and a positive count, e.g. world:train:{WORLD_DEFAULT_COUNT}."
        )
    _, captions, scenes = shapes.ShapesWorld().dataset(int(count or WORLD_DEFAULT_COUNT), split)
    openers = [functools.partial(shapes.render, scene) for scene in scenes]
    # Each example's rejected image is the next example's scene: a drawing of another caption.
    return PromptImageDataset(prompts=captions, sources=openers, name=source, rejected=openers[1:] + openers[:1])


def _some(values: list[Any]) -> list[Any] | None:
    """``values`` (one per example, None where an example has none), or None when all are None."""
    return values if any(value is not None for value in values) else None


def _file_opener(path: Path) -> ImageSource:
    return functools.partial(Image.open, path)


def _load_jsonl(path: Path) -> PromptImageDataset:
    prompts, sources, answers, rejected = [], [], [], []
    for number, line in enumerate(read_user_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, image = str(row["prompt"]), Path(row["image"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f'{path}:{number}: expected a JSON object with "prompt" and "image" fields.') from None
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise ConfigError(f"{path}:{number}: image file not found: {image}")
        prompts.append(prompt)
        sources.append(_file_opener(image))
        answers.append(row_answer(row))
        rejected.append(None)
        if "rejected" in row:
            loser = Path(row["rejected"])
            loser = loser if loser.is_absolute() else path.parent / loser
            if not loser.is_file():
                raise ConfigError(f"{path}:{number}: rejected image file not found: {loser}")
            rejected[-1] = _file_opener(loser)
    return PromptImageDataset(prompts, sources, str(path), _some(answers), _some(rejected))


def _load_folder(folder: Path) -> PromptImageDataset:
    metadata = folder / "metadata.jsonl"
    prompts, sources, answers = [], [], []
    if metadata.is_file():
        for number, line in enumerate(read_user_text(metadata).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
                prompt = next(str(row[key]) for key in PROMPT_FIELDS if key in row)
            except (json.JSONDecodeError, KeyError, TypeError, StopIteration):
                raise ConfigError(
                    f'{metadata}:{number}: expected a JSON object with "file_name" and one of '
                    f"{', '.join(PROMPT_FIELDS)}."
                ) from None
            if not (folder / name).is_file():
                raise ConfigError(f"{metadata}:{number}: image file not found: {folder / name}")
            prompts.append(prompt)
            sources.append(_file_opener(folder / name))
            answers.append(row_answer(row))
        return PromptImageDataset(prompts, sources, str(folder), _some(answers))
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise ConfigError(f"{image} has no caption file {caption.name} (or give the folder a metadata.jsonl).")
        prompts.append(read_user_text(caption).strip())
        sources.append(_file_opener(image))
    return PromptImageDataset(prompts, sources, str(folder))


@functools.lru_cache(maxsize=2)  # the prompt list and SePPO's winners read the same rows once
def _load_hub_dataset(spec: str, max_examples: int) -> PromptImageDataset:
    dataset_id, _, split = spec.partition("@")
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"reading hf:{spec} needs the `datasets` package: pip install 'align-gen[data]' (or datasets)."
        ) from None
    try:
        rows = datasets.load_dataset(dataset_id, split=split or "train", streaming=True)
    except Exception as error:  # the hub client raises many types; all mean "cannot read it"
        raise ConfigError(
            f"cannot load the dataset hf:{spec} ({type(error).__name__}: {error}); offline, save it "
            "with datasets' save_to_disk or export a folder / JSONL and point prompts.source at it."
        ) from None
    prompts, sources, answers, rejected = [], [], [], []
    for row in rows:
        example = hub_row_example(row)
        if example is not None:
            prompts.append(example[0])
            sources.append(example[1])
            rejected.append(example[2])
            answers.append(row_answer(row))
        if len(prompts) >= max_examples:
            break
    return PromptImageDataset(prompts, sources, f"hf:{spec}", _some(answers), _some(rejected))


def hub_row_example(row: dict[str, Any]) -> tuple[str, ImageSource, ImageSource | None] | None:
    """(prompt, image opener, rejected image opener or None) of one hub dataset row, or None for
    a row without a preferred image (a Pick-a-Pic tie). Raises ConfigError naming the columns when
    neither layout fits."""
    if {"caption", "jpg_0", "jpg_1", "label_0"} <= row.keys():
        if row["label_0"] == 0.5:
            return None
        winner, loser = (row["jpg_0"], row["jpg_1"]) if row["label_0"] == 1 else (row["jpg_1"], row["jpg_0"])
        return str(row["caption"]), _opener(winner), _opener(loser)
    prompt_key = next((key for key in PROMPT_FIELDS if key in row), None)
    image_key = next((key for key in IMAGE_FIELDS if key in row), None)
    if prompt_key is None or image_key is None:
        raise ConfigError(
            f"the dataset row has columns {sorted(row)}; expected Pick-a-Pic's (caption, jpg_0, jpg_1, "
            f"label_0) or a prompt column ({', '.join(PROMPT_FIELDS)}) and an image column "
            f"({', '.join(IMAGE_FIELDS)})."
        )
    return str(row[prompt_key]), _opener(row[image_key]), None


def _opener(value: Any) -> ImageSource:
    """An opener for a hub image value: a PIL image, encoded bytes, or {"bytes": ...}."""
    if isinstance(value, Image.Image):
        return lambda: value
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, bytes):
        return lambda: Image.open(io.BytesIO(value))
    raise ConfigError(f"cannot read a dataset image of type {type(value).__name__}.")
