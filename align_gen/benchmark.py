"""Task benchmarks scored like GenEval: each task's accuracy with its interval, and the overall score.

A benchmark names a reward that judges one image as correct (1) or not (0) for one task, and each
task's prompts per split. ``align-gen evaluate --benchmark NAME`` samples every task's prompts
once per seed (each task on its own: a caption that serves three tasks is drawn three times, as
GenEval draws each task's prompts) and scores:

- a task's **accuracy**: the fraction of its images judged correct, with a 95% interval over its
  prompts (each prompt's mean over its seeds is one unit; Student's t, as every interval of
  ``align-gen evaluate``: :mod:`align_gen.evaluation`);
- the **overall** score: the mean of the task accuracies (GenEval's), its standard error
  sqrt(sum_t se_t^2) / T (the tasks' samples are independent) and a t interval with the
  Welch-Satterthwaite degrees of freedom;
- with ``--compare``, B - A per task on the same prompts and seeds (a paired comparison) and
  overall (the mean of the task differences, its error combined the same way).

Benchmarks (:data:`BENCHMARKS`):

- ``world-geneval``: GenEval's six tasks in the tiny world's captions, judged by the world's gold
  checker (:mod:`align_gen.world.geneval`); splits ``train`` and ``heldout`` by composition.
- ``geneval``: GenEval itself at full size, without mmcv / mmdet (:mod:`reward_models.geneval`):
  its prompts generated from a seed over its tasks and COCO's classes, or read from GenEval's
  ``evaluation_metadata.jsonl`` (``--metadata``); one split, ``all``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from align_gen.errors import ConfigError
from align_gen.evaluation import (
    CONFIDENCE,
    ScoredSamples,
    mean_interval,
    paired_comparison,
    sample_and_score,
    select_prompts,
    student_t_quantile,
)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A task benchmark: its reward, the options that make it judge one task strictly
    (``task_options(task)``), its tasks' prompts per split (``task_prompts(split, metadata) ->
    {task: prompts}``; ``metadata``: a prompt-set file, for the benchmarks that read one) and the
    model it is made for."""

    name: str
    reward: str
    splits: tuple[str, ...]
    task_prompts: Callable[[str, str | None], dict[str, list[str]]]
    task_options: Callable[[str], dict[str, Any]]
    model: str
    description: str
    reads_metadata: bool = False


def _world_task_prompts(split: str, metadata: str | None) -> dict[str, list[str]]:
    from align_gen.world.geneval import task_prompts

    return task_prompts(split)


def _geneval_task_prompts(split: str, metadata: str | None) -> dict[str, list[str]]:
    from reward_models.geneval import geneval_task_prompts

    return geneval_task_prompts(metadata)


BENCHMARKS = {
    "world-geneval": Benchmark(
        name="world-geneval",
        reward="world_geneval",
        splits=("heldout", "train"),
        task_prompts=_world_task_prompts,
        task_options=lambda task: {"task": task, "mode": "strict"},
        model="align-gen:world",
        description="GenEval's six tasks in the tiny world's captions, judged by its gold checker",
    ),
    "geneval": Benchmark(
        name="geneval",
        reward="geneval",
        splits=("all",),
        task_prompts=_geneval_task_prompts,
        task_options=lambda task: {"mode": "strict"},
        model="stabilityai/stable-diffusion-3.5-medium",
        description="GenEval: Mask2Former detections and CLIP colours judged by GenEval's rules",
        reads_metadata=True,
    ),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


@dataclasses.dataclass
class TaskResult:
    """One model's samples of one task: its prompts and their scores (``ScoredSamples``, the
    benchmark's reward under the key ``correct``)."""

    task: str
    prompts: list[str]
    samples: ScoredSamples

    @property
    def correct(self):
        return self.samples.scores["correct"]


def task_rewards(benchmark: Benchmark, tasks: Sequence[str], options: dict[str, Any]) -> dict[str, Any]:
    """{task: the benchmark's strict reward for it} (``options``: the user's, beside the task's);
    one reward serves every task whose options are the same (its weights load once)."""
    from reward_models import get_reward

    built: dict[str, Any] = {}
    rewards = {}
    for task in tasks:
        settings = {**options, **benchmark.task_options(task)}
        key = repr(sorted(settings.items(), key=lambda item: item[0]))
        if key not in built:
            built[key] = get_reward(benchmark.reward, **settings)
        rewards[task] = built[key]
    return rewards


def run_benchmark(
    policy,
    benchmark: Benchmark,
    split: str,
    seeds: Sequence[int],
    batch_size: int,
    *,
    num_prompts: int = 0,
    grid_prompts: int = 0,
    metadata: str | None = None,
    reward_options: dict[str, Any] | None = None,
    desc: str = "",
) -> list[TaskResult]:
    """Samples each task's prompts of ``split`` (``num_prompts`` evenly spread per task; 0 =
    all) once per seed and judges them; keeps the images of ``grid_prompts`` prompts per task
    for up to 4 seeds. ``metadata``: the benchmark's prompt-set file, where it reads one (it is
    also handed to the reward); ``reward_options``: the reward's other options."""
    if split not in benchmark.splits:
        raise ConfigError(f"benchmark {benchmark.name} has the splits {', '.join(benchmark.splits)}, not {split!r}")
    prompts_of = benchmark.task_prompts(split, metadata)
    options = dict(reward_options or {}) | ({"metadata": metadata} if metadata else {})
    rewards = task_rewards(benchmark, list(prompts_of), options)
    results = []
    for task, all_prompts in prompts_of.items():
        prompts = select_prompts(all_prompts, num_prompts)
        keep = select_prompts(range(len(prompts)), grid_prompts) if grid_prompts > 0 else []
        samples = sample_and_score(policy, {"correct": rewards[task]}, prompts, seeds, batch_size, keep_prompts=keep,
                                   keep_seeds=min(len(seeds), 4), desc=f"{desc}{task}")
        results.append(TaskResult(task, prompts, samples))
    return results


def _combined(means: Sequence[float], ses: Sequence[float | None], dfs: Sequence[int]) -> dict[str, Any]:
    """The mean of T independent estimates, its se sqrt(sum se^2) / T and a t interval with the
    Welch-Satterthwaite degrees of freedom (no interval when any estimate has none)."""
    mean = sum(means) / len(means)
    if any(se is None for se in ses) or any(df < 1 for df in dfs):
        return {"mean": mean, "se": None, "ci_low": None, "ci_high": None, "df": None}
    variances = [(se / len(means)) ** 2 for se in ses]
    se = math.sqrt(sum(variances))
    if se == 0:
        return {"mean": mean, "se": 0.0, "ci_low": mean, "ci_high": mean, "df": None}
    df = sum(variances) ** 2 / sum(v * v / d for v, d in zip(variances, dfs, strict=True) if v > 0)
    half = student_t_quantile(0.5 + CONFIDENCE / 2, df) * se
    return {"mean": mean, "se": se, "ci_low": mean - half, "ci_high": mean + half, "df": df}


def _clipped(row: dict[str, Any], low_key: str, high_key: str, bound: float) -> dict[str, Any]:
    """``row`` with its interval clipped to [-bound, 1] (an accuracy's [0, 1] or a difference's [-1, 1])."""
    def clip(value: float | None) -> float | None:
        return None if value is None else min(max(value, -bound), 1.0)

    return {**row, low_key: clip(row[low_key]), high_key: clip(row[high_key])}


def task_statistics(results: Sequence[TaskResult]) -> dict[str, Any]:
    """{"tasks": {task: accuracy, se, 95% interval, prompts, images, correct}, "overall": the
    mean accuracy over tasks with its interval} (module docstring)."""
    tasks = {}
    for result in results:
        row = mean_interval(result.correct, len(result.prompts))
        tasks[result.task] = _clipped({
            "accuracy": row["mean"], "se": row["se"], "ci_low": row["ci_low"], "ci_high": row["ci_high"],
            "df": row["df"], "prompts": len(result.prompts), "images": len(result.correct),
            "correct": int(result.correct.sum()),
        }, "ci_low", "ci_high", 0.0)
    overall = _combined([t["accuracy"] for t in tasks.values()], [t["se"] for t in tasks.values()],
                        [t["df"] for t in tasks.values()])
    return {"tasks": tasks, "overall": _clipped({"accuracy": overall.pop("mean"), **overall}, "ci_low", "ci_high", 0.0)}


def task_comparison(a: Sequence[TaskResult], b: Sequence[TaskResult]) -> dict[str, Any]:
    """B - A per task (paired by prompt and seed) and overall (module docstring)."""
    tasks = {}
    for result_a, result_b in zip(a, b, strict=True):
        comparison = paired_comparison(result_a.correct, result_b.correct, len(result_a.prompts))
        tasks[result_a.task] = _clipped(comparison, "difference_ci_low", "difference_ci_high", 1.0)
    overall = _combined([c["mean_difference"] for c in tasks.values()], [c["difference_se"] for c in tasks.values()],
                        [c["df"] for c in tasks.values()])
    return {"tasks": tasks, "overall": _clipped({"mean_difference": overall.pop("mean"), **overall}, "ci_low", "ci_high", 1.0)}


# ------------------------------------------------------------------------------------------
# outputs


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _percent_interval(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f"[{100 * low:.1f}, {100 * high:.1f}]"


def benchmark_table(summary: dict[str, Any]) -> str:
    """The per-task table ``align-gen evaluate --benchmark`` prints (accuracy in %)."""
    roles = [("A", summary["A"])] + ([("B", summary["B"])] if "B" in summary else [])
    lines = [f"{role} = {stats['model']}" for role, stats in roles]
    header = f"{'task':<16}" + "".join(f"{role + ' %':>8}{'95% CI':>16}" for role, _ in roles)
    if "comparison" in summary:
        header += f"{'B - A':>8}{'95% CI':>16}"
    lines.append(header + f"{'prompts':>9}{'images':>8}")
    names = [*summary["A"]["tasks"], "overall"]
    for name in names:
        line = f"{name:<16}"
        for _, stats in roles:
            row = stats["overall"] if name == "overall" else stats["tasks"][name]
            line += f"{_percent(row['accuracy']):>8}{_percent_interval(row['ci_low'], row['ci_high']):>16}"
        if "comparison" in summary:
            c = summary["comparison"]["overall"] if name == "overall" else summary["comparison"]["tasks"][name]
            low, high = (c["ci_low"], c["ci_high"]) if name == "overall" else (c["difference_ci_low"], c["difference_ci_high"])
            line += f"{_percent(c['mean_difference']):>8}{_percent_interval(low, high):>16}"
        task = summary["A"]["tasks"].get(name)
        line += f"{task['prompts'] if task else '':>9}{task['images'] if task else '':>8}"
        lines.append(line)
    return "\n".join(lines)


def benchmark_summary(benchmark: Benchmark, models: Sequence[tuple[str, list[TaskResult]]],
                      settings: dict[str, Any]) -> dict[str, Any]:
    """summary.json of a benchmark run: the settings, per model (A, B) the task statistics, and
    with two models the comparison B - A."""
    summary: dict[str, Any] = {"benchmark": benchmark.name, "description": benchmark.description, **settings}
    for role, (label, results) in zip("AB", models, strict=False):
        summary[role] = {"model": label, **task_statistics(results)}
    if len(models) > 1:
        summary["comparison"] = {"direction": f"B ({models[1][0]}) - A ({models[0][0]})",
                                 **task_comparison(models[0][1], models[1][1])}
    return summary


def write_benchmark_outputs(out_dir: Path, benchmark: Benchmark, models: Sequence[tuple[str, list[TaskResult]]],
                            settings: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """summary.json, scores.jsonl (one line per image: model, task, prompt, seed, correct), one
    sample grid per task (samples_<task>.png) and report.md / report.html; returns the summary."""
    from align_gen.report import (
        EvaluatedModel,
        Figure,
        Heading,
        Paragraph,
        Table,
        render_html,
        render_markdown,
        sample_grid_image,
        training_run_blocks,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = settings["seeds"]
    summary = benchmark_summary(benchmark, models, settings)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    with (out_dir / "scores.jsonl").open("w") as handle:
        for role, (label, results) in zip("AB", models, strict=False):
            for result in results:
                for index, value in enumerate(result.correct.tolist()):
                    record = {"role": role, "model": label, "task": result.task,
                              "prompt": result.prompts[index % len(result.prompts)],
                              "seed": seeds[index // len(result.prompts)], "correct": bool(value)}
                    handle.write(json.dumps(record) + "\n")
    roles = "AB"[: len(models)]
    header = ["task", *(f"{role} ({label}) %" for role, (label, _) in zip(roles, models, strict=True))]
    header += ["B - A (points)"] if len(models) > 1 else []
    rows = []
    for task in [*summary["A"]["tasks"], "overall"]:
        cells = [task]
        for role in roles:
            row = summary[role]["overall"] if task == "overall" else summary[role]["tasks"][task]
            cells.append(f"{_percent(row['accuracy'])} {_percent_interval(row['ci_low'], row['ci_high'])}")
        if len(models) > 1:
            c = summary["comparison"]["overall"] if task == "overall" else summary["comparison"]["tasks"][task]
            low, high = (c["ci_low"], c["ci_high"]) if task == "overall" else (c["difference_ci_low"], c["difference_ci_high"])
            cells.append(f"{_percent(c['mean_difference'])} {_percent_interval(low, high)}")
        rows.append(cells)
    prompts = ", ".join(f"{task} {row['prompts']}" for task, row in summary["A"]["tasks"].items())
    blocks = [
        Heading(f"Benchmark {benchmark.name}", 1),
        Paragraph(f"{benchmark.description}. Split `{settings['split']}`, seeds {', '.join(map(str, seeds))}; "
                  f"prompts per task: {prompts}. Accuracy in percent with its 95% interval over prompts; "
                  "overall = the mean over tasks."),
        Table(header, rows),
    ]
    for index, task in enumerate(summary["A"]["tasks"]):
        evaluated = [EvaluatedModel(role, label, None, results[index].samples)
                     for role, (label, results) in zip("AB", models, strict=False)]
        image = sample_grid_image(evaluated, models[0][1][index].prompts, seeds, "correct")
        if image is not None:
            name = f"samples_{task}.png"
            image.save(out_dir / name)
            blocks += [Heading(f"Samples: {task}"), Figure(name, "each captioned 1 (correct) or 0, with its seed and prompt")]
    if run_dir is not None:
        blocks += training_run_blocks(run_dir, out_dir)
    (out_dir / "report.md").write_text(render_markdown(blocks))
    (out_dir / "report.html").write_text(render_html(blocks, f"align-gen {benchmark.name}"))
    return summary
