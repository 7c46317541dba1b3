"""What the benchmarks share: their common flags, a synchronised timer, the machine description,
and the model-FLOPs / MFU estimate.

Not a library module: the scripts next to this file import it as ``harness`` (run them as
``python benchmarks/<script>.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def add_common_flags(
    parser: argparse.ArgumentParser, *, batch_size: int, steps: int, repeats: int
) -> None:
    """The flags every benchmark takes; the defaults given are the ones of the CPU tiny run."""
    parser.add_argument(
        "--model",
        default="align-gen:tiny-random-sd",
        type=model_argument,
        help="built-in name, hub id, folder, or a random full-size architecture "
        "(random:sd15, random:sd15-mid, ...: see benchmarks/full_size.py)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="dtype of the frozen weights (default: float16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=batch_size, help="images per sampling call"
    )
    parser.add_argument("--steps", type=int, default=steps, help="DDIM steps per image")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM stochasticity (> 0)")
    parser.add_argument(
        "--repeats", type=int, default=repeats, help="timed repeats after one warm-up"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the numbers here"
    )


# Folders built for ``random:`` names during this process -> the names as given.
RANDOM_MODEL_NAMES: dict[str, str] = {}


def model_argument(name: str) -> str:
    """``--model``'s type: a ``random:...`` name becomes its folder (built once, see
    full_size.py), so every script that uses :func:`add_common_flags` accepts them; any other
    name is returned unchanged."""
    import full_size

    try:
        folder = full_size.resolve(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if folder != name:
        RANDOM_MODEL_NAMES[folder] = name
    return folder


def resolve_model(args: argparse.Namespace) -> str:
    """Makes ``args.model`` a loadable name (resolving a ``random:...`` name that a script's own
    ``--model`` flag left as given) and returns the name as the user gave it, for the reports."""
    if args.model.startswith("random:"):
        try:
            args.model = model_argument(args.model)
        except argparse.ArgumentTypeError as error:
            raise SystemExit(f"--model: {error}") from None
    return RANDOM_MODEL_NAMES.get(args.model, args.model)


def resolve_dtype(args: argparse.Namespace) -> str:
    if args.dtype is not None:
        return args.dtype
    return "float16" if torch.device(args.device).type == "cuda" else "float32"


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """(wall-clock seconds of ``fn()``, its result), the device queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict[str, Any]:
    """The facts a reader needs to compare two results."""
    import diffusers

    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(device),
        "load_avg_1min": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> float | None:
    """The 1-minute load average: other work on a shared machine makes every number noisier."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def print_machine(info: dict[str, Any]) -> None:
    print("machine: " + ", ".join(f"{key}={value}" for key, value in info.items()))


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    """A plain aligned text table."""
    cells = [header] + [
        [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")


def save_line_plot(
    series: dict[str, tuple[list[float], list[float]]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    target: float | None = None,
) -> None:
    """One line per ``series`` entry ({label: (xs, ys)}), an optional dashed target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        axis.plot(xs, ys, marker="o", markersize=3, label=label)
    if target is not None:
        axis.axhline(
            target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.4g}"
        )
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}")


# Dense bf16 / fp16 tensor-core peaks (no sparsity), FLOP/s, from NVIDIA's datasheets; matched
# in order against torch.cuda.get_device_name (the first substring found wins).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak FLOP/s from :data:`PEAK_BF16_FLOPS`; None off CUDA or for a GPU
    not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products, convolutions and attention that ``fn()`` runs (forward and,
    if ``fn`` calls backward, backward), counted by ``torch.utils.flop_counter.FlopCounterMode``
    (a multiply-add counts 2). Elementwise ops are not counted, as in every MFU convention."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def flops_report(flops: float, seconds: float, device: torch.device) -> dict[str, float | None]:
    """{"tflops": achieved model TFLOP/s, "mfu": achieved / the GPU's bf16 peak, or None}, for
    ``flops`` model FLOPs done in ``seconds``."""
    achieved = flops / seconds
    peak = peak_flops(device)
    return {"tflops": achieved / 1e12, "mfu": None if peak is None else achieved / peak}


def format_flops(
    label: str, flops: float, report: dict[str, float | None], device: torch.device
) -> str:
    """One line: the model FLOPs, the achieved TFLOP/s and the MFU (or why there is none)."""
    if report["mfu"] is not None:
        mfu_text = f"{100 * report['mfu']:.1f}% of the bf16 peak"
    elif device.type != "cuda":
        mfu_text = f"n/a ({device.type})"
    else:
        mfu_text = "n/a (GPU not in harness.PEAK_BF16_FLOPS)"
    return f"{label}: {flops / 1e12:.4g} TFLOP, {report['tflops']:.4g} TFLOP/s achieved, MFU {mfu_text}"


def build_like_train(config, device: str):
    """(accelerator, policy, objective, optimizer) built in the order ``align_gen.train.train``
    builds them: objective checked, policy, AdamW (or 8-bit), ``objective.setup``, then
    ``align_gen.train.prepare_model`` (accelerate, torch.compile when asked, steps per forward). The
    LoRA initialisation is seeded from ``config.seed``, so two builds start from the same weights."""
    from accelerate import Accelerator

    from align_gen.objectives import build_objective
    from align_gen.optimizers import build_optimizer
    from align_gen.policies import build_policy
    from align_gen.train import prepare_model

    accelerator = Accelerator(mixed_precision=config.train.mixed_precision, cpu=device == "cpu")
    objective = build_objective(config.objective)
    objective.check(config)
    torch.manual_seed(config.seed)
    policy = build_policy(config.model, config.sample, accelerator.device)
    optimizer = build_optimizer(policy, config.train)
    objective.setup(policy, config)
    optimizer = prepare_model(policy, optimizer, config, accelerator)
    return accelerator, policy, objective, optimizer
