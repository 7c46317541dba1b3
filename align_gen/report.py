"""The outputs of ``align-gen evaluate``: every sample's scores (JSON and CSV), the summary, the
sample or comparison grid, and one report rendered twice (Markdown and HTML).

Files written into the output folder (:func:`write_outputs`):
    scores.json      every sample: model, role (A = the evaluated model, B = --compare), prompt,
                     prompt index, seed, each reward's score (and a VLM's answer)
    scores.csv       the same, one row per sample and one column per reward
    summary.json     per reward and model: mean, std, 95% CI; B - A: mean difference, win rate,
                     each comparison naming both models and saying which scores higher
    samples.png      one model: prompts (rows) x seeds (columns), each labelled with its score
    comparison.png   two models: the same prompts and seeds, A's grid beside B's
    report.md/.html  the tables, the grid, the statistics used and, given a training run folder,
                     its monitors (every ``monitor/*`` key) and held-out curve (training.png)
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from align_gen.errors import ConfigError
from align_gen.evaluation import ScoredSamples, paired_comparison, per_prompt_means, summarise
from align_gen.tracking import EVALUATION_FILE, METRICS_FILE, read_metrics

STATISTICS = (
    "Each model samples every prompt once per seed; the same (prompt, seed) pair starts from the same "
    "noise for both models. The 95% confidence interval of a mean is Student's t over prompts: the "
    "samples of one prompt are correlated, so each prompt's mean over its seeds is one unit "
    "(mean +- t(0.975, P-1) * sd(prompt means) / sqrt(P)); with one prompt the seeds are the units. "
    "It is the interval for prompts drawn like these ones, conservative for this exact list. "
    "std is the standard deviation of all samples. A is the evaluated model, B the --compare model. "
    "B - A is computed per sample (same prompt and "
    "seed) with the same interval; the win rate counts a pair where B scores higher as 1, a tie as "
    "1/2 and a loss as 0, and its interval (same method) is clipped to [0, 1]."
)
MAX_RUN_ROWS = 25  # epochs shown in a training run's monitor table (all of them are in metrics.jsonl)


@dataclasses.dataclass
class EvaluatedModel:
    """A model's evaluation: ``role`` "A" (the evaluated model) or "B" (the compared one)."""

    role: str
    name: str
    lora: str | None
    samples: ScoredSamples

    @property
    def label(self) -> str:
        """The model's name, with its LoRA weights when it has some."""
        return model_label(self.name, self.lora)


def model_label(name: str, lora: str | None) -> str:
    """How reports name a model: ``name``, or ``name + LoRA lora``."""
    return name if not lora else f"{name} + LoRA {lora}"


def comparison_result(c: dict[str, Any], a: str, b: str) -> str:
    """Which model scores higher, in words that name both (``a`` and ``b``: the labels of A and
    B), from :func:`~align_gen.evaluation.paired_comparison`'s B - A: a model is higher when the
    95% interval of the difference excludes 0."""
    d, low, high = c["mean_difference"], c["difference_ci_low"], c["difference_ci_high"]
    if low is None or high is None:
        return f"B ({b}) - A ({a}) = {d:.4g} (no interval: a single paired unit)"
    if low > 0:
        return f"B ({b}) scores higher than A ({a}), by {d:.4g} (95% CI [{low:.4g}, {high:.4g}])"
    if high < 0:
        return f"A ({a}) scores higher than B ({b}), by {-d:.4g} (95% CI [{-high:.4g}, {-low:.4g}])"
    return f"no clear difference between A ({a}) and B ({b}): B - A = {d:.4g}, 95% CI [{low:.4g}, {high:.4g}] holds 0"


def higher_model(c: dict[str, Any]) -> str | None:
    """"A" or "B" when the 95% interval of B - A excludes 0 (that model scores higher), else None."""
    low, high = c["difference_ci_low"], c["difference_ci_high"]
    if low is not None and low > 0:
        return "B"
    if high is not None and high < 0:
        return "A"
    return None


# ------------------------------------------------------------------------------------------
# the document: a few block types rendered to Markdown and HTML


@dataclasses.dataclass
class Heading:
    text: str
    level: int = 2


@dataclasses.dataclass
class Paragraph:
    text: str  # `code` spans are kept


@dataclasses.dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclasses.dataclass
class Figure:
    path: str  # relative to the report
    caption: str


Block = Heading | Paragraph | Table | Figure


def render_markdown(blocks: Sequence[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            cells = [[cell.replace("|", "\\|") for cell in row] for row in [block.header, *block.rows]]
            lines += ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(block.header)]
            lines += ["| " + " | ".join(row) + " |" for row in cells[1:]] + [""]
        else:
            lines += [f"![{block.caption}]({block.path})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)


def render_html(blocks: Sequence[Block], title: str) -> str:
    def inline(text: str) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))

    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{inline(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{inline(cell)}</th>" for cell in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{inline(cell)}</td>" for cell in row) + "</tr>\n" for row in block.rows)
            body.append(f"<table>\n<tr>{head}</tr>\n{rows}</table>")
        else:
            body.append(
                f'<figure><img src="{html.escape(block.path)}" alt="{html.escape(block.caption)}">'
                f"<figcaption>{inline(block.caption)}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def number(value: Any, digits: int = 4) -> str:
    """A table cell: ``digits`` significant digits, '' for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def interval(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f"[{number(low)}, {number(high)}]"


# ------------------------------------------------------------------------------------------
# samples, summary and grid


def sample_records(models: Sequence[EvaluatedModel], prompts: Sequence, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One record per (model, seed, prompt) sample, in the seed-major order of the scores."""
    records = []
    for model in models:
        scores, texts = model.samples.scores, model.samples.texts
        for index in range(len(seeds) * len(prompts)):
            prompt = prompts[index % len(prompts)]
            record: dict[str, Any] = {"role": model.role, "model": model.name, "prompt_index": index % len(prompts),
                                      "prompt": str(prompt), "seed": seeds[index // len(prompts)]}
            if hasattr(prompt, "image_key"):
                record["image"] = prompt.image_key
            if texts is not None:
                record["answer"] = texts[index]
            record["scores"] = {name: float(values[index]) for name, values in scores.items()}
            records.append(record)
    return records


def build_summary(models: Sequence[EvaluatedModel], prompts: Sequence, settings: dict[str, Any]) -> dict[str, Any]:
    """summary.json: the settings, model A's per-reward statistics at the top level (``model``,
    ``lora``, ``rewards``: the former ``align-gen evaluate`` report), B's under ``compare``, and
    ``comparison``: B - A per reward (:func:`~align_gen.evaluation.paired_comparison`), each with
    ``direction`` (what was subtracted from what, the models named), ``higher`` ("A", "B" or
    None: no clear difference) and ``result`` (the same in words); ``comparison_direction``
    names A and B once more."""
    first = models[0]
    summary: dict[str, Any] = {"model": first.name, "lora": first.lora, **settings, "num_prompts": len(prompts),
                               "rewards": summarise(first.samples.scores, len(prompts))}
    if len(models) > 1:
        other = models[1]
        a, b = first.label, other.label
        summary["compare"] = {"model": other.name, "lora": other.lora,
                              "rewards": summarise(other.samples.scores, len(prompts))}
        summary["comparison_direction"] = {
            "A": a,
            "B": b,
            "difference": f"B ({b}) - A ({a})",
            "meaning": f"mean_difference > 0: B ({b}) scores higher than A ({a}); win_rate: the share of "
            f"paired samples where B ({b}) scores higher (a tie counts a half); wins / ties / losses: of B",
        }
        summary["comparison"] = {}
        for name in first.samples.scores:
            c = paired_comparison(first.samples.scores[name], other.samples.scores[name], len(prompts))
            summary["comparison"][name] = {"direction": f"B ({b}) - A ({a})", **c, "higher": higher_model(c),
                                           "result": comparison_result(c, a, b)}
    summary["statistics"] = STATISTICS
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as the text ``align-gen evaluate`` prints: which model is A (and B), per reward
    and model the mean, std, 95% CI and n; with a comparison, B - A and B's win rate with their
    intervals, and per reward one line saying which model scores higher, naming both."""

    def cell(low: float | None, high: float | None) -> str:
        return "" if low is None or high is None else f"[{low:.4f}, {high:.4f}]"

    a = model_label(summary["model"], summary.get("lora"))
    lines = [f"A = {a}"]
    if "compare" in summary:
        b = model_label(summary["compare"]["model"], summary["compare"].get("lora"))
        lines.append(f"B = {b}")
    lines.append(f"{'reward':<28}{'model':>6}{'mean':>12}{'std':>12}{'95% CI':>26}{'n':>6}")
    for role, rewards in (("A", summary["rewards"]), ("B", summary.get("compare", {}).get("rewards", {}))):
        for name, row in rewards.items():
            ci = cell(row["ci_low"], row["ci_high"])
            lines.append(f"{name:<28}{role:>6}{row['mean']:>12.4f}{row['std']:>12.4f}{ci:>26}{row['n']:>6}")
    if "comparison" in summary:
        lines.append(f"paired by prompt and seed; B - A = B ({b}) minus A ({a}):")
        lines.append(f"{'reward':<28}{'B - A':>12}{'95% CI':>26}{'win rate of B':>15}{'95% CI':>20}")
        for name, c in summary["comparison"].items():
            change = cell(c["difference_ci_low"], c["difference_ci_high"])
            win = cell(c["win_rate_ci_low"], c["win_rate_ci_high"])
            lines.append(f"{name:<28}{c['mean_difference']:>12.4f}{change:>26}{c['win_rate']:>15.3f}{win:>20}")
        for name, c in summary["comparison"].items():
            lines.append(f"{name}: {comparison_result(c, a, b)}")
    return "\n".join(lines)


def sample_grid_image(models: Sequence[EvaluatedModel], prompts: Sequence, seeds: Sequence[int], reward: str):
    """The kept samples of each model as a grid (rows = prompts, columns = seeds), each captioned
    with its ``reward`` score, seed and prompt; two models side by side. None when none were kept."""
    from pipelines.grid import render_grid, side_by_side

    panels, titles = [], []
    for model in models:
        kept = sorted(model.samples.images, key=lambda key: (key[1], key[0]))  # row-major by prompt
        if not kept:
            return None
        columns = len({seed_index for seed_index, _ in kept})
        labels = []
        for seed_index, prompt_index in kept:
            sample = seed_index * len(prompts) + prompt_index
            answer = f" -> {model.samples.texts[sample]}" if model.samples.texts else ""
            score = float(model.samples.scores[reward][sample])
            labels.append(f"{score:.3g} (seed {seeds[seed_index]}) {prompts[prompt_index]}{answer}")
        images = torch.stack([model.samples.images[key] for key in kept]).float() / 255
        panels.append(render_grid(images, labels, columns=columns))
        titles.append(f"{model.role}: {model.label}")
    return panels[0] if len(panels) == 1 else side_by_side(panels, titles)


# ------------------------------------------------------------------------------------------
# the report


def summary_blocks(summary: dict[str, Any], models: Sequence[EvaluatedModel], prompts: Sequence, grid: str | None) -> list[Block]:
    seeds = summary["seeds"]
    names = " vs ".join(f"{m.role} = `{m.name}`" + (f" (LoRA `{m.lora}`)" if m.lora else "") for m in models)
    blocks: list[Block] = [
        Heading("Evaluation report", 1),
        Paragraph(f"{names}. Prompts `{summary['prompts']}`: {len(prompts)} prompts x {len(seeds)} seeds "
                  f"({', '.join(map(str, seeds))}) = {len(prompts) * len(seeds)} samples per model."),
        Heading("Rewards"),
    ]
    rows = []
    for model, rewards in zip(models, [summary["rewards"], summary.get("compare", {}).get("rewards")], strict=False):
        for name, row in rewards.items():
            rows.append([name, f"{model.role}: {model.label}", number(row["mean"]), number(row["std"]),
                         interval(row["ci_low"], row["ci_high"]), str(row["n"])])
    blocks.append(Table(["reward", "model", "mean", "std", "95% CI", "n"], rows))
    if "comparison" in summary:
        a, b = models[0].label, models[1].label
        blocks += [
            Heading(f"Paired comparison: B ({b}) - A ({a}), same prompts and seeds"),
            Paragraph(f"B - A > 0: B (`{b}`) scores higher than A (`{a}`); B - A < 0: A scores higher. The win "
                      f"rate is the share of paired samples where B (`{b}`) scores higher (a tie counts a half)."),
            Table(
                ["reward", f"mean A ({a})", f"mean B ({b})", "B - A", "95% CI", "win rate of B", "95% CI",
                 "B wins / ties / B loses", "result"],
                [[name, number(c["mean_a"]), number(c["mean_b"]), number(c["mean_difference"]),
                  interval(c["difference_ci_low"], c["difference_ci_high"]), number(c["win_rate"], 3),
                  interval(c["win_rate_ci_low"], c["win_rate_ci_high"]), f"{c['wins']} / {c['ties']} / {c['losses']}",
                  comparison_result(c, a, b)]
                 for name, c in summary["comparison"].items()],
            ),
        ]
    if grid is not None:
        what = (f"A ({models[0].label}, left) and B ({models[1].label}, right), the same prompts and seeds"
                if len(models) > 1 else "rows = prompts, columns = seeds")
        reward = next(iter(summary["rewards"]))
        blocks += [Heading("Samples"), Figure(grid, f"{what}; each captioned with its {reward} score, seed and prompt")]
    blocks += _prompt_blocks(models, prompts)
    blocks += [Heading("Statistics"), Paragraph(STATISTICS)]
    return blocks


def _prompt_blocks(models: Sequence[EvaluatedModel], prompts: Sequence, count: int = 5) -> list[Block]:
    """The prompts at both ends of the first reward (of B - A when comparing), mean over seeds."""
    reward = next(iter(models[0].samples.scores))
    means = [per_prompt_means(m.samples.scores[reward], len(prompts)) for m in models]
    key = means[-1] - means[0] if len(models) > 1 else means[0]
    order = key.argsort().tolist()
    shown = order if len(order) <= 2 * count else order[:count] + order[-count:]
    header = ["prompt", *(f"mean {m.role} ({m.label})" for m in models)] + (["B - A"] if len(models) > 1 else [])
    rows = [[str(prompts[i]), *(number(float(m[i])) for m in means)] + ([number(float(key[i]))] if len(models) > 1 else [])
            for i in shown]
    what = f"B - A (B = {models[1].label}, A = {models[0].label})" if len(models) > 1 else "the mean"
    return [Heading(f"Prompts: lowest and highest {what} of `{reward}`"), Table(header, rows)]


def training_run_blocks(run_dir: Path, out_dir: Path, figure_name: str = "training.png") -> list[Block]:
    """A training run's section: every numeric ``monitor/*`` key of its metrics.jsonl (and of
    evaluation.jsonl) over epochs, and the held-out evaluation curve with its intervals, as
    tables and one figure (written to ``out_dir / figure_name``)."""
    metrics_path, evaluation_path = run_dir / METRICS_FILE, run_dir / EVALUATION_FILE
    if not metrics_path.is_file() and not evaluation_path.is_file():
        raise ConfigError(f"--run {run_dir}: not a training output folder (no {METRICS_FILE} or {EVALUATION_FILE}).")
    metrics = read_metrics(metrics_path) if metrics_path.is_file() else []
    evaluations = read_metrics(evaluation_path) if evaluation_path.is_file() else []
    monitors: dict[str, dict[int, float]] = {}
    for rows, epoch_key in ((metrics, "epoch"), (evaluations, "epochs_done")):
        for row in rows:
            for key, value in row.items():
                if key.startswith("monitor/") and isinstance(value, int | float) and not isinstance(value, bool):
                    monitors.setdefault(key, {})[row[epoch_key]] = float(value)
    blocks: list[Block] = [Heading("Training run"), Paragraph(f"Run folder `{run_dir}`.")]
    if monitors:
        epochs = sorted({epoch for values in monitors.values() for epoch in values})
        step = max(1, math.ceil(len(epochs) / MAX_RUN_ROWS))
        shown = sorted(set(epochs[::step]) | {epochs[-1]})
        blocks += [Heading("Monitors", 3), Table(
            ["epoch", *monitors], [[str(e), *(number(values.get(e)) for values in monitors.values())] for e in shown])]
        if len(shown) < len(epochs):
            blocks.append(Paragraph(f"One epoch in {step} shown (and the last); all {len(epochs)} are in {METRICS_FILE}."))
    else:
        blocks.append(Paragraph(f"The run logged no `monitor/*` keys in {METRICS_FILE}."))
    curves = {"reward": _heldout_curve(run_dir, evaluations)}
    for name in dict.fromkeys(key.removesuffix("_scores") for row in evaluations for key in row if key.endswith("_scores")):
        curves[name] = _heldout_curve(run_dir, evaluations, name)
    for name, curve in curves.items():
        if curve:
            title = "Held-out evaluation" + ("" if name == "reward" else f": {name} (evaluation.rewards)")
            blocks += [Heading(title, 3), Table(
                ["epochs done", "mean", "95% CI", "change since the first", "95% CI"],
                [[str(r["epochs_done"]), number(r["mean"]), interval(r["ci_low"], r["ci_high"]), number(r.get("change")),
                  interval(r.get("change_ci_low"), r.get("change_ci_high"))] for r in curve])]
    if len(curves) > 1:
        blocks.append(Paragraph(
            "The other rewards scored the same held-out samples as the training reward. Against it (the figure's "
            "last panels): a gold reward that rises with the trained one is being learned; one that stalls or "
            "falls while the trained one rises is reward hacking (see the World-GenEval docs)."))
    if monitors or any(curves.values()):
        skipped = _plot_training(monitors, curves, out_dir / figure_name)
        if skipped is None:
            blocks.append(Paragraph("No figure: every series has fewer than 2 points (their values are in the tables)."))
        else:
            note = f"; fewer than 2 points, in the tables only: {', '.join(skipped)}" if skipped else ""
            blocks.append(Figure(figure_name, "held-out reward (95% CI band) and each monitor against the epochs of "
                                              f"updates done when the samples were drawn{note}"))
    return blocks


def _heldout_curve(run_dir: Path, evaluations: list[dict[str, Any]], name: str = "reward") -> list[dict[str, Any]]:
    """Each evaluation.jsonl row's mean of the training reward (``name`` "reward": its
    ``scores``) or of one of evaluation.rewards (its ``{name}_scores``), with its 95% interval
    over prompts (the prompt count is the row's n / the number of evaluation.seeds in the run's
    config.yaml; over samples when unknown) and its paired change since the first row."""
    import yaml

    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    num_seeds = len(((config or {}).get("evaluation") or {}).get("seeds") or []) or None
    scores_key = "scores" if name == "reward" else f"{name}_scores"
    rows = [row for row in evaluations if scores_key in row or name == "reward"]
    curve = []
    for row in rows:
        scores = torch.tensor(row.get(scores_key) or [row[f"{name}_mean"]], dtype=torch.float64)
        prompts = len(scores) // num_seeds if num_seeds and len(scores) % num_seeds == 0 else None
        point = {"epochs_done": row["epochs_done"], **summarise({"r": scores}, prompts)["r"]}
        first = torch.tensor(rows[0].get(scores_key) or [], dtype=torch.float64)
        if point["epochs_done"] != rows[0]["epochs_done"] and len(first) == len(scores) > 1:
            change = paired_comparison(first, scores, prompts or len(scores))
            point |= {"change": change["mean_difference"], "change_ci_low": change["difference_ci_low"],
                      "change_ci_high": change["difference_ci_high"]}
        curve.append(point)
    return curve


def training_figure(monitors: dict[str, dict[int, float]], curves: dict[str, list[dict[str, Any]]]):
    """A training run's figure: one panel per series with at least 2 finite points (the held-out
    reward and each of evaluation.rewards with its 95% band, then each monitor) against the
    epochs of updates done (integer ticks), and, per reward of evaluation.rewards, a panel of it
    against the training reward at each evaluation (the gold-against-proxy picture). Returns
    ``(figure or None when no series has 2 points, the titles left out)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from align_gen.tracking import EPOCH_AXIS

    series: dict[str, list[tuple[float, float]]] = {}
    bands = {}  # panel title -> its curve, drawn with its interval band
    for name, curve in curves.items():
        if curve:
            title = "held-out reward" if name == "reward" else f"held-out {name}"
            series[title] = [(p["epochs_done"], p["mean"]) for p in curve if not math.isnan(p["mean"])]
            bands[title] = curve
    proxy = {p["epochs_done"]: p["mean"] for p in curves.get("reward", [])}
    for name, curve in curves.items():
        if name != "reward" and curve:
            series[f"{name} against the training reward"] = [(proxy[p["epochs_done"]], p["mean"]) for p in curve
                                                              if p["epochs_done"] in proxy]
    for title, values in monitors.items():
        series[title] = sorted((e, v) for e, v in values.items() if not math.isnan(v))
    skipped = [title for title, points in series.items() if len(points) < 2]
    panels = [title for title in series if title not in skipped]
    if not panels:
        return None, skipped
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, title in zip(axes.flat, panels, strict=False):
        points = series[title]
        if title in bands:
            curve = bands[title]
            x = [p["epochs_done"] for p in curve]
            axis.plot(x, [p["mean"] for p in curve], marker="s", color="tab:red")
            if all(p["ci_low"] is not None for p in curve):
                axis.fill_between(x, [p["ci_low"] for p in curve], [p["ci_high"] for p in curve], color="tab:red", alpha=0.2)
        else:
            axis.plot([e for e, _ in points], [v for _, v in points], marker="o", markersize=3)
        axis.set_title(title, fontsize=9)
        if title.endswith("against the training reward"):
            axis.set_xlabel("held-out training reward (one point per evaluation)", fontsize=8)
        else:
            axis.set_xlabel("epochs of updates done", fontsize=8)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(f"x: {EPOCH_AXIS}", fontsize=8)
    figure.tight_layout()
    return figure, skipped


def _plot_training(monitors: dict[str, dict[int, float]], curves: dict[str, list[dict[str, Any]]],
                   path: Path) -> list[str] | None:
    """Writes :func:`training_figure` to ``path``; returns the series left out, or None when
    there was nothing to draw (no file written)."""
    import matplotlib.pyplot as plt

    figure, skipped = training_figure(monitors, curves)
    if figure is None:
        path.unlink(missing_ok=True)  # an earlier report's figure
        return None
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return skipped


def write_outputs(
    out_dir: Path,
    models: Sequence[EvaluatedModel],
    prompts: Sequence,
    settings: dict[str, Any],
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Writes every file of the module docstring into ``out_dir``; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = settings["seeds"]
    summary = build_summary(models, prompts, settings)
    records = sample_records(models, prompts, seeds)
    (out_dir / "scores.json").write_text(json.dumps(records, indent=1))
    rewards = list(models[0].samples.scores)
    extra = [key for key in ("image", "answer") if records and key in records[0]]
    with (out_dir / "scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["role", "model", "prompt_index", "seed", "prompt", *extra, *rewards])
        for r in records:
            writer.writerow([r["role"], r["model"], r["prompt_index"], r["seed"], r["prompt"],
                             *(r[key] for key in extra), *(f"{r['scores'][name]:.6g}" for name in rewards)])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    grid_name = "comparison.png" if len(models) > 1 else "samples.png"
    image = sample_grid_image(models, prompts, seeds, rewards[0])
    if image is not None:
        image.save(out_dir / grid_name)
    blocks = summary_blocks(summary, models, prompts, grid_name if image is not None else None)
    if run_dir is not None:
        blocks += training_run_blocks(run_dir, out_dir)
    (out_dir / "report.md").write_text(render_markdown(blocks))
    (out_dir / "report.html").write_text(render_html(blocks, "align-gen evaluation"))
    return summary
