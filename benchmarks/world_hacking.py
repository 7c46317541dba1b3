"""Reward hacking on the tiny world made visible: a proxy reward trained, the gold one watched.

What is measured: one config (by default the demo's, ``configs/tiny/awm_world_preference.yaml``:
AWM on the learned preference head, a proxy) trained once per KL strength (``--betas``, set as
``objective.beta``: the objective's pull toward the base model), each run evaluating the same
held-out samples (``--eval-prompts`` x ``--eval-seeds``) every ``--eval-every`` epochs with the
trained reward and with the gold ``world_geneval`` (``evaluation.rewards``; ``--gold-mode``
strict: the share of samples whose caption is exactly right). Per run: the proxy's and the gold
reward's held-out means over training, the KL to the base model (``monitor/kl_to_base``), and
the paired change of each with its standard error.

The plot (``--plot``) is Gao et al.'s over-optimisation picture: gold against proxy, one line per
KL strength, a point per evaluation; beside it (``*_kl.png``) gold against the square root of the
KL to the base model, their distance measure (points where the monitor was measured: an
epoch's KL is measured as it samples, so the evaluation after the last epoch has none). Runs go
one after the other in this process; ``--reuse`` re-reads finished runs in ``--output-dir``.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_hacking.py \\
        --betas 1e-4 1e-2 1 --epochs 24 --json benchmarks/results/world_hacking.json \\
        --plot benchmarks/results/world_hacking.png
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
from align_gen.evaluation import paired_change, watched_changes
from align_gen.tracking import read_metrics
from align_gen.train import train

HERE = Path(__file__).resolve().parent
GOLD = "world_geneval"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE.parent / "configs" / "tiny" / "awm_world_preference.yaml")
    parser.add_argument("--betas", type=float, nargs="+", default=[1e-4, 1e-2, 1.0], help="objective.beta per run")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", default="builtin:world_geneval_heldout")
    parser.add_argument("--eval-num-prompts", type=int, default=0, help="evenly spaced held-out captions (0 = all)")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[1000, 1001])
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--gold-mode", default="strict", choices=["strict", "graded"])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/world_hacking"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reuse", action="store_true", help="analyse the runs in --output-dir, do not train")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def kl_plot_path(plot: Path) -> Path:
    """Where the gold-against-KL plot goes beside ``--plot``."""
    return plot.with_name(f"{plot.stem}_kl{plot.suffix}")


def run_name(beta: float) -> str:
    return f"beta_{beta:g}"


def run_beta(args: argparse.Namespace, beta: float) -> dict:
    """Trains one KL strength (unless --reuse); its row: proxy and gold before / after and their
    paired changes, the last KL to the base model, and the curve (proxy, gold, KL) per evaluation."""
    output_dir = args.output_dir / run_name(beta)
    if not args.reuse:
        config = load_config(args.config, [
            f"seed={args.seed}",
            f"output_dir={json.dumps(str(output_dir))}",
            f"epochs={args.epochs}",
            f"save_every={args.epochs}",
            f"objective.beta={beta}",
            "tensorboard=false",
            "grid.every=0",
            f"evaluation.prompts={args.eval_prompts}",
            f"evaluation.num_prompts={args.eval_num_prompts}",
            f"evaluation.seeds={json.dumps(args.eval_seeds)}",
            f"evaluation.every={args.eval_every}",
            f"evaluation.rewards={json.dumps({GOLD: {'mode': args.gold_mode}})}",
            *args.overrides,
        ])
        print(f"\n== beta {beta:g}: {args.config}, {args.epochs} epochs (load {load_average()})", flush=True)
        train(config)
    evaluations = read_metrics(output_dir / "evaluation.jsonl")
    kl = {row["epoch"]: row["monitor/kl_to_base"] for row in read_metrics(output_dir / "metrics.jsonl")
          if isinstance(row.get("monitor/kl_to_base"), int | float)}
    first, last = evaluations[0], evaluations[-1]
    proxy_change, proxy_se = paired_change(first["scores"], last["scores"])
    gold_before, gold_after, gold_change, gold_se = watched_changes(first, last)[GOLD]
    return {
        "name": run_name(beta),
        "beta": beta,
        "proxy_before": first["reward_mean"],
        "proxy_after": last["reward_mean"],
        "proxy_change": proxy_change,
        "proxy_change_se": proxy_se,
        "gold_before": gold_before,
        "gold_after": gold_after,
        "gold_change": gold_change,
        "gold_change_se": gold_se,
        "kl_last": kl[max(kl)] if kl else None,
        "curve": [[row["epochs_done"], row["reward_mean"], row[f"{GOLD}_mean"], kl.get(row["epochs_done"])]
                  for row in evaluations],
    }


def main() -> None:
    args = parse_args()
    machine = describe_machine(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print_machine(machine)
    rows = [run_beta(args, beta) for beta in args.betas]
    table = Table.of(
        ["objective.beta", "proxy before", "after", "change", "+- se", f"gold ({GOLD}) before", "after", "change", "+- se",
         "KL to base (last)"],
        [[r["beta"], r["proxy_before"], r["proxy_after"], r["proxy_change"], r["proxy_change_se"], r["gold_before"],
          r["gold_after"], r["gold_change"], r["gold_change_se"], r["kl_last"] if r["kl_last"] is not None else "n/a"]
         for r in rows],
    )
    extra = {"curves": {r["name"]: r.pop("curve") for r in rows},
             "curve_columns": ["epochs_done", "proxy held-out mean", "gold held-out mean", "monitor/kl_to_base"]}
    if args.plot:
        series = {f"beta {name.removeprefix('beta_')}": ([p[1] for p in curve], [p[2] for p in curve])
                  for name, curve in extra["curves"].items()}
        save_line_plot(series, args.plot, xlabel="held-out proxy reward (the trained one)",
                       ylabel=f"held-out gold reward ({GOLD}, {args.gold_mode})",
                       title=f"{args.config.name}: gold against proxy, one point per evaluation")
        distance = {f"beta {name.removeprefix('beta_')}": ([p[3] ** 0.5 for p in curve if p[3] is not None],
                                                           [p[2] for p in curve if p[3] is not None])
                    for name, curve in extra["curves"].items()}
        save_line_plot(distance, kl_plot_path(args.plot), xlabel="sqrt(KL to the base model), nats of the whole chain",
                       ylabel=f"held-out gold reward ({GOLD}, {args.gold_mode})",
                       title=f"{args.config.name}: gold against the distance from the base model")
    notes = [f"held-out: {args.eval_prompts} x seeds {args.eval_seeds}; gold = {GOLD} ({args.gold_mode})"]
    for note in notes:
        print(note)
    publish(BenchmarkResult(benchmark="world_hacking", description=__doc__.splitlines()[0], settings=settings_of(args),
                            machine=machine, rows=rows, table=table, notes=notes, extra=extra), args.json)


if __name__ == "__main__":
    main()
