"""benchmarks/gpu_suite.py: the full-size GPU benchmarks as one command. Run here in --tiny mode
on the CPU (tiny built-in models, seconds per entry), as a user checks the wiring before renting
a GPU; the full-size commands are checked as text (--dry-run and the README). Every benchmark
writes the one result schema of benchmarks/harness.py (BenchmarkResult), which the suite renders
without knowing the script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402
import harness  # noqa: E402
from harness import BenchmarkResult  # noqa: E402


def entry(name: str) -> gpu_suite.Entry:
    return next(e for e in gpu_suite.ENTRIES if e.name == name)


def test_tiny_suite_writes_every_json_and_a_summary_with_their_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two real entries on the CPU: their results (the shared schema), logs and summary.md, which
    shows each result's table and comparisons (the DDPO speed-up over the anchor loop, the
    sampling ratio) and the machine, and is printed at the end."""
    status = gpu_suite.main(["--tiny", "--out", str(tmp_path), "--only", "ddpo_sd15_lora", "sampling_sd15"])
    assert status == 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary in capsys.readouterr().out
    for name in ("sampling_sd15", "ddpo_sd15_lora"):
        assert (tmp_path / f"{name}.log").read_text().startswith("$ ")
        assert f"`{name}`" in summary and "Status: **ok in" in summary
    ddpo = BenchmarkResult.read(tmp_path / "ddpo_sd15_lora.json")
    sampling = BenchmarkResult.read(tmp_path / "sampling_sd15.json")
    assert ddpo.benchmark == "ddpo_update" and sampling.benchmark == "sampling_overhead"
    assert ddpo.settings["model"] == "align-gen:tiny-random-sd" and ddpo.settings["device"] == "cpu"
    assert ddpo.command[:2] == ["python", "benchmarks/ddpo_update.py"] and "--compare-anchor" in ddpo.command
    ours, anchor = ddpo.row("align-gen"), ddpo.row("anchor (batched CFG)")
    assert len(ours["wall_s"]) == 1 and ours["median_cpu_s"] > 0 and anchor["samples_per_s"] > 0
    speedup = ddpo.comparison("align-gen / anchor (batched CFG) samples/s")
    assert speedup.value == pytest.approx(ours["samples_per_s"] / anchor["samples_per_s"])
    assert f"samples/s: **{harness.cell(speedup.value, '.3f')}**" in summary
    assert f"| align-gen | {harness.cell(ours['median_wall_s'])} |" in summary
    assert sampling.row("plain diffusers")["images_per_s"] > 0
    assert "\n".join(sampling.markdown()) in summary and "\n".join(ddpo.markdown()) in summary
    assert "load_avg_1min_end" in ddpo.machine and "at the end." in summary
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
    vlm = BenchmarkResult.read(out / "vlm_qwen2vl.json")
    assert "\n".join(vlm.table.markdown()) in summary
    assert f"| align-gen | {harness.cell(vlm.row('align-gen')['median_wall_s'])} |" in summary
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
    assert "random:" not in tiny and "--device cuda" not in tiny and tiny.count("--device cpu") == len(gpu_suite.ENTRIES)


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


def run_in_process(module: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``python benchmarks/<module>.py <argv>``, in this process (no interpreter start-up)."""
    script = __import__(module)
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{module}.py", *argv])
    script.main()


def fake_training_runs(out: Path) -> None:
    """What reward_vs_time.py and world_alignment.py --reuse read: a finished run's metrics.jsonl
    (and evaluation.jsonl) per method, without training."""
    for method, rewards, cpu_seconds in (("ddpo", [0.1, 0.3, 0.2], 2.0), ("rebel", [0.1, 0.2, 0.25], 1.0)):
        (out / method).mkdir(parents=True)
        rows = [{"epoch": e, "epochs_done": e, "reward_mean": r, "samples": 8, "time_sampling_s": 1.0,
                 "time_update_s": 2.0, "time_cpu_s": cpu_seconds} for e, r in enumerate(rewards)]
        (out / method / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        scores = [{"epochs_done": e, "reward_mean": r, "scores": [r, r + 0.1, r - 0.05]} for e, r in enumerate(rewards)]
        (out / method / "evaluation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in scores))


def fake_hacking_runs(out: Path) -> None:
    """What world_hacking.py --reuse reads: two finished runs (beta 0.0001 and 1) whose held-out
    proxy rises while the gold reward falls (beta 0.0001) or rises (beta 1)."""
    for beta, gold in (("0.0001", [0.5, 0.25]), ("1", [0.5, 0.75])):
        folder = out / f"beta_{beta}"
        folder.mkdir(parents=True)
        metrics = [{"epoch": e, "reward_mean": 0.0, "monitor/kl_to_base": 0.1 * e} for e in range(3)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
        rows = [{"epochs_done": e, "reward_mean": 0.1 * e, "scores": [0.1 * e, 0.1 * e + 0.2],
                 "world_geneval_mean": g, "world_geneval_scores": [g, g]} for e, g in zip((0, 2), gold, strict=True)]
        (folder / "evaluation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


# The benchmarks the tiny suite tests above do not run (sampling_overhead, ddpo_update and
# vlm_sampling are), at tiny size: (script, arguments, a row it must have).
TINY_RUNS = [
    ("objective_update", ["--objectives", "ddpo", "--batch-size", "2", "--num-batches", "1", "--steps", "2",
                          "--repeats", "1"], "ddpo"),
    ("switches", ["--switches", "steps_per_forward", "sdpa_efficient", "--k", "2", "--batch-size", "2",
                  "--num-batches", "1", "--steps", "2", "--repeats", "1"], "steps_per_forward"),
    ("rebel_memory", ["--batch-size", "2", "--steps", "1", "2"], "2 steps"),
    ("sde_window", ["--steps", "2", "--window", "1", "--batch-size", "2", "--num-batches", "1", "--repeats", "1",
                    "--prompts", "builtin:shapes"], "window"),
    ("reward_vs_time", ["--methods", "ddpo", "rebel", "--reuse"], "rebel"),
    ("world_alignment", ["--methods", "ddpo", "rebel", "--reuse"], "rebel"),
    ("world_hacking", ["--betas", "0.0001", "1", "--reuse"], "beta_1"),
    ("world_checker", ["--scenes", "4", "--blur", "1", "--noise", "--generated", "2", "--seeds", "0"],
     "heldout blur 1 noise 0"),
    ("world_relations", ["--captions", "2", "--seeds", "0", "--batch-size", "2"], "align-gen:world"),
    ("world_supervised", ["--steps", "2", "--batch-size", "2", "--num-prompts", "1", "--seeds", "0",
                          "--eval-batch-size", "2", "--sample-steps", "2"], "overall"),
]


@pytest.mark.parametrize(("module", "argv", "row"), TINY_RUNS, ids=[run[0] for run in TINY_RUNS])
def test_every_benchmark_writes_the_shared_schema_and_the_suite_renders_it(
    module: str, argv: list[str], row: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], single_thread: None,
) -> None:
    """Each script's tiny run (the training benchmarks re-read fake finished runs) writes a
    BenchmarkResult that round-trips through its JSON, prints its table, and renders in the
    suite's summary with no code of its own there."""
    out = tmp_path / "result.json"
    argv = [*argv, "--json", str(out)]
    if module == "world_supervised":
        argv += ["--out", str(tmp_path / "tuned")]
    if module in ("reward_vs_time", "world_alignment", "world_hacking"):
        (fake_hacking_runs if module == "world_hacking" else fake_training_runs)(tmp_path / "runs")
        argv += ["--output-dir", str(tmp_path / "runs"), "--plot", str(tmp_path / "plot.png")]
    else:
        argv += ["--device", "cpu"]
    run_in_process(module, argv, monkeypatch)
    text = out.read_text()
    result = BenchmarkResult.from_json(text)
    assert result.to_json() + "\n" == text and result.schema_version == harness.SCHEMA_VERSION
    assert result.benchmark == module and result.description
    assert result.command == ["python", f"benchmarks/{module}.py", *argv]
    assert {"cpu", "load_avg_1min", "load_avg_1min_end"} <= set(result.machine)
    assert result.settings["json"] == str(out) and result.date
    assert result.row(row)["name"] == row and len(result.table.rows) >= len(result.rows)
    assert "\n".join(result.table.text()) in capsys.readouterr().out
    outcome = gpu_suite.Outcome(gpu_suite.Entry(module, f"{module}.py", (), "a tiny run", 60), ["python"], out,
                                tmp_path / "log", status="ok")
    section = "\n".join(gpu_suite.entry_section(1, outcome, *gpu_suite.read_result(out)))
    assert "\n".join(result.table.markdown()) in section
    assert all(comparison.describe(bold=True) in section for comparison in result.comparisons)
    if module == "world_supervised":  # the tuned model is a pipeline folder the benchmark loaded back
        assert (tmp_path / "tuned" / "model_index.json").is_file() and result.extra["loss_first"] > 0
        with pytest.raises(SystemExit, match="already holds files"):  # a second run refuses to overwrite it
            run_in_process(module, argv, monkeypatch)
    if module == "switches":  # a switch the CPU cannot run is reported, not measured
        assert "sdpa_efficient" in result.extra["unavailable"] and "| sdpa_efficient | n/a on this device |" in section
    if module == "reward_vs_time":
        assert result.extra["target"] == 0.25 and len(result.extra["curves"]["rebel"]) == 3
        assert result.comparison("rebel / ddpo seconds to target").value == pytest.approx(7 / 4)
    if module == "world_hacking":  # the paired changes of the fake runs, by hand
        low, high = result.row("beta_0.0001"), result.row("beta_1")
        assert low["gold_change"] == pytest.approx(-0.25) and high["gold_change"] == pytest.approx(0.25)
        assert low["proxy_change"] == pytest.approx(0.2) and low["kl_last"] == pytest.approx(0.2)
        assert (tmp_path / "plot.png").is_file() and (tmp_path / "plot_kl.png").is_file()
    if module == "world_alignment":  # the race to DDPO's final held-out reward, 0.2: 3 s per epoch
        race = {entry["name"]: entry for entry in result.extra["race"]}
        assert race["ddpo"]["seconds_to_target"] == pytest.approx(1.5)  # 0.1 at 0 s, 0.3 at 3 s
        assert race["rebel"]["seconds_to_target"] == pytest.approx(3.0) and race["rebel"]["ratio_to_reference"] == pytest.approx(2.0)
        cpu_race = {entry["name"]: entry for entry in result.extra["race_cpu"]}  # 2 and 1 CPU s per epoch
        assert cpu_race["ddpo"]["seconds_to_target"] == pytest.approx(1.0)
        assert cpu_race["rebel"]["seconds_to_target"] == pytest.approx(1.0) and cpu_race["rebel"]["ratio_to_reference"] == pytest.approx(1.0)


def test_world_relations_reads_the_drawn_relation_against_the_asked_one() -> None:
    """A rendered "red circle left of a blue square" read against that caption, its mirror
    ("right of"), the other axis ("above") and a caption whose colours it lacks."""
    import numpy as np
    import world_relations

    from align_gen.world.shapes import render, scene_for_caption, to_tensor

    caption = "a red circle left of a blue square"
    image = to_tensor(render(scene_for_caption(np.random.default_rng(0), caption)))
    assert world_relations.drawn_outcome(caption, image) == "right"
    assert world_relations.drawn_outcome("a red circle right of a blue square", image) == "opposite"
    assert world_relations.drawn_outcome("a red circle above a blue square", image) == "across"
    assert world_relations.drawn_outcome("a green circle left of a blue square", image) is None
    assert world_relations.variant_caption(caption, "mirrored") == "a red circle right of a blue square"
    assert world_relations.variant_caption(caption, "turned") == "a red circle above a blue square"
    assert world_relations.variant_caption("a red circle left of an orange square", "colours swapped") == (
        "an orange circle left of a red square")
    assert world_relations.variant_caption(caption, "kinds swapped") == "a red square left of a blue circle"


def test_the_schema_refuses_what_it_cannot_render_and_reads_older_results(tmp_path: Path) -> None:
    """Rows are flat; an unknown schema version or field is refused; the suite reports a bad JSON
    and goes on; the result files written before the schema (benchmarks/results/) still read."""
    table = harness.Table.of(["", "s"], [["a", 1.5]])
    good = BenchmarkResult("demo", "a demo", {}, {}, [{"name": "a", "median_wall_s": 1.5}], table)
    assert BenchmarkResult.from_json(good.to_json()) == good and table.rows == [["a", "1.5"]]
    with pytest.raises(ValueError, match="lists of them"):
        BenchmarkResult("demo", "a demo", {}, {}, [{"name": "a", "nested": {"x": 1}}], table).to_json()
    with pytest.raises(ValueError, match="needs 2 formatted cells"):
        harness.Table.of(["", "s"], [["a"]])
    for change in ({"schema_version": 99}, {"surprise": 1}):
        with pytest.raises(ValueError):
            BenchmarkResult.from_dict({**good.to_dict(), **change})
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 99}')
    assert gpu_suite.read_result(bad)[1].startswith("ValueError: result schema version 99")
    published = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    versions = set()
    for path in published:
        result = BenchmarkResult.read(path)
        versions.add(result.schema_version)
        assert result.benchmark in path.name and result.machine["cpu"] and result.extra and result.settings
    assert 0 in versions and versions <= {0, harness.SCHEMA_VERSION}  # the older files among them still read


def test_reading_results_imports_no_torch() -> None:
    """The suite process only reads results; the children touch the device."""
    code = "import sys; sys.path.insert(0, 'benchmarks'); import gpu_suite; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
