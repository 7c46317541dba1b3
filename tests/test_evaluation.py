"""Held-out evaluation: paired samples, the rows a run writes, and exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from align_gen.config import load_config
from align_gen.errors import ConfigError
from align_gen.evaluation import paired_change, score_samples, select_prompts, summarise
from align_gen.policies import build_policy
from align_gen.tracking import read_metrics
from align_gen.train import train
from reward_models import get_reward
from reward_models.errors import RewardError
from tests.test_train import FAST, TINY_CONFIG, run


def test_paired_change_is_the_mean_difference_and_its_standard_error() -> None:
    change, error = paired_change([1.0, 2.0, 3.0], [2.0, 2.0, 5.0])  # differences 1, 0, 2
    assert change == pytest.approx(1.0)
    assert error == pytest.approx(1.0 / 3**0.5)  # sample std 1, n 3
    with pytest.raises(ValueError, match="paired"):
        paired_change([1.0], [2.0])


def test_select_prompts_spreads_a_fixed_subset_over_the_list() -> None:
    prompts = [f"p{i}" for i in range(10)]
    assert select_prompts(prompts, 0) == prompts
    assert select_prompts(prompts, 20) == prompts
    assert select_prompts(prompts, 4) == ["p0", "p2", "p5", "p7"]


def test_score_samples_pairs_seeds_and_prompts_across_calls(single_thread) -> None:
    config = load_config(TINY_CONFIG, FAST)
    policy = build_policy(config.model, config.sample, "cpu", trainable=False)
    rewards = {"jpeg": get_reward("jpeg_compressibility")}
    prompts = ["a red circle", "a blue square", "a green triangle"]
    first = score_samples(policy, rewards, prompts, [3, 4], batch_size=2, progress=False)["jpeg"]
    again = score_samples(policy, rewards, prompts, [3, 4], batch_size=2, progress=False)["jpeg"]
    other_seeds = score_samples(policy, rewards, prompts, [5, 6], batch_size=2, progress=False)["jpeg"]
    assert first.shape == (6,)
    assert torch.equal(first, again)  # the same (prompt, seed) samples every time
    assert not torch.equal(first, other_seeds)
    summary = summarise({"jpeg": first})["jpeg"]
    assert summary["n"] == 6 and summary["mean"] == pytest.approx(float(first.mean()))


def test_a_run_with_an_evaluation_logs_it_before_periodically_and_after(tmp_path: Path, prompt_file: Path) -> None:
    result = run(
        tmp_path / "run",
        "epochs=3",
        f"evaluation.prompts={prompt_file}",
        "evaluation.seeds=[7]",
        "evaluation.every=2",
        "evaluation.batch_size=1",
    )
    rows = read_metrics(result.evaluation)
    assert [row["epochs_done"] for row in rows] == [0, 2, 3]
    assert all(row["n"] == 2 for row in rows)
    assert result.evaluation_before == rows[0]["reward_mean"]
    assert result.evaluation_after == rows[-1]["reward_mean"]
    change, _ = result.evaluation_change
    assert change == pytest.approx(rows[-1]["reward_mean"] - rows[0]["reward_mean"], abs=1e-5)
    assert result.before_after_grid is not None
    before, after = (Image.open(p) for p in (result.grids[0], result.grids[-1]))
    assert Image.open(result.before_after_grid).width > before.width + after.width


def test_a_run_without_an_evaluation_writes_none(tmp_path: Path) -> None:
    result = run(tmp_path / "run", "epochs=1")
    assert result.evaluation is None and result.evaluation_before is None
    assert not (result.output_dir / "evaluation.jsonl").exists()


def test_resume_keeps_the_evaluations_already_made(tmp_path: Path, prompt_file: Path) -> None:
    settings = [f"evaluation.prompts={prompt_file}", "evaluation.seeds=[7]", "evaluation.every=1", "save_every=1"]
    straight = run(tmp_path / "straight", "epochs=3", *settings)
    run(tmp_path / "resumed", "epochs=2", *settings)
    resumed = run(tmp_path / "resumed", "epochs=3", "resume=latest", *settings)

    def without_time(path: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in read_metrics(path)]

    assert len(read_metrics(straight.evaluation)[0]["scores"]) == 2

    assert without_time(straight.evaluation) == without_time(resumed.evaluation)
    assert [row["epochs_done"] for row in read_metrics(resumed.evaluation)] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("override", "message"),
    [("evaluation.every=-1", "evaluation.every"), ("evaluation.seeds=[]", "evaluation.seeds")],
)
def test_bad_evaluation_settings_are_named(override: str, message: str, prompt_file: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_CONFIG, [f"evaluation.prompts={prompt_file}", override])


def test_train_refuses_a_missing_evaluation_prompt_file(tmp_path: Path) -> None:
    config = load_config(TINY_CONFIG, [*FAST, f"output_dir={tmp_path}", "evaluation.prompts=/no/such/prompts.txt"])
    with pytest.raises(ConfigError, match="prompts file not found"):
        train(config)


def test_an_evaluation_of_a_weighted_sum_logs_each_term(tmp_path: Path, prompt_file: Path) -> None:
    result = run(
        tmp_path / "run",
        "epochs=1",
        f"evaluation.prompts={prompt_file}",
        "evaluation.seeds=[7]",
        "reward.weights={jpeg_compressibility: 1.0, jpeg_incompressibility: 0.5}",
    )
    row = read_metrics(result.evaluation)[0]
    compressibility, size = row["reward/jpeg_compressibility_mean"], row["reward/jpeg_incompressibility_mean"]
    assert compressibility == pytest.approx(-size)  # minus kB and kB of the same images
    assert row["reward_mean"] == pytest.approx(compressibility + 0.5 * size, abs=1e-5)


def test_evaluation_rewards_score_the_same_samples_and_join_the_run_report(tmp_path: Path, prompt_file: Path) -> None:
    """evaluation.rewards: jpeg_incompressibility scores the samples that jpeg_compressibility
    (the trained reward) scores, so their per-sample scores are exact negatives; the --run report
    gets its held-out table and the gold-against-proxy panel."""
    from align_gen.report import training_run_blocks

    result = run(
        tmp_path / "run",
        "epochs=2",
        f"evaluation.prompts={prompt_file}",
        "evaluation.seeds=[7, 8]",
        "evaluation.every=1",
        "evaluation.rewards={jpeg_incompressibility: {}}",
    )
    rows = read_metrics(result.evaluation)
    assert [row["epochs_done"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert row["jpeg_incompressibility_scores"] == pytest.approx([-s for s in row["scores"]], abs=1e-5)
        assert row["jpeg_incompressibility_mean"] == pytest.approx(-row["reward_mean"], abs=1e-5)
    before, after, change, error = result.watched["jpeg_incompressibility"]  # what `align-gen train` prints
    assert (before, after) == (rows[0]["jpeg_incompressibility_mean"], rows[-1]["jpeg_incompressibility_mean"])
    assert change == pytest.approx(-result.evaluation_change[0], abs=1e-5)
    assert error == pytest.approx(result.evaluation_change[1], abs=1e-5)
    blocks = training_run_blocks(tmp_path / "run", tmp_path)
    headings = [block.text for block in blocks if type(block).__name__ == "Heading"]
    assert "Held-out evaluation: jpeg_incompressibility (evaluation.rewards)" in headings
    with pytest.raises(RewardError, match="unknown reward .no_such_reward"):
        run(tmp_path / "bad", f"evaluation.prompts={prompt_file}", "evaluation.rewards={no_such_reward: {}}")
