"""The front door, as a new user meets it (issue 18): ``--help`` of every command (a real
description, every option explained with its default, the shipped configs listed), ``sample``
with ``--num-prompts`` and a progress bar, complete grid captions, comparison reports that name
both models in every line that holds a difference, and plots whose axes say what they show."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFont

from align_gen import cli
from align_gen.cli import main
from align_gen.evaluation import ScoredSamples
from align_gen.report import (
    EvaluatedModel,
    Figure,
    Paragraph,
    build_summary,
    render_markdown,
    summary_blocks,
    summary_table,
    training_figure,
    training_run_blocks,
)
from align_gen.tracking import EPOCH_AXIS, learning_curve_figure, plot_learning_curve
from pipelines.grid import LINE_H, MIN_CELL, render_grid, sample_grid, wrap_caption

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL = "align-gen:tiny-random-sd"


def help_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The text ``align-gen ARGV --help`` prints (argparse exits 0 after printing it)."""
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def flat(text: str) -> str:
    """``text`` with every run of whitespace one space (argparse wraps help to the terminal)."""
    return " ".join(text.split())


def subparsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) of every command and sub-command under ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from subparsers(sub, (*prefix, name))


# --------------------------------------------------------------------------------------------
# --help


def test_top_level_help_is_one_plain_sentence_and_names_the_first_commands(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(capsys)
    assert "``" not in text  # no reStructuredText markup
    assert flat(cli.DESCRIPTION) in flat(text)  # the whole sentence, not its first line
    assert cli.DESCRIPTION.endswith(".") and cli.DESCRIPTION.count(". ") == 0
    assert "make demo" in text and "make test" in text
    assert "align-gen train configs/tiny/awm_world_preference.yaml" in text
    assert "align-gen train --help" in text


def test_every_option_of_every_command_says_what_it_does_and_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    """Every argument of every command (train, sample, evaluate, make-pairs, train-reward, world
    build) has help text, and every one with a default shows it in that command's --help."""
    commands = dict(subparsers(cli._build_parser()))
    assert {("train",), ("sample",), ("evaluate",), ("make-pairs",), ("train-reward",), ("world", "build")} <= set(commands)
    for words, parser in commands.items():
        text = flat(help_of(capsys, *words))
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help and action.help.strip(), f"align-gen {' '.join(words)} {name}: no help text"
            shown = flat(action.help)
            assert shown[:40] in text, f"{name}'s help missing from align-gen {' '.join(words)} --help"
            if action.default not in (None, False, []) and action.default is not argparse.SUPPRESS:
                assert "default" in parser._get_formatter()._get_help_string(action), f"{' '.join(words)} {name}"
    sample = flat(help_of(capsys, "sample")).split(" options: ", 1)[1]
    for option, default in (("--guidance-scale", "5.0"), ("--dtype", "float32"), ("--steps", "50"), ("--seeds", "0"),
                            ("--num-prompts", "0"), ("--out", "grid.png")):
        assert re.search(rf"{option} \S+ (?:(?! --).)*?\(default: {re.escape(default)}\)", sample), option
    evaluate = flat(help_of(capsys, "evaluate"))
    assert "--batch-size BATCH_SIZE prompts sampled together (default: 8)" in evaluate
    assert "(default: 0 1 2)" in evaluate  # evaluate's own seeds


def test_train_help_lists_every_shipped_config_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(capsys, "train")
    files = sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "tiny").glob("*.yaml"))
    assert len(files) > 20
    lines = text.splitlines()
    for path in files:
        (line,) = [line for line in lines if line.split()[:1] == [path.name]]
        description = line.split(None, 1)[1]
        assert description.endswith(".") and len(description) > 20, line
        assert description == cli._config_summary(path)
    assert "configs/tiny/ (offline, CPU" in text and "configs/ (a GPU" in text
    assert text.index("configs/tiny/ (") < text.index("configs/ (a GPU")  # the offline ones first


def test_config_summary_is_the_first_sentence_of_the_header(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("# DDPO on a model, rewarding X. Offline, CPU:\n#   align-gen train c.yaml\nseed: 0\n")
    assert cli._config_summary(config) == "DDPO on a model, rewarding X."
    config.write_text("# REBEL on a model (a remark that makes the sentence far too long to read on one line, "
                      "since it goes on and on) rewarding\n# the CLIP score\n#\n# more\n")
    assert cli._config_summary(config) == "REBEL on a model rewarding the CLIP score."
    config.write_text("seed: 0\n")
    assert cli._config_summary(config) == "(no header comment)"


def test_train_help_without_the_configs_folder_says_where_configs_live(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed without the repository there is no configs/ next to the package: the help
    says so instead of crashing."""
    stray = tmp_path / "site-packages" / "configs"  # another package's configs/, not the repository's
    (stray / "tiny").mkdir(parents=True)
    (stray / "tiny" / "other.yaml").write_text("# Someone else's config.\n")
    monkeypatch.setattr(cli, "CONFIGS_DIR", stray)
    text = flat(help_of(capsys, "train"))
    assert f"no configs folder at {stray}" in text and "other.yaml" not in text
    assert "configs/ folder of the align-gen source repository" in text
    (stray.parent / "pyproject.toml").write_text("")  # a checkout: its configs are listed
    assert "other.yaml Someone else's config." in flat(help_of(capsys, "train"))


def test_train_reward_help_defaults_are_the_configs_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """train-reward's options default to None (the handler tells given from not given), so their
    help names the default by hand: it must match the config classes."""
    from align_gen.world.preference import PreferenceTrainConfig
    from reward_models.preference_training import HeadTrainConfig

    text = flat(help_of(capsys, "train-reward")).split(" options: ", 1)[1]
    head, world = HeadTrainConfig(), PreferenceTrainConfig()
    expected = {"--steps": head.steps, "--lr": head.learning_rate, "--batch-size": head.batch_size,
                "--seed": head.seed, "--features": head.features, "--hidden-size": head.hidden_size,
                "--train-pairs": world.train_pairs, "--heldout-pairs": world.heldout_pairs, "--margin": world.margin}
    assert head.seed == world.seed
    for option, value in expected.items():
        match = re.search(rf"{option} \S+ (?:(?! --).)*?\(default: ([^)]+)\)", text)
        assert match, option
        shown = match.group(1)
        assert (shown == value) if isinstance(value, str) else float(shown) == value, (option, shown, value)


def test_world_build_help_names_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    from align_gen.world.build import STAGES

    assert cli.WORLD_STAGES == STAGES
    assert " ".join(STAGES) in flat(help_of(capsys, "world", "build"))


# --------------------------------------------------------------------------------------------
# sample: --num-prompts, a progress bar, words before slow steps


class CountingPolicy:
    """A policy whose samples are its generator's noise (3 x 8 x 8 per prompt)."""

    def __init__(self):
        self.calls: list[int] = []

    def sample(self, prompts, generator):
        self.calls.append(len(prompts))
        images = torch.rand(len(prompts), 3, 8, 8, generator=generator)
        return _Rollout(images)


class _Rollout:
    def __init__(self, images):
        self.images, self.texts = images, None

    def check_finite(self):
        return self


def test_sample_grid_default_is_one_batch_per_seed_as_before(capsys: pytest.CaptureFixture[str]) -> None:
    """The default call samples all prompts of a seed in one batch, from a generator seeded with
    that seed (what the training grids have always drawn): the same image as that loop; a
    batch size samples the prompts batch after batch from the seed's generator."""
    prompts, seeds = ["a", "b", "c"], [3, 7]
    policy = CountingPolicy()
    grid = sample_grid(policy, prompts, seeds)
    assert policy.calls == [3, 3]
    columns = [torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    old = render_grid(torch.stack(columns, dim=1).flatten(0, 1),
                      [f"{p} (seed {s})" for p in prompts for s in seeds], columns=2)
    assert grid.tobytes() == old.tobytes()
    assert capsys.readouterr().err == ""  # no bar unless asked

    batched = CountingPolicy()
    sample_grid(batched, prompts, seeds, batch_size=2, progress=True)
    assert batched.calls == [2, 1, 2, 1]
    assert "sampling" in capsys.readouterr().err  # the bar
    with pytest.raises(ValueError, match="batch_size"):
        sample_grid(batched, prompts, seeds, batch_size=0)


@pytest.mark.usefixtures("single_thread")
def test_sample_num_prompts_spreads_over_the_list_and_says_what_it_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from align_gen.evaluation import select_prompts
    from align_gen.prompts import load_prompts

    out = tmp_path / "g.png"
    code = main(["sample", MODEL, "--prompts", "builtin:world_heldout", "--num-prompts", "3", "--seeds", "0",
                 "--steps", "2", "--batch-size", "2", "--out", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0, err
    lines = printed.splitlines()
    assert lines[0] == f"loading {MODEL} ..."
    assert lines[1].startswith("sampling 3 prompts x 1 seeds")
    assert lines[-1] == f"wrote {out} (3 prompts x 1 seeds)"
    assert "sampling" in err  # the progress bar (stderr)
    chosen = select_prompts(load_prompts("builtin:world_heldout"), 3)
    assert len(load_prompts("builtin:world_heldout")) > 100 and len(set(chosen)) == 3
    font = ImageFont.load_default()
    caption_h = LINE_H * max(len(wrap_caption(f"{p} (seed 0)", MIN_CELL - 6, font)) for p in chosen) + 6
    with Image.open(out) as image:
        assert image.size == (MIN_CELL, 3 * (MIN_CELL + caption_h))

    assert main(["sample", MODEL, "--prompts", "builtin:shapes", "--num-prompts", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and "--num-prompts must be >= 0" in err
    assert main(["sample", MODEL, "--prompts", "builtin:shapes", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# grid captions


def test_long_captions_are_complete_on_as_many_lines_as_they_need() -> None:
    """The former grid kept 3 wrapped lines and dropped the rest; now every word is drawn, each
    line fits the cell, and the caption band grows to hold the longest caption."""
    label = ("0.672 (seed 3) a small purple triangle to the left of a large yellow circle above a "
             "green square, with a supercalifragilisticexpialidociouslylongword at the end")
    font = ImageFont.load_default()
    lines = wrap_caption(label, MIN_CELL - 6, font)
    assert len(lines) > 3
    assert "".join(lines).replace(" ", "") == label.replace(" ", "")  # every character, in order
    assert " ".join(lines).split()[-3:] == ["at", "the", "end"]
    assert all(font.getlength(line) <= MIN_CELL - 6 for line in lines)
    assert wrap_caption("", 100, font) == [""]
    grid = render_grid(torch.zeros(2, 3, 32, 32), [label, "short"], columns=2)
    assert grid.size == (2 * MIN_CELL, MIN_CELL + LINE_H * len(lines) + 6)
    pixels = grid.crop((0, MIN_CELL + LINE_H * (len(lines) - 1), MIN_CELL, grid.height)).getdata()
    assert any(pixel != (255, 255, 255) for pixel in pixels)  # the last line is drawn


# --------------------------------------------------------------------------------------------
# the comparison names both models


def evaluated(role: str, name: str, values: list[float], lora: str | None = None) -> EvaluatedModel:
    return EvaluatedModel(role, name, lora, ScoredSamples({"reward": torch.tensor(values)}))


@pytest.fixture
def trained_against_base():
    """The README's order: the trained model is A, the base model B (--compare); A scores about
    1 higher on each of 3 prompts x 2 seeds."""
    base = [0.0, 1.0, 2.0, 0.5, 1.5, 2.5]
    trained = [v + 1.0 + 0.1 * i for i, v in enumerate(base)]
    models = [evaluated("A", "base/sd", trained, lora="outputs/run/final"), evaluated("B", "base/sd", base)]
    prompts = ["p0", "p1", "p2"]
    settings = {"prompts": "prompts.txt", "seeds": [0, 1]}
    return models, prompts, build_summary(models, prompts, settings)


def test_the_printed_table_names_both_models_and_says_which_is_higher(trained_against_base) -> None:
    _, _, summary = trained_against_base
    text = summary_table(summary)
    a, b = "base/sd + LoRA outputs/run/final", "base/sd"
    lines = text.splitlines()
    assert lines[:2] == [f"A = {a}", f"B = {b}"]
    assert f"B - A = B ({b}) minus A ({a})" in text
    result = [line for line in lines if line.startswith("reward: ")]
    assert result == [f"reward: A ({a}) scores higher than B ({b}), by {1.25:.4g} "
                      f"(95% CI [{-summary['comparison']['reward']['difference_ci_high']:.4g}, "
                      f"{-summary['comparison']['reward']['difference_ci_low']:.4g}])"]


def test_the_summary_json_names_the_direction_and_keeps_its_keys(trained_against_base) -> None:
    _, _, summary = trained_against_base
    c = summary["comparison"]["reward"]
    assert c["mean_difference"] == pytest.approx(-1.25)  # still B - A, as before
    assert {"mean_a", "mean_b", "difference_ci_low", "difference_ci_high", "win_rate", "wins", "ties", "losses"} <= set(c)
    assert c["direction"] == "B (base/sd) - A (base/sd + LoRA outputs/run/final)"
    assert c["higher"] == "A" and c["result"].startswith("A (base/sd + LoRA outputs/run/final) scores higher")
    assert summary["comparison_direction"]["A"] == "base/sd + LoRA outputs/run/final"
    assert summary["comparison_direction"]["B"] == "base/sd"
    json.dumps(summary)  # still JSON


def test_the_report_names_both_models_wherever_a_difference_is(trained_against_base) -> None:
    models, prompts, summary = trained_against_base
    markdown = render_markdown(summary_blocks(summary, models, prompts, "comparison.png"))
    a, b = "base/sd + LoRA outputs/run/final", "base/sd"
    assert f"## Paired comparison: B ({b}) - A ({a})" in markdown
    assert f"| mean A ({a}) | mean B ({b}) | B - A |" in markdown
    assert f"A ({a}) scores higher than B ({b})" in markdown
    assert f"lowest and highest B - A (B = {b}, A = {a})" in markdown
    assert f"A ({a}, left) and B ({b}, right)" in markdown
    for line in markdown.splitlines():
        if "B - A" in line and not line.startswith(("|---", "Each model")):
            assert a in line or line.startswith("| reward") or line.startswith("| prompt"), line


def test_no_clear_difference_is_said_so() -> None:
    models = [evaluated("A", "m1", [1.0, 2.0, 3.0, 3.0, 2.0, 5.0]), evaluated("B", "m2", [2.0, 2.0, 2.0, 3.0, 1.0, 5.0])]
    summary = build_summary(models, ["p0", "p1", "p2"], {"prompts": "x", "seeds": [0, 1]})
    c = summary["comparison"]["reward"]
    assert c["higher"] is None and c["result"].startswith("no clear difference between A (m1) and B (m2)")


# --------------------------------------------------------------------------------------------
# plots


def test_learning_curve_axes(tmp_path: Path) -> None:
    """Training row e (samples drawn with e updates done) and held-out row epochs_done = k share
    one x axis, labelled with what it counts, with integer ticks; the y label is words."""
    rows = [{"epoch": e, "reward_mean": 0.1 * e, "reward_std": 0.05, "samples": 8} for e in range(3)]
    evaluations = [{"epochs_done": 0, "reward_mean": 0.0, "n": 4}, {"epochs_done": 3, "reward_mean": 0.35, "n": 4}]
    figure = learning_curve_figure(rows, evaluations)
    (axis,) = figure.axes
    assert axis.get_xlabel() == EPOCH_AXIS == "epochs of updates done when the samples were drawn"
    assert axis.get_ylabel() == "mean reward"
    figure.canvas.draw()
    ticks = axis.get_xticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
    training, heldout = (line for line in axis.get_lines())
    assert list(training.get_xdata()) == [0, 1, 2] and list(heldout.get_xdata()) == [0, 3]
    labels = [text.get_text() for text in axis.get_legend().get_texts()]
    assert labels[0] == "training samples (mean reward, 8 per epoch)" and "held-out evaluation" in labels[-1]
    alone = learning_curve_figure(rows, [])
    assert alone.axes[0].get_ylabel() == "mean reward (training samples)"
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    plot_learning_curve(metrics, tmp_path / "curve.png", evaluation_path=tmp_path / "missing.jsonl")
    assert (tmp_path / "curve.png").is_file()


def test_training_figure_leaves_out_single_points(tmp_path: Path) -> None:
    monitors = {"monitor/a": {0: 1.0, 1: 2.0, 2: 1.5}, "monitor/once": {3: 0.5}, "monitor/nan": {0: float("nan"), 1: 1.0}}
    curve = [{"epochs_done": 0, "mean": 1.0, "ci_low": 0.5, "ci_high": 1.5},
             {"epochs_done": 3, "mean": 2.0, "ci_low": 1.5, "ci_high": 2.5}]
    figure, skipped = training_figure(monitors, {"reward": curve})
    assert skipped == ["monitor/once", "monitor/nan"]
    titles = [axis.get_title() for axis in figure.axes if axis.get_visible()]
    assert titles == ["held-out reward", "monitor/a"]
    figure.canvas.draw()
    for axis in figure.axes:
        if axis.get_visible():
            assert axis.get_xlabel() == "epochs of updates done"
            assert all(float(t).is_integer() for t in axis.get_xticks())
    assert training_figure({"monitor/once": {1: 0.5}}, {"reward": curve[:1]}) == (None, ["held-out reward", "monitor/once"])


def test_a_gold_reward_gets_its_own_panel_and_one_against_the_trained_reward() -> None:
    """evaluation.rewards' curves: a panel over epochs, and the gold-against-proxy panel whose
    points are (the training reward's held-out mean, the gold mean) at each evaluation."""
    proxy = [{"epochs_done": e, "mean": m, "ci_low": None, "ci_high": None} for e, m in ((0, 0.5), (4, 0.7), (8, 0.9))]
    gold = [{"epochs_done": e, "mean": m, "ci_low": m - 0.1, "ci_high": m + 0.1} for e, m in ((0, 0.3), (4, 0.4), (8, 0.2))]
    figure, skipped = training_figure({}, {"reward": proxy, "world_geneval": gold})
    panels = {axis.get_title(): axis for axis in figure.axes if axis.get_visible()}
    assert list(panels) == ["held-out reward", "held-out world_geneval", "world_geneval against the training reward"]
    line = panels["world_geneval against the training reward"].get_lines()[0]
    assert list(line.get_xdata()) == [0.5, 0.7, 0.9] and list(line.get_ydata()) == [0.3, 0.4, 0.2]
    assert skipped == []


def test_a_run_of_single_points_gets_no_figure(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    out.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "reward_mean": 1.0, "monitor/kl_to_base": 0.0}) + "\n")
    (out / "training.png").write_bytes(b"an earlier report's figure")
    blocks = training_run_blocks(run, out)
    assert not any(isinstance(block, Figure) for block in blocks) and not (out / "training.png").exists()
    assert any(isinstance(block, Paragraph) and "fewer than 2 points" in block.text for block in blocks)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "reward_mean": 1.0, "monitor/kl_to_base": 0.1 * e, **({"monitor/once": 1.0} if e == 0 else {})})
        + "\n" for e in range(3)))
    blocks = training_run_blocks(run, out)
    assert isinstance(blocks[-1], Figure) and "in the tables only: monitor/once" in blocks[-1].caption
    assert (out / "training.png").is_file()
