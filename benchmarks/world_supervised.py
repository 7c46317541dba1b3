"""The supervised ceiling on the tiny world: the world model fine-tuned on the renderer's ground
truth, scored by World-GenEval like an RL-aligned one.

What is measured: the shipped world model (``align-gen:world``) trained ``--steps`` more steps of
its own training objective (SD's denoising loss on batches of ``--batch-size`` rendered scenes of
the world's train split, as ``align-gen world build`` trains it), with LoRA adapters of rank
``--lora-rank`` on the UNet's attention (align-gen's default targets, what the RL configs train)
or, with ``--lora-rank 0``, all the UNet's weights. The renderer's images are right by
construction, so this is what the same trainable weights reach with the best possible signal for
that many updates: when it does not fix a task either, that task is capped by the model, not by
the RL objective. The tuned model is saved as a diffusers pipeline folder (``--out``; adapters
merged) that any align-gen command loads, and both models are scored on World-GenEval's
``--split`` split (``--seeds``; paired: the same prompts and seeds), per task.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_supervised.py \\
        --steps 1500 --out outputs/world_supervised --json benchmarks/results/world_supervised.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from harness import BenchmarkResult, Table, describe_machine, print_machine, publish, settings_of
from tqdm import tqdm

from align_gen.benchmark import get_benchmark, run_benchmark, task_comparison, task_statistics
from align_gen.builtins import resolve_folder
from align_gen.policies.common import DENOISER_LORA_TARGETS
from align_gen.world.diffusion import UnetTrainConfig, noise_scheduler, world_batch_loss
from align_gen.world.shapes import ShapesWorld


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="supervised steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--lora-rank", type=int, default=8, help="0: all the UNet's weights train")
    parser.add_argument("--seed", type=int, default=1, help="the scenes' seed (the shipped model was trained on seed 0)")
    parser.add_argument("--split", default="heldout", choices=["heldout", "train"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num-prompts", type=int, default=0, help="prompts per task, evenly spread (0: all)")
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("outputs/world_supervised"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def fine_tune(args: argparse.Namespace) -> tuple[float, float, float]:
    """Trains and saves the tuned pipeline (module docstring); (first and last 50 steps' mean
    loss, seconds)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(resolve_folder("align-gen:world"))
    unet = pipeline.unet
    if args.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        unet = get_peft_model(unet, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, target_modules=list(DENOISER_LORA_TARGETS)))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    config = UnetTrainConfig(batch_size=args.batch_size, seed=args.seed)
    world, scheduler = ShapesWorld(seed=args.seed), noise_scheduler()
    pipeline.vae.eval()
    pipeline.text_encoder.eval()
    unet.train()
    losses, start = [], time.perf_counter()
    for step in tqdm(range(args.steps), desc="supervised steps"):
        loss = world_batch_loss(unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, scheduler, world, config,
                                np.random.default_rng([args.seed, step]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    unet.eval()
    pipeline.unet = unet.merge_and_unload() if args.lora_rank > 0 else unet
    pipeline.save_pretrained(args.out)
    window = min(50, len(losses))
    return float(np.mean(losses[:window])), float(np.mean(losses[-window:])), seconds


def main() -> None:
    args = parse_args()
    if args.out.exists() and any(args.out.iterdir()):  # a tuned model is never overwritten implicitly
        raise SystemExit(f"--out {args.out} already holds files; give a new folder or remove it yourself.")
    machine = describe_machine(torch.device(args.device))
    print_machine(machine)
    first_loss, last_loss, seconds = fine_tune(args)
    from align_gen.config import SampleConfig
    from align_gen.models import load_policy

    benchmark = get_benchmark("world-geneval")
    results = {}
    for name in ("align-gen:world", str(args.out)):
        policy = load_policy(name, SampleConfig(num_steps=args.sample_steps, guidance_scale=3.0, eta=1.0), device=args.device)
        results[name] = run_benchmark(policy, benchmark, args.split, args.seeds, args.eval_batch_size,
                                      num_prompts=args.num_prompts, desc=f"{name} ")
        del policy
    base, tuned = (task_statistics(r) for r in results.values())
    comparison = task_comparison(results["align-gen:world"], results[str(args.out)])
    rows = [{"name": task, "base": base["tasks"][task]["accuracy"], "tuned": tuned["tasks"][task]["accuracy"],
             "change": change["mean_difference"], "change_low": change.get("difference_ci_low"),
             "change_high": change.get("difference_ci_high")} for task, change in comparison["tasks"].items()]
    overall = comparison["overall"]
    rows.append({"name": "overall", "base": base["overall"]["accuracy"], "tuned": tuned["overall"]["accuracy"],
                 "change": overall["mean_difference"], "change_low": overall.get("ci_low"),
                 "change_high": overall.get("ci_high")})
    table = Table.of(
        ["task", "base %", "supervised %", "change (points)", "95% interval"],
        [[r["name"], f"{100 * r['base']:.1f}", f"{100 * r['tuned']:.1f}", f"{100 * r['change']:+.1f}",
          "" if r["change_low"] is None else f"[{100 * r['change_low']:+.1f}, {100 * r['change_high']:+.1f}]"]
         for r in rows],
    )
    adapter = f"LoRA rank {args.lora_rank} on the UNet's attention" if args.lora_rank > 0 else "all the UNet's weights"
    notes = [f"{args.steps} supervised steps x {args.batch_size} rendered scenes ({adapter}, lr {args.learning_rate:g}): "
             f"loss {first_loss:.4f} (first 50 steps) -> {last_loss:.4f} (last 50), {seconds:.0f} s",
             f"World-GenEval {args.split}, seeds {args.seeds}, DDIM {args.sample_steps} steps at guidance 3; "
             f"tuned model saved to {args.out}"]
    for note in notes:
        print(note)
    publish(BenchmarkResult(benchmark="world_supervised", description=__doc__.splitlines()[0], settings=settings_of(args),
                            machine=machine, rows=rows, table=table, notes=notes,
                            extra={"loss_first": first_loss, "loss_last": last_loss, "train_seconds": seconds}), args.json)


if __name__ == "__main__":
    main()
