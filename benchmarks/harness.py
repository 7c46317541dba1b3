"""What both benchmarks share: their common flags, a synchronised timer, and a machine description.

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
        "--model", default="align-gen:tiny-random-sd", help="built-in name, hub id or folder"
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
        axis.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.4g}")
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
