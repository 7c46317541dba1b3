"""Checkpoints that resume a run exactly: trainable weights, optimizer, advantage state, epoch.

Random state is not stored: every random draw of epoch e on process p comes from a generator
seeded by (seed, e, p) (see :func:`align_gen.train.epoch_generator`), so a run resumed after
epoch e draws exactly what the uninterrupted run drew. A checkpoint folder is written under a
temporary name and renamed when complete, so a crash while saving never leaves a half
checkpoint that ``resume: latest`` would pick up.

Layout of ``<output_dir>/checkpoints/epoch_000012/`` (12 = epochs completed):
    trainable.safetensors   the trained weights only (LoRA adapters or the full denoiser)
    optimizer.pt            the optimizer's state_dict
    state.json              {"epoch": 12, "global_step": ..., "advantage": {...}}
    objective.safetensors   the objective's tensors, when it keeps any (SePPO's reference ring)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from align_gen.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(output_dir: Path, epoch: int) -> Path:
    return output_dir / CHECKPOINT_DIR / f"epoch_{epoch:06d}"


def save_checkpoint(
    output_dir: Path,
    *,
    epoch: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    objective_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes the checkpoint of ``epoch`` completed epochs atomically; keeps the newest ``keep``."""
    final = checkpoint_path(output_dir, epoch)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(weights, str(partial / "trainable.safetensors"))
    torch.save(optimizer_state, partial / "optimizer.pt")
    (partial / "state.json").write_text(json.dumps({"epoch": epoch, **state}, indent=1))
    if objective_state:
        save_file(objective_state, str(partial / "objective.safetensors"))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = output_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("epoch_*") if p.is_dir() and not p.name.endswith(".partial"))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: ``latest`` (None if there is none yet) or a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"resume: {resume} is not a checkpoint folder (no state.json in it).")
    return path


@dataclasses.dataclass
class Checkpoint:
    """What a checkpoint folder holds (see the module docstring)."""

    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    state: dict[str, Any]
    objective_state: dict[str, torch.Tensor]


def load_checkpoint(path: Path) -> Checkpoint:
    objective_file = path / "objective.safetensors"
    return Checkpoint(
        weights=load_file(str(path / "trainable.safetensors")),
        optimizer_state=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        state=json.loads((path / "state.json").read_text()),
        objective_state=load_file(str(objective_file)) if objective_file.is_file() else {},
    )
