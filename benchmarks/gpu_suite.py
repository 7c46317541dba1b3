"""The full-size GPU benchmarks in one command, most important first, with a markdown summary.

What is run: the commands of benchmarks/README.md's "GPU (full size)" section (:data:`ENTRIES`,
the one table of them; the README lists the same commands), one after the other in order of
priority, so that a short GPU lease gets the most important numbers first: sampling with
log-probs vs the plain diffusers pipeline, DDPO vs the anchor loop (samples/s, peak memory, MFU),
VLM sampling vs plain ``generate``, every objective's epoch and peak memory, every performance
switch, several steps per forward, REBEL's memory per number of steps, the full fine-tune, and
DDPO on the SD3.5-Medium transformer. Every model is a ``random:`` architecture of
``full_size.py`` (built on first use, no hub).

How: each entry is its own process (this interpreter, ``sys.executable``; a fresh process per
entry also gives every benchmark a clean GPU and clean peak-memory counters), with ``--device``
and ``--json <out>/<name>.json`` appended, its stdout and stderr in ``<out>/<name>.log``, and its
own time limit (the process group is killed when it runs past it). A failure or a timeout is
recorded and the suite goes on. ``--budget-s`` bounds the whole suite: an entry that would start
after the budget is spent is skipped (and said so), and a running entry's limit is cut to what
is left. The children get ``HF_HUB_OFFLINE=1`` unless it is set (none of them needs the hub).
At the end ``<out>/summary.md`` holds, per entry, its exact command line, its status and what its
JSON holds (every benchmark writes the one schema of ``harness.BenchmarkResult``): the table the
benchmark printed, its comparisons (named ratios) and notes, and the load average at its start
and end; above the entries, the machine the JSONs describe. It is printed too. The exit status is 1 if an entry failed or timed
out, 130 if interrupted (Ctrl-C kills the running entry; the summary is still written), else 0.
This script imports no torch (nor does ``harness``, until a function needs it): only the
children touch the device.

``--tiny`` runs the same commands with every full-size model swapped for the tiny built-in one
(``align-gen:tiny-random-sd``, ``align-gen:tiny-random-sd3``, ``align-gen:tiny-random-qwen2-vl``),
float32 on the CPU, batch 2, 2 steps, 1 repeat (:func:`tiny_arguments`): the whole suite in a
minute or two on a CPU, into ``out/gpu_suite_tiny`` by default. Its numbers measure nothing; it
checks the wiring (the tests use it, and a user can run it before renting a GPU).

    python benchmarks/gpu_suite.py                      # on the GPU machine: everything, out/gpu_suite/
    python benchmarks/gpu_suite.py --budget-s 840 --only sampling_sd15 ddpo_sd15_lora
    python benchmarks/gpu_suite.py --dry-run            # the commands, nothing run
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_suite.py --tiny --out /tmp/gpu_suite_tiny
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness import BenchmarkResult

BENCHMARKS = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Entry:
    """One benchmark command: ``python benchmarks/<script> <args> --device D --json OUT``."""

    name: str
    script: str  # a file in benchmarks/ (an absolute path also works)
    args: tuple[str, ...]
    title: str
    timeout_s: float  # at full size, on an H100-class GPU, building the random model included
    tiny_args: tuple[str, ...] = ()  # flags set (replaced or added) in --tiny mode only


SD15 = ("--model", "random:sd15", "--dtype", "bfloat16")
SD15_BF16 = (*SD15, "--mixed-precision", "bf16")
DDPO_SD15 = (*SD15_BF16, "--batch-size", "8", "--num-batches", "1", "--steps", "50", "--repeats", "2")

# The commands, in order of priority (the README's "GPU (full size)" section lists the same).
ENTRIES: tuple[Entry, ...] = (
    Entry(
        "sampling_sd15",
        "sampling_overhead.py",
        (*SD15, "--batch-size", "8", "--steps", "50"),
        "Sampling with log-probs vs the plain diffusers pipeline, SD1.5 at 512 px",
        900,
    ),
    Entry(
        "ddpo_sd15_lora",
        "ddpo_update.py",
        (*DDPO_SD15, "--lora", "--compare-anchor"),
        "DDPO update vs the anchor loop, SD1.5 at 512 px, LoRA, batch 8, 50 steps",
        1800,
    ),
    Entry(
        "vlm_qwen2vl",
        "vlm_sampling.py",
        ("--model", "random:qwen2vl-2b", "--dtype", "bfloat16", "--batch-size", "8", "--max-new-tokens", "64"),
        "VLM sampling with log-probs vs plain generate, Qwen2-VL-2B architecture",
        1200,
    ),
    Entry(
        "objective_update_sd15",
        "objective_update.py",
        (*SD15_BF16, "--batch-size", "8", "--num-batches", "1", "--steps", "50"),
        "Every objective's epoch (sampling, update samples/s, peak memory), SD1.5 at 512 px, LoRA",
        2700,  # seven objectives
    ),
    Entry(
        "switches_sd15",
        "switches.py",
        (*SD15_BF16, "--batch-size", "8", "--num-batches", "1", "--steps", "50", "--repeats", "3"),
        "Every performance switch and attention kernel against the defaults, SD1.5 at 512 px",
        3600,
        tiny_args=("--switches", "steps_per_forward", "sdpa_efficient", "--k", "2"),
    ),
    Entry(
        "ddpo_sd15_lora_k5",
        "ddpo_update.py",
        (*DDPO_SD15, "--lora", "--compare-anchor", "--steps-per-forward", "5"),
        "DDPO update vs the anchor loop with 5 denoising steps per forward, SD1.5, LoRA",
        1800,
    ),
    Entry(
        "ddpo_sd15_lora_k10",
        "ddpo_update.py",
        (*DDPO_SD15, "--lora", "--compare-anchor", "--steps-per-forward", "10"),
        "DDPO update vs the anchor loop with 10 denoising steps per forward, SD1.5, LoRA",
        1800,
    ),
    Entry(
        "rebel_memory_sd15",
        "rebel_memory.py",
        (*SD15, "--lora", "--batch-size", "2", "--steps", "5", "10", "20", "50"),
        "REBEL gradient memory vs the number of steps, SD1.5 at 512 px, LoRA",
        1800,
        tiny_args=("--steps", "1", "2"),
    ),
    Entry(
        "ddpo_sd15_full",
        "ddpo_update.py",
        (*DDPO_SD15, "--full", "--compare-anchor"),
        "DDPO update vs the anchor loop, SD1.5 at 512 px, full fine-tune",
        1800,
    ),
    Entry(
        "ddpo_sd35m_lora",
        "ddpo_update.py",
        ("--model", "random:sd35m", "--dtype", "bfloat16", "--mixed-precision", "bf16", "--lora",
         "--batch-size", "8", "--num-batches", "1", "--steps", "10", "--guidance-scale", "4.5",
         "--repeats", "2"),
        "DDPO update on the SD3.5-Medium transformer (flow SDE), 512 px, LoRA",
        1800,
    ),
)

# --tiny: the built-in tiny model of each full-size architecture, and the flag values that make
# every command take seconds on a CPU (a flag in TINY_ADDED is set even where the command omits it).
TINY_MODELS = {
    "random:sd15": "align-gen:tiny-random-sd",
    "random:sd35m": "align-gen:tiny-random-sd3",
    "random:qwen2vl-2b": "align-gen:tiny-random-qwen2-vl",
}
TINY_VALUES: dict[str, tuple[str, ...]] = {
    "--dtype": ("float32",),
    "--mixed-precision": ("no",),
    "--batch-size": ("2",),
    "--num-batches": ("1",),
    "--steps": ("2",),
    "--max-new-tokens": ("4",),
    "--steps-per-forward": ("2",),
    "--repeats": ("1",),
}
TINY_ADDED = ("--dtype", "--repeats")
TINY_TIMEOUT_S = 300.0


@dataclasses.dataclass
class Outcome:
    """What became of one entry."""

    entry: Entry
    command: list[str]
    json_path: Path
    log_path: Path
    status: str = "skipped"  # ok | failed | timed out | skipped | interrupted
    detail: str = ""
    seconds: float = 0.0


def parse_args(argv: Sequence[str] | None, entries: Sequence[Entry]) -> argparse.Namespace:
    names = [entry.name for entry in entries]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="JSONs, logs, summary.md (default out/gpu_suite; out/gpu_suite_tiny with --tiny)"
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"run these entries only: {', '.join(names)}")
    parser.add_argument("--device", default=None, help="passed to every command (default: cuda; cpu with --tiny)")
    parser.add_argument("--budget-s", type=float, default=None, help="total wall-clock budget of the suite")
    parser.add_argument("--tiny", action="store_true", help="tiny built-in models, float32, seconds each (CPU check)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"--only: unknown entries {unknown}; the entries are {names}")
    if args.device is None:
        args.device = "cpu" if args.tiny else "cuda"
    if args.out is None:  # a wiring check must not overwrite real results
        args.out = Path("out/gpu_suite_tiny" if args.tiny else "out/gpu_suite")
    return args


def flag_groups(args: Sequence[str]) -> dict[str, list[str]]:
    """``--flag value ...`` -> {"--flag": [values]} in order (every entry argument is a flag
    followed by its values)."""
    groups: dict[str, list[str]] = {}
    for token in args:
        if token.startswith("--"):
            groups[token] = []
        elif groups:
            groups[next(reversed(groups))].append(token)
        else:
            raise ValueError(f"entry arguments must start with a --flag, got {token!r}")
    return groups


def tiny_arguments(entry: Entry) -> list[str]:
    """The entry's arguments at tiny scale: models swapped, TINY_VALUES, then its own tiny_args."""
    groups = flag_groups(entry.args)
    for flag, values in TINY_VALUES.items():
        if flag in groups or flag in TINY_ADDED:
            groups[flag] = list(values)
    if "--model" in groups:
        groups["--model"] = [TINY_MODELS.get(name, name) for name in groups["--model"]]
    groups.update(flag_groups(entry.tiny_args))
    return [token for flag, values in groups.items() for token in (flag, *values)]


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it (shorter commands)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def entry_command(entry: Entry, *, device: str, json_path: Path, tiny: bool, python: str) -> list[str]:
    """The entry's full command line: interpreter, script, arguments, device and JSON path."""
    arguments = tiny_arguments(entry) if tiny else list(entry.args)
    script = display_path(BENCHMARKS / entry.script)
    return [python, script, *arguments, "--device", device, "--json", str(json_path)]


def child_environment(tiny: bool) -> dict[str, str]:
    """This process's environment, offline; one OpenMP thread per process in --tiny mode (the
    tiny models gain nothing from more, and a shared CPU slows down a lot with them)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    if tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_command(command: list[str], log_path: Path, timeout_s: float, env: dict[str, str]) -> tuple[str, str]:
    """Runs ``command`` with its output in ``log_path``; (status, detail). The process gets its
    own group, killed whole on a timeout or an interrupt (torch.compile starts worker processes)."""
    with log_path.open("w") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as stop:
            with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if isinstance(stop, KeyboardInterrupt):
                raise
            return "timed out", f"killed after its limit of {timeout_s:.0f} s"
    return ("ok", "") if code == 0 else ("failed", f"exit status {code}")


def last_log_line(path: Path) -> str:
    """The last non-empty line of a log (where a traceback names its error), at most 300 chars."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def time_limit(entry: Entry, tiny: bool) -> float:
    """The entry's own limit, at most TINY_TIMEOUT_S in --tiny mode."""
    return min(entry.timeout_s, TINY_TIMEOUT_S) if tiny else entry.timeout_s


def run_suite(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    """Runs the outcomes' commands in order, filling in their status; honours the budget."""
    env = child_environment(args.tiny)
    start = time.monotonic()
    for index, outcome in enumerate(outcomes, 1):
        elapsed = time.monotonic() - start
        budget_left = math.inf if args.budget_s is None else args.budget_s - elapsed
        if budget_left <= 0:
            outcome.detail = f"the budget of {args.budget_s:.0f} s was spent after {elapsed:.0f} s"
            print(f"[{index}/{len(outcomes)}] {outcome.entry.name}: skipped ({outcome.detail})", flush=True)
            continue
        limit = min(time_limit(outcome.entry, args.tiny), budget_left)
        print(f"[{index}/{len(outcomes)}] {outcome.entry.name}: running (limit {limit:.0f} s, log {outcome.log_path})",
              flush=True)
        outcome.json_path.unlink(missing_ok=True)  # a stale JSON must not pass for this run's
        began = time.monotonic()
        try:
            outcome.status, outcome.detail = run_command(outcome.command, outcome.log_path, limit, env)
        except KeyboardInterrupt:
            outcome.status, outcome.detail = "interrupted", "stopped by the user"
            for later in outcomes[index:]:
                later.detail = "the suite was interrupted"
            return
        finally:
            outcome.seconds = time.monotonic() - began
        if outcome.status == "failed":
            outcome.detail += f"; last log line: {last_log_line(outcome.log_path)}"
        if outcome.status == "timed out" and limit == budget_left:
            outcome.detail += " (what was left of the budget)"
        detail = f": {outcome.detail}" if outcome.detail else ""
        print(f"    {outcome.status} in {outcome.seconds:.0f} s{detail}", flush=True)


# --- summary ---------------------------------------------------------------------------------


def read_result(path: Path) -> tuple[BenchmarkResult | None, str]:
    """(the entry's result, "") or (None, why it could not be read: "" if no JSON was written)."""
    try:
        text = path.read_text()
    except OSError:
        return None, ""
    try:
        return BenchmarkResult.from_json(text), ""
    except Exception as error:  # a malformed JSON must not lose the other entries' summaries
        return None, f"{type(error).__name__}: {error}"


def entry_section(index: int, outcome: Outcome, result: BenchmarkResult | None, error: str = "") -> list[str]:
    """One entry: heading, command, status, and its result (table, comparisons, notes, load)."""
    entry = outcome.entry
    status = outcome.status + (f" in {outcome.seconds:.0f} s" if outcome.status != "skipped" else "")
    files = "" if outcome.status == "skipped" else (
        f" Log: `{outcome.log_path}`; JSON: `{outcome.json_path}`{'' if result or error else ' (not written)'}."
    )
    lines = [f"## {index}. `{entry.name}`: {entry.title}", "", f"```\n{shlex.join(outcome.command)}\n```", "",
             f"Status: **{status}**{': ' + outcome.detail if outcome.detail else ''}.{files}", ""]
    if error:
        return lines + [f"(could not read the result: {error})", ""]
    if result is None:
        return lines
    machine = result.machine
    load = (f"Load average (1 min): {machine.get('load_avg_1min', 'n/a')} at the start, "
            f"{machine.get('load_avg_1min_end', 'n/a')} at the end.")
    return lines + result.markdown() + ["", load, ""]


def machine_line(results: list[BenchmarkResult | None]) -> str:
    machine = next((r.machine for r in results if r is not None and r.machine), None)
    if machine is None:
        return "Machine: n/a (no benchmark wrote its JSON)."
    keys = [k for k in machine if not k.startswith("load_avg")]
    return "Machine: " + ", ".join(f"{k}={machine[k]}" for k in keys) + "."


def summary_markdown(
    outcomes: list[Outcome], args: argparse.Namespace, argv: list[str], started: str, seconds: float
) -> str:
    """The whole summary.md: the suite's command and machine, what was not measured, each entry."""
    read = [read_result(o.json_path) if o.status != "skipped" else (None, "") for o in outcomes]
    results = [result for result, _ in read]
    mode = " (--tiny: tiny models; these numbers check the wiring and measure nothing)" if args.tiny else ""
    lines = [f"# GPU benchmark suite{mode}", "",
             f"Started {started}, {seconds:.0f} s in all; device {args.device}; "
             f"command `{shlex.join([sys.executable, display_path(Path(__file__)), *argv])}`.", "",
             machine_line(results), ""]
    problems = [o for o in outcomes if o.status != "ok"]
    lines += [f"Entries not measured: {len(problems)} of {len(outcomes)}."]
    lines += [f"- `{o.entry.name}`: {o.status}{': ' + o.detail if o.detail else ''}" for o in problems]
    lines.append("")
    for index, (outcome, (result, error)) in enumerate(zip(outcomes, read, strict=True), 1):
        lines += entry_section(index, outcome, result, error)
    return "\n".join(lines)


def plan(args: argparse.Namespace, entries: Sequence[Entry]) -> list[Outcome]:
    """The chosen entries (table order) with their commands, JSON and log paths; nothing run."""
    outcomes = []
    for entry in entries:
        if args.only is None or entry.name in args.only:
            json_path = args.out / f"{entry.name}.json"
            command = entry_command(entry, device=args.device, json_path=json_path, tiny=args.tiny, python=sys.executable)
            outcomes.append(Outcome(entry, command, json_path, args.out / f"{entry.name}.log"))
    return outcomes


def print_plan(outcomes: list[Outcome], tiny: bool) -> None:
    for index, outcome in enumerate(outcomes, 1):
        limit = time_limit(outcome.entry, tiny)
        print(f"{index}. {outcome.entry.name} (limit {limit:.0f} s)\n    {shlex.join(outcome.command)}")


def main(argv: Sequence[str] | None = None, entries: Sequence[Entry] = ENTRIES) -> int:
    """Runs the suite (``entries``: the table; tests pass their own); returns the exit status:
    1 if an entry failed or timed out, 130 if interrupted, else 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, entries)
    outcomes = plan(args, entries)
    if args.dry_run:
        print_plan(outcomes, args.tiny)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    started, start = datetime.datetime.now().isoformat(timespec="seconds"), time.monotonic()
    run_suite(outcomes, args)
    summary = summary_markdown(outcomes, args, argv, started, time.monotonic() - start)
    (args.out / "summary.md").write_text(summary + "\n")
    print(f"\n{summary}\nwrote {args.out / 'summary.md'}")
    if any(o.status == "interrupted" for o in outcomes):
        return 130
    return 1 if any(o.status in ("failed", "timed out") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
