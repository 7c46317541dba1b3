"""Held-out evaluation: the reward of a policy's samples on fixed prompts with fixed seeds, and
the statistics that say how sure a mean or a comparison is.

A training epoch's mean reward is a noisy measure of progress: its prompts are drawn afresh
every epoch and its samples are new noise. An evaluation samples the SAME prompts with the SAME
seeds every time it runs, so two evaluations of a run (before training, after it) compare
paired samples and their difference is the policy's change alone. ``align-gen train`` runs one
before the first update, every ``evaluation.every`` epochs and after the last one (rows of
``evaluation.jsonl``); ``align-gen evaluate`` runs one on any model, or on two models with the
same prompts and seeds (a paired comparison).

Each seed's pass samples the prompts in batches of ``batch_size`` from one generator seeded with
that seed, so a (prompt, seed) pair gets the same starting noise in every evaluation of the same
prompt list and batch size (for two models: the same noise when their latents have one shape).

Statistics (:func:`summarise`, :func:`paired_comparison`). The S seeds x P prompts scores are
not S * P independent draws: the samples of one prompt share its difficulty, so they are
correlated. The 95% confidence interval of a mean is therefore computed over PROMPTS (the
prompt is the cluster): with m_p the mean of prompt p over its seeds,

    mean = (1/P) sum_p m_p,  se = sd(m_1..m_P) / sqrt(P)  (sd with P - 1 in the denominator),
    CI   = mean -+ t(0.975, P - 1) * se                   (Student's t, P - 1 degrees of freedom).

It is the interval for the mean over prompts drawn like these ones; for this exact prompt list
it is conservative (it includes the prompt-to-prompt spread). With one prompt the seeds are the
units instead (t with S - 1 degrees of freedom); the output says which (``ci_unit``). A paired
comparison applies the same interval to the per-sample differences B - A and to the wins
(1 when B scores higher, 0.5 for a tie, 0 when lower), whose interval is clipped to [0, 1].
An interval is zero wide when every prompt gives the same value (a model against itself: every
difference 0, every pair a tie, win rate 0.5).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

CONFIDENCE = 0.95


@dataclasses.dataclass
class ScoredSamples:
    """One policy's evaluation: every sample's scores, and the images of some of them.

    Attributes:
        scores: ``{reward name: (S * P,)}`` float32 on the CPU, seed-major (all prompts of the
            first seed, then the next seed); a weighted sum also gives ``name/term`` scores.
        texts: S * P generated texts (a VLM's answers), seed-major, or None for images.
        images: ``{(seed index, prompt index): (3, H, W) uint8}`` of the samples asked to be kept.
    """

    scores: dict[str, torch.Tensor]
    texts: list[str] | None = None
    images: dict[tuple[int, int], torch.Tensor] = dataclasses.field(default_factory=dict)


@torch.no_grad()
def sample_and_score(
    policy,
    rewards: Mapping[str, Any],
    prompts: Sequence,
    seeds: Sequence[int],
    batch_size: int,
    *,
    keep_prompts: Sequence[int] = (),
    keep_seeds: int = 0,
    progress: bool = True,
    desc: str = "evaluating",
) -> ScoredSamples:
    """Samples every prompt once per seed (in batches of ``batch_size``, one generator per seed)
    and scores each sample with every reward; keeps the images of the prompts (indices)
    ``keep_prompts`` for the first ``keep_seeds`` seeds (for a sample grid)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keep_prompts = set(keep_prompts)
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in rewards}
    texts: list[str] = []
    images: dict[tuple[int, int], torch.Tensor] = {}
    batches = [(s, start) for s in range(len(seeds)) for start in range(0, len(prompts), batch_size)]
    generator = None
    for seed_index, start in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress):
        if start == 0:
            generator = torch.Generator().manual_seed(seeds[seed_index])
        batch = list(prompts[start : start + batch_size])
        rollout = policy.sample(batch, generator=generator).check_finite()
        for name, reward in rewards.items():
            values = torch.as_tensor(reward(rollout.images, batch, texts=rollout.texts)).float().flatten().cpu()
            scores[name].append(values)
            terms = getattr(reward, "last_terms", None) or {}
            for term, term_values in (terms.items() if len(terms) > 1 else ()):
                scores.setdefault(f"{name}/{term}", []).append(term_values.float().flatten().cpu())
        if rollout.texts is not None:
            texts.extend(rollout.texts)
        for offset in range(len(batch)):
            if start + offset in keep_prompts and seed_index < keep_seeds:
                pixels = (rollout.images[offset].detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
                images[(seed_index, start + offset)] = pixels.cpu()
    return ScoredSamples(
        scores={name: torch.cat(values) if values else torch.empty(0) for name, values in scores.items()},
        texts=texts or None,
        images=images,
    )


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
    float32 on the CPU, seed-major; :attr:`ScoredSamples.scores` of :func:`sample_and_score`."""
    return sample_and_score(policy, rewards, prompts, seeds, batch_size, progress=progress).scores


# ------------------------------------------------------------------------------------------
# statistics


def student_t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom, found by
    bisection on its CDF, 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0 (I: the regularised
    incomplete beta function). Above 1e7 degrees of freedom: the normal quantile."""
    if not 0 < probability < 1 or not df > 0:
        raise ValueError(f"need 0 < probability < 1 and df > 0, got {probability} and {df}")
    if df > 1e7:
        return statistics.NormalDist().inv_cdf(probability)
    if probability < 0.5:
        return -student_t_quantile(1 - probability, df)

    def cdf(t: float) -> float:
        return 1 - 0.5 * _incomplete_beta(df / (df + t * t), df / 2, 0.5)

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), by its continued fraction (modified Lentz; Numerical Recipes' betacf),
    evaluated on the side of the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where it converges fast."""
    if x <= 0.0 or x >= 1.0:
        return min(max(x, 0.0), 1.0)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d, fraction = 1e-300, 1.0, 0.0, 1.0
    for i in range(0, 400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / (c if abs(c) > tiny else tiny)
        fraction *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (fraction - 1.0)


def per_prompt_means(values: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """(P,) float64: each prompt's mean over its seeds, of seed-major (S * P,) values."""
    if num_prompts < 1 or len(values) % num_prompts:
        raise ValueError(f"{len(values)} seed-major values do not split into {num_prompts} prompts")
    return values.double().reshape(-1, num_prompts).mean(0)


def mean_interval(values: torch.Tensor, num_prompts: int | None = None) -> dict[str, Any]:
    """The mean of seed-major (S * P,) ``values`` and its 95% confidence interval over prompts
    (see the module docstring): ``{mean, se, ci_low, ci_high, df, ci_unit}``. Each value is its
    own unit when ``num_prompts`` is None (or 1); ``se`` and the interval are None below 2 units."""
    if num_prompts is not None and num_prompts > 1:
        units, unit = per_prompt_means(values, num_prompts), "prompt"
    else:
        units, unit = values.double(), "sample" if num_prompts is None else "seed"
    mean = float(units.mean()) if len(units) else float("nan")
    if len(units) < 2:
        return {"mean": mean, "se": None, "ci_low": None, "ci_high": None, "df": 0, "ci_unit": unit}
    se = float(units.std(unbiased=True)) / math.sqrt(len(units))
    half = student_t_quantile(0.5 + CONFIDENCE / 2, len(units) - 1) * se
    return {"mean": mean, "se": se, "ci_low": mean - half, "ci_high": mean + half, "df": len(units) - 1, "ci_unit": unit}


def summarise(scores: Mapping[str, torch.Tensor], num_prompts: int | None = None) -> dict[str, dict[str, Any]]:
    """``{name: {mean, std, n, se, ci_low, ci_high, df, ci_unit, ...}}`` of :func:`score_samples`'
    output: ``std`` is the samples' standard deviation (n - 1 in the denominator) and the interval
    is over prompts when ``num_prompts`` is given (see the module docstring), else over samples."""
    summary = {}
    for name, values in scores.items():
        n = len(values)
        std = float(values.double().std(unbiased=True)) if n > 1 else 0.0
        row: dict[str, Any] = {**mean_interval(values, num_prompts), "std": std, "n": n}
        if num_prompts:
            row |= {"n_prompts": num_prompts, "n_seeds": n // num_prompts}
        summary[name] = row
    return summary


def paired_comparison(
    scores_a: torch.Tensor, scores_b: torch.Tensor, num_prompts: int, *, tie_tolerance: float = 0.0
) -> dict[str, Any]:
    """B against A on the same (seed, prompt) samples, seed-major (S * P,) each: the mean of
    B - A with its 95% interval over prompts, and B's win rate (a tie, |B - A| <= tie_tolerance,
    counts a half) with its interval clipped to [0, 1]; see the module docstring."""
    if scores_a.shape != scores_b.shape or not len(scores_a):
        raise ValueError(f"paired scores must have one shape, got {tuple(scores_a.shape)} and {tuple(scores_b.shape)}")
    difference = scores_b.double() - scores_a.double()
    tie = difference.abs() <= tie_tolerance
    wins = torch.where(tie, 0.5, (difference > 0).double())
    change, win = mean_interval(difference, num_prompts), mean_interval(wins, num_prompts)
    return {
        "mean_a": float(scores_a.double().mean()),
        "mean_b": float(scores_b.double().mean()),
        "mean_difference": change["mean"],
        "difference_se": change["se"],
        "difference_ci_low": change["ci_low"],
        "difference_ci_high": change["ci_high"],
        "win_rate": win["mean"],
        "win_rate_se": win["se"],
        "win_rate_ci_low": _clip_to_unit(win["ci_low"]),
        "win_rate_ci_high": _clip_to_unit(win["ci_high"]),
        "wins": int(((difference > 0) & ~tie).sum()),
        "ties": int(tie.sum()),
        "losses": int(((difference < 0) & ~tie).sum()),
        "n": len(difference),
        "df": change["df"],
        "ci_unit": change["ci_unit"],
    }


def _clip_to_unit(value: float | None) -> float | None:
    return None if value is None else min(max(value, 0.0), 1.0)


def paired_change(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean of ``after - before`` over paired samples (same prompt, same seed) and its standard
    error (std of the differences / sqrt(n)): how far a policy moved, and how surely."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"need two equally long score lists of >= 2 paired samples, got {len(before)} and {len(after)}")
    difference = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    return float(difference.mean()), float(difference.std() / len(difference) ** 0.5)


def watched_changes(first: dict, last: dict) -> dict[str, tuple[float, float, float, float]]:
    """Each ``evaluation.rewards`` reward between two evaluation rows of the same samples
    (``{name}_mean`` / ``{name}_scores``): name -> (before, after, paired change, its s.e.)."""
    names = [key.removesuffix("_scores") for key in first if key.endswith("_scores") and key in last]
    return {name: (first[f"{name}_mean"], last[f"{name}_mean"],
                   *paired_change(first[f"{name}_scores"], last[f"{name}_scores"])) for name in names}


def select_prompts(prompts: Sequence, count: int) -> list:
    """``count`` prompts spread evenly over the list (all of them when ``count`` is 0 or larger
    than the list): a fixed, deterministic subset."""
    if count <= 0 or count >= len(prompts):
        return list(prompts)
    step = len(prompts) / count
    return [prompts[int(i * step)] for i in range(count)]
