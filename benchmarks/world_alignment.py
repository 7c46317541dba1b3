"""The objectives aligning the tiny world's diffusion model to the world's CLIP score, and their race.

What is measured: each method trains the shipped world model (``align_gen/world/weights/sd``)
with ``align_gen.train.train`` on its config ``configs/tiny/<method>_world_clipscore.yaml``
(LoRA, DDIM 10 steps, guidance 3, world-CLIP ``clip_score`` reward, train-split captions), for
the same SAMPLE BUDGET: ``epochs = --samples / samples per epoch``, where a method's samples per
epoch are the images it draws (sample.batch_size x sample.num_batches_per_epoch; SePPO's are
drawn by its reference model, and it also reads that many dataset winners: drawn world scenes of
training captions, the ``world:train`` dataset). Every run evaluates with the SAME held-out set (the
evaluation section below: ``--eval-prompts`` held-out captions x ``--eval-seeds``; each sample
paired across evaluations) before training, every ``--eval-every`` epochs and after training.

Reported per method: held-out reward before and after, the paired change with its standard
error, samples used, and wall time (the trainer's sampling + reward + update clocks; model
loading, grids, evaluations and checkpoints excluded) with the process's CPU time over the same
spans (``time_cpu_s`` in the trainer's metrics: a check on the wall clock of a shared machine). The plot shows held-out reward vs samples
used. Methods run one after the other in this process; ``--reuse`` re-reads finished runs.
``--json`` writes the result (``harness.BenchmarkResult``: one row per method, the held-out curves
under ``extra["curves"]`` and ``extra["time_curves"]``).

The race (when DDPO is among the methods): each method's held-out reward against its training
seconds (the same clocks, summed over the epochs before each evaluation), and the seconds it
needs to reach DDPO's final held-out reward (linear between evaluations; "not reached" when it
never does), as a ratio to DDPO's own: below 1 = faster than DDPO. ``--race-plot`` draws the
reward-against-seconds curves. The race is also reported on CPU seconds (``extra["race_cpu"]``).
Seconds are only comparable between methods run in one process on a quiet machine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_alignment.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_alignment.py --samples 128 --methods awm --json /tmp/w.json --plot /tmp/w.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from harness import (
    BenchmarkResult,
    Table,
    describe_machine,
    load_average,
    print_machine,
    publish,
    save_line_plot,
    settings_of,
)

from align_gen.config import load_config
from align_gen.evaluation import paired_change
from align_gen.tracking import read_metrics
from align_gen.train import train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG_NAME = "{method}_world_clipscore.yaml"
METHODS = ("ddpo", "grpo", "rebel", "awm", "seppo", "diffusion_dpo", "nft")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--config-dir", type=Path, default=HERE.parent / "configs" / "tiny")
    parser.add_argument("--samples", type=int, default=1024, help="images each method may draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", default="builtin:world_heldout")
    parser.add_argument("--eval-num-prompts", type=int, default=52, help="evenly spaced held-out captions")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[1000, 1001])
    parser.add_argument("--eval-every", type=int, default=4, help="epochs between evaluations")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/world_alignment"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reuse", action="store_true", help="analyse the runs in --output-dir, do not train")
    parser.add_argument("--plot", type=Path, default=RESULTS / "world_alignment.png")
    parser.add_argument("--json", type=Path, default=RESULTS / "world_alignment.json")
    parser.add_argument("--race-plot", type=Path, default=None, help="held-out reward against training seconds")
    return parser.parse_args()


def run_method(args: argparse.Namespace, method: str) -> dict:
    """Trains ``method`` on the sample budget (unless --reuse); returns its row of the table,
    with its held-out curve ((samples drawn, reward) per evaluation) under "curve"."""
    output_dir = args.output_dir / method
    config_path = args.config_dir / CONFIG_NAME.format(method=method)
    overrides = [
        f"seed={args.seed}",
        f"output_dir={json.dumps(str(output_dir))}",  # JSON: YAML reads it verbatim
        "tensorboard=false",
        "grid.every=0",
        f"evaluation.prompts={args.eval_prompts}",
        f"evaluation.num_prompts={args.eval_num_prompts}",
        f"evaluation.seeds={json.dumps(args.eval_seeds)}",
        f"evaluation.every={args.eval_every}",
        *args.overrides,
    ]
    config = load_config(config_path, overrides)
    per_epoch = config.sample.batch_size * config.sample.num_batches_per_epoch
    epochs = max(1, args.samples // per_epoch)
    config = load_config(config_path, [*overrides, f"epochs={epochs}", f"save_every={epochs}"])
    if not args.reuse:
        print(f"\n== {method}: {config_path}, {epochs} epochs x {per_epoch} samples (load {load_average()})", flush=True)
        train(config)
    metrics = read_metrics(output_dir / "metrics.jsonl")
    evaluations = read_metrics(output_dir / "evaluation.jsonl")
    change, error = paired_change(evaluations[0]["scores"], evaluations[-1]["scores"])
    return {
        "name": method,
        "before": evaluations[0]["reward_mean"],
        "after": evaluations[-1]["reward_mean"],
        "change": change,
        "change_se": error,
        "samples": sum(row["samples"] for row in metrics),
        "train_wall_s": training_seconds(metrics, len(metrics)),
        "train_cpu_s": training_seconds(metrics, len(metrics), cpu=True),
        "curve": [(row["epochs_done"] * per_epoch, row["reward_mean"]) for row in evaluations],
        "time_curve": [(training_seconds(metrics, row["epochs_done"]), row["reward_mean"]) for row in evaluations],
        "cpu_curve": [(training_seconds(metrics, row["epochs_done"], cpu=True), row["reward_mean"]) for row in evaluations],
        "config": str(config_path),
    }


def training_seconds(metrics: list[dict], epochs: int, cpu: bool = False) -> float:
    """The trainer's sampling + reward + update seconds of the first ``epochs`` epochs: wall
    seconds, or with ``cpu`` the process's CPU seconds over the same spans."""
    def seconds(row: dict) -> float:
        return row["time_cpu_s"] if cpu else row["time_sampling_s"] + row["time_update_s"]

    return sum(seconds(row) for row in metrics if row["epoch"] < epochs)


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first seconds at which the (seconds, reward) ``curve`` reaches ``target``, linear
    between its points; None when it never does."""
    for (t0, r0), (t1, r1) in zip(curve, curve[1:], strict=False):
        if r1 >= target:
            return t0 if r0 >= target else t0 + (target - r0) / (r1 - r0) * (t1 - t0)
    return None


def race(rows: list[dict], reference: str = "ddpo", curve: str = "time_curve") -> list[dict]:
    """Each method's seconds to reach the reference method's final held-out reward and its
    ratio to the reference's own seconds (None when not reached), on the rows' ``curve``
    ("time_curve": wall seconds, "cpu_curve": CPU seconds)."""
    by_name = {row["name"]: row for row in rows}
    target = by_name[reference]["after"]
    reference_time = time_to_reach(by_name[reference][curve], target)
    results = []
    for row in rows:
        seconds = time_to_reach(row[curve], target)
        ratio = None if seconds is None or not reference_time else seconds / reference_time
        results.append({"name": row["name"], "target": target, "seconds_to_target": seconds, "ratio_to_reference": ratio})
    return results


def race_entry_text(entry: dict) -> str:
    """"12 s (0.50x DDPO's)", "not reached", or without the ratio when DDPO's own time is 0
    (its reward at the start already met its final one)."""
    seconds, ratio = entry["seconds_to_target"], entry["ratio_to_reference"]
    if seconds is None:
        return "not reached"
    return f"{seconds:.0f} s" + ("" if ratio is None else f" ({ratio:.2f}x DDPO's)")


def plot(rows: list[dict], path: Path, title: str) -> None:
    series = {row["name"]: tuple(map(list, zip(*row["curve"], strict=True))) for row in rows}
    save_line_plot(
        series, path, xlabel="samples drawn", ylabel="held-out world CLIP score (mean)", title=title
    )


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as train() picks
    machine = describe_machine(device)
    print_machine(machine)
    rows = [run_method(args, method) for method in args.methods]
    print(
        f"\nheld-out: {args.eval_num_prompts} captions of {args.eval_prompts} x seeds {args.eval_seeds}; "
        f"budget {args.samples} samples per method; seconds = sampling + reward + update"
    )
    table = Table.of(
        ["method", "before", "after", "change", "+- se", "samples", "seconds", "CPU seconds"],
        [
            [r["name"], r["before"], r["after"], r["change"], r["change_se"], r["samples"], r["train_wall_s"], r["train_cpu_s"]]
            for r in rows
        ],
    )
    title = f"world model, world CLIP score, {args.samples} samples each, seed {args.seed}, {machine['cpu']}"
    plot(rows, args.plot, title)
    notes, extra = [], {}
    if "ddpo" in args.methods:
        results, cpu_results = race(rows), race(rows, curve="cpu_curve")
        extra["race"], extra["race_cpu"] = results, cpu_results
        notes.append(f"race: seconds to reach DDPO's final held-out reward {results[0]['target']:.4f} (ratio to DDPO's)")
        for entry, cpu_entry in zip(results, cpu_results, strict=True):
            notes.append(f"  {entry['name']}: {race_entry_text(entry)}; CPU {race_entry_text(cpu_entry)}")
        if args.race_plot:
            series = {row["name"]: tuple(map(list, zip(*row["time_curve"], strict=True))) for row in rows}
            save_line_plot(series, args.race_plot, xlabel="training seconds", ylabel="held-out world CLIP score (mean)", title=title)
    for note in notes:
        print(note)
    extra["curves"] = {row["name"]: [list(point) for point in row.pop("curve")] for row in rows}
    extra["time_curves"] = {row["name"]: [list(point) for point in row.pop("time_curve")] for row in rows}
    extra["cpu_curves"] = {row["name"]: [list(point) for point in row.pop("cpu_curve")] for row in rows}
    result = BenchmarkResult(
        benchmark="world_alignment",
        description=__doc__.splitlines()[0],
        settings=settings_of(args),
        machine=machine,
        rows=rows,
        table=table,
        notes=notes,
        extra=extra,
    )
    publish(result, args.json)


if __name__ == "__main__":
    main()
