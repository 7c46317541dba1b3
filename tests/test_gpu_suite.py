"""benchmarks/gpu_suite.py: the full-size GPU benchmarks as one command. Run here in --tiny mode
on the CPU (tiny built-in models, seconds per entry), as a user checks the wiring before renting
a GPU; the full-size commands are checked as text (--dry-run and the README)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def entry(name: str) -> gpu_suite.Entry:
    return next(e for e in gpu_suite.ENTRIES if e.name == name)


def test_tiny_suite_writes_every_json_and_a_summary_with_their_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two real entries on the CPU: their JSONs, logs and summary.md, which shows the headline
    numbers of each JSON (the DDPO speed-up over the anchor loop, the sampling ratio) and the
    machine, and is printed at the end."""
    status = gpu_suite.main(["--tiny", "--out", str(tmp_path), "--only", "ddpo_sd15_lora", "sampling_sd15"])
    assert status == 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary in capsys.readouterr().out
    for name in ("sampling_sd15", "ddpo_sd15_lora"):
        assert (tmp_path / f"{name}.log").read_text().startswith("$ ")
        assert f"`{name}`" in summary and "Status: **ok in" in summary
    ddpo = json.loads((tmp_path / "ddpo_sd15_lora.json").read_text())
    sampling = json.loads((tmp_path / "sampling_sd15.json").read_text())
    assert ddpo["settings"]["model"] == "align-gen:tiny-random-sd" and ddpo["settings"]["device"] == "cpu"
    assert f"**{gpu_suite.fmt(ddpo['ratio_ours_over_anchor'], '.3f')}**" in summary
    assert f"| align-gen | {gpu_suite.fmt(ddpo['align-gen']['median_seconds'])} |" in summary
    assert f"| {gpu_suite.fmt(sampling['images_per_s']['ours'])} | " in summary
    assert f" {gpu_suite.fmt(sampling['ratio_plain_over_ours'], '.3f')} |" in summary
    assert "cpu_cores=" in summary and "Entries not measured: 0 of 2." in summary
    # In priority order: sampling comes first in the table, whatever --only's order.
    assert summary.index("`sampling_sd15`") < summary.index("`ddpo_sd15_lora`")


def test_a_failing_entry_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    """An entry whose model does not exist fails (argparse refuses the random: name), one that
    runs past its limit is killed; the real entry after the failure still runs and is summarised."""
    sleeper = tmp_path / "sleeps.py"
    sleeper.write_text("import time\ntime.sleep(120)\n")
    broken = gpu_suite.Entry("broken", "sampling_overhead.py", ("--model", "random:sd16"), "no such model", 600)
    slow = gpu_suite.Entry("slow", str(sleeper), (), "runs past its limit", 2)
    out = tmp_path / "suite"
    status = gpu_suite.main(["--tiny", "--out", str(out)], entries=(broken, entry("vlm_qwen2vl"), slow))
    assert status == 1
    summary = (out / "summary.md").read_text()
    assert "Entries not measured: 2 of 3." in summary
    assert re.search(r"- `broken`: failed: exit status 2; last log line: .*random:sd16", summary)
    assert "- `slow`: timed out: killed after its limit of 2 s" in summary
    vlm = json.loads((out / "vlm_qwen2vl.json").read_text())
    assert f"| {gpu_suite.fmt(vlm['tokens_per_s']['ours'])} | " in summary
    assert not (out / "broken.json").exists()


def test_dry_run_lists_every_entry_at_full_size_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_suite.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = lines[1::2]
    assert [line.split()[1] for line in lines[::2]] == [e.name for e in gpu_suite.ENTRIES]
    for command, suite_entry in zip(commands, gpu_suite.ENTRIES, strict=True):
        assert f"benchmarks/{suite_entry.script}" in command and "--device cuda" in command
        assert re.search(r"--model random:(sd15|sd35m|qwen2vl-2b) ", command)
        assert command.endswith(f"--json out/gpu_suite/{suite_entry.name}.json")
    # --tiny swaps every model for a built-in tiny one, on the CPU.
    assert gpu_suite.main(["--dry-run", "--tiny"]) == 0
    tiny = capsys.readouterr().out
    assert "random:" not in tiny and "--device cuda" not in tiny and tiny.count("--device cpu") == 9


def test_budget_skips_the_entries_it_cannot_start(tmp_path: Path) -> None:
    assert gpu_suite.main(["--budget-s", "0", "--out", str(tmp_path), "--only", "switches_sd15"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "- `switches_sd15`: skipped: the budget of 0 s was spent" in summary
    assert "Machine: n/a" in summary


def test_the_readme_lists_the_suite_commands() -> None:
    """The README's GPU section shows each entry's command, as `python benchmarks/...`."""
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    text = " ".join(readme.replace("\\\n", " ").split())
    for suite_entry in gpu_suite.ENTRIES:
        command = gpu_suite.entry_command(
            suite_entry, device="cuda", json_path=Path(f"out/gpu_suite/{suite_entry.name}.json"),
            tiny=False, python="python",
        )
        command[1] = f"benchmarks/{suite_entry.script}"
        assert " ".join(command) in text, suite_entry.name
