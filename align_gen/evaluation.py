"""Held-out evaluation: the reward of a policy's samples on fixed prompts with fixed seeds.

A training epoch's mean reward is a noisy measure of progress: its prompts are drawn afresh
every epoch and its samples are new noise. An evaluation samples the SAME prompts with the SAME
seeds every time it runs, so two evaluations of a run (before training, after it) compare
paired samples and their difference is the policy's change alone. ``align-gen train`` runs one
before the first update, every ``evaluation.every`` epochs and after the last one (rows of
``evaluation.jsonl``); ``align-gen evaluate`` runs one on any model.

Each seed's pass samples the prompts in batches of ``batch_size`` from one generator seeded with
that seed, so a (prompt, seed) pair gets the same starting noise in every evaluation of the same
prompt list and batch size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def score_samples(
    policy,
    rewards: Mapping[str, Any],
    prompts: Sequence,
    seeds: Sequence[int],
    batch_size: int,
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Every reward's scores of one sample per (seed, prompt): ``{name: (len(seeds) * len(prompts),)}``
    float32 on the CPU, seed-major (all prompts of the first seed, then the next seed). A
    weighted sum of several rewards also gives each term's unweighted scores as ``name/term``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in rewards}
    batches = [(seed, start) for seed in seeds for start in range(0, len(prompts), batch_size)]
    generator = None
    for seed, start in tqdm(batches, desc="evaluating", leave=False, disable=not progress):
        if start == 0:
            generator = torch.Generator().manual_seed(seed)
        batch = list(prompts[start : start + batch_size])
        rollout = policy.sample(batch, generator=generator)
        for name, reward in rewards.items():
            values = torch.as_tensor(reward(rollout.images, batch, texts=rollout.texts)).float().flatten().cpu()
            scores[name].append(values)
            terms = getattr(reward, "last_terms", None) or {}
            for term, term_values in (terms.items() if len(terms) > 1 else ()):
                scores.setdefault(f"{name}/{term}", []).append(term_values.float().flatten().cpu())
    return {name: torch.cat(values) if values else torch.empty(0) for name, values in scores.items()}


def summarise(scores: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """``{name: {"mean", "std", "n"}}`` of :func:`score_samples`' output."""
    return {
        name: {"mean": float(values.mean()), "std": float(values.std(unbiased=False)), "n": len(values)}
        for name, values in scores.items()
    }


def paired_change(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean of ``after - before`` over paired samples (same prompt, same seed) and its standard
    error (std of the differences / sqrt(n)): how far a policy moved, and how surely."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"need two equally long score lists of >= 2 paired samples, got {len(before)} and {len(after)}")
    difference = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    return float(difference.mean()), float(difference.std() / len(difference) ** 0.5)


def select_prompts(prompts: Sequence, count: int) -> list:
    """``count`` prompts spread evenly over the list (all of them when ``count`` is 0 or larger
    than the list): a fixed, deterministic subset."""
    if count <= 0 or count >= len(prompts):
        return list(prompts)
    step = len(prompts) / count
    return [prompts[int(i * step)] for i in range(count)]
