"""The evaluation suite: statistics with hand-derived numbers, prompt sets, the ``align-gen
evaluate`` outputs (one model, a model against itself, two different models), model folders
and checkpoints, and the training-run section of the report."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from align_gen.cli import main
from align_gen.errors import ConfigError
from align_gen.evaluation import mean_interval, paired_comparison, student_t_quantile, summarise
from align_gen.prompts import BUILTIN_DIR, hub_prompt_set, load_prompts, prompts_from_rows
from align_gen.report import (
    Figure,
    Heading,
    Paragraph,
    Table,
    render_html,
    render_markdown,
    training_run_blocks,
)

WORLD = "align-gen:world"
FAST = ["--steps", "3", "--guidance-scale", "3"]
WORLD_CLIP = ["--reward", "clip_score", "--reward-option", "clip_score.model=align-gen:world-clip"]
T2 = 4.302652729749464  # t(0.975, 2) = 0.95 * sqrt(2 / (4 * 0.975 * 0.025)), the closed form for df = 2

# Two models' scores, seed-major: seed 0 then seed 1 over prompts p0, p1, p2.
SCORES_A = torch.tensor([1.0, 2.0, 3.0, 3.0, 2.0, 5.0])
SCORES_B = torch.tensor([2.0, 2.0, 2.0, 3.0, 1.0, 5.0])


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here samples or builds on one intra-op thread (see conftest)."""


# --------------------------------------------------------------------------------------------
# statistics


def test_student_t_quantiles_match_closed_forms() -> None:
    """df = 1 is the Cauchy quantile tan(pi (p - 1/2)); df = 2 has t = (2p - 1) sqrt(2 / (4p(1-p)));
    huge df is the normal quantile; the distribution is symmetric."""
    assert student_t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    assert student_t_quantile(0.975, 2) == pytest.approx(T2, rel=1e-9)
    assert student_t_quantile(0.975, 4) == pytest.approx(2.776445105, rel=1e-8)  # printed t tables
    assert student_t_quantile(0.975, 1e9) == pytest.approx(statistics.NormalDist().inv_cdf(0.975))
    assert student_t_quantile(0.025, 5) == pytest.approx(-student_t_quantile(0.975, 5))


def test_summary_interval_is_over_prompts() -> None:
    """Prompt means over the 2 seeds: (1+3)/2 = 2, (2+2)/2 = 2, (3+5)/2 = 4; mean 8/3. Their sd:
    deviations -2/3, -2/3, 4/3, squares sum 24/9, / (3 - 1) = 4/3; se = sqrt(4/3) / sqrt(3) = 2/3;
    CI = 8/3 -+ t(0.975, 2) * 2/3. std of all six samples: squared deviations sum 84/9, / 5."""
    row = summarise({"r": SCORES_A}, num_prompts=3)["r"]
    assert row["mean"] == pytest.approx(8 / 3)
    assert row["se"] == pytest.approx(2 / 3)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((8 / 3 - T2 * 2 / 3, 8 / 3 + T2 * 2 / 3))
    assert row["std"] == pytest.approx(math.sqrt(84 / 45))
    assert (row["n"], row["n_prompts"], row["n_seeds"], row["df"], row["ci_unit"]) == (6, 3, 2, 2, "prompt")
    # no prompt count: the samples are the units (5 degrees of freedom); one prompt: its seeds
    iid = mean_interval(SCORES_A)
    assert iid["ci_unit"] == "sample" and iid["df"] == 5
    assert iid["se"] == pytest.approx(math.sqrt(84 / 45) / math.sqrt(6))
    assert mean_interval(SCORES_A, 1)["ci_unit"] == "seed"
    assert mean_interval(torch.tensor([1.0]), 1)["ci_low"] is None


def test_paired_comparison_by_hand() -> None:
    """B - A = [1, 0, -1 | 0, -1, 0]: mean -1/6; prompt means 1/2, -1/2, -1/2 (sd sqrt(1/3),
    se 1/3). Wins (1, tie 1/2, 0) = [1, .5, 0 | .5, 0, .5]: rate 5/12; prompt means 3/4, 1/4, 1/4
    (sd sqrt(1/12), se 1/6), interval 5/12 -+ t * 1/6 clipped to [0, 1]."""
    c = paired_comparison(SCORES_A, SCORES_B, num_prompts=3)
    assert c["mean_difference"] == pytest.approx(-1 / 6)
    assert c["difference_se"] == pytest.approx(1 / 3)
    assert (c["difference_ci_low"], c["difference_ci_high"]) == pytest.approx((-1 / 6 - T2 / 3, -1 / 6 + T2 / 3))
    assert c["win_rate"] == pytest.approx(5 / 12)
    assert c["win_rate_se"] == pytest.approx(1 / 6)
    assert (c["win_rate_ci_low"], c["win_rate_ci_high"]) == (0.0, 1.0)  # 5/12 -+ 0.717, clipped
    assert (c["wins"], c["ties"], c["losses"], c["n"]) == (1, 3, 2, 6)
    assert (c["mean_a"], c["mean_b"]) == pytest.approx((8 / 3, 15 / 6))
    with pytest.raises(ValueError, match="one shape"):
        paired_comparison(SCORES_A, SCORES_B[:3], 3)


def test_a_model_against_itself_is_all_ties() -> None:
    """Equal scores: every difference 0 and every pair a tie, so the intervals are [0, 0] and
    [1/2, 1/2]; a tolerance turns near-equal pairs into ties too."""
    c = paired_comparison(SCORES_A, SCORES_A.clone(), num_prompts=3)
    assert c["mean_difference"] == 0 and (c["difference_ci_low"], c["difference_ci_high"]) == (0, 0)
    assert c["win_rate"] == 0.5 and (c["win_rate_ci_low"], c["win_rate_ci_high"]) == (0.5, 0.5)
    assert (c["wins"], c["ties"], c["losses"]) == (0, 6, 0)
    nudged = paired_comparison(SCORES_A, SCORES_A + 1e-7, num_prompts=3, tie_tolerance=1e-6)
    assert nudged["ties"] == 6 and nudged["win_rate"] == 0.5


# --------------------------------------------------------------------------------------------
# prompt sets


@pytest.mark.parametrize("name", ["animals", "objects", "compositional"])
def test_builtin_prompt_lists(name: str) -> None:
    prompts = load_prompts(f"builtin:{name}")
    assert 30 <= len(prompts) <= 50 and len(set(prompts)) == len(prompts)
    assert (BUILTIN_DIR / f"{name}.txt").is_file()


def test_hub_prompt_sets_and_the_column_override() -> None:
    assert hub_prompt_set("hf:nateraw/parti-prompts") == ("nateraw/parti-prompts", "train", "Prompt")
    assert hub_prompt_set("hf:sayakpaul/drawbench") == ("sayakpaul/drawbench", "train", "Prompts")
    assert hub_prompt_set("hf:yuvalkirstain/pickapic_v2@validation_unique") == (
        "yuvalkirstain/pickapic_v2", "validation_unique", "caption")
    assert hub_prompt_set("hf:some/set@test#text") == ("some/set", "test", "text")
    assert hub_prompt_set("hf:nateraw/parti-prompts#Category") == ("nateraw/parti-prompts", "train", "Category")
    # Pick-a-Pic's training split stays the (prompt, preferred image) dataset SePPO reads
    assert hub_prompt_set("hf:yuvalkirstain/pickapic_v2") is None
    assert hub_prompt_set("builtin:animals") is None
    with pytest.raises(ConfigError, match="#<text column>"):
        hub_prompt_set("hf:some/set#")


def test_prompts_from_hub_rows() -> None:
    rows = [{"Prompt": " a cat ", "Category": "Animals"}, {"Prompt": ""}, {"Prompt": "a dog"}, {"Prompt": "a cow"}]
    assert prompts_from_rows(rows, "Prompt", "hf:x") == ["a cat", "a dog", "a cow"]
    assert prompts_from_rows(rows, "Prompt", "hf:x", max_prompts=2) == ["a cat", "a dog"]
    with pytest.raises(ConfigError, match=r"no column 'prompt'; the rows have \['Category', 'Prompt'\]"):
        prompts_from_rows(rows, "prompt", "hf:x")


def test_a_hub_prompt_set_offline_says_what_to_do() -> None:
    """Without the `datasets` package (or without a network) the error says how to get the
    prompts; it never returns an empty list."""
    with pytest.raises(ConfigError, match=r"align-gen\[data\]|cannot load the prompt set") as info:
        load_prompts("hf:nateraw/parti-prompts")
    assert ".txt file" in str(info.value)


# --------------------------------------------------------------------------------------------
# the command


def evaluate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    code = main(["evaluate", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


@pytest.fixture
def training_run(tmp_path: Path) -> Path:
    """A hand-written run folder: metrics.jsonl with monitors (one logged every other epoch, one
    not a number), evaluation.jsonl (2 seeds x 3 prompts, the scores above) and config.yaml."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"epoch": e, "reward_mean": 0.1 * e, "monitor/diversity": 1.0 - 0.1 * e, "monitor/kl_to_base": 0.01 * e,
         "monitor/note": "text", **({"monitor/heldout_reward": 0.5 + e} if e % 2 == 0 else {})}
        for e in range(4)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    evaluations = [{"epochs_done": 0, "reward_mean": 8 / 3, "n": 6, "scores": SCORES_A.tolist()},
                   {"epochs_done": 4, "reward_mean": 15 / 6, "n": 6, "scores": SCORES_B.tolist()}]
    (run / "evaluation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in evaluations))
    (run / "config.yaml").write_text("evaluation:\n  seeds: [1000, 1001]\n")
    return run


def test_training_run_section(training_run: Path, tmp_path: Path) -> None:
    """Every numeric monitor/* key becomes a column (missing epochs blank); the held-out curve
    has each row's prompt-level interval (P = 6 scores / 2 seeds = 3) and the paired change."""
    blocks = training_run_blocks(training_run, tmp_path)
    monitors, heldout = (b for b in blocks if isinstance(b, Table))
    assert monitors.header == ["epoch", "monitor/diversity", "monitor/kl_to_base", "monitor/heldout_reward"]
    assert monitors.rows[1] == ["1", "0.9", "0.01", ""]
    assert [row[0] for row in monitors.rows] == ["0", "1", "2", "3"]
    first, last = heldout.rows
    assert first[:3] == ["0", "2.667", f"[{8 / 3 - T2 * 2 / 3:.4g}, {8 / 3 + T2 * 2 / 3:.4g}]"]
    assert last[3:] == ["-0.1667", f"[{-1 / 6 - T2 / 3:.4g}, {-1 / 6 + T2 / 3:.4g}]"]
    assert (tmp_path / "training.png").is_file() and isinstance(blocks[-1], Figure)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "reward_mean": 1.0}) + "\n")
    assert any(isinstance(b, Paragraph) and "no `monitor/*` keys" in b.text for b in training_run_blocks(empty, tmp_path))


def test_report_rendering_escapes() -> None:
    blocks = [Heading("T", 1), Paragraph("a `x<y`"), Table(["a|b", "c"], [["<1>", "2"]]), Figure("f.png", "cap")]
    markdown = render_markdown(blocks)
    assert "| a\\|b | c |" in markdown and "![cap](f.png)" in markdown
    page = render_html(blocks, "title")
    assert "<code>x&lt;y</code>" in page and "<td>&lt;1&gt;</td>" in page and '<img src="f.png"' in page


def test_a_model_against_itself(capsys: pytest.CaptureFixture[str], tmp_path: Path, training_run: Path) -> None:
    """3 seeds x 4 prompts: the same seeds give the same images, so B - A is exactly 0 and every
    pair ties (win rate 1/2); every output file is written, the report includes the run."""
    out = tmp_path / "self"
    printed, _ = evaluate(
        capsys, WORLD, "--compare", WORLD, "--prompts", "builtin:world_heldout", "--num-prompts", "4",
        "--reward", "jpeg_compressibility", *WORLD_CLIP, *FAST, "--run", str(training_run), "--out", str(out),
    )
    names = ["summary.json", "scores.json", "scores.csv", "report.md", "report.html", "comparison.png", "training.png"]
    assert all((out / name).is_file() for name in names)
    assert [line for line in printed.splitlines() if line.startswith("wrote")] == [f"wrote {out / n}" for n in names]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1, 2] and summary["num_prompts"] == 4
    for name in ("jpeg_compressibility", "clip_score"):
        row, c = summary["rewards"][name], summary["comparison"][name]
        assert (row["n"], row["n_prompts"], row["n_seeds"]) == (12, 4, 3)
        assert row["ci_low"] < row["mean"] < row["ci_high"]
        assert summary["compare"]["rewards"][name]["mean"] == row["mean"]
        assert c["mean_difference"] == 0 and c["difference_ci_low"] <= 0 <= c["difference_ci_high"]
        assert c["win_rate"] == 0.5 and c["ties"] == 12
    records = json.loads((out / "scores.json").read_text())
    assert len(records) == 24 and {r["role"] for r in records} == {"A", "B"}
    assert {(r["seed"], r["prompt_index"]) for r in records} == {(s, p) for s in range(3) for p in range(4)}
    assert records[0]["prompt"] == load_prompts("builtin:world_heldout")[0]
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 24 and float(rows[5]["clip_score"]) == pytest.approx(records[5]["scores"]["clip_score"], abs=1e-5)
    report = (out / "report.md").read_text()
    for section in ("## Rewards", "## Paired comparison", "comparison.png", "## Statistics", "monitor/kl_to_base", "training.png"):
        assert section in report
    assert "<table>" in (out / "report.html").read_text()


def test_two_different_models(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The world model (32 px) against the tiny random SD model (64 px noise-like images): B's
    JPEGs are far larger, so B - A in compressibility (minus kB) is negative with an interval
    below 0, and B loses every pair."""
    out = tmp_path / "two"
    evaluate(
        capsys, "--model", WORLD, "--compare", "align-gen:tiny-random-sd", "--prompts", "builtin:shapes",
        "--num-prompts", "3", "--reward", "jpeg_compressibility", "--steps", "2", "--out", str(out),
    )
    c = json.loads((out / "summary.json").read_text())["comparison"]["jpeg_compressibility"]
    assert c["difference_ci_high"] < 0 and c["win_rate"] == 0 and c["losses"] == 9
    assert c["win_rate_ci_high"] < 0.5


def test_one_model_writes_a_sample_grid(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "one"
    printed, _ = evaluate(capsys, WORLD, "--prompts", "builtin:shapes", "--num-prompts", "2", "--seeds", "5",
                          "--reward-weights", "jpeg_compressibility=1", "jpeg_incompressibility=0.5",
                          "--grid-prompts", "1", *FAST, "--out", str(out))
    assert (out / "samples.png").is_file() and not (out / "comparison.png").exists()
    rewards = json.loads((out / "summary.json").read_text())["rewards"]
    assert set(rewards) == {"weighted", "weighted/jpeg_compressibility", "weighted/jpeg_incompressibility"}
    assert rewards["weighted"]["mean"] == pytest.approx(0.5 * rewards["weighted/jpeg_compressibility"]["mean"], abs=1e-4)
    lines = printed.splitlines()
    header = lines.index(f"A = {WORLD}") + 1
    assert "B - A" not in printed and "95% CI" in lines[header]


def test_a_checkpoint_and_a_run_folder_are_models(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A checkpoint folder is the run's model (config.yaml) with its trained weights, and a run's
    output folder is its final/ model: with the same perturbed LoRA weights both differ from the
    base model by the same amount."""
    from safetensors.torch import save_file

    from align_gen.config import load_config, save_config
    from align_gen.policies import build_policy

    run = tmp_path / "run"
    config = load_config(None, [f"model.pretrained={WORLD}", f"output_dir={run}"])
    policy = build_policy(config.model, config.sample, "cpu", trainable=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    checkpoint = run / "checkpoints" / "epoch_000001"
    checkpoint.mkdir(parents=True)
    save_file(policy.trainable_state_dict(), str(checkpoint / "trainable.safetensors"))
    save_config(config, run / "config.yaml")
    policy.save(run / "final")
    common = ["--prompts", "builtin:shapes", "--num-prompts", "2", "--seeds", "0", "1", "--reward", "jpeg_compressibility", *FAST]
    changes = []
    for model in (checkpoint, run):
        evaluate(capsys, WORLD, "--compare", str(model), *common, "--out", str(tmp_path / "ck.json"))
        changes.append(json.loads((tmp_path / "ck.json").read_text())["comparison"]["jpeg_compressibility"])
    assert changes[0]["ties"] < 4  # the weights changed the samples
    assert changes[1]["mean_difference"] == pytest.approx(changes[0]["mean_difference"], abs=2e-3)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--prompts", "builtin:shapes", "--reward", "jpeg_compressibility"], "give the model to evaluate"),
        ([WORLD, "--prompts", "builtin:shapes"], "give at least one --reward"),
        ([WORLD, "--prompts", "builtin:shapes", "--reward-weights", "jpeg_compressibility"], "NAME=WEIGHT"),
        ([WORLD, "--model", WORLD, "--prompts", "builtin:shapes", "--reward", "jpeg_compressibility"], "give the model once"),
        ([WORLD, "--prompts", "builtin:shapes", "--reward", "jpeg_compressibility", "--run", "/no/run"], "not a training output folder"),
        ([WORLD, "--prompts", "builtin:shapes", "--reward", "jpeg_compressibility", "--num-prompts", "-1"], "--num-prompts"),
        ([WORLD, "--prompts", "builtin:shapes", "--reward", "jpeg_compressibility", "--run", ".", "--out", "e.json"], "give --out a folder"),
    ],
)
def test_bad_evaluate_arguments(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("align-gen evaluate: error: ") and fragment in err
