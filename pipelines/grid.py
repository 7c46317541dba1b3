"""Labelled sample grids: fixed prompts x fixed seeds, so grids of different epochs compare."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from align_gen.image_datasets import to_uint8_pixels

MIN_CELL = 128  # tiny-model images are upscaled (nearest) to stay readable


def render_grid(images: torch.Tensor, labels: Sequence[str], columns: int) -> Image.Image:
    """One PIL image of (N, 3, H, W) images in [0, 1], ``columns`` wide, a caption under each.

    Args:
        images: (N, 3, H, W) float in [0, 1].
        labels: N captions (wrapped to the cell width).
        columns: cells per row.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    count, _, height, width = images.shape
    scale = max(1, -(-MIN_CELL // max(height, width)))
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default()
    chars_per_line = max(8, cell_w // 7)
    wrapped = [textwrap.wrap(label, chars_per_line)[:3] or [""] for label in labels]
    caption_h = 12 * max(len(lines) for lines in wrapped) + 6
    rows = -(-count // columns)
    canvas = Image.new("RGB", (columns * cell_w, rows * (cell_h + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = to_uint8_pixels(images)  # (N, H, W, 3)
    for index in range(count):
        x = (index % columns) * cell_w
        y = (index // columns) * (cell_h + caption_h)
        tile = Image.fromarray(pixels[index]).resize((cell_w, cell_h), Image.NEAREST)
        canvas.paste(tile, (x, y))
        for line_number, line in enumerate(wrapped[index]):
            draw.text((x + 3, y + cell_h + 3 + 12 * line_number), line, fill="black", font=font)
    return canvas


@torch.no_grad()
def sample_grid(policy, prompts: Sequence, seeds: Sequence[int]) -> Image.Image:
    """Samples every prompt once per seed (one batch per seed) and renders prompts x seeds.

    Rows are prompts and columns are seeds; the same (prompt, seed) gives the same noise in
    every call, so grids drawn at different epochs show how the same sample changed. A
    vision-language model's cells are its input images, captioned with question and answer.
    A sample holding NaN or inf raises :class:`~align_gen.errors.NonFiniteSamplesError`.
    """
    columns, answers = [], []
    for seed in seeds:
        rollout = policy.sample(list(prompts), generator=torch.Generator().manual_seed(seed)).check_finite()
        columns.append(rollout.images.cpu())
        answers.append(rollout.texts)
    images = torch.stack(columns, dim=1).flatten(0, 1)  # (P * S, 3, H, W), row-major by prompt
    labels = [
        f"{prompt} (seed {seed})" if answers[j] is None else f"{prompt} -> {answers[j][i]} (seed {seed})"
        for i, prompt in enumerate(prompts)
        for j, seed in enumerate(seeds)
    ]
    return render_grid(images, labels, columns=len(seeds))


def side_by_side(panels: Sequence[Image.Image], titles: Sequence[str]) -> Image.Image:
    """Grids (e.g. before and after training, same prompts and seeds) next to each other, each
    under its title, separated by a gap."""
    if len(panels) != len(titles) or not panels:
        raise ValueError(f"{len(titles)} titles for {len(panels)} panels")
    gap, title_h = 16, 20
    width = sum(panel.width for panel in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, title_h + max(panel.height for panel in panels)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = 0
    for panel, title in zip(panels, titles, strict=True):
        draw.text((x + 3, 4), title, fill="black", font=font)
        canvas.paste(panel.convert("RGB"), (x, title_h))
        x += panel.width + gap
    return canvas
