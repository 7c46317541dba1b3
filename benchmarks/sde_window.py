"""An SDE window (Flow-GRPO-Fast, MixGRPO) against noise at every step: sampling and the update.

What is measured: one trainer is built as ``align_gen.train.train`` builds it (policy, AdamW,
``accelerator.prepare``), with the objective ``--objective`` (DDPO by default; GRPO adds the KL's
reference pass to both sides alike). Two epochs of rollouts are sampled from the same prompts and
seed: FULL (noise at every one of the ``--steps`` steps) and WINDOW (``sample.sde_window.size =
--window``, a random start per batch, the deterministic step elsewhere), with random advantages.
Then the two sides alternate, ``--repeats`` pairs after one warm-up each, the order within a pair
reversed every other pair: one sampling batch (``policy.sample``, the window opened for the
window side) and one update (``align_gen.train.update``) over that side's rollouts. The update
re-scores every trainable step of FULL and only the window's steps of WINDOW, so its cost should
fall to about window / steps; sampling runs the denoiser at every step either way. Reported: the
median seconds of each side (wall and process CPU time), the speed-ups FULL / WINDOW of the
medians and the median, min and max of the per-pair ratios, and the expected update speed-up
(trainable steps of FULL / of WINDOW).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sde_window.py --model align-gen:world --steps 10 --window 3
"""

from __future__ import annotations

import argparse

import torch
from harness import (
    BenchmarkResult,
    Table,
    add_common_flags,
    build_like_train,
    describe_machine,
    interleaved,
    print_machine,
    publish,
    resolve_dtype,
    resolve_model,
    run_settings,
    settings_of,
    time_ratio,
    timing_numbers,
)

from align_gen.config import RunConfig, from_dict
from align_gen.prompts import load_prompts
from align_gen.train import collect_rollouts, epoch_generator, sde_window_steps, update


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, batch_size=8, steps=10, repeats=5)
    parser.add_argument("--window", type=int, default=3, help="steps in the SDE window")
    parser.add_argument("--num-batches", type=int, default=2, help="sampling batches of the epoch updated on")
    parser.add_argument("--objective", choices=["ddpo", "grpo"], default="ddpo")
    parser.add_argument("--prompts", default="builtin:world_train")
    return parser.parse_args()


def config_of(args: argparse.Namespace, dtype: str, window: int) -> RunConfig:
    settings = run_settings(
        args,
        dtype,
        sample={"samples_per_prompt": 2, "sde_window": {"size": window}},
        objective={"name": args.objective},
        advantage={"kind": "group"},
        prompts={"source": args.prompts},
    )
    return from_dict(RunConfig, settings)


def main() -> None:
    args = parse_args()
    shown_model = resolve_model(args)
    dtype = resolve_dtype(args)
    machine = describe_machine(torch.device(args.device))
    print_machine(machine)
    configs = {"full": config_of(args, dtype, 0), "window": config_of(args, dtype, args.window)}
    accelerator, policy, objective, optimizer = build_like_train(configs["full"], args.device)
    device = accelerator.device
    prompts = load_prompts(args.prompts)
    rollouts = {}
    for side, config in configs.items():  # the same prompts and noise draws up to the window's
        rollouts[side] = collect_rollouts(policy, objective, prompts, config, epoch_generator(args.seed, 0, 0), accelerator)
        rollouts[side].advantages = torch.randn(len(rollouts[side]), generator=torch.Generator().manual_seed(1)).to(device)
    batch_prompts = prompts[: args.batch_size]

    def sample(side: str):
        window = sde_window_steps(configs[side].sample, 0, torch.Generator().manual_seed(0))
        with policy.sde_window(window):
            return policy.sample(batch_prompts, generator=torch.Generator().manual_seed(0))

    def train_on(side: str):
        return update(policy, objective, optimizer, rollouts[side], configs[side], torch.Generator().manual_seed(0), accelerator)

    sample_times, _ = interleaved({side: (lambda side=side: sample(side)) for side in configs}, args.repeats, device)
    update_times, _ = interleaved({side: (lambda side=side: train_on(side)) for side in configs}, args.repeats, device)
    trainable = {side: int(rollouts[side].step_mask.sum()) for side in configs}
    expected = trainable["full"] / trainable["window"]
    rows = []
    for side in configs:
        row = {"name": side, "trainable_steps": trainable[side]}
        row.update(timing_numbers(sample_times[side], "sample_"))
        row.update(timing_numbers(update_times[side], "update_"))
        rows.append(row)
    comparisons = [
        time_ratio("full / window sampling seconds", sample_times["full"], sample_times["window"]),
        time_ratio("full / window update seconds", update_times["full"], update_times["window"],
                   note=f"expected about {expected:.2f} = trainable steps {trainable['full']} / {trainable['window']}"),
    ]
    header = ["side", "trainable steps", "sample s (median)", "sample CPU s", "update s (median)", "update CPU s"]
    table = Table.of(header, [[row["name"], row["trainable_steps"], row["sample_median_wall_s"], row["sample_median_cpu_s"],
                               row["update_median_wall_s"], row["update_median_cpu_s"]] for row in rows])
    print(f"\nmodel={shown_model} steps={args.steps} window={args.window} epoch={args.batch_size * args.num_batches} "
          f"rollouts, objective={args.objective}, repeats={args.repeats} (+1 warm-up), pairs in alternating order")
    result = BenchmarkResult(
        benchmark="sde_window",
        description=__doc__.splitlines()[0],
        settings=settings_of(args, model=shown_model, model_folder=args.model, dtype=dtype),
        machine=machine,
        rows=rows,
        table=table,
        comparisons=comparisons,
        extra={"expected_update_speedup": expected},
    )
    publish(result, args.json)


if __name__ == "__main__":
    main()
