"""Every objective's epoch cost on one model: sampling (SePPO's from its reference model), update
throughput and peak memory.

What is measured: for each objective of ``--objectives``, a trainer built as
``align_gen.train.train`` builds it (``objective.setup`` included: AWM's EMA copy, SePPO's
reference ring and winner dataset) samples one epoch with ``collect_rollouts`` (the objective's own
sampler: SePPO draws x_ref from a reference model) and the epoch's rollouts get random rewards and
advantages (the reward does not change the cost of an update); then ``update`` runs over them,
once to warm up and ``--repeats`` times timed. Reported per objective: sampling seconds of the
epoch, median update seconds, samples/s of the update (rollouts per second of update), samples/s
of the whole epoch (sampling + update) and, on CUDA, the peak memory allocated during the
updates. All objectives use the same model, LoRA, sampler and minibatch; REBEL's and
Diffusion-DPO's pairs and the groups of AWM, GRPO and NFT come from ``sample.samples_per_prompt =
2``; NFT samples with its EMA sampling policy. Beside each wall-clock time, the process's CPU
time over the same call. ``--json OUT`` writes the result (``harness.BenchmarkResult``: one row per
objective).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/objective_update.py --model random:sd15-mid
    python benchmarks/objective_update.py --model random:sd15 --device cuda --dtype bfloat16 --mixed-precision bf16 --batch-size 8 --steps 50
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from harness import (
    BenchmarkResult,
    Table,
    add_common_flags,
    build_like_train,
    describe_machine,
    print_machine,
    publish,
    resolve_dtype,
    resolve_model,
    run_settings,
    settings_of,
    timed,
    timing_numbers,
)

from align_gen.config import RunConfig, from_dict
from align_gen.prompts import load_prompts
from align_gen.train import collect_rollouts, epoch_generator, update

OBJECTIVES = ("ddpo", "grpo", "rebel", "awm", "seppo", "diffusion_dpo", "nft")
SEPPO_WINNERS = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "data" / "shapes"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, batch_size=4, steps=10, repeats=2)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--num-batches", type=int, default=2, help="sampling batches per epoch")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--seppo-winners", default=str(SEPPO_WINNERS), help="SePPO's (prompt, image) dataset")
    return parser.parse_args()


def run_config(args: argparse.Namespace, objective: str, dtype: str) -> RunConfig:
    """One objective's run with the shared settings (each objective's own defaults otherwise)."""
    prompts = args.seppo_winners if objective == "seppo" else "builtin:simple_animals"
    settings = run_settings(
        args,
        dtype,
        sample={"samples_per_prompt": 2},
        train={"mixed_precision": args.mixed_precision},
        objective={"name": objective},
        advantage={"kind": "group"},  # what grpo requires; the advantages are drawn at random anyway
        prompts={"source": prompts},
    )
    return from_dict(RunConfig, settings)


def measure(args: argparse.Namespace, name: str, dtype: str) -> dict:
    """One objective's row: sampling seconds, update seconds and peak memory of its epoch."""
    config = run_config(args, name, dtype)
    accelerator, policy, objective, optimizer = build_like_train(config, args.device)
    device = accelerator.device
    generator = epoch_generator(config.seed, 0, accelerator.process_index)
    prompts = load_prompts(config.prompts.source)
    sampling, rollouts = timed(lambda: collect_rollouts(policy, objective, prompts, config, generator, accelerator), device)
    rollouts.rewards = torch.randn(len(rollouts), generator=generator).to(device)
    rollouts.advantages = torch.randn(len(rollouts), generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for repeat in range(args.repeats + 1):  # repeat 0: the warm-up (and AdamW's state)
        timing, _ = timed(lambda: update(policy, objective, optimizer, rollouts, config, generator, accelerator), device)
        if repeat:
            times.append(timing)
    numbers = timing_numbers(times, "update_")
    update_s = numbers["update_median_wall_s"]
    return {
        "name": name,
        "rollouts": len(rollouts),
        "sampling_wall_s": sampling.wall_s,
        "sampling_cpu_s": sampling.cpu_s,
        **numbers,
        "update_samples_per_s": len(rollouts) / update_s,
        "epoch_samples_per_s": len(rollouts) / (sampling.wall_s + update_s),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> None:
    args = parse_args()
    shown_model = resolve_model(args)
    dtype = resolve_dtype(args)
    machine = describe_machine(torch.device(args.device))
    print_machine(machine)
    results = [measure(args, name, dtype) for name in args.objectives]
    print(f"\nmodel={shown_model} dtype={dtype} batch={args.batch_size} x {args.num_batches} steps={args.steps} "
          f"guidance={args.guidance_scale} repeats={args.repeats} (+1 warm-up)")
    header = ["objective", "sampling s", "update s", "update CPU s", "update samples/s", "epoch samples/s", "peak GiB"]
    table = Table.of(header, [
        [r["name"], r["sampling_wall_s"], r["update_median_wall_s"], r["update_median_cpu_s"], r["update_samples_per_s"],
         r["epoch_samples_per_s"], "n/a (cpu)" if r["peak_memory_gib"] is None else r["peak_memory_gib"]]
        for r in results
    ])
    result = BenchmarkResult(
        benchmark="objective_update",
        description=__doc__.splitlines()[0],
        settings=settings_of(args, model=shown_model, model_folder=args.model, dtype=dtype),
        machine=machine,
        rows=results,
        table=table,
    )
    publish(result, args.json)


if __name__ == "__main__":
    main()
