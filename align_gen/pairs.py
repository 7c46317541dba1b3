"""Preference pairs from a model and a judge: a Pick-a-Pic made offline.

Pick-a-Pic's pairs are two samples of a text-to-image model for one prompt, with the one a person
preferred marked. ``make_pairs`` builds the same thing from any policy and any reward as the
judge: ``candidates`` samples per prompt, the best-scoring one is ``chosen`` and the worst
``rejected``. The one ``pairs.jsonl`` file it writes serves both consumers:

- SePPO's winners (``prompts.source: DIR/pairs.jsonl``): each line's ``prompt`` and ``image``
  (the chosen sample), read by :mod:`align_gen.image_datasets`;
- a Bradley-Terry head (``align-gen train-reward --pairs DIR/pairs.jsonl``): ``chosen`` and
  ``rejected``, read by :func:`reward_models.preference_training.load_pair_file`.

Each line also keeps every candidate's score (``scores``), so how much the judge separates the
pair is on record. Image paths are relative to the file. The samples are reproducible from
``seed``: one generator seeded with it draws every batch in order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from align_gen.errors import ConfigError
from reward_models.images import to_uint8_pixels

PAIRS_FILE = "pairs.jsonl"


@torch.no_grad()
def make_pairs(
    policy,
    judge,
    prompts: Sequence[str],
    output_dir: str | Path,
    *,
    candidates: int = 4,
    seed: int = 0,
    prompts_per_batch: int = 8,
    progress: bool = True,
) -> Path:
    """Sample ``candidates`` images of every prompt, score them with ``judge`` (a reward), and
    write the best and the worst of each prompt as a pair. Returns the pairs file.

    Args:
        policy: a diffusion policy (``policy.sample(prompts, generator=...)``).
        judge: a reward callable ``(images, prompts) -> (B,)``; higher is preferred.
        prompts: the prompts, one pair each.
        output_dir: gets ``pairs.jsonl`` and ``images/``.
        candidates: samples per prompt (>= 2).
        seed: seeds the one generator that draws every batch.
        prompts_per_batch: prompts sampled together (``prompts_per_batch * candidates`` images).
    """
    if candidates < 2:
        raise ConfigError(f"a pair needs at least 2 candidates per prompt, got {candidates}.")
    if prompts_per_batch < 1:
        raise ConfigError(f"prompts_per_batch must be >= 1, got {prompts_per_batch}.")
    if not prompts:
        raise ConfigError("no prompts to make pairs of.")
    if getattr(policy, "takes_images", False):  # a VLM answers questions about images
        raise ConfigError("make_pairs samples images: give a text-to-image (diffusion) model.")
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    lines = []
    starts = range(0, len(prompts), prompts_per_batch)
    for start in tqdm(starts, desc="pairs", disable=not progress):
        batch = list(prompts[start : start + prompts_per_batch])
        repeated = [prompt for prompt in batch for _ in range(candidates)]
        images = policy.sample(repeated, generator=generator).images
        scores = torch.as_tensor(judge(images, repeated)).float().cpu().view(len(batch), candidates)
        if not torch.isfinite(scores).all():
            raise ConfigError(f"the judge returned a non-finite score for a prompt of {batch}.")
        pixels = to_uint8_pixels(images)  # (B * candidates, H, W, 3)
        for row, prompt in enumerate(batch):
            index = start + row
            best, worst = int(scores[row].argmax()), int(scores[row].argmin())
            names = {}
            for role, column in (("chosen", best), ("rejected", worst)):
                names[role] = f"images/{index:06d}_{role}.png"
                Image.fromarray(pixels[row * candidates + column]).save(output_dir / names[role])
            lines.append(
                {
                    "prompt": prompt,
                    "image": names["chosen"],
                    "chosen": names["chosen"],
                    "rejected": names["rejected"],
                    "scores": [round(float(value), 6) for value in scores[row]],
                }
            )
    path = output_dir / PAIRS_FILE
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def summarise_pairs(path: str | Path) -> dict[str, float]:
    """The judge's mean score of the chosen, the rejected and all candidates of a pairs file."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"{path} holds no pairs.")
    scores = torch.tensor([row["scores"] for row in rows])  # (pairs, candidates)
    return {
        "pairs": len(rows),
        "chosen_mean": float(scores.max(dim=1).values.mean()),
        "rejected_mean": float(scores.min(dim=1).values.mean()),
        "candidates_mean": float(scores.mean()),
    }
