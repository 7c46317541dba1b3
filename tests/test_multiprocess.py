"""``accelerate launch`` with 2 CPU processes (gloo DDP): rewards are gathered over both
processes, only the main process logs and saves, and checkpoints are written under DDP.

On a machine without GPUs, ``accelerate launch --cpu --num_processes 2`` starts ONE process
(its simple launcher only fans out through ``mpirun``); two local CPU processes need the
torchrun launcher (``--multi_gpu``) plus ``ACCELERATE_USE_CPU=true``, which makes every
``Accelerator()`` pick the MULTI_CPU / gloo backend.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

TINY_CONFIG = (
    Path(__file__).resolve().parents[1] / "configs" / "tiny" / "ddpo_tiny_compressibility.yaml"
)
NUM_PROCESSES = 2
PER_PROCESS_BATCH = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(tmp_path: Path, overrides: list[str]) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu",  # the torchrun launcher; with ACCELERATE_USE_CPU it runs gloo on CPU
        "--num_processes", str(NUM_PROCESSES),
        "--num_machines", "1",
        "--mixed_precision", "no",
        "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "align_gen.cli", "train", str(TINY_CONFIG), *overrides,
    ]  # fmt: skip
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )


def test_two_cpu_processes_gather_rewards_and_checkpoint(
    tmp_path: Path, tiny_train_overrides: list[str]
) -> None:
    run_dir = tmp_path / "run"
    result = launch(
        tmp_path,
        [
            *tiny_train_overrides,
            f"sample.batch_size={PER_PROCESS_BATCH}",
            "epochs=2",
            "save_every=1",
            "keep_checkpoints=5",
            f"output_dir={run_dir}",
        ],
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert "Traceback" not in result.stderr

    # one metrics line per epoch (the main process logs), each over both processes' rollouts
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
    assert [row["samples"] for row in rows] == [NUM_PROCESSES * PER_PROCESS_BATCH] * 2
    # one optimizer step per epoch per process (train.batch_size == rollouts per process)
    assert [row["global_step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["reward_std"] >= 0 and row["ratio"] > 0

    # checkpoints of both epochs, written once, complete
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["epoch_000001", "epoch_000002"]
    for epoch in (1, 2):
        folder = run_dir / "checkpoints" / f"epoch_{epoch:06d}"
        state = json.loads((folder / "state.json").read_text())
        assert state["epoch"] == epoch and state["global_step"] == epoch
        assert (folder / "trainable.safetensors").is_file() and (folder / "optimizer.pt").is_file()

    final = run_dir / "final"
    assert final.is_dir()
    assert json.loads((final / "align_gen_model.json").read_text())["kind"] == "full"
    assert (final / "model_index.json").is_file()
    assert (run_dir / "grids" / "epoch_000000.png").is_file()
    assert (run_dir / "grids" / "epoch_000002.png").is_file()
    assert (run_dir / "config.yaml").is_file()
    # the summary is printed once, by local rank 0
    assert result.stdout.count("final model") == 1
