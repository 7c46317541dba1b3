"""A training run that kills itself with SIGKILL at a chosen file-system event (tests/test_faults.py).

    python -m tests.fault_child OUTPUT_DIR EPOCHS KILL_AT [resume]

Every write, rename and deletion the run makes is an *event*, counted from 1. At event
``KILL_AT`` the process dies the way a crash or the OOM killer ends it: a write is cut off half-way
(half the bytes reach the disk), a deletion has removed part of the tree, then SIGKILL; no
``finally`` block or atexit handler runs. ``KILL_AT`` 0 never kills: the run prints its number of
events on its last line (``events N``), which the test uses to draw kill points.

The events are counted by wrapping, in this process only, the functions that touch the disk:
``os.replace``, ``shutil.rmtree``, ``torch.save``, safetensors' ``save_file`` and the JSON-lines
log. Nothing else about the run changes.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

from tests.test_train import FAST, TINY_CONFIG

SETTINGS = [*FAST, "save_every=1", "keep_checkpoints=2", "advantage.kind=per_prompt", "advantage.min_count=2"]


class Killer:
    """Counts events; at event ``kill_at`` leaves the damage of a cut-off operation and dies."""

    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at
        self.events = 0

    def event(self, damage) -> None:
        self.events += 1
        if self.events == self.kill_at:
            damage()
            os.kill(os.getpid(), signal.SIGKILL)


def _half_written(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


def install(killer: Killer) -> None:
    import safetensors.torch

    from align_gen import checkpoint, tracking

    real_replace, real_rmtree, real_torch_save = os.replace, shutil.rmtree, torch.save
    real_save_file, real_log = safetensors.torch.save_file, tracking.MetricsLog.log

    def replace(source, target):
        killer.event(lambda: None)
        return real_replace(source, target)

    def rmtree(path, *args, **kwargs):
        def half_deleted() -> None:
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for file in files[: len(files) // 2 + 1]:
                file.unlink()

        if Path(path).exists():
            killer.event(half_deleted)
        return real_rmtree(path, *args, **kwargs)

    def torch_save(obj, target, *args, **kwargs):
        if isinstance(target, (str, os.PathLike)):
            import io

            buffer = io.BytesIO()
            real_torch_save(obj, buffer)
            killer.event(lambda: _half_written(Path(target), buffer.getvalue()))
        return real_torch_save(obj, target, *args, **kwargs)

    def save_file(tensors, filename, *args, **kwargs):
        from safetensors.torch import save

        killer.event(lambda: _half_written(Path(filename), save(tensors)))
        return real_save_file(tensors, filename, *args, **kwargs)

    @functools.wraps(real_log)
    def log(self, metrics):
        import json

        def torn_line() -> None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(metrics)[:20])

        if self.enabled:
            killer.event(torn_line)
        return real_log(self, metrics)

    os.replace, shutil.rmtree, torch.save = replace, rmtree, torch_save
    safetensors.torch.save_file = save_file
    checkpoint.save_file = save_file
    tracking.MetricsLog.log = log


def main(argv: list[str]) -> None:
    output_dir, epochs, kill_at = argv[0], int(argv[1]), int(argv[2])
    resume = ["resume=latest"] if argv[3:] == ["resume"] else []
    torch.set_num_threads(1)
    killer = Killer(kill_at)
    install(killer)
    from align_gen.config import load_config
    from align_gen.train import train

    train(load_config(TINY_CONFIG, [*SETTINGS, f"output_dir={output_dir}", f"epochs={epochs}", *resume]))
    print(f"events {killer.events}")


if __name__ == "__main__":
    main(sys.argv[1:])
