"""Sampling overhead: ``DiffusionPolicy.sample`` vs a plain diffusers ``StableDiffusionPipeline``.

What is measured: wall-clock seconds per batch of
  (A) ours:  ``policy.sample(prompts, generator=g)``, which also records the trajectory and the
             float32 log-prob of every DDIM step (pipelines.kernels.ddim_step_with_logprob);
  (B) plain: ``pipeline(prompts, ..., output_type="pt")`` on the SAME pipeline object (same
             weights, same modules) with a ``DDIMScheduler`` built from the policy's scheduler
             config, and the same steps, eta, guidance scale, batch, resolution, negative prompt
             and kind of generator.
Both produce the same images (checked once: the largest pixel difference is printed), so the
difference in time is the cost of recording the trajectory and the log-probs.

How: one process, one warm-up call of each, then ``--repeats`` pairs whose order alternates (A B,
B A, A B, ...: a drift in the machine's load favours neither side), each call under ``torch.inference_mode`` and timed between
``torch.cuda.synchronize()`` calls on CUDA. Reported: medians (wall-clock, and the process's CPU
time beside it), images/s, and ratio = images/s plain / images/s ours (= median time ours /
median time plain), with the spread of the per-pair ratios and the same ratio of CPU time;
overhead = ratio - 1, target <= 10%. ``--json OUT`` writes the result
(``harness.BenchmarkResult``: rows "align-gen" and "plain diffusers").

Model FLOPs per batch (prompt encoding + ``--steps`` guided denoiser passes + VAE decoding,
each counted once by ``FlopCounterMode`` at the benchmark's shapes) are divided by each side's
median time; on a GPU of ``harness.PEAK_BF16_FLOPS`` also by its bf16 peak (MFU).

``--model`` takes the random full-size architectures of ``full_size.py`` (``random:sd15``,
``random:sd15-mid``, ...; SD1.x-family pipelines only: the plain side is a
``StableDiffusionPipeline`` call).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sampling_overhead.py [--json out.json]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sampling_overhead.py --model random:sd15-mid
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from diffusers import DDIMScheduler
from harness import (
    BenchmarkResult,
    Table,
    add_common_flags,
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
    settings_of,
    time_ratio,
    timing_numbers,
)

from align_gen.config import ModelConfig, SampleConfig
from align_gen.policies import build_policy
from align_gen.policies.diffusion import DiffusionPolicy, SDXLPolicy
from align_gen.prompts import load_prompts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, batch_size=4, steps=20, repeats=7)
    parser.add_argument(
        "--generator-device",
        default="cpu",
        help="device of the torch.Generator given to both (the trainer uses a CPU generator)",
    )
    return parser.parse_args()


def sampling_flops(policy: DiffusionPolicy, prompts: list[str], steps: int) -> int:
    """Model FLOPs of one sampling call on ``prompts``: the prompt encoding, ``steps`` times one
    guided denoiser pass (2B rows with CFG) at the sampling shape, and one VAE decode (each
    counted once; the passes of a call all have the same shape)."""
    with torch.inference_mode():
        encode = count_flops(lambda: policy.encode_prompts(prompts))
        conditioning = policy.encode_prompts(prompts)
        latents = policy.sampler.initial_latents(
            len(prompts), policy.resolution, torch.Generator().manual_seed(0)
        )
        t = policy.scheduler.timesteps[:1].expand(len(prompts)).to(policy.device)
        denoise = count_flops(lambda: policy._denoise(latents, t, conditioning))
        decode = count_flops(lambda: policy.decode(latents))
    return encode + steps * denoise + decode


def main() -> None:
    args = parse_args()
    model_name = resolve_model(args)
    device = torch.device(args.device)
    dtype = resolve_dtype(args)
    machine = describe_machine(device)
    print_machine(machine)

    sample_config = SampleConfig(
        num_steps=args.steps,
        eta=args.eta,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
    )
    policy = build_policy(
        ModelConfig(pretrained=args.model, dtype=dtype), sample_config, device, trainable=False
    )
    if not isinstance(policy, DiffusionPolicy) or isinstance(policy, SDXLPolicy):
        raise SystemExit(
            f"--model {model_name!r} is a {type(policy).__name__}; this benchmark compares against "
            "StableDiffusionPipeline (SD1.x/2.x models: align-gen:tiny-random-sd, random:sd15, ...)"
        )
    pipeline = policy.pipeline  # the same object, hence the same weights and modules
    pipeline.scheduler = DDIMScheduler.from_config(policy.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    all_prompts = load_prompts("builtin:simple_animals")
    prompts = [all_prompts[i % len(all_prompts)] for i in range(args.batch_size)]

    def generator() -> torch.Generator:
        return torch.Generator(args.generator_device).manual_seed(args.seed)

    @torch.inference_mode()
    def ours() -> torch.Tensor:
        return policy.sample(prompts, generator=generator()).images

    @torch.inference_mode()
    def plain() -> torch.Tensor:
        return pipeline(
            prompts,
            height=policy.resolution,
            width=policy.resolution,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            negative_prompt=[sample_config.negative_prompt] * len(prompts),
            eta=args.eta,
            generator=generator(),
            output_type="pt",
        ).images

    timings, images = interleaved({"ours": ours, "plain": plain}, args.repeats, device)
    max_diff = float((images["ours"].float() - images["plain"].float()).abs().max())
    flops = sampling_flops(policy, prompts, args.steps)

    times = {name: [t.wall_s for t in values] for name, values in timings.items()}
    med = {name: median(values) for name, values in times.items()}
    images_per_s = {name: args.batch_size / seconds for name, seconds in med.items()}
    comparison = time_ratio("plain / align-gen images/s", timings["ours"], timings["plain"])
    ratio = comparison.value
    print(
        f"\nmodel={model_name} dtype={dtype} batch={args.batch_size} steps={args.steps} "
        f"guidance={args.guidance_scale} eta={args.eta} resolution={policy.resolution} "
        f"repeats={args.repeats} (+1 warm-up), interleaved pairs in alternating order"
    )
    achieved = {name: flops_report(flops, med[name], device) for name in med}
    names = {"ours": "align-gen", "plain": "plain diffusers"}
    rows = [
        {
            "name": names[side],
            **timing_numbers(timings[side]),
            "images_per_s": images_per_s[side],
            **achieved[side],
        }
        for side in timings
    ]
    extra_ms_per_step = 1e3 * (med["ours"] - med["plain"]) / args.steps
    table = Table.of(
        ["", "median s/batch", "min s/batch", "max s/batch", "median CPU s", "images/s", "TFLOP/s", "MFU"],
        [
            [row["name"], row["median_wall_s"], row["min_wall_s"], row["max_wall_s"], row["median_cpu_s"],
             row["images_per_s"], row["tflops"], percent(row["mfu"])]
            for row in rows
        ],
    )
    result = BenchmarkResult(
        benchmark="sampling_overhead",
        description=__doc__.splitlines()[0],
        settings=settings_of(
            args, model=model_name, model_folder=args.model, dtype=dtype, resolution=policy.resolution
        ),
        machine=machine,
        rows=rows,
        table=table,
        comparisons=[
            dataclasses.replace(comparison, note=f"overhead {100 * (ratio - 1):+.1f}%, target <= +10%")
        ],
        notes=[
            f"extra time per DDIM step: {extra_ms_per_step:+.2f} ms",
            f"max |image ours - plain|: {max_diff:.2e} (same seed: both draw the same noise)",
            *(format_flops(f"{names[side]} sampling", flops, achieved[side], device) for side in med),
        ],
        extra={
            "overhead_percent": 100 * (ratio - 1),
            "extra_ms_per_step": extra_ms_per_step,
            "max_image_difference": max_diff,
            "model_flops_per_batch": flops,
        },
    )
    publish(result, args.json)


if __name__ == "__main__":
    main()
