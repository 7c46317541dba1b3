"""DDPO update throughput: seconds of ``align_gen.train.update`` per epoch of rollouts.

What is measured: the policy is built as ``align_gen.train.train`` builds it (the same
Accelerator, AdamW optimizer and ``accelerator.prepare``), with LoRA adapters (``--lora``,
default) or the whole UNet trainable (``--full``). One epoch of rollouts
(``--batch-size`` x ``--num-batches`` samples, ``--steps`` DDIM steps each) is drawn once with
``policy.sample`` and given random advantages (the reward does not change the cost of an
update). Then ``update(...)`` -- DDPO's clipped surrogate re-scored on every timestep of every
rollout, backward per step, one optimizer step per minibatch -- is timed.

How: one process, one warm-up update (it also allocates AdamW's state), then ``--repeats``
timed updates over the same rollouts (the weights move between repeats; the cost of an update does
not depend on them), each between ``torch.cuda.synchronize()`` calls on CUDA.
Reported: the median seconds per update, samples/s (rollouts processed per second of update,
all their timesteps included) and transitions/s (= samples/s x steps); on CUDA also the peak
memory allocated (``torch.cuda.max_memory_allocated``) during the updates.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ddpo_update.py --lora [--json out.json]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ddpo_update.py --full
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from harness import (
    add_common_flags,
    describe_machine,
    load_average,
    median,
    print_machine,
    print_table,
    resolve_dtype,
    timed,
    write_json,
)

from align_gen.config import RunConfig, from_dict
from align_gen.objectives import build_objective
from align_gen.policies import build_policy
from align_gen.prompts import load_prompts
from align_gen.train import build_optimizer, collect_rollouts, epoch_generator, update


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, batch_size=4, steps=10, repeats=3)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--lora",
        dest="lora",
        action="store_true",
        default=True,
        help="train LoRA adapters (default)",
    )
    mode.add_argument("--full", dest="lora", action="store_false", help="train every UNet weight")
    parser.add_argument("--num-batches", type=int, default=2, help="sampling batches per epoch")
    parser.add_argument(
        "--train-batch-size", type=int, default=None, help="minibatch (default: --batch-size)"
    )
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    return parser.parse_args()


def run_config(args: argparse.Namespace, dtype: str) -> RunConfig:
    """The RunConfig of a DDPO run with these settings (anchor defaults elsewhere)."""
    return from_dict(
        RunConfig,
        {
            "seed": args.seed,
            "model": {"pretrained": args.model, "dtype": dtype, "lora": {"enabled": args.lora}},
            "sample": {
                "num_steps": args.steps,
                "eta": args.eta,
                "guidance_scale": args.guidance_scale,
                "batch_size": args.batch_size,
                "num_batches_per_epoch": args.num_batches,
            },
            "train": {"batch_size": args.train_batch_size, "mixed_precision": args.mixed_precision},
            "objective": {"name": "ddpo"},
        },
    )


def main() -> None:
    args = parse_args()
    dtype = resolve_dtype(args)
    config = run_config(args, dtype)

    # As align_gen.train.train builds them.
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision, cpu=args.device == "cpu"
    )
    device = accelerator.device
    machine = describe_machine(device)
    print_machine(machine)
    objective = build_objective(config.objective)
    objective.check(config)
    policy = build_policy(config.model, config.sample, device)
    optimizer = build_optimizer(policy, config.train)
    policy.forward_model, optimizer = accelerator.prepare(policy.model, optimizer)
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    total = sum(p.numel() for p in policy.model.parameters())

    generator = epoch_generator(config.seed, 0, accelerator.process_index)
    prompts = load_prompts(config.prompts.source)
    sampling_s, rollouts = timed(
        lambda: collect_rollouts(policy, prompts, config, generator, accelerator), device
    )
    rollouts.advantages = torch.randn(len(rollouts), generator=generator).to(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one_update() -> tuple[dict[str, float], int]:
        return update(policy, objective, optimizer, rollouts, config, generator, accelerator)

    times = []
    for repeat in range(args.repeats + 1):  # repeat 0 is the warm-up
        seconds, (_, optimizer_steps) = timed(one_update, device)
        if repeat:
            times.append(seconds)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    seconds = median(times)
    samples_per_s = len(rollouts) / seconds
    mode = "lora" if args.lora else "full"
    print(
        f"\nmodel={args.model} dtype={dtype} mode={mode} trainable={trainable:,}/{total:,} UNet params "
        f"rollouts={len(rollouts)} steps={args.steps} minibatch={config.train.batch_size} "
        f"guidance={args.guidance_scale} mixed_precision={args.mixed_precision} "
        f"repeats={args.repeats} (+1 warm-up)"
    )
    row = {
        "mode": mode,
        "median s/update": seconds,
        "min": min(times),
        "max": max(times),
        "samples/s": samples_per_s,
        "transitions/s": samples_per_s * args.steps,
        "opt steps": optimizer_steps,
        "peak GiB": "n/a (cpu)" if peak_gib is None else peak_gib,
    }
    print_table(list(row), [list(row.values())])
    print(
        f"(sampling the epoch took {sampling_s:.3g} s: {len(rollouts) / sampling_s:.3g} images/s)"
    )

    write_json(
        args.json,
        {
            "benchmark": "ddpo_update",
            "machine": {**machine, "load_avg_1min_end": load_average()},
            "settings": {**vars(args), "json": str(args.json), "dtype": dtype, "mode": mode},
            "trainable_parameters": trainable,
            "rollouts": len(rollouts),
            "seconds": times,
            "median_seconds": seconds,
            "samples_per_s": samples_per_s,
            "transitions_per_s": samples_per_s * args.steps,
            "optimizer_steps_per_update": optimizer_steps,
            "peak_memory_gib": peak_gib,
            "sampling_seconds": sampling_s,
        },
    )


if __name__ == "__main__":
    main()
