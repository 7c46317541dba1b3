"""Fault injection: a tiny run is killed with SIGKILL at seeded random file-system events
(inside checkpoint writes, renames and deletions, metrics appends, the final model's save),
twice per trial, then resumed; afterwards a finished run's files are damaged on disk and it is
resumed again. Every time, the run must end with the weights and metrics of an uninterrupted run,
bit for bit, with nothing half-done left behind (``tests/fault_child.py`` is the killed process).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align_gen.checkpoint import CHECKPOINT_DIR, list_checkpoints
from align_gen.tracking import read_metrics
from tests.test_train import without_timing

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
TRIALS = 2


def child(output_dir: Path, kill_at: int, *, resume: bool, epochs: int = EPOCHS) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "tests.fault_child", str(output_dir), str(epochs), str(kill_at)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(argv + (["resume"] if resume else []), capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


def outcome(output_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict], dict[str, bytes]]:
    """(last checkpoint's weights, metrics without timings, {file: bytes} of final/) of a run."""
    weights = load_file(str(list_checkpoints(output_dir)[-1] / "trainable.safetensors"))
    final = output_dir / "final"
    files = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    return weights, without_timing(read_metrics(output_dir / "metrics.jsonl")), files


def assert_same_run(run: Path, reference: Path) -> None:
    (weights, metrics, final), (ref_weights, ref_metrics, ref_final) = outcome(run), outcome(reference)
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    assert metrics == ref_metrics
    assert final.keys() == ref_final.keys() and final == ref_final  # the saved pipeline, byte for byte
    leftovers = [p.name for p in (run / CHECKPOINT_DIR).iterdir() if not p.name.startswith("epoch_") or "." in p.name]
    assert not leftovers, leftovers
    assert not [p.name for p in run.iterdir() if p.name.endswith((".partial", ".deleting"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """An uninterrupted run and its number of file-system events."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    result = child(output_dir, 0, resume=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return output_dir, int(result.stdout.strip().splitlines()[-1].split()[1])


@pytest.mark.parametrize("trial", range(TRIALS))
def test_two_kills_at_random_events_then_resume_reaches_the_same_run(
    tmp_path: Path, reference: tuple[Path, int], trial: int
) -> None:
    """The trials kill at distinct events, drawn once from all of the run's events (23 in a
    3-epoch run: metrics lines, checkpoint files, manifests, renames, deletions, the final save);
    the second kill of a trial lands in the resumed run's own sequence of events. (What a kill
    mid-deletion leaves is also resumed from in test_run_safety.py.)"""
    reference_dir, events = reference
    points = random.Random(2026).sample(range(1, events + 1), 2 * TRIALS)
    output_dir = tmp_path / "run"
    kills = points[2 * trial : 2 * trial + 2]
    first = child(output_dir, kills[0], resume=False)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    second = child(output_dir, kills[1], resume=True)
    assert second.returncode in (0, -signal.SIGKILL), second.stderr[-2000:]
    last = child(output_dir, 0, resume=True)
    assert last.returncode == 0, f"kills at events {kills}:\n{last.stderr[-3000:]}"
    assert_same_run(output_dir, reference_dir)


def test_damaged_files_fall_back_to_a_valid_checkpoint_and_say_so(tmp_path: Path, reference: tuple[Path, int]) -> None:
    """A copy of the finished reference run has a seeded random file of its newest checkpoint
    truncated or one byte flipped, its metrics file's last line cut, and its final model gone;
    resumed, it falls back to the previous checkpoint, says so, and redoes the last epoch."""
    reference_dir, _ = reference
    rng = random.Random(0)
    output_dir = tmp_path / "run"
    shutil.copytree(reference_dir, output_dir)
    shutil.rmtree(output_dir / "final")
    newest = list_checkpoints(output_dir)[-1]
    victim = rng.choice(sorted(p for p in newest.iterdir() if p.name != "manifest.json"))
    data = bytearray(victim.read_bytes())
    if rng.random() < 0.5:
        data = data[: rng.randint(0, len(data) - 1)]
    else:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    victim.write_bytes(bytes(data))
    metrics = output_dir / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-7])

    resumed = child(output_dir, 0, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint {newest} is damaged" in resumed.stdout, (victim.name, resumed.stdout[-2000:])
    assert f"epoch_{EPOCHS - 1:06d} after epoch {EPOCHS - 1}" in resumed.stdout
    assert_same_run(output_dir, reference_dir)
