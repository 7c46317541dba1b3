"""(prompt, image) datasets: folder and JSONL layouts, hub rows, and errors that name the problem."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from align_gen.errors import ConfigError
from align_gen.image_datasets import (
    hub_row_example,
    is_image_dataset_source,
    load_image_dataset,
    row_answer,
    to_square_tensor,
)
from align_gen.prompts import load_prompts


def save_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def test_folder_with_metadata(tmp_path: Path) -> None:
    save_image(tmp_path / "r.png", (255, 0, 0))
    save_image(tmp_path / "b.png", (0, 0, 255))
    rows = [{"file_name": "r.png", "prompt": "red"}, {"file_name": "b.png", "text": "blue"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = load_image_dataset(str(tmp_path))
    assert dataset.prompts == ["red", "blue"]
    images = dataset.images_for(["blue", "red"], 8, torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 8, 8)
    assert images[0, 2].min() > 0.99 and images[0, 0].max() < 0.01  # blue first, as asked
    assert load_prompts(str(tmp_path)) == ["red", "blue"]
    assert is_image_dataset_source(str(tmp_path))


def test_folder_with_caption_files(tmp_path: Path) -> None:
    save_image(tmp_path / "cat.png", (1, 2, 3))
    (tmp_path / "cat.txt").write_text("a cat\n")
    assert load_image_dataset(str(tmp_path)).prompts == ["a cat"]
    save_image(tmp_path / "dog.png", (1, 2, 3))
    with pytest.raises(ConfigError, match="dog.png has no caption file dog.txt"):
        load_image_dataset(str(tmp_path))


def test_jsonl_with_relative_image_paths(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    save_image(tmp_path / "img" / "a.png", (0, 255, 0))
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"prompt": "green", "image": "img/a.png"}) + "\n")
    assert is_image_dataset_source(str(source))
    assert load_image_dataset(str(source)).prompts == ["green"]
    source.write_text(json.dumps({"prompt": "green", "image": "img/missing.png"}) + "\n")
    with pytest.raises(ConfigError, match=r"pairs.jsonl:1: image file not found"):
        load_image_dataset(str(source))
    source.write_text('{"prompt": "green"}\n')
    assert not is_image_dataset_source(str(source))  # a prompt list, not an image dataset


def test_unreadable_image_names_the_example(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "bad.txt").write_text("broken")
    dataset = load_image_dataset(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot read the image of example 0 \\('broken'\\)"):
        dataset.images_for(["broken"], 8, torch.Generator())
    with pytest.raises(KeyError, match="no image for the prompt 'other'"):
        dataset.images_for(["other"], 8, torch.Generator())


def test_square_crop_keeps_the_centre() -> None:
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))  # white centre square, black sides
    assert to_square_tensor(image, 10).min() > 0.99


def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pick_a_pic_rows_yield_the_preferred_and_the_rejected_image() -> None:
    red, blue = _png_bytes((255, 0, 0)), _png_bytes((0, 0, 255))
    row = {"caption": "c", "jpg_0": red, "jpg_1": blue, "label_0": 0.0, "label_1": 1.0}
    prompt, opener, loser = hub_row_example(row)
    assert prompt == "c" and opener().convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert loser().convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    _, opener, loser = hub_row_example({**row, "label_0": 1.0})
    assert opener().convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert loser().convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert hub_row_example({**row, "label_0": 0.5}) is None  # a tie has no winner


def test_jsonl_pairs_and_world_pairs(tmp_path: Path) -> None:
    save_image(tmp_path / "r.png", (255, 0, 0))
    save_image(tmp_path / "b.png", (0, 0, 255))
    rows = [{"prompt": "red", "image": "r.png", "rejected": "b.png"}, {"prompt": "plain", "image": "b.png"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = load_image_dataset(str(tmp_path / "pairs.jsonl"))
    assert dataset.has_pairs
    winners, losers = dataset.pairs_for(["red", "red"], 8, torch.Generator())
    assert winners.shape == losers.shape == (2, 3, 8, 8)
    assert winners[:, 0].mean() > 0.9 and losers[:, 2].mean() > 0.9  # red preferred to blue
    with pytest.raises(ConfigError, match="no \\(preferred, rejected\\) pair for the prompt 'plain'"):
        dataset.pairs_for(["plain"], 8, torch.Generator())
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p", "image": "r.png", "rejected": "gone.png"}))
    with pytest.raises(ConfigError, match="bad.jsonl:1: rejected image file not found"):
        load_image_dataset(str(tmp_path / "bad.jsonl"))
    assert not load_image_dataset(str(tmp_path / "pairs.jsonl")).rejected[1]
    world = load_image_dataset("world:train:4")
    winners, losers = world.pairs_for(world.prompts[:1], 16, torch.Generator())
    torch.testing.assert_close(losers, world.images_for(world.prompts[1:2], 16, torch.Generator()))  # the next scene


def test_generic_hub_rows_and_bad_columns() -> None:
    image = Image.new("RGB", (4, 4))
    prompt, opener, loser = hub_row_example({"text": "t", "image": image})
    assert prompt == "t" and opener() is image and loser is None
    prompt, opener, _ = hub_row_example({"prompt": "p", "image": {"bytes": _png_bytes((0, 0, 0))}})
    assert opener().size == (4, 4)
    with pytest.raises(ConfigError, match="expected Pick-a-Pic's"):
        hub_row_example({"question": "q", "picture": image})


def test_hub_dataset_needs_the_datasets_package_or_says_what_to_do() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install 'align-gen\[data\]'"):
            load_image_dataset("hf:yuvalkirstain/pickapic_v2")
    else:  # installed, but offline: the error says how to provide the data
        with pytest.raises(ConfigError, match="cannot load the dataset"):
            load_image_dataset("hf:align-gen/does-not-exist")


def test_answers_make_visual_prompts(tmp_path: Path) -> None:
    save_image(tmp_path / "r.png", (255, 0, 0))
    save_image(tmp_path / "b.png", (0, 0, 255))
    rows = [
        {"file_name": "r.png", "prompt": "What colour?", "answer": "red"},
        {"file_name": "b.png", "prompt": "What colour?", "answers": ["blue", "navy"]},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    prompts = load_prompts(str(tmp_path), visual=True)
    assert [(str(p), p.answer) for p in prompts] == [("What colour?", "red"), ("What colour?", "blue")]
    assert prompts[0] != prompts[1] and len({*prompts, *load_prompts(str(tmp_path), visual=True)}) == 2
    assert prompts[1].open_image().size == (20, 12)
    asked = load_prompts(str(tmp_path), visual=True, instruction="Describe it.")
    assert [p.text for p in asked] == ["Describe it."] * 2 and asked[0].answer == "red"
    with pytest.raises(ConfigError, match="prompts.instruction is the question"):
        load_prompts(str(tmp_path), instruction="Describe it.")
    with pytest.raises(ConfigError, match="not a dataset of \\(image, prompt\\) examples"):
        load_prompts("builtin:shapes", visual=True)


def test_vqa_style_hub_rows_give_question_and_answer() -> None:
    row = {
        "question": "What is on the table?",
        "multiple_choice_answer": "cup",
        "answers": [{"answer": "mug", "answer_confidence": "yes", "answer_id": 1}],
        "image": Image.new("RGB", (4, 4)),
    }
    prompt, _, _ = hub_row_example(row)
    assert prompt == "What is on the table?" and row_answer(row) == "cup"
    assert row_answer({"answers": row["answers"]}) == "mug"
    assert row_answer({"prompt": "p"}) is None
