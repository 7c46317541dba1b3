"""Labelled sample grids: fixed prompts x fixed seeds, so grids of different epochs compare."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

MIN_CELL = 128  # tiny-model images are upscaled (nearest) to stay readable


LINE_H = 12  # caption line height in pixels


def wrap_caption(label: str, width: float, font) -> list[str]:
    """``label`` in lines no wider than ``width`` pixels in ``font``, every word kept (a word wider
    than a line is split across lines); [""] for an empty label."""

    def fits(text: str) -> bool:
        return font.getlength(text) <= width

    lines: list[str] = []
    line = ""
    for word in label.split():
        candidate = f"{line} {word}" if line else word
        if fits(candidate):
            line = candidate
            continue
        if line:
            lines.append(line)
        while not fits(word) and len(word) > 1:  # split a word that no line holds
            cut = 1
            while cut < len(word) and fits(word[: cut + 1]):
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line or not lines:
        lines.append(line)
    return lines


def render_grid(images: torch.Tensor, labels: Sequence[str], columns: int) -> Image.Image:
    """One PIL image of (N, 3, H, W) images in [0, 1], ``columns`` wide, a caption under each.

    Args:
        images: (N, 3, H, W) float in [0, 1].
        labels: N captions, wrapped to the cell width on as many lines as they need (every
            caption's row gets the height of the longest caption).
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
    wrapped = [wrap_caption(label, cell_w - 6, font) for label in labels]
    caption_h = LINE_H * max(len(lines) for lines in wrapped) + 6
    rows = -(-count // columns)
    canvas = Image.new("RGB", (columns * cell_w, rows * (cell_h + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for index in range(count):
        x = (index % columns) * cell_w
        y = (index // columns) * (cell_h + caption_h)
        tile = Image.fromarray(pixels[index]).resize((cell_w, cell_h), Image.NEAREST)
        canvas.paste(tile, (x, y))
        for line_number, line in enumerate(wrapped[index]):
            draw.text((x + 3, y + cell_h + 3 + LINE_H * line_number), line, fill="black", font=font)
    return canvas


@torch.no_grad()
def sample_grid(
    policy, prompts: Sequence, seeds: Sequence[int], *, progress: bool = False, batch_size: int | None = None
) -> Image.Image:
    """Samples every prompt once per seed and renders prompts x seeds.

    Rows are prompts and columns are seeds; the same (prompt, seed) gives the same noise in
    every call, so grids drawn at different epochs show how the same sample changed. A
    vision-language model's cells are its input images, captioned with question and answer.
    A sample holding NaN or inf raises :class:`~align_gen.errors.NonFiniteSamplesError`.

    Args:
        progress: show a progress bar (one step per batch) on stderr.
        batch_size: prompts sampled together. None (the default): all prompts of a seed in one
            batch. Otherwise each seed's generator draws the prompts' noise batch after batch (as
            ``align-gen evaluate --batch-size`` does), which gives other samples than one batch.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    prompts = list(prompts)
    size = batch_size or max(1, len(prompts))
    batches = [(column, start) for column in range(len(seeds)) for start in range(0, len(prompts), size)]
    columns: list[list[torch.Tensor]] = [[] for _ in seeds]
    answers: list[list[str] | None] = [None for _ in seeds]
    generator = None
    for column, start in tqdm(batches, desc="sampling", unit="batch", leave=False, disable=not progress):
        if start == 0:
            generator = torch.Generator().manual_seed(seeds[column])
        rollout = policy.sample(prompts[start : start + size], generator=generator).check_finite()
        columns[column].append(rollout.images.cpu())
        if rollout.texts is not None:
            answers[column] = (answers[column] or []) + list(rollout.texts)
    images = torch.stack([torch.cat(column) for column in columns], dim=1).flatten(0, 1)  # (P * S, 3, H, W), row-major by prompt
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
