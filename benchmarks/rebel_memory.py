"""REBEL update memory vs the number of sampling steps: align-gen's two-pass loss vs a one-pass loss.

What is measured: for each step count in ``--steps`` a fresh policy is built (as the trainer
builds it: an Accelerator, ``accelerator.prepare`` of the denoiser, LoRA by default or ``--full``)
and samples ONE minibatch of ``--batch-size`` rollouts (pairs of the same prompt, random
advantages). Then the gradient of REBEL's loss on that minibatch is computed twice:
  (A) naive: the one-pass loss. ``policy.step_log_prob`` over ALL steps with grad, chain
      log-ratios summed, the squared residual averaged over pairs, ONE backward. Every step's
      activations stay alive until that backward, so memory grows linearly with the steps.
  (B) ours:  ``align_gen.objectives.rebel`` through ``Objective.loss_terms``, each piece
      backpropagated as it comes (as ``align_gen.train.update`` does): a no-grad pass computes
      the residuals, then one piece per step; one step's activations alive at a time.
Both give the same gradient (the two-pass gradient is exact): the largest absolute difference
between the two gradients is printed next to the largest gradient entry.

How memory is counted, the same on every device: the bytes of the tensors autograd saves for
backward, tracked with ``torch.autograd.graph.saved_tensors_hooks``. The pack hook wraps each
saved tensor in a handle with a ``weakref.finalize``; a storage is counted (once, keyed by its
``data_ptr``, however many saved tensors view it) from its first pack until the last handle on it
is released, which autograd does when backward has used it or when the graph is dropped. The
peak of the live sum is reported. Storages that exist before the update (the weights, buffers
and the minibatch's own tensors) are not counted. This is the activation memory the two
implementations differ by; it excludes gradients, optimizer state and temporaries of a single
kernel. On CUDA, ``torch.cuda.max_memory_allocated`` above the memory allocated at the start of
the update is reported as well.

Reported per step count: both peaks, ratio = naive / ours, ours relative to the smallest step
count (the growth; ~1.0 is the claim), seconds per gradient (median of ``--repeats``; ours does
one extra forward per step), and the gradient difference. A naive run that runs out of CUDA
memory is reported as OOM. ``--json OUT`` writes the result (``harness.BenchmarkResult``: one row
per step count, named "<steps> steps"; the seconds are wall-clock, with the process's CPU time
beside them).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rebel_memory.py [--steps 2 5 10 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from harness import (
    BenchmarkResult,
    Comparison,
    Table,
    add_common_flags,
    describe_machine,
    median,
    print_machine,
    publish,
    resolve_dtype,
    resolve_model,
    settings_of,
    timed,
)

from align_gen.config import RunConfig, load_config
from align_gen.objectives import build_objective
from align_gen.policies import build_policy
from align_gen.types import Rollout

MIB = 2**20
PROMPTS = [
    "a red circle above a blue square",
    "a green triangle",
    "a yellow square left of a purple circle",
    "an orange circle",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], conflict_handler="resolve"
    )
    add_common_flags(parser, batch_size=4, steps=10, repeats=1)
    # Replaces the common single --steps: this benchmark sweeps the number of steps.
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[2, 5, 10, 20],
        help="DDIM step counts to compare (each builds a fresh policy)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="rollouts in the minibatch: an even number (pairs of the same prompt)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--lora", dest="lora", action="store_true", default=True, help="LoRA adapters (default)"
    )
    mode.add_argument("--full", dest="lora", action="store_false", help="train every UNet weight")
    parser.add_argument("--rebel-eta", type=float, default=1.0, help="REBEL's eta (objective.eta)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    args = parser.parse_args()
    if args.batch_size < 2 or args.batch_size % 2:
        parser.error(f"--batch-size must be even and >= 2 (REBEL pairs), got {args.batch_size}")
    if min(args.steps) < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


class SavedTensorMeter:
    """Live and peak bytes of the storages autograd saves for backward while it is entered.

    Each saved tensor is packed into a :class:`_Saved` handle, which autograd holds for as long
    as the tensor is needed; a finalizer on the handle releases its share. Storages are counted
    once (keyed by ``data_ptr``) while any handle on them is alive; keys in ``ignore`` (storages
    that existed before, such as the weights) are never counted.
    """

    def __init__(self, ignore: set[int]) -> None:
        self.ignore = ignore
        self.handles: dict[int, int] = {}  # storage data_ptr -> live handles on it
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        handle = _Saved(tensor)
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key == 0 or key in self.ignore:
            return handle
        if key not in self.handles:
            self.handles[key] = 0
            self.live_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.handles[key] += 1
        weakref.finalize(handle, self._release, key, size)
        return handle

    def _release(self, key: int, size: int) -> None:
        self.handles[key] -= 1
        if self.handles[key] == 0:
            del self.handles[key]
            self.live_bytes -= size

    @staticmethod
    def _unpack(handle: _Saved) -> torch.Tensor:
        return handle.tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class _Saved:
    """What autograd holds in place of a saved tensor (a weak-referenceable wrapper)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def storage_keys(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def rollout_tensors(batch: Rollout) -> list[torch.Tensor]:
    fields = [batch.trajectory, batch.timesteps, batch.log_probs, batch.step_mask, batch.images]
    return fields + [batch.advantages] + list(batch.conditioning.values())


@dataclass
class Measurement:
    saved_bytes: int | None  # peak live bytes saved for backward; None = out of memory
    cuda_bytes: int | None  # peak CUDA bytes allocated above the start of the call
    wall_s: float | None  # median wall-clock seconds of one gradient
    cpu_s: float | None  # median process CPU seconds of one gradient
    leftover_bytes: int  # saved bytes still live after the call (0: the graph was freed)
    grads: dict[str, torch.Tensor]


def run_config(args: argparse.Namespace, steps: int, dtype: str) -> RunConfig:
    """A REBEL run's config with these settings: one minibatch of pairs. (Strings go in as JSON,
    which YAML reads verbatim: bare `no` would be YAML's false.)"""
    return load_config(
        None,
        [
            f"seed={args.seed}",
            f"model.pretrained={json.dumps(args.model)}",
            f"model.dtype={json.dumps(dtype)}",
            f"model.lora.enabled={str(args.lora).lower()}",
            f"sample.num_steps={steps}",
            f"sample.eta={args.eta}",
            f"sample.guidance_scale={args.guidance_scale}",
            f"sample.batch_size={args.batch_size}",
            "sample.num_batches_per_epoch=1",
            "sample.samples_per_prompt=2",
            f"train.mixed_precision={json.dumps(args.mixed_precision)}",
            "objective.name=rebel",
            f"objective.eta={args.rebel_eta}",
        ],
    )


def naive_rebel_loss(policy, batch: Rollout, eta: float) -> torch.Tensor:
    """The one-pass REBEL loss (REBEL's regression, written directly): every step's log-prob with grad at once."""
    steps = torch.arange(batch.num_steps, device=batch.log_probs.device)
    log_probs = policy.step_log_prob(batch, steps)  # (B, T), all T graphs alive
    log_ratio = ((log_probs - batch.log_probs) * batch.step_mask.float()).sum(dim=1)  # (B,)
    targets = batch.advantages.float()  # (B,)
    residual = (log_ratio[0::2] - log_ratio[1::2]) / eta - (targets[0::2] - targets[1::2])  # (P,)
    return residual.pow(2).mean()  # ()


def measure(
    gradient: Callable[[], None],
    policy,
    ignore: set[int],
    device: torch.device,
    repeats: int,
) -> Measurement:
    """Runs ``gradient`` (which fills the trainable weights' .grad) ``repeats`` times; the peaks
    are the largest over the calls, the gradient is the first call's."""
    named = [(n, p) for n, p in policy.model.named_parameters() if p.requires_grad]
    saved, cuda, times, leftover, grads = 0, 0, [], 0, {}
    timing = None
    for repeat in range(repeats):
        for _, param in named:
            param.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
        out_of_memory = False
        try:
            with SavedTensorMeter(ignore) as meter:
                timing, _ = timed(gradient, device)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # cleaned up below, once the traceback no longer holds the graph
        if out_of_memory:
            for _, param in named:
                param.grad = None
            gc.collect()
            torch.cuda.empty_cache()
            return Measurement(None, None, None, None, 0, {})
        gc.collect()
        saved = max(saved, meter.peak_bytes)
        leftover = max(leftover, meter.live_bytes)
        if device.type == "cuda":
            cuda = max(cuda, torch.cuda.max_memory_allocated(device) - start)
        times.append(timing)
        if repeat == 0:
            grads = {
                n: p.grad.detach().float().cpu().clone() for n, p in named if p.grad is not None
            }
    for _, param in named:
        param.grad = None
    return Measurement(
        saved,
        cuda if device.type == "cuda" else None,
        median([t.wall_s for t in times]),
        median([t.cpu_s for t in times]),
        leftover,
        grads,
    )


def gradient_difference(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """(largest |a - b| over every entry, largest |a|); a weight missing from one counts as 0."""
    diff, scale = 0.0, 0.0
    for name in a.keys() | b.keys():
        x = a.get(name, torch.zeros_like(b.get(name, torch.zeros(()))))
        y = b.get(name, torch.zeros_like(x))
        diff = max(diff, float((x - y).abs().max()))
        scale = max(scale, float(x.abs().max()))
    return diff, scale


def measure_steps(
    args: argparse.Namespace, steps: int, dtype: str, accelerator: Accelerator, warm_up: bool
) -> dict[str, object]:
    """Both gradients of one minibatch sampled with ``steps`` DDIM steps."""
    device = accelerator.device
    config = run_config(args, steps, dtype)
    objective = build_objective(config.objective)
    objective.check(config)
    policy = build_policy(config.model, config.sample, device)
    policy.use_forward_module(accelerator.prepare(policy.model))
    generator = torch.Generator().manual_seed(args.seed)
    pairs = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size // 2) for _ in range(2)]
    batch = policy.sample(pairs, generator=generator)
    batch.advantages = torch.randn(len(batch), generator=generator).to(device)
    ignore = storage_keys(list(policy.model.parameters()) + list(policy.model.buffers()))
    ignore |= storage_keys(rollout_tensors(batch))
    policy.model.train()

    def naive() -> None:
        with accelerator.autocast():
            accelerator.backward(naive_rebel_loss(policy, batch, config.objective.eta))

    def ours() -> None:
        with accelerator.autocast():
            for term in objective.loss_terms(policy, batch, generator):
                accelerator.backward(term.loss)

    if warm_up:  # first-call costs (allocations, lazy initialisation) out of the timings
        measure(ours, policy, ignore, device, 1)
    ours_m = measure(ours, policy, ignore, device, args.repeats)
    naive_m = measure(naive, policy, ignore, device, args.repeats)
    diff, scale = (
        gradient_difference(ours_m.grads, naive_m.grads) if naive_m.grads else (None, None)
    )
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    return {
        "name": f"{steps} steps",
        "steps": steps,
        "naive_saved_bytes": naive_m.saved_bytes,
        "ours_saved_bytes": ours_m.saved_bytes,
        "naive_cuda_bytes": naive_m.cuda_bytes,
        "ours_cuda_bytes": ours_m.cuda_bytes,
        "naive_median_wall_s": naive_m.wall_s,
        "ours_median_wall_s": ours_m.wall_s,
        "naive_median_cpu_s": naive_m.cpu_s,
        "ours_median_cpu_s": ours_m.cpu_s,
        "leftover_saved_bytes": max(naive_m.leftover_bytes, ours_m.leftover_bytes),
        "grad_max_abs_diff": diff,
        "grad_max_abs": scale,
        "trainable_parameters": trainable,
    }


def ratio(a: float | None, b: float | None) -> float | str:
    return "OOM" if a is None or b is None else a / b


def growth(value: float | str) -> str:
    return value if isinstance(value, str) else f"x{value:.3f}"


def mib(value: int | None) -> float | str:
    return "OOM" if value is None else value / MIB


def main() -> None:
    args = parse_args()
    model_name = resolve_model(args)
    dtype = resolve_dtype(args)
    # As align_gen.train.train builds it.
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    device = accelerator.device
    machine = describe_machine(device)
    print_machine(machine)

    steps_list = sorted(set(args.steps))
    rows = []
    for index, steps in enumerate(steps_list):
        rows.append(measure_steps(args, steps, dtype, accelerator, warm_up=index == 0))
        gc.collect()  # the previous policy's memory back before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row["ratio_naive_over_ours"] = ratio(row["naive_saved_bytes"], row["ours_saved_bytes"])
        row["ours_growth"] = ratio(row["ours_saved_bytes"], rows[0]["ours_saved_bytes"])
        row["naive_growth"] = ratio(row["naive_saved_bytes"], rows[0]["naive_saved_bytes"])

    mode = "lora" if args.lora else "full"
    print(
        f"\nmodel={model_name} dtype={dtype} mode={mode} "
        f"trainable={rows[0]['trainable_parameters']:,} batch={args.batch_size} "
        f"({args.batch_size // 2} pairs) guidance={args.guidance_scale} eta={args.eta} "
        f"rebel_eta={args.rebel_eta} mixed_precision={args.mixed_precision} repeats={args.repeats}"
    )
    header = [
        "steps",
        "naive saved MiB",
        "ours saved MiB",
        "naive/ours",
        "ours growth",
        "naive growth",
        "naive s",
        "ours s",
        "grad max|diff|",
        "grad max|g|",
    ]
    if device.type == "cuda":
        header += ["naive CUDA MiB", "ours CUDA MiB", "CUDA naive/ours"]
    table = []
    for row in rows:
        line = [
            row["steps"],
            mib(row["naive_saved_bytes"]),
            mib(row["ours_saved_bytes"]),
            row["ratio_naive_over_ours"],
            row["ours_growth"],
            row["naive_growth"],
            "OOM" if row["naive_median_wall_s"] is None else row["naive_median_wall_s"],
            row["ours_median_wall_s"],
            "n/a" if row["grad_max_abs_diff"] is None else f"{row['grad_max_abs_diff']:.2e}",
            "n/a" if row["grad_max_abs"] is None else f"{row['grad_max_abs']:.2e}",
        ]
        if device.type == "cuda":
            line += [
                mib(row["naive_cuda_bytes"]),
                mib(row["ours_cuda_bytes"]),
                ratio(row["naive_cuda_bytes"], row["ours_cuda_bytes"]),
            ]
        table.append(line)
    first, last = rows[0], rows[-1]
    notes = [
        f"from {first['steps']} to {last['steps']} steps (x{last['steps'] / first['steps']:.3g}): "
        f"ours grew {growth(last['ours_growth'])} (flat = x1.000), "
        f"naive grew {growth(last['naive_growth'])}"
    ]
    leftover = max(row["leftover_saved_bytes"] for row in rows)
    notes.append(f"saved bytes still live after the backward calls: {leftover} (0 = all released)")
    diffs = [row["grad_max_abs_diff"] for row in rows if row["grad_max_abs_diff"] is not None]
    if diffs:
        notes.append(f"same gradient: largest |naive - ours| over all step counts = {max(diffs):.2e}")

    def number(value: float | str) -> float | None:  # "OOM" is not a ratio
        return None if isinstance(value, str) else value

    comparisons = [
        Comparison(
            f"naive / ours saved bytes at {last['steps']} steps",
            number(last["ratio_naive_over_ours"]),
        ),
        Comparison(
            f"ours saved bytes at {last['steps']} / {first['steps']} steps",
            number(last["ours_growth"]),
            note="flat = 1.000",
        ),
        Comparison(
            f"naive saved bytes at {last['steps']} / {first['steps']} steps",
            number(last["naive_growth"]),
        ),
    ]
    result = BenchmarkResult(
        benchmark="rebel_memory",
        description=__doc__.splitlines()[0],
        settings=settings_of(
            args, model=model_name, model_folder=args.model, dtype=dtype, mode=mode
        ),
        machine=machine,
        rows=rows,
        table=Table.of(header, table),
        comparisons=comparisons,
        notes=notes,
    )
    publish(result, args.json)


if __name__ == "__main__":
    main()
