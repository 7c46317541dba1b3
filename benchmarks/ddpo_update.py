"""DDPO update throughput: seconds of ``align_gen.train.update`` per epoch of rollouts.

What is measured: the policy is built as ``align_gen.train.train`` builds it (the same
Accelerator, AdamW optimizer and ``accelerator.prepare``), with LoRA adapters (``--lora``,
default) or the whole UNet trainable (``--full``). One epoch of rollouts
(``--batch-size`` x ``--num-batches`` samples, ``--steps`` DDIM steps each) is drawn once with
``policy.sample`` and given random advantages (the reward does not change the cost of an
update). Then ``update(...)`` -- DDPO's clipped surrogate re-scored on every timestep of every
rollout, backward per step, one optimizer step per minibatch -- is timed.

``--compare-anchor`` also times, in the same process on the same rollouts, LoRA, optimizer and
number of optimizer steps, the update as the research anchor (ddpo-pytorch's train loop) writes
it: :func:`anchor_update`, a loop over timesteps with one forward/backward per timestep and the
log-prob through the same float32 kernel (``pipelines.kernels.ddim_step_with_logprob``) on the
full latent. By default (``--anchor-cfg batched``) its classifier-free guidance is ONE UNet pass
of the doubled batch, as ddpo-pytorch's train.py runs it: the faithful baseline, and the
headline ratio. ``--anchor-cfg two-pass`` runs the guidance as TWO passes of B rows
(unconditional, then conditional), the form of pipelines that call the denoiser once per branch;
``--anchor-cfg both`` times the two as separate rows. Every side computes the same loss and
gradient (``tests/test_full_size_benchmarks.py`` checks it to float tolerance), so a ratio
compares two implementations of one computation.

How: one process, one warm-up update of each side (it also allocates AdamW's state), then
``--repeats`` rounds of one timed update per side over the same rollouts, the order alternating
between rounds (A B, B A, ...: a drift in the machine's load favours no side); the weights move
between repeats, the cost of an update does not depend on them. Each update runs between
``torch.cuda.synchronize()`` calls on CUDA. Reported: the median seconds per update (wall-clock, and the process's CPU time beside it),
samples/s (rollouts processed per second of update,
all their timesteps included) and transitions/s (= samples/s x steps); on CUDA also the peak
memory allocated (``torch.cuda.max_memory_allocated``) during each side's updates. Model FLOPs:
one minibatch's loss piece (one timestep, forward and backward) counted by ``FlopCounterMode``,
times the pieces of an update; divided by the median time, and on a GPU of
``harness.PEAK_BF16_FLOPS`` by its bf16 peak (MFU). ``--json OUT`` writes the result
(``harness.BenchmarkResult``: rows "align-gen" and, with ``--compare-anchor``, "anchor (batched
CFG)" and / or "anchor (two-pass CFG)"; each comparison gives the ratio of the median times, the
spread of the per-pair ratios and the same ratio of process CPU time).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ddpo_update.py --lora [--json out.json]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ddpo_update.py --full
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ddpo_update.py --model random:sd15-mid --compare-anchor
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from harness import (
    BenchmarkResult,
    Comparison,
    Table,
    Timing,
    add_common_flags,
    build_like_train,
    count_flops,
    describe_machine,
    flops_report,
    format_flops,
    interleaved,
    median,
    percent,
    print_machine,
    publish,
    resolve_dtype,
    resolve_model,
    run_settings,
    settings_of,
    time_ratio,
    timed,
    timing_numbers,
)

from align_gen.config import RunConfig, from_dict
from align_gen.objectives.base import Objective
from align_gen.policies.diffusion import DiffusionPolicy
from align_gen.prompts import load_prompts
from align_gen.train import collect_rollouts, epoch_generator, update
from align_gen.types import Rollout
from pipelines.kernels import ddim_step_with_logprob

Tensor = torch.Tensor


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
    parser.add_argument(
        "--steps-per-forward",
        type=int,
        default=1,
        help="align-gen's train.steps_per_forward: denoising steps re-scored per UNet forward",
    )
    parser.add_argument(
        "--compare-anchor",
        action="store_true",
        help="also time the anchor-style update (anchor_update) in the same run; report the ratio",
    )
    parser.add_argument(
        "--anchor-cfg",
        choices=["batched", "two-pass", "both"],
        default="batched",
        help="the anchor's CFG: one UNet pass of 2B rows as ddpo-pytorch runs it (the faithful baseline), "
        "two passes of B rows, or both as separate rows",
    )
    parser.add_argument(
        "--only",
        choices=["align-gen", "anchor"],
        default=None,
        help="run only this side's update, --repeats times after sampling, and report nothing: for "
        "timing the whole process from outside (e.g. /usr/bin/time), --repeats 0 for the common part",
    )
    return parser.parse_args()


def run_config(args: argparse.Namespace, dtype: str) -> RunConfig:
    """The RunConfig of a DDPO run with these settings (anchor defaults elsewhere)."""
    settings = run_settings(
        args,
        dtype,
        model={"lora": {"enabled": args.lora}},
        train={
            "batch_size": args.train_batch_size,
            "mixed_precision": args.mixed_precision,
            "steps_per_forward": args.steps_per_forward,
        },
        objective={"name": "ddpo"},
    )
    return from_dict(RunConfig, settings)


# ------------------------------------------------------------------------------------------------
# The anchor-style update (ddpo-pytorch's train loop, written against our Rollout)


def anchor_step_order(
    num_samples: int, num_steps: int, fraction: float, generator: torch.Generator
) -> Tensor:
    """(B, k) the timestep indices each sample trains on, in order: a random permutation per
    sample, its first ``ceil(fraction * T)`` kept. The same draws as ``align_gen.objectives.ddpo``
    (so that, from the same generator state, both visit the same transitions)."""
    num_train = max(1, math.ceil(num_steps * fraction))
    order = torch.stack(
        [torch.randperm(num_steps, generator=generator) for _ in range(num_samples)]
    )
    return order[:, :num_train]


def anchor_minibatch_backward(
    policy: DiffusionPolicy,
    batch: Rollout,
    order: Tensor,
    clip_range: float,
    accelerator: Accelerator,
    cfg: str = "two-pass",
) -> list[float]:
    """Backpropagates DDPO's loss on ``batch`` one timestep at a time, as ddpo-pytorch does:
    for each column j of ``order`` (B, k), re-score every sample's transition
    ``trajectory[b, order[b, j]] -> trajectory[b, order[b, j] + 1]`` (latents (B, C, h, w)) with the
    UNet (CFG as two passes of B rows, or one of 2B), the DDIM kernel's float32 log-prob, PPO's
    clipped surrogate (mean over B) / k, and ``backward``. Returns the k losses."""
    unet, dtype, device = policy.forward_model, policy.model_dtype, policy.device
    scale, eta = policy.sample_config.guidance_scale, policy.sample_config.eta
    rows = torch.arange(len(batch), device=device)
    embeds = batch.conditioning["prompt_embeds"].to(dtype)  # (B, L, D)
    negative = batch.conditioning.get("negative_prompt_embeds")  # (B, L, D) or None (no CFG)
    losses = []
    for j in range(order.shape[1]):
        index = order[:, j].to(device)  # (B,)
        latents = batch.trajectory[rows, index]  # (B, C, h, w)
        next_latents = batch.trajectory[rows, index + 1]  # (B, C, h, w)
        timesteps = batch.timesteps[rows, index]  # (B,)
        with accelerator.autocast():
            x = latents.to(dtype)
            if negative is None:
                noise_pred = unet(x, timesteps, embeds).sample
            elif cfg == "two-pass":
                noise_pred_uncond = unet(x, timesteps, negative.to(dtype)).sample
                noise_pred_text = unet(x, timesteps, embeds).sample
                noise_pred = noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)
            else:
                both = unet(
                    torch.cat([x, x]),
                    torch.cat([timesteps, timesteps]),
                    torch.cat([negative.to(dtype), embeds]),
                )
                noise_pred_uncond, noise_pred_text = both.sample.chunk(2)
                noise_pred = noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)
            # The log-prob in float32 on the full latent, by the same kernel as align-gen's.
            _, log_prob = ddim_step_with_logprob(
                policy.scheduler,
                noise_pred.float(),
                timesteps,
                latents,
                eta=eta,
                prev_sample=next_latents,
            )  # (B,)
        ratio = torch.exp(log_prob - batch.log_probs[rows, index])  # (B,)
        unclipped = -batch.advantages * ratio  # (B,)
        clipped = -batch.advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B,)
        loss = (
            torch.maximum(unclipped, clipped).mean() / order.shape[1]
        )  # () gradient accumulated over k
        accelerator.backward(loss)
        losses.append(float(loss.detach()))
    return losses


def anchor_update(
    policy: DiffusionPolicy,
    optimizer: torch.optim.Optimizer,
    rollouts: Rollout,
    config: RunConfig,
    generator: torch.Generator,
    accelerator: Accelerator,
    cfg: str = "two-pass",
) -> tuple[dict[str, float], int]:
    """The anchor's update over ``rollouts``: the same minibatches, step orders (same draws from
    ``generator`` as ``align_gen.train.update``), gradient clipping and optimizer steps as
    align-gen's, each minibatch through :func:`anchor_minibatch_backward`. Returns
    ({"loss": mean piece loss}, optimizer steps), like ``update``."""
    train, objective = config.train, config.objective
    if train.gradient_accumulation_steps != 1 or config.sample.samples_per_prompt != 1:
        raise ValueError(
            "anchor_update mirrors update() for gradient_accumulation_steps = samples_per_prompt = 1"
        )
    parameters = list(policy.trainable_parameters())
    losses: list[float] = []
    steps = 0
    policy.model.train()
    for _ in range(train.inner_epochs):
        for minibatch in torch.randperm(len(rollouts), generator=generator).split(train.batch_size):
            batch = rollouts.select(minibatch)
            order = anchor_step_order(
                len(batch), batch.num_steps, objective.timestep_fraction, generator
            )
            losses += anchor_minibatch_backward(
                policy, batch, order, objective.clip_range, accelerator, cfg
            )
            accelerator.clip_grad_norm_(parameters, train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    policy.model.eval()
    return {"loss": sum(losses) / len(losses)}, steps


def update_flops(
    policy: DiffusionPolicy,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    rollouts: Rollout,
    config: RunConfig,
    accelerator: Accelerator,
) -> int:
    """Model FLOPs of one update: one minibatch's first loss piece (``train.steps_per_forward``
    timesteps of each sample, CFG included, forward and backward) counted by FlopCounterMode,
    per timestep, times every trained timestep of every minibatch and inner epoch: the same
    count whatever the steps per forward. The gradient it leaves is discarded."""
    size = min(config.train.batch_size, len(rollouts))
    batch = rollouts.select(torch.arange(size))
    generator = torch.Generator().manual_seed(0)

    def one_piece() -> None:
        with accelerator.autocast():
            term = next(iter(objective.loss_terms(policy, batch, generator)))
            accelerator.backward(term.loss)

    piece = count_flops(one_piece)
    optimizer.zero_grad(set_to_none=True)
    trained_steps = max(1, math.ceil(rollouts.num_steps * config.objective.timestep_fraction))
    steps_in_piece = min(config.train.steps_per_forward, trained_steps)
    return round(piece / steps_in_piece / size * len(rollouts) * trained_steps * config.train.inner_epochs)


def time_sides(
    sides: dict[str, Callable[[], tuple[dict[str, float], int]]], repeats: int, device: torch.device
) -> tuple[dict[str, list[Timing]], dict[str, float | None], dict[str, int]]:
    """The sides timed in interleaved pairs of alternating order (:func:`harness.interleaved`).
    Returns the timings (wall and CPU seconds), the peak CUDA GiB allocated during each side's
    calls (None off CUDA) and each side's optimizer steps per update."""
    peaks: dict[str, float | None] = {name: None for name in sides}

    def measured(name: str, fn: Callable[[], tuple[dict[str, float], int]]) -> Callable[[], int]:
        def call() -> int:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _, steps = fn()
            if device.type == "cuda":
                peaks[name] = max(peaks[name] or 0.0, torch.cuda.max_memory_allocated(device) / 2**30)
            return steps

        return call

    times, optimizer_steps = interleaved({name: measured(name, fn) for name, fn in sides.items()}, repeats, device)
    return times, peaks, optimizer_steps


def main() -> None:
    args = parse_args()
    model_name = resolve_model(args)
    dtype = resolve_dtype(args)
    config = run_config(args, dtype)

    accelerator, policy, objective, optimizer = build_like_train(config, args.device)
    device = accelerator.device
    machine = describe_machine(device)
    print_machine(machine)
    if args.compare_anchor and not isinstance(policy, DiffusionPolicy):
        raise SystemExit(
            f"--compare-anchor needs an SD1.x/2.x UNet model; {model_name!r} is a {type(policy).__name__}"
        )
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    total = sum(p.numel() for p in policy.model.parameters())

    generator = epoch_generator(config.seed, 0, accelerator.process_index)
    prompts = load_prompts(config.prompts.source)
    sampling, rollouts = timed(
        lambda: collect_rollouts(policy, objective, prompts, config, generator, accelerator), device
    )
    rollouts.advantages = torch.randn(len(rollouts), generator=generator).to(device)
    if args.only is not None:
        if args.only == "anchor" and args.anchor_cfg == "both":
            raise SystemExit("--only anchor times one anchor: pass --anchor-cfg batched or two-pass")
        for _ in range(args.repeats):
            if args.only == "align-gen":
                update(policy, objective, optimizer, rollouts, config, generator, accelerator)
            else:
                anchor_update(policy, optimizer, rollouts, config, generator, accelerator, args.anchor_cfg)
        return
    flops = update_flops(policy, objective, optimizer, rollouts, config, accelerator)

    sides: dict[str, Callable[[], tuple[dict[str, float], int]]] = {
        "align-gen": lambda: update(
            policy, objective, optimizer, rollouts, config, generator, accelerator
        )
    }
    if args.compare_anchor:
        for cfg in ("batched", "two-pass") if args.anchor_cfg == "both" else (args.anchor_cfg,):
            sides[f"anchor ({cfg} CFG)"] = lambda cfg=cfg: anchor_update(
                policy, optimizer, rollouts, config, generator, accelerator, cfg
            )
    times, peaks, optimizer_steps = time_sides(sides, args.repeats, device)
    mode = "lora" if args.lora else "full"
    print(
        f"\nmodel={model_name} dtype={dtype} mode={mode} trainable={trainable:,}/{total:,} denoiser params "
        f"rollouts={len(rollouts)} steps={args.steps} minibatch={config.train.batch_size} "
        f"resolution={policy.resolution} guidance={args.guidance_scale} "
        f"mixed_precision={args.mixed_precision} repeats={args.repeats} (+1 warm-up each), alternating pairs"
    )
    rows, table, comparisons, notes = report(
        times, peaks, optimizer_steps, len(rollouts), args.steps, flops, device
    )
    notes.append(
        f"sampling the epoch took {sampling.wall_s:.3g} s: {len(rollouts) / sampling.wall_s:.3g} images/s"
    )
    result = BenchmarkResult(
        benchmark="ddpo_update",
        description=__doc__.splitlines()[0],
        settings=settings_of(
            args,
            model=model_name,
            model_folder=args.model,
            dtype=dtype,
            mode=mode,
            resolution=policy.resolution,
        ),
        machine=machine,
        rows=rows,
        table=table,
        comparisons=comparisons,
        notes=notes,
        extra={
            "trainable_parameters": trainable,
            "denoiser_parameters": total,
            "rollouts": len(rollouts),
            "model_flops_per_update": flops,
            "sampling_wall_s": sampling.wall_s,
            "sampling_cpu_s": sampling.cpu_s,
        },
    )
    publish(result, args.json)


def report(
    times: dict[str, list[Timing]],
    peaks: dict[str, float | None],
    optimizer_steps: dict[str, int],
    rollouts: int,
    steps: int,
    flops: int,
    device: torch.device,
) -> tuple[list[dict[str, Any]], Table, list[Comparison], list[str]]:
    """The result's rows (one per side), its table, the align-gen / anchor comparison (when the
    anchor ran) and the FLOPs / MFU lines."""
    rows, notes = [], []
    for name, timings in times.items():
        seconds = median([t.wall_s for t in timings])
        achieved = flops_report(flops, seconds, device)
        rows.append(
            {
                "name": name,
                **timing_numbers(timings),
                "samples_per_s": rollouts / seconds,
                "transitions_per_s": rollouts * steps / seconds,
                "optimizer_steps_per_update": optimizer_steps[name],
                "peak_memory_gib": peaks[name],
                **achieved,
            }
        )
        notes.append(format_flops(f"{name} update", flops, achieved, device))
    header = [
        "",
        "median s/update",
        "min",
        "max",
        "median CPU s",
        "samples/s",
        "transitions/s",
        "opt steps",
        "peak GiB",
        "TFLOP/s",
        "MFU",
    ]
    table = Table.of(
        header,
        [
            [
                row["name"],
                row["median_wall_s"],
                row["min_wall_s"],
                row["max_wall_s"],
                row["median_cpu_s"],
                row["samples_per_s"],
                row["transitions_per_s"],
                row["optimizer_steps_per_update"],
                f"n/a ({device.type})" if row["peak_memory_gib"] is None else row["peak_memory_gib"],
                row["tflops"],
                percent(row["mfu"]),
            ]
            for row in rows
        ],
    )
    comparisons = [  # samples/s of align-gen over an anchor's = the anchor's time over align-gen's
        time_ratio(f"align-gen / {name} samples/s", timings, times["align-gen"])
        for name, timings in times.items()
        if name != "align-gen"
    ]
    return rows, table, comparisons, notes


if __name__ == "__main__":
    main()
