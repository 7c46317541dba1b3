"""Draws the tiny SePPO winners: one flat-coloured shape on white per prompt of builtin:shapes,
and writes the tiny VLM's questions about them.

    python configs/tiny/data/make_shapes.py      # rewrites configs/tiny/data/shapes/ and
                                                 # configs/tiny/data/shape_questions.jsonl

The images are what the shapes prompts describe, drawn plainly, so they are also highly
compressible: configs/tiny/seppo_tiny_compressibility.yaml prefers them to the random tiny
model's noise, and its JPEG-compressibility reward should rise as the policy moves toward them.
shape_questions.jsonl asks the colour of each drawing (answer: the colour word), the toy task of
the tiny VLM configs (configs/tiny/*_tiny_vlm_*.yaml).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SIZE = 64
QUESTION = "What colour is the shape?"


def draw(prompt: str, size: int = SIZE) -> Image.Image:
    """The shape of a prompt like "a red circle", centred on a white square image."""
    _, colour, shape = prompt.split()
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(size // 2, size // 4), (3 * size // 4, 3 * size // 4), (size // 4, 3 * size // 4)], fill=fill)
    return image


def main() -> None:
    root = Path(__file__).resolve().parents[3]
    prompts = (root / "align_gen" / "data" / "prompts" / "shapes.txt").read_text().split("\n")
    folder = Path(__file__).parent / "shapes"
    folder.mkdir(exist_ok=True)
    rows = []
    for prompt in filter(None, prompts):
        name = prompt.removeprefix("a ").replace(" ", "_") + ".png"
        draw(prompt).save(folder / name, optimize=True)
        rows.append(json.dumps({"file_name": name, "prompt": prompt}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    questions = [
        json.dumps({"image": f"shapes/{json.loads(row)['file_name']}", "prompt": QUESTION, "answer": json.loads(row)["prompt"].split()[1]})
        for row in rows
    ]
    (folder.parent / "shape_questions.jsonl").write_text("\n".join(questions) + "\n")


if __name__ == "__main__":
    main()
