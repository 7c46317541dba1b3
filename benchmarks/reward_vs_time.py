"""Reward vs wall-clock time of DDPO, REBEL and AWM on the tiny offline setup.

What is measured: each method trains with ``align_gen.train.train`` on its tiny config
(``configs/tiny/<method>_tiny_compressibility.yaml``: the built-in random tiny SD model, JPEG
compressibility reward, CPU), loaded with ``align_gen.config.load_config`` and these overrides:
``epochs``, ``seed``, ``output_dir`` (``<--output-dir>/<method>``), no TensorBoard, no periodic
grids, and any ``--set KEY=VALUE``. The methods run one after the other in this process.

How: each run's ``metrics.jsonl`` gives, per epoch e, ``reward_mean`` (of the samples drawn at
the start of epoch e, i.e. by the policy after e updates), ``time_sampling_s`` and
``time_update_s`` (the trainer's own clocks: sampling; then reward, advantages and update).
The curve plots reward_e at the wall-clock time its samples were ready:
    seconds_e = sum_{i<e} (sampling_i + update_i) + sampling_e
so model loading, grids, checkpoints and logging are not counted. For a common target reward
(``--target``, default: the smallest of the methods' best rewards, so every method reaches it)
the time to target is the first seconds_e with reward_e >= target, reported with its ratio to
the baseline's (``--baseline``, DDPO) measured in the same run. A ratio below 1 reaches the
target faster than the baseline. One seed per method: first crossings of a noisy curve are noisy
too, so read the ratios with the curves (the plot) and repeat with other ``--seed`` values.

Writes the result to ``--json`` (``harness.BenchmarkResult``: one row per method with its
summary, the per-epoch curves under ``extra["curves"]``, the target under ``extra["target"]``)
and the plot (reward vs cumulative seconds, one
line per method) to ``--plot``. ``--reuse`` analyses the runs already in ``--output-dir``
without training.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reward_vs_time.py            # 20 epochs each
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reward_vs_time.py --epochs 2 --plot /tmp/r.png --json /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from harness import (
    BenchmarkResult,
    Comparison,
    Table,
    describe_machine,
    load_average,
    print_machine,
    publish,
    save_line_plot,
    settings_of,
)

from align_gen.config import load_config
from align_gen.train import train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG_NAME = "{method}_tiny_compressibility.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=["ddpo", "rebel", "awm"], help="objectives to run"
    )
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=HERE.parent / "configs" / "tiny",
        help=f"where {CONFIG_NAME} lives",
    )
    parser.add_argument("--epochs", type=int, default=20, help="sampling epochs per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/reward_vs_time"),
        help="each method's run goes to <output-dir>/<method>",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override applied to every method's run (repeatable)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="the reward to reach (default: the smallest of the methods' best rewards)",
    )
    parser.add_argument("--baseline", default="ddpo", help="the method the times are divided by")
    parser.add_argument(
        "--reuse", action="store_true", help="analyse the runs in --output-dir, do not train"
    )
    parser.add_argument("--plot", type=Path, default=RESULTS / "reward_vs_time.png")
    parser.add_argument("--json", type=Path, default=RESULTS / "reward_vs_time.json")
    args = parser.parse_args()
    if args.baseline not in args.methods:
        parser.error(f"--baseline {args.baseline!r} is not among --methods {args.methods}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    return args


def run_method(args: argparse.Namespace, method: str) -> Path:
    """Trains ``method`` (unless --reuse) and returns its metrics.jsonl."""
    output_dir = args.output_dir / method
    metrics = output_dir / "metrics.jsonl"
    if args.reuse:
        if not metrics.is_file():
            raise SystemExit(f"--reuse: {metrics} does not exist; run without --reuse first.")
        return metrics
    config_path = args.config_dir / CONFIG_NAME.format(method=method)
    overrides = [
        f"epochs={args.epochs}",
        f"seed={args.seed}",
        f"output_dir={json.dumps(str(output_dir))}",  # JSON: YAML reads it verbatim
        "tensorboard=false",
        "grid.every=0",
        f"save_every={args.epochs}",
        *args.overrides,
    ]
    config = load_config(config_path, overrides)
    print(f"\n== {method}: {config_path} + {overrides} (load {load_average()})", flush=True)
    train(config)
    return metrics


def read_curve(metrics: Path) -> list[dict[str, float]]:
    """Per epoch: the reward and the wall-clock seconds at which its samples were ready."""
    rows = sorted(
        (json.loads(line) for line in metrics.read_text().splitlines() if line.strip()),
        key=lambda row: row["epoch"],
    )
    if not rows:
        raise SystemExit(f"{metrics} holds no epochs.")
    elapsed, curve = 0.0, []
    for row in rows:
        curve.append(
            {
                "epoch": row["epoch"],
                "seconds": elapsed + row["time_sampling_s"],
                "reward": row["reward_mean"],
                "reward_std": row.get("reward_std"),
                "time_sampling_s": row["time_sampling_s"],
                "time_update_s": row["time_update_s"],
            }
        )
        elapsed += row["time_sampling_s"] + row["time_update_s"]
    return curve


def first_reaching(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    return next((point for point in curve if point["reward"] >= target), None)


def plot(curves: dict[str, list[dict[str, float]]], target: float, path: Path, title: str) -> None:
    series = {
        method: ([point["seconds"] for point in curve], [point["reward"] for point in curve])
        for method, curve in curves.items()
    }
    save_line_plot(
        series,
        path,
        xlabel="cumulative seconds (sampling + reward + update)",
        ylabel="reward_mean",
        title=title,
        target=target,
    )


def summarise(
    curves: dict[str, list[dict[str, float]]], target: float, baseline: str
) -> dict[str, dict[str, Any]]:
    reached = {method: first_reaching(curve, target) for method, curve in curves.items()}
    base = reached[baseline]
    summary = {}
    for method, curve in curves.items():
        hit = reached[method]
        total = curve[-1]["seconds"] + curve[-1]["time_update_s"]
        summary[method] = {
            "name": method,
            "epochs": len(curve),
            "wall_s_per_epoch": total / len(curve),
            "first_reward": curve[0]["reward"],
            "best_reward": max(point["reward"] for point in curve),
            "last_reward": curve[-1]["reward"],
            "epoch_to_target": None if hit is None else hit["epoch"],
            "wall_s_to_target": None if hit is None else hit["seconds"],
            "ratio_to_baseline": (
                None if hit is None or base is None else hit["seconds"] / base["seconds"]
            ),
        }
    return summary


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as train() picks
    machine = describe_machine(device)
    print_machine(machine)

    loads = {}
    curves = {}
    for method in args.methods:
        loads[method] = load_average()
        curves[method] = read_curve(run_method(args, method))

    best = {method: max(point["reward"] for point in curve) for method, curve in curves.items()}
    target = args.target if args.target is not None else min(best.values())
    summary = summarise(curves, target, args.baseline)

    print(
        f"\ntarget reward {target:.6g} ({'--target' if args.target is not None else 'smallest best'}); "
        f"times are cumulative seconds of sampling + reward + update; baseline {args.baseline}"
    )
    header = [
        "method",
        "epochs",
        "s/epoch",
        "first reward",
        "best reward",
        "last reward",
        "epoch to target",
        "s to target",
        f"ratio to {args.baseline}",
    ]
    rows = [
        [
            method,
            s["epochs"],
            s["wall_s_per_epoch"],
            s["first_reward"],
            s["best_reward"],
            s["last_reward"],
            "not reached" if s["epoch_to_target"] is None else s["epoch_to_target"],
            "not reached" if s["wall_s_to_target"] is None else s["wall_s_to_target"],
            "n/a" if s["ratio_to_baseline"] is None else s["ratio_to_baseline"],
        ]
        for method, s in summary.items()
    ]
    notes = []
    if any(s["epoch_to_target"] == 0 for s in summary.values()):
        notes.append(
            "note: a method reaches the target with its very first samples (a method that never "
            "beat its first reward sets the default target); pass --target for a meaningful one."
        )

    title = f"{', '.join(args.methods)}: tiny SD, jpeg compressibility, seed {args.seed}, {machine['cpu']}"
    plot(curves, target, args.plot, title)
    result = BenchmarkResult(
        benchmark="reward_vs_time",
        description=__doc__.splitlines()[0],
        settings=settings_of(args),
        machine=machine,
        rows=list(summary.values()),
        table=Table.of(header, rows),
        comparisons=[
            Comparison(f"{method} / {args.baseline} seconds to target", s["ratio_to_baseline"])
            for method, s in summary.items()
            if method != args.baseline
        ],
        notes=notes,
        extra={"target": target, "load_avg_1min_at_start": loads, "curves": curves},
    )
    publish(result, args.json)


if __name__ == "__main__":
    main()
