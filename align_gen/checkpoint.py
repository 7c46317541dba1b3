"""Checkpoints that resume a run exactly, and survive a crash or kill at any point.

Random state is not stored: every random draw of epoch e on process p comes from a generator
seeded by (seed, e, p) (see :func:`align_gen.train.epoch_generator`), so a run resumed after
epoch e draws exactly what the uninterrupted run drew.

Layout of ``<output_dir>/checkpoints/epoch_000012/`` (12 = epochs completed):
    trainable.safetensors   the trained weights only (LoRA adapters or the full denoiser)
    optimizer.pt            the optimizer's state_dict
    state.json              {"epoch": 12, "global_step": ..., "advantage": {...}}
    objective.safetensors   the objective's tensors, when it keeps any (SePPO's reference ring)
    manifest.json           written last: each file's size and SHA-256

What is guaranteed (see :mod:`align_gen.durable` for the file-level steps):

- A checkpoint is written under ``epoch_N.partial``, every file fsync'd, the manifest last, and
  then renamed to ``epoch_N``: a folder under its final name is complete.
- Re-saving an epoch and deleting old checkpoints first rename the folder away
  (``.deleting``), so a kill mid-deletion never leaves a half-deleted ``epoch_N``.
- A checkpoint whose weights turn out to sample NaN (a diverged update that left finite but
  broken weights) is renamed ``epoch_N.diverged`` when that is found, out of resume's sight.
- ``resume: latest`` checks the newest checkpoint against its manifest (sizes and hashes) and
  loads it; a damaged one (truncated file, full disk, bit rot) is skipped with a one-line
  warning and the next older one is tried.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from align_gen.durable import (
    PARTIAL_SUFFIX,
    clear_deleting,
    file_sha256,
    fsync_dir,
    remove_tree,
    write_atomic,
    write_folder_atomic,
)
from align_gen.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "trainable.safetensors"
DIVERGED_SUFFIX = ".diverged"
_NAME = re.compile(r"epoch_\d{6}")


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

    def write(folder: Path) -> None:
        save_file(weights, str(folder / WEIGHTS_FILE))
        torch.save(optimizer_state, folder / "optimizer.pt")
        (folder / "state.json").write_text(json.dumps({"epoch": epoch, **state}, indent=1))
        if objective_state:
            save_file(objective_state, str(folder / "objective.safetensors"))
        _write_manifest(folder)

    # Under epoch_N.partial, then renamed into place; the same epoch saved again (a run resumed
    # from an older checkpoint) replaces the old copy, which is renamed away first.
    write_folder_atomic(final, write)
    for old in list_checkpoints(output_dir)[:-keep]:
        remove_tree(old)
    return final


def _write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(folder.iterdir()):  # write_folder_atomic fsyncs them all before the rename
        files[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    write_atomic(folder / MANIFEST_FILE, json.dumps({"files": files}, indent=1))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders under their final names (``epoch_NNNNNN``), oldest first."""
    folder = output_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.fullmatch(p.name) and p.is_dir())


def set_aside_diverged(output_dir: Path, epoch: int) -> Path | None:
    """Renames the checkpoint of ``epoch`` (if any) to ``epoch_N.diverged``: its weights were
    finite but sample NaN. Kept for inspection; resume no longer sees it. Returns the new path."""
    path = checkpoint_path(output_dir, epoch)
    if not path.is_dir():
        return None
    aside = path.with_name(path.name + DIVERGED_SUFFIX)
    if aside.exists():
        remove_tree(aside)
    os.replace(path, aside)
    fsync_dir(path.parent)
    return aside


def recover_interrupted(output_dir: Path) -> list[str]:
    """Tidies what a kill left in ``<output_dir>/checkpoints`` and returns a line per action:
    finishes interrupted deletions, drops incomplete ``.partial`` folders, and promotes a
    complete one whose final name is missing (a kill between replacing an epoch and renaming)."""
    folder = output_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    clear_deleting(folder)
    notes = []
    for partial in sorted(folder.glob("epoch_*" + PARTIAL_SUFFIX)):
        final = partial.with_name(partial.name[: -len(PARTIAL_SUFFIX)])
        if not final.exists() and verify_checkpoint(partial) is None:
            os.replace(partial, final)
            notes.append(f"completed the interrupted save of {final}")
        else:
            shutil.rmtree(partial, ignore_errors=True)
            notes.append(f"removed {partial.name}, a checkpoint whose writing was interrupted")
    fsync_dir(folder)
    return notes


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with checkpoint folder ``path`` against its manifest, or None when every
    file has its recorded size and hash. A folder without a manifest (an align-gen older than
    manifests) is verified by loading it instead (see :func:`load_checkpoint`)."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return None if (path / "state.json").is_file() else "no manifest.json and no state.json"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "its manifest.json is unreadable"
    for name, record in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != record["bytes"]:
            return f"{name} has {size} bytes, the manifest records {record['bytes']}"
        if file_sha256(file) != record["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


@dataclasses.dataclass
class Checkpoint:
    """What a checkpoint folder holds (see the module docstring)."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    state: dict[str, Any]
    objective_state: dict[str, torch.Tensor]


def load_checkpoint(path: Path) -> Checkpoint:
    """Verifies and loads checkpoint folder ``path``.

    Raises:
        CheckpointError: the folder is damaged (what is wrong is in the message).
    """
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}.")
    objective_file = path / "objective.safetensors"
    try:
        state = json.loads((path / "state.json").read_text())
        checkpoint = Checkpoint(
            path=path,
            weights=load_file(str(path / WEIGHTS_FILE)),
            optimizer_state=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
            state=state,
            objective_state=load_file(str(objective_file)) if objective_file.is_file() else {},
        )
        int(state["epoch"]), int(state["global_step"]), dict(state["advantage"])
    except Exception as error:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        reason = " ".join(str(error).split())[:200]
        raise CheckpointError(f"checkpoint {path} is damaged: {type(error).__name__}: {reason}.") from None
    return checkpoint


def load_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The trained weights of checkpoint folder ``path`` (what ``align-gen sample`` / ``evaluate``
    of a checkpoint need), verified against its manifest when it has one.

    Raises:
        CheckpointError: the folder does not match its manifest, or its weights are unreadable.
    """
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}.")
    try:
        return load_file(str(path / WEIGHTS_FILE))
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS_FILE} is unreadable ({error}).") from None


def resume_checkpoint(resume: str | None, output_dir: Path, warn: Callable[[str], None]) -> Checkpoint | None:
    """The checkpoint to resume from: with ``latest``, the newest valid one in ``output_dir``
    (damaged ones are skipped with a warning; None when there is none); with a folder, that one.

    Raises:
        CheckpointError: the named folder is not a checkpoint, or is damaged.
    """
    if resume is None:
        return None
    if resume != "latest":
        if not (Path(resume) / "state.json").is_file():
            raise CheckpointError(f"resume: {resume} is not a checkpoint folder (no state.json in it).")
        return load_checkpoint(Path(resume))
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as error:
            warn(f"warning: {error} Skipping it; trying the previous checkpoint.")
    return None
