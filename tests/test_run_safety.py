"""Nothing lost, nothing mis-saved: a run folder is never overwritten by accident, a damaged
checkpoint or metrics file does not end a resume, a changed config is shown (and refused when it
changes what is trained), and a diverged update never becomes a resumable checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align_gen.checkpoint import MANIFEST_FILE, list_checkpoints
from align_gen.cli import main
from align_gen.config import load_config
from align_gen.tracking import TornLineWarning, read_metrics
from align_gen.train import train
from tests.test_train import FAST, TINY_CONFIG, without_timing

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = [*FAST, "save_every=1", "keep_checkpoints=3", "advantage.kind=per_prompt", "advantage.min_count=2"]


def run(output_dir: Path, *overrides: str):
    return train(load_config(TINY_CONFIG, [*SETTINGS, f"output_dir={output_dir}", *overrides]))


def cli_train(output_dir: Path, *overrides: str) -> list[str]:
    return ["train", str(TINY_CONFIG), *SETTINGS, f"output_dir={output_dir}", *overrides]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("align-gen train: error: ")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    return lines[0]


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(output_dir)[-1] / "trainable.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 3-epoch run: what every resumed run below must reproduce bit for bit."""
    output_dir = tmp_path_factory.mktemp("straight") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (single_thread): the thread count changes float rounding
    try:
        run(output_dir, "epochs=3")
    finally:
        torch.set_num_threads(threads)
    return output_dir


# --------------------------------------------------------------------------------------------
# an existing run folder


def test_a_second_run_into_a_run_folder_is_refused_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    output_dir = tmp_path / "run"
    run(output_dir, "epochs=1")
    before = {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()}

    assert main(cli_train(output_dir, "epochs=2")) == 2
    line = one_error_line(capsys)
    assert "already holds a run" in line and "resume=latest" in line and "overwrite=true" in line
    assert {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()} == before

    assert main(cli_train(output_dir, "epochs=1", "overwrite=true", "resume=latest")) == 2
    assert "give one of them" in one_error_line(capsys)


def test_overwrite_replaces_the_run(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    run(output_dir, "epochs=2")
    run(output_dir, "epochs=1", "overwrite=true")
    assert [row["epoch"] for row in read_metrics(output_dir / "metrics.jsonl")] == [0]
    assert [p.name for p in list_checkpoints(output_dir)] == ["epoch_000001"]
    assert [p.name for p in (output_dir / "config_history").iterdir()] == ["epoch_000000.yaml"]


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_an_output_dir_that_is_or_lies_under_a_file_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, where: str
) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a user's file")
    output_dir = blocker if where == "is-a-file" else blocker / "run"
    assert main(cli_train(output_dir)) == 2
    assert f"{blocker} is a file" in one_error_line(capsys)
    assert blocker.read_text() == "a user's file"


# --------------------------------------------------------------------------------------------
# damaged checkpoints and metrics


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # same size, one byte flipped: only the hash can tell
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "how"),
    # Truncated trainable weights are among the damage test_faults.py draws at random.
    [("optimizer.pt", "flipped"), ("state.json", "truncated")],
)
def test_resume_skips_a_damaged_checkpoint_and_still_reaches_the_same_weights(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, straight: Path, name: str, how: str
) -> None:
    output_dir = tmp_path / "run"
    run(output_dir, "epochs=2")
    damage(output_dir / "checkpoints" / "epoch_000002" / name, how)
    capsys.readouterr()

    run(output_dir, "epochs=3", "resume=latest")
    out = capsys.readouterr().out
    assert f"checkpoint {output_dir / 'checkpoints' / 'epoch_000002'} is damaged" in out, out
    assert "resumed from" in out and "epoch_000001 after epoch 1" in out
    assert_same_weights(final_weights(output_dir), final_weights(straight))
    assert without_timing(read_metrics(output_dir / "metrics.jsonl")) == without_timing(
        read_metrics(straight / "metrics.jsonl")
    )


def test_a_checkpoint_from_before_manifests_still_resumes(tmp_path: Path, straight: Path) -> None:
    output_dir = tmp_path / "run"
    run(output_dir, "epochs=2")
    for checkpoint in list_checkpoints(output_dir):
        (checkpoint / MANIFEST_FILE).unlink()
    run(output_dir, "epochs=3", "resume=latest")
    assert_same_weights(final_weights(output_dir), final_weights(straight))


def test_a_resume_named_checkpoint_that_is_damaged_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    run(output_dir, "epochs=1")
    checkpoint = output_dir / "checkpoints" / "epoch_000001"
    damage(checkpoint / "trainable.safetensors", "flipped")
    assert main(cli_train(output_dir, "epochs=2", f"resume={checkpoint}")) == 2
    assert "trainable.safetensors does not match its SHA-256" in one_error_line(capsys)


def test_a_metrics_line_cut_off_mid_write_is_dropped_with_a_warning(tmp_path: Path, straight: Path) -> None:
    output_dir = tmp_path / "run"
    run(output_dir, "epochs=2")
    with (output_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 2, "reward_me')  # a crash mid-write
    with pytest.warns(TornLineWarning, match="cut off mid-write"):
        run(output_dir, "epochs=3", "resume=latest")
    assert without_timing(read_metrics(output_dir / "metrics.jsonl")) == without_timing(
        read_metrics(straight / "metrics.jsonl")
    )


def test_what_a_kill_leaves_in_checkpoints_is_tidied(capsys: pytest.CaptureFixture[str], tmp_path: Path, straight: Path) -> None:
    """A kill mid-deletion (``.deleting``), mid-write (``.partial`` without a manifest), and
    between removing an epoch and renaming its new copy into place (a complete ``.partial``)."""
    output_dir = tmp_path / "run"
    run(output_dir, "epochs=2")
    folder = output_dir / "checkpoints"
    os.replace(folder / "epoch_000001", folder / "epoch_000001.deleting")
    os.replace(folder / "epoch_000002", folder / "epoch_000002.partial")
    (folder / "epoch_000003.partial").mkdir()
    (folder / "epoch_000003.partial" / "trainable.safetensors").write_bytes(b"half")
    capsys.readouterr()

    run(output_dir, "epochs=3", "resume=latest")
    out = capsys.readouterr().out
    assert "completed the interrupted save" in out and "epoch_000002 after epoch 2" in out
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_000002", "epoch_000003"]
    assert_same_weights(final_weights(output_dir), final_weights(straight))


# --------------------------------------------------------------------------------------------
# resuming with a changed config


def test_resume_refuses_a_config_that_changes_what_is_trained(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    run(output_dir, "epochs=1")
    recorded = (output_dir / "config.yaml").read_text()
    assert main(cli_train(output_dir, "epochs=2", "resume=latest", "train.learning_rate=1e-3")) == 2
    line = one_error_line(capsys)
    assert "train.learning_rate 0.003 -> 0.001" in line and "allow_config_changes=true" in line
    assert (output_dir / "config.yaml").read_text() == recorded
    assert [row["epoch"] for row in read_metrics(output_dir / "metrics.jsonl")] == [0]


def test_resume_shows_accepted_changes_and_keeps_every_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    run(output_dir, "epochs=1")
    run(output_dir, "epochs=2", "resume=latest")  # a longer run: no permission needed
    run(output_dir, "epochs=3", "resume=latest", "train.learning_rate=1e-3", "allow_config_changes=true")
    out = capsys.readouterr().out
    assert "config change from epoch 1: epochs 1 -> 2" in out
    assert "config change from epoch 2: train.learning_rate 0.003 -> 0.001" in out
    history = output_dir / "config_history"
    assert sorted(p.name for p in history.iterdir()) == ["epoch_000000.yaml", "epoch_000001.yaml", "epoch_000002.yaml"]
    rates = [load_config(history / f"epoch_00000{e}.yaml").train.learning_rate for e in range(3)]
    assert rates == [3e-3, 3e-3, 1e-3]
    assert load_config(output_dir / "config.yaml").train.learning_rate == 1e-3


# --------------------------------------------------------------------------------------------
# divergence


def test_a_diverging_learning_rate_stops_before_its_weights_can_be_resumed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """lr 1e6: the first update leaves finite but huge weights, which sample NaN next epoch. The
    error names the learning rate (not the reward), the checkpoint of those weights is set
    aside, no final model is written, and resume finds nothing to load from them."""
    output_dir = tmp_path / "run"
    assert main(cli_train(output_dir, "epochs=3", "train.learning_rate=1e6")) == 2
    line = one_error_line(capsys)
    assert "train.learning_rate=1e+06 is likely too high" in line and "reward" not in line
    assert list_checkpoints(output_dir) == []
    assert (output_dir / "checkpoints" / "epoch_000001.diverged").is_dir()
    assert not (output_dir / "final").exists()


def test_a_non_finite_gradient_stops_the_update_and_names_its_step(tmp_path: Path) -> None:
    """A NaN in the loss (here: NaN advantages) stops the update when it reads its statistics
    back (once, at its end), naming the first optimizer step whose gradient norm was not finite;
    the trainer raises before anything is saved (the weights it reached are discarded with the
    run: see the learning-rate test above for what stays on disk)."""
    from accelerate import Accelerator

    from align_gen.errors import TrainingDivergedError
    from align_gen.objectives import build_objective
    from align_gen.optimizers import build_optimizer
    from align_gen.policies import build_policy
    from align_gen.train import collect_rollouts, update

    config = load_config(TINY_CONFIG, [*SETTINGS, f"output_dir={tmp_path}"])
    policy = build_policy(config.model, config.sample, "cpu")
    objective = build_objective(config.objective)
    optimizer = build_optimizer(policy, config.train)
    generator = torch.Generator().manual_seed(0)
    rollouts = collect_rollouts(policy, objective, ["a red circle"], config, generator, Accelerator())
    rollouts.advantages = torch.full((len(rollouts),), float("nan"))

    with pytest.raises(TrainingDivergedError, match="gradient norm is nan at optimizer step 1"):
        update(policy, objective, optimizer, rollouts, config, generator, Accelerator())
