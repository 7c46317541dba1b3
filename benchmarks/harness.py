"""What the benchmarks share: their common flags, a synchronised timer (wall and process CPU
time), the machine description, the model-FLOPs / MFU estimate, and the one result schema
(:class:`BenchmarkResult`) that every script writes with ``--json OUT`` and prints with
:func:`publish`.

Not a library module: the scripts next to this file import it as ``harness`` (run them as
``python benchmarks/<script>.py``, which puts this folder on ``sys.path``). Importing it does not
import torch (``gpu_suite.py`` reads results without touching the device): the functions that
need torch import it themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# When this process imported the harness, i.e. when the benchmark started: a result's date.
STARTED = datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def add_common_flags(
    parser: argparse.ArgumentParser, *, batch_size: int, steps: int, repeats: int
) -> None:
    """The flags every benchmark takes; the defaults given are the ones of the CPU tiny run."""
    import torch

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
        "--json",
        type=Path,
        default=None,
        metavar="OUT",
        help="also write the result here (harness.BenchmarkResult as JSON)",
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
    import torch

    if args.dtype is not None:
        return args.dtype
    return "float16" if torch.device(args.device).type == "cuda" else "float32"


class Timing(NamedTuple):
    """One timed call: wall-clock seconds and this process's CPU seconds (every thread, user +
    system: ``time.process_time``) over the same interval."""

    wall_s: float
    cpu_s: float


def timed(fn: Callable[[], T], device: torch.device) -> tuple[Timing, T]:
    """(the :class:`Timing` of ``fn()``, its result), the device queue drained before and after
    (the CPU time includes the host's wait in ``torch.cuda.synchronize``)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), result


def pair_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of the sides in timed round ``round_index`` (0 = the first after the
    warm-ups): as given in even rounds, reversed in odd ones."""
    return list(names) if round_index % 2 == 0 else list(names)[::-1]


def interleaved(
    sides: Mapping[str, Callable[[], T]], repeats: int, device: torch.device
) -> tuple[dict[str, list[Timing]], dict[str, T]]:
    """Times every side ``repeats`` times after one untimed warm-up call of each, in pairs (one
    call of each side per round) whose order alternates (A B, B A, A B, ...): when the machine's
    load drifts, neither side always gets the quieter half of a pair. Returns each side's
    timings, in round order (the i-th of every side are one pair), and its last result."""
    names = list(sides)
    results: dict[str, T] = {}
    for name in names:  # the warm-up (and any compilation)
        results[name] = timed(sides[name], device)[1]
    timings: dict[str, list[Timing]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in pair_order(names, round_index):
            timing, results[name] = timed(sides[name], device)
            timings[name].append(timing)
    return timings, results


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
    """The facts a reader needs to compare two results (:func:`publish` adds the load average
    at the end, ``load_avg_1min_end``)."""
    import diffusers
    import torch

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


def timing_numbers(timings: Sequence[Timing], prefix: str = "") -> dict[str, Any]:
    """A row's numbers of repeated timed calls, under the schema's keys (each with ``prefix``):
    every call's ``wall_s`` and ``cpu_s``, and ``median_wall_s``, ``min_wall_s``,
    ``max_wall_s``, ``median_cpu_s``."""
    wall = [t.wall_s for t in timings]
    cpu = [t.cpu_s for t in timings]
    return {
        f"{prefix}median_wall_s": median(wall),
        f"{prefix}min_wall_s": min(wall),
        f"{prefix}max_wall_s": max(wall),
        f"{prefix}median_cpu_s": median(cpu),
        f"{prefix}wall_s": wall,
        f"{prefix}cpu_s": cpu,
    }


# --- the result schema ---------------------------------------------------------------------------

SCHEMA_VERSION = 1
MISSING = "n/a"


def cell(value: Any, spec: str = ".4g") -> str:
    """One table cell, the one formatting rule of every benchmark's table: a float with ``spec``,
    an int, a bool or a string as it is, None as "n/a", a list cell by cell."""
    if value is None:
        return MISSING
    if isinstance(value, bool | int | str):
        return str(value)
    if isinstance(value, float):
        return format(value, spec)
    if isinstance(value, list | tuple):
        return ", ".join(cell(item, spec) for item in value)
    return str(value)


def percent(value: float | None, signed: bool = False) -> str:
    """A fraction as a percentage cell ("n/a" for None)."""
    return MISSING if value is None else format(100 * value, "+.1f" if signed else ".1f") + "%"


@dataclasses.dataclass
class Table:
    """The table a benchmark prints and a report shows: column names and rows of already
    formatted cells (build it with :meth:`of`)."""

    header: list[str]
    rows: list[list[str]]

    @classmethod
    def of(cls, header: Sequence[str], rows: Iterable[Sequence[Any]], spec: str = ".4g") -> Table:
        """The table of ``rows``, each cell formatted by :func:`cell` (strings kept as they are)."""
        table = cls(list(header), [[cell(value, spec) for value in row] for row in rows])
        table.validate()
        return table

    def validate(self) -> None:
        if not all(isinstance(name, str) for name in self.header):
            raise ValueError(f"table header: column names must be strings, got {self.header!r}")
        for row in self.rows:
            if len(row) != len(self.header) or not all(isinstance(value, str) for value in row):
                raise ValueError(
                    f"table row {row!r}: needs {len(self.header)} formatted cells (strings)"
                )

    def text(self) -> list[str]:
        """A plain aligned text table, columns right-aligned."""
        cells = [self.header, *self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.header))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        return lines[:1] + ["  ".join("-" * width for width in widths)] + lines[1:]

    def markdown(self) -> list[str]:
        def line(row: list[str]) -> str:
            return "| " + " | ".join(value.replace("|", "\\|") for value in row) + " |"

        return [line(self.header), "|" + "---|" * len(self.header), *map(line, self.rows)]


@dataclasses.dataclass
class Comparison:
    """A named ratio between two rows (e.g. "align-gen / anchor samples/s"): the ratio of the
    rows' medians (wall-clock), the median of the per-pair ratios where the sides ran in
    interleaved pairs with their spread (min and max over the pairs), the same ratio of process
    CPU time (what a shared, noisy machine distorts least), and an optional note (what the
    number means, a target). :func:`time_ratio` fills every field from two sides' timings."""

    name: str
    value: float | None
    per_pair_median: float | None = None
    note: str = ""
    per_pair_min: float | None = None
    per_pair_max: float | None = None
    cpu_value: float | None = None  # the ratio of the medians of process CPU time
    cpu_per_pair_median: float | None = None

    def describe(self, bold: bool = False) -> str:
        value = cell(self.value, ".3f")
        text = f"{self.name}: {f'**{value}**' if bold else value}"
        if self.per_pair_median is not None:
            text += f"; median of the per-pair ratios {cell(self.per_pair_median, '.3f')}"
            if self.per_pair_min is not None and self.per_pair_max is not None:
                text += f" (min {cell(self.per_pair_min, '.3f')}, max {cell(self.per_pair_max, '.3f')})"
        if self.cpu_value is not None:
            text += f"; CPU time: {cell(self.cpu_value, '.3f')}"
            if self.cpu_per_pair_median is not None:
                text += f" (per-pair median {cell(self.cpu_per_pair_median, '.3f')})"
        return text + (f" ({self.note})" if self.note else "")


def time_ratio(name: str, numerator: Sequence[Timing], denominator: Sequence[Timing], note: str = "") -> Comparison:
    """``numerator`` / ``denominator`` of two sides timed in interleaved pairs (the i-th call of
    each is one pair): the ratio of the median times, wall and CPU, and the median, min and max
    of the per-pair wall ratios. A ratio of times is the inverse ratio of throughputs: a
    comparison named "B / A samples/s" is ``time_ratio(name, A, B)``."""

    def ratios(kind: str) -> tuple[float, list[float]]:
        top = [getattr(t, kind) for t in numerator]
        bottom = [getattr(t, kind) for t in denominator]
        per_pair = [a / b for a, b in zip(top, bottom, strict=True) if b > 0]
        return median(top) / median(bottom), per_pair

    wall, wall_pairs = ratios("wall_s")
    cpu, cpu_pairs = ratios("cpu_s")
    return Comparison(
        name,
        wall,
        median(wall_pairs) if wall_pairs else None,
        note,
        per_pair_min=min(wall_pairs) if wall_pairs else None,
        per_pair_max=max(wall_pairs) if wall_pairs else None,
        cpu_value=cpu,
        cpu_per_pair_median=median(cpu_pairs) if cpu_pairs else None,
    )


def command_line() -> list[str]:
    """This process's command line as it would be typed: ``python`` then ``sys.argv``."""
    return ["python", *sys.argv]


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


@dataclasses.dataclass
class BenchmarkResult:
    """What every benchmark produces, prints and writes (``--json OUT``), in one schema.

    - ``benchmark``: the script's name (``sampling_overhead``, ...); ``description``: one line.
    - ``command``: the exact command line (``python`` then ``sys.argv``); ``date``: when the run
      started (ISO 8601, local time with its offset).
    - ``machine``: :func:`describe_machine` (CPU, GPU, versions, threads, 1-minute load average
      at the start) plus ``load_avg_1min_end``, set by :func:`publish`.
    - ``settings``: the parsed arguments (and what they resolved to: dtype, model folder, ...).
    - ``rows``: the measured rows, each a flat dict (values: numbers, strings, None, or lists of
      them) with a ``name`` and the numbers under unit-suffixed keys: ``median_wall_s``,
      ``median_cpu_s``, ``wall_s`` (every timed call), ``samples_per_s``, ``peak_memory_gib``,
      ``tflops``, ``mfu``, ...
    - ``comparisons``: named ratios between rows (:class:`Comparison`).
    - ``table``: the table printed and shown in reports (:class:`Table`); ``notes``: the lines
      printed under it.
    - ``extra``: every other number the run recorded (curves, FLOP counts, checks).
    - ``schema_version``: :data:`SCHEMA_VERSION`; a file without one is read as version 0 (written
      before this schema: all of it but the machine and settings under ``extra``).
    """

    benchmark: str
    description: str
    settings: dict[str, Any]
    machine: dict[str, Any]
    rows: list[dict[str, Any]]
    table: Table
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    command: list[str] = dataclasses.field(default_factory=command_line)
    date: str = STARTED
    schema_version: int = SCHEMA_VERSION

    def validate(self) -> None:
        """Raises ValueError where the result does not follow the schema."""
        if not self.benchmark or not isinstance(self.benchmark, str):
            raise ValueError(f"benchmark must be a non-empty string, got {self.benchmark!r}")
        for row in self.rows:
            if not isinstance(row, dict) or not isinstance(row.get("name"), str):
                raise ValueError(f"every row needs a string 'name': {row!r}")
            for key, value in row.items():
                items = value if isinstance(value, list) else [value]
                if not all(_is_scalar(item) for item in items):
                    raise ValueError(
                        f"row {row['name']!r}, {key!r}: a row holds numbers, strings, None or "
                        f"lists of them (nested data goes under extra), got {value!r}"
                    )
        self.table.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        self.validate()
        return json.dumps(self.to_dict(), indent=1, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchmarkResult:
        if not isinstance(data, dict):
            raise ValueError(f"a benchmark result is a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version is None:
            return cls._from_version_0(data)
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"result schema version {version}; this harness reads {SCHEMA_VERSION} (and 0)"
            )
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown result fields {unknown}")
        values = dict(data)
        values["table"] = Table(**data["table"])
        values["comparisons"] = [Comparison(**item) for item in data.get("comparisons", [])]
        result = cls(**values)
        result.validate()
        return result

    @classmethod
    def _from_version_0(cls, data: dict[str, Any]) -> BenchmarkResult:
        """A file written before this schema (``benchmarks/results/*.json`` of older runs): its
        benchmark, machine and settings (``settings`` or ``args``) read, the rest under extra."""
        machine = data.get("machine") if isinstance(data.get("machine"), dict) else {}
        settings = data.get("settings", data.get("args"))
        own = ("benchmark", "machine", "settings", "args")
        return cls(
            benchmark=str(data.get("benchmark", "unknown")),
            description="written before the shared result schema (version 0): numbers under extra",
            settings=settings if isinstance(settings, dict) else {},
            machine=machine,
            rows=[],
            table=Table([], []),
            extra={key: value for key, value in data.items() if key not in own},
            command=[],
            date=str(machine.get("date", "")),
            schema_version=0,
        )

    @classmethod
    def from_json(cls, text: str) -> BenchmarkResult:
        return cls.from_dict(json.loads(text))

    @classmethod
    def read(cls, path: Path) -> BenchmarkResult:
        return cls.from_json(Path(path).read_text())

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")

    def row(self, name: str) -> dict[str, Any]:
        """The row called ``name`` (KeyError if there is none)."""
        for row in self.rows:
            if row["name"] == name:
                return row
        raise KeyError(f"{self.benchmark}: no row {name!r}; rows: {[r['name'] for r in self.rows]}")

    def comparison(self, name: str) -> Comparison:
        for comparison in self.comparisons:
            if comparison.name == name:
                return comparison
        raise KeyError(f"{self.benchmark}: no comparison {name!r}")

    def text(self) -> list[str]:
        """What :func:`publish` prints: the table, the comparisons, the notes."""
        lines = self.table.text() if self.table.header else []
        if self.comparisons:
            lines += ["", *(comparison.describe() for comparison in self.comparisons)]
        return lines + (["", *self.notes] if self.notes else [])

    def markdown(self) -> list[str]:
        """The same as markdown: the table, the comparisons and notes as a list."""
        if not self.table.header:
            return [f"(no table: {self.description}; see the JSON)"]
        items = [comparison.describe(bold=True) for comparison in self.comparisons] + self.notes
        return self.table.markdown() + ([""] + [f"- {item}" for item in items] if items else [])


def settings_of(args: argparse.Namespace, **more: Any) -> dict[str, Any]:
    """A result's settings: the parsed arguments (paths as strings) and ``more``."""
    values = {key: str(v) if isinstance(v, Path) else v for key, v in vars(args).items()}
    return {**values, **more}


def publish(result: BenchmarkResult, path: Path | None) -> None:
    """The end of every benchmark: stamps the load average at the end into ``result.machine``,
    prints the result's table, comparisons and notes, and writes it to ``path`` (``--json``)."""
    result.machine["load_avg_1min_end"] = load_average()
    result.validate()
    print("\n" + "\n".join(result.text()))
    if path is not None:
        result.write(path)
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
    import torch

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


def run_settings(args: argparse.Namespace, dtype: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """A run's config as a dict (for ``align_gen.config.from_dict``) from the common flags: the
    seed, ``--model`` at ``dtype``, and the sampler (``--steps``, ``--eta``,
    ``--guidance-scale``, ``--batch-size``, ``--num-batches`` batches per epoch), each section
    of ``sections`` merged over it (``sample={"samples_per_prompt": 2}``, ``objective=...``)."""
    settings: dict[str, Any] = {
        "seed": args.seed,
        "model": {"pretrained": args.model, "dtype": dtype},
        "sample": {
            "num_steps": args.steps,
            "eta": args.eta,
            "guidance_scale": args.guidance_scale,
            "batch_size": args.batch_size,
            "num_batches_per_epoch": args.num_batches,
        },
    }
    for key, values in sections.items():
        settings[key] = {**settings.get(key, {}), **values}
    return settings


def build_like_train(config, device: str):
    """(accelerator, policy, objective, optimizer) built in the order ``align_gen.train.train``
    builds them: objective checked, policy, AdamW (or 8-bit), ``objective.setup``, then
    ``align_gen.train.prepare_model`` (accelerate, torch.compile when asked, steps per forward). The
    LoRA initialisation is seeded from ``config.seed``, so two builds start from the same weights."""
    import torch
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
