"""Each performance switch against the defaults, in the same process: sampling and DDPO update.

What is measured: for every switch asked for (``--switches``), two trainers are built as
``align_gen.train.train`` builds them (policy, AdamW, ``accelerator.prepare``, the compile step):
the BASELINE (the run's defaults) and the VARIANT (the baseline plus the switch's config
overrides, e.g. ``model.channels_last=true``). The baseline samples one epoch of rollouts with
random advantages; both then alternate, ``--repeats`` pairs after one warm-up each (the warm-up
absorbs torch.compile's compilation), the order within a pair reversed every other pair so that
a drift in the load favours neither: one sampling batch (``policy.sample``) and one DDPO update
(``update``) over those rollouts. Reported per switch: the median seconds of each side, the
speed-up baseline / variant of the medians, the median, min and max of the per-pair ratios, the
same speed-up of process CPU time, and on CUDA the peak memory of each side's update. Beside each wall-clock time,
the process's CPU time over the same call. ``--json OUT`` writes the result
(``harness.BenchmarkResult``: one row per switch, its two sides under ``baseline_`` / ``variant_``
keys; the switches the device cannot run under ``extra["unavailable"]``).

Switches (``SWITCHES``): ``channels_last``, ``compile`` (torch.compile, inductor),
``steps_per_forward`` (``train.steps_per_forward=--k``), ``gradient_checkpointing``,
``adamw_8bit`` (bitsandbytes' 8-bit AdamW: its gain is memory, in the peak column on CUDA),
``offload_frozen`` (VAE and text encoders on the CPU between uses: memory, for transfer time),
and the attention kernels against PyTorch's own choice (``sdpa``): ``sdpa_flash``,
``sdpa_efficient``, ``sdpa_cudnn``, ``sdpa_math`` (one SDPA kernel only) and ``xformers``. A
switch the device cannot run (efficient, cudnn or xformers on a CPU; xformers not installed) is
reported as n/a with the reason and the others go on.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/switches.py --model random:sd15-mid --switches channels_last steps_per_forward
    python benchmarks/switches.py --model random:sd15 --device cuda --dtype bfloat16 --mixed-precision bf16 --batch-size 8 --steps 50
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from accelerate import Accelerator
from harness import (
    BenchmarkResult,
    Comparison,
    Table,
    Timing,
    add_common_flags,
    build_like_train,
    cell,
    describe_machine,
    pair_order,
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

from align_gen.config import RunConfig, apply_override, from_dict
from align_gen.errors import ConfigError
from align_gen.objectives import build_objective
from align_gen.prompts import load_prompts
from align_gen.train import collect_rollouts, epoch_generator, update

ATTENTION_KERNELS = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "xformers")


def switch_overrides(k: int) -> dict[str, list[str]]:
    """{switch name: the config overrides that turn it on}."""
    return {
        "channels_last": ["model.channels_last=true"],
        "compile": ["model.compile=true"],
        "steps_per_forward": [f"train.steps_per_forward={k}"],
        "gradient_checkpointing": ["model.gradient_checkpointing=true"],
        "adamw_8bit": ["train.optimizer=adamw_8bit"],
        "offload_frozen": ["model.offload_frozen=true"],
        **{kernel: [f"model.attention={kernel}"] for kernel in ATTENTION_KERNELS},
    }


SWITCHES = tuple(switch_overrides(1))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, batch_size=4, steps=10, repeats=3)
    parser.add_argument("--switches", nargs="+", default=list(SWITCHES), choices=SWITCHES)
    parser.add_argument("--k", type=int, default=5, help="steps_per_forward's K")
    parser.add_argument("--num-batches", type=int, default=2, help="sampling batches of the epoch updated on")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    return parser.parse_args()


def base_config(args: argparse.Namespace, dtype: str) -> dict:
    """The baseline run (DDPO, LoRA, anchor defaults elsewhere) as a config dict."""
    return run_settings(args, dtype, train={"mixed_precision": args.mixed_precision}, objective={"name": "ddpo"})


@dataclasses.dataclass
class Trainer:
    """What one side needs to sample and update, built as align_gen.train.train builds it."""

    config: RunConfig
    policy: object
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator


def build_trainer(raw: dict, overrides: list[str], device: str) -> Trainer:
    for override in overrides:
        apply_override(raw, override)
    config = from_dict(RunConfig, raw)
    accelerator, policy, _, optimizer = build_like_train(config, device)  # seeded: the same LoRA on both sides
    return Trainer(config, policy, optimizer, accelerator)


def time_side(
    side: Trainer, objective, rollouts, prompts: list, repeat: int, device: torch.device
) -> tuple[Timing, Timing, float | None]:
    """(timing of one sampling batch, timing of one DDPO update, peak GiB on CUDA or None)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sample_s, _ = timed(lambda: side.policy.sample(prompts, generator=torch.Generator().manual_seed(repeat)), device)
    generator = torch.Generator().manual_seed(repeat)
    update_s, _ = timed(
        lambda: update(side.policy, objective, side.optimizer, rollouts, side.config, generator, side.accelerator), device
    )
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return sample_s, update_s, peak


def measure_pair(args: argparse.Namespace, raw: dict, overrides: list[str], name: str = "variant") -> dict:
    """The switch's row: alternating sampling and update timings of the baseline and the variant
    (``baseline_sample_median_wall_s``, ...), the speed-ups baseline / variant of the medians and
    the medians of the per-pair ratios, each side's peak GiB on CUDA."""
    import copy

    sides = {"baseline": build_trainer(copy.deepcopy(raw), [], args.device),
             "variant": build_trainer(copy.deepcopy(raw), overrides, args.device)}
    device = sides["baseline"].accelerator.device
    objective = build_objective(sides["baseline"].config.objective)
    prompts = load_prompts(sides["baseline"].config.prompts.source)
    base = sides["baseline"]
    generator = epoch_generator(args.seed, 0, 0)
    rollouts = collect_rollouts(base.policy, objective, prompts, base.config, generator, base.accelerator)
    rollouts.advantages = torch.randn(len(rollouts), generator=generator).to(device)
    batch_prompts = prompts[: args.batch_size]
    times: dict[str, dict[str, list[Timing]]] = {side: {"sample": [], "update": []} for side in sides}
    peaks: dict[str, float | None] = {side: None for side in sides}
    for repeat in range(args.repeats + 1):  # repeat 0: the warm-up (and compilation)
        for side_name in pair_order(sides, repeat - 1):  # the order alternates; repeat 0 warms up
            side = sides[side_name]
            sample_t, update_t, peak = time_side(side, objective, rollouts, batch_prompts, repeat, device)
            if repeat:
                times[side_name]["sample"].append(sample_t)
                times[side_name]["update"].append(update_t)
            peaks[side_name] = peak
    row: dict = {"name": name, "overrides": overrides}
    for side in sides:
        for kind in ("sample", "update"):
            row.update(timing_numbers(times[side][kind], f"{side}_{kind}_"))
        row[f"{side}_peak_memory_gib"] = peaks[side]
    for kind in ("sample", "update"):  # baseline / variant seconds: > 1 = the switch is faster
        ratio = time_ratio("", times["baseline"][kind], times["variant"][kind])
        row[f"{kind}_speedup"], row[f"{kind}_per_pair"] = ratio.value, ratio.per_pair_median
        row[f"{kind}_per_pair_min"], row[f"{kind}_per_pair_max"] = ratio.per_pair_min, ratio.per_pair_max
        row[f"{kind}_cpu_speedup"], row[f"{kind}_cpu_per_pair"] = ratio.cpu_value, ratio.cpu_per_pair_median
    return row


def main() -> None:
    args = parse_args()
    shown_model = resolve_model(args)
    dtype = resolve_dtype(args)
    machine = describe_machine(torch.device(args.device))
    print_machine(machine)
    raw = base_config(args, dtype)
    overrides = switch_overrides(args.k)
    rows, unavailable = [], {}
    for name in args.switches:
        try:
            rows.append(measure_pair(args, raw, overrides[name], name))
        except ConfigError as error:  # the device cannot run this switch
            unavailable[name] = str(error)
    print(f"\nmodel={shown_model} dtype={dtype} batch={args.batch_size} steps={args.steps} "
          f"epoch={args.batch_size * args.num_batches} rollouts, repeats={args.repeats} (+1 warm-up), "
          "pairs in alternating order")
    header = ["switch", "sample s base", "sample s var", "sample x", "per-pair", "update s base", "update s var",
              "update x", "per-pair", "peak GiB base / var"]
    table_rows = []
    for row in rows:
        peak = ("n/a (cpu)" if row["baseline_peak_memory_gib"] is None
                else f"{cell(row['baseline_peak_memory_gib'], '.2f')} / {cell(row['variant_peak_memory_gib'], '.2f')}")
        table_rows.append([row["name"], row["baseline_sample_median_wall_s"], row["variant_sample_median_wall_s"],
                           row["sample_speedup"], row["sample_per_pair"], row["baseline_update_median_wall_s"],
                           row["variant_update_median_wall_s"], row["update_speedup"], row["update_per_pair"], peak])
    table_rows += [[name, "n/a on this device"] + [""] * (len(header) - 2) for name in unavailable]
    comparisons = [
        Comparison(
            f"baseline / {row['name']} {kind} seconds",
            row[f"{kind}_speedup"],
            row[f"{kind}_per_pair"],
            per_pair_min=row[f"{kind}_per_pair_min"],
            per_pair_max=row[f"{kind}_per_pair_max"],
            cpu_value=row[f"{kind}_cpu_speedup"],
            cpu_per_pair_median=row[f"{kind}_cpu_per_pair"],
        )
        for row in rows for kind in ("sample", "update")
    ]
    result = BenchmarkResult(
        benchmark="switches",
        description=__doc__.splitlines()[0],
        settings=settings_of(args, model=shown_model, model_folder=args.model, dtype=dtype),
        machine=machine,
        rows=rows,
        table=Table.of(header, table_rows),
        comparisons=comparisons,
        notes=[f"{name}: n/a on this device ({reason})" for name, reason in unavailable.items()],
        extra={"unavailable": unavailable},
    )
    publish(result, args.json)


if __name__ == "__main__":
    main()
