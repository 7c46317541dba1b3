"""Learning tests: REBEL and AWM each raise the JPEG compressibility of the tiny random SD model.

Each runs its tiny config shortened (32 px images, few epochs) on one CPU thread in about a
minute, and asserts that the mean reward of the last epochs clearly beats the first epoch's.
Caveat (measured): on this random model any weight change tends to make its coloured noise a
little smoother. With the reward flipped (jpeg_incompressibility) the same settings also made the
images more compressible: REBEL by 2.8 first-epoch stds in 8 epochs (vs +3.2 / +7.3 with the
reward), AWM by 1.2 stds in 10 (vs +0.8 / +1.6). So these tests show that training runs and moves
the samples the easy way; for AWM they are not evidence of reward-directed learning.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from align_gen.config import load_config
from align_gen.tracking import read_metrics
from align_gen.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
COMMON = [
    "grid.every=0",
    "grid.num_prompts=1",
    "grid.seeds=[0]",
    "tensorboard=false",
    "save_every=100",
]


def _rewards(config_name: str, tmp_path: Path, *overrides: str) -> list[dict]:
    config = load_config(CONFIGS / config_name, [*COMMON, f"output_dir={tmp_path}", *overrides])
    return read_metrics(train(config).metrics)


def _assert_rise(rows: list[dict], last: int, margin: float) -> None:
    first = rows[0]["reward_mean"]
    tail = sum(row["reward_mean"] for row in rows[-last:]) / last
    assert tail > first + margin, [round(row["reward_mean"], 4) for row in rows]


@pytest.mark.slow
def test_rebel_raises_compressibility(tmp_path: Path, single_thread) -> None:
    rows = _rewards("rebel_tiny_compressibility.yaml", tmp_path, "epochs=8")
    # Seeds 0 and 1 rose by 7.3 and 3.2 first-epoch stds (last 3 epochs vs the first).
    _assert_rise(rows, last=3, margin=2 * rows[0]["reward_std"])


@pytest.mark.slow
def test_awm_raises_compressibility(tmp_path: Path, single_thread) -> None:
    rows = _rewards("awm_tiny_compressibility.yaml", tmp_path, "epochs=10")
    # AWM moves this random model slowly: seeds 0 and 1 rose by 1.6 and 0.8 first-epoch stds.
    # Half a std is still 4 standard errors of an epoch's mean reward (std / sqrt(64)).
    _assert_rise(rows, last=3, margin=0.5 * rows[0]["reward_std"])
