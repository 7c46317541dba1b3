"""A run's output folder: never overwritten by accident, resumed only with the config it ran with.

:func:`open_run` is the first thing :func:`align_gen.train.train` does, before any model loads:

- a folder that already holds a run is refused unless the run is resumed (``resume: latest``)
  or replaced on purpose (``overwrite: true``); results are never deleted implicitly;
- on resume, what a kill left half-done is tidied (:func:`~align_gen.checkpoint.recover_interrupted`)
  and the newest valid checkpoint is loaded (damaged ones are skipped with a warning);
- the config is compared with the one the run last used: changes that only extend or observe the
  run (``epochs``, checkpoints kept, grids, evaluation, monitors) are shown and accepted, changes
  that alter what is trained are refused unless ``allow_config_changes: true``;
- every config the run has used is kept (:func:`record_config`): ``config.yaml`` is the current
  one and ``config_history/epoch_NNNNNN.yaml`` the one that ran from epoch NNNNNN on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from align_gen.checkpoint import CHECKPOINT_DIR, Checkpoint, recover_interrupted, resume_checkpoint
from align_gen.config import RunConfig, to_dict
from align_gen.durable import clear_deleting, file_in_the_way, remove_tree, write_atomic
from align_gen.errors import ConfigError

CONFIG_FILE = "config.yaml"
CONFIG_HISTORY_DIR = "config_history"

# What a run writes into its folder besides its configs; any of these means the folder holds a run.
RUN_OUTPUTS = (
    "metrics.jsonl",
    "evaluation.jsonl",
    CHECKPOINT_DIR,
    "final",
    "grids",
    "tensorboard",
    "learning_curve.png",
)

# Config keys that say how a run is launched, not what it trains: never compared on resume.
LAUNCH_KEYS = ("resume", "overwrite", "allow_config_changes", "output_dir")
# Keys (and sections) whose change on resume leaves the trained trajectory as it was: the run's
# length, its bookkeeping, and what it measures with its own random streams.
BOOKKEEPING_KEYS = ("epochs", "save_every", "keep_checkpoints", "tensorboard", "grid", "evaluation", "monitors")


def existing_outputs(output_dir: Path) -> list[str]:
    """The names of :data:`RUN_OUTPUTS` present in ``output_dir``."""
    return [name for name in RUN_OUTPUTS if (output_dir / name).exists()]


def _existing_configs(output_dir: Path) -> list[str]:
    return [name for name in (CONFIG_FILE, CONFIG_HISTORY_DIR) if (output_dir / name).exists()]


def check_output_dir(config: RunConfig) -> None:
    """Refuses an output_dir that cannot hold a run or that holds one the config would replace.

    Raises:
        ConfigError: the path (or a parent) is a file, or it holds a run and neither
            ``resume`` nor ``overwrite`` says what to do with it.
    """
    output_dir = Path(config.output_dir)
    blocker = file_in_the_way(output_dir, is_folder=True)
    if blocker is not None:
        raise ConfigError(f"output_dir={config.output_dir}: {blocker} is a file, not a folder; choose another output_dir.")
    if config.overwrite and config.resume is not None:
        raise ConfigError("overwrite=true replaces the run in output_dir, resume continues it: give one of them.")
    found = existing_outputs(output_dir)
    if found and config.resume is None and not config.overwrite:
        raise ConfigError(
            f"output_dir={config.output_dir} already holds a run ({', '.join(found)}); nothing was changed. "
            "Continue it with resume=latest, start a new one with another output_dir, "
            "or replace it with overwrite=true (deletes its results)."
        )


def open_run(config: RunConfig, *, is_main: bool, barrier: Callable[[], None], say: Callable[[str], None]) -> Checkpoint | None:
    """Checks ``config.output_dir`` for the run and returns the checkpoint to resume from; writes
    nothing but what ``overwrite`` deletes and what a kill left half-done.

    ``is_main``: this process writes to the folder; ``barrier`` waits for every process;
    ``say`` prints on the main process.
    """
    check_output_dir(config)
    output_dir = Path(config.output_dir)
    if is_main:
        if config.overwrite:
            _delete_run(output_dir, say)
        if output_dir.is_dir():
            clear_deleting(output_dir)  # e.g. an old final/ whose replacement a kill interrupted
        for note in recover_interrupted(output_dir):
            say(note)
    barrier()
    checkpoint = resume_checkpoint(config.resume, output_dir, say if is_main else lambda _: None)
    start_epoch = 0 if checkpoint is None else int(checkpoint.state["epoch"])
    if checkpoint is not None:
        _check_training_mode(checkpoint, config)
    if config.resume is not None and checkpoint is None and existing_outputs(output_dir):
        say(f"{output_dir} has no valid checkpoint yet: the run starts again from epoch 0.")
    previous = _previous_config(output_dir) if config.resume is not None else None
    if previous is not None:
        _check_changes(previous, to_dict(config), start_epoch, config.allow_config_changes, say)
    return checkpoint


def _check_training_mode(checkpoint: Checkpoint, config: RunConfig) -> None:
    """Refuses to resume LoRA adapters as a full fine-tune, or the reverse."""
    holds_lora = any(".lora_A." in name or ".lora_B." in name for name in checkpoint.weights)
    if holds_lora != config.model.lora.enabled:
        saved, asked = ("LoRA adapters", "a full fine-tune") if holds_lora else ("a full fine-tune", "LoRA adapters")
        raise ConfigError(
            f"{checkpoint.path} holds {saved}, but model.lora.enabled={str(config.model.lora.enabled).lower()} "
            f"asks for {asked}; resume with model.lora.enabled={str(holds_lora).lower()}, or start a new run."
        )


def record_config(config: RunConfig, start_epoch: int) -> None:
    """Writes config.yaml (the current config) and, when it differs from the last one the run
    used, ``config_history/epoch_<start_epoch>.yaml``. Called once the run is set up, before
    its first output: a run that fails to start leaves no config behind."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    history = output_dir / CONFIG_HISTORY_DIR
    if config.resume is None:  # a fresh run: configs of an earlier start that produced nothing go
        if history.is_dir():
            remove_tree(history)
        previous = None
    else:
        previous = _previous_config(output_dir)
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    history.mkdir(exist_ok=True)
    if previous != _comparable(to_dict(config)) or not any(history.iterdir()):
        write_atomic(history / f"epoch_{start_epoch:06d}.yaml", text)
    write_atomic(output_dir / CONFIG_FILE, text)


def _delete_run(output_dir: Path, say: Callable[[str], None]) -> None:
    found = existing_outputs(output_dir) + _existing_configs(output_dir)
    for name in found:
        path = output_dir / name
        remove_tree(path) if path.is_dir() else path.unlink()
    if found:
        say(f"overwrite=true: deleted the previous run's {', '.join(found)} in {output_dir}")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in _flatten(data).items() if key.split(".")[0] not in LAUNCH_KEYS}


def _previous_config(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return _comparable(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} (the run's recorded config) is not valid YAML: {error}.") from None


def _check_changes(
    previous: dict[str, Any], current: dict[str, Any], start_epoch: int, allowed: bool, say: Callable[[str], None]
) -> None:
    """Shows the difference between the run's last config and this one; refuses trajectory changes."""
    current = _comparable(current)
    missing = object()
    changes = {
        key: (previous.get(key, missing), current.get(key, missing))
        for key in sorted(previous.keys() | current.keys())
        if previous.get(key, missing) != current.get(key, missing)
    }
    if not changes:
        return

    def shown(value: Any) -> str:
        return "(absent)" if value is missing else repr(value)

    described = [f"{key} {shown(old)} -> {shown(new)}" for key, (old, new) in changes.items()]
    trajectory = [key for key in changes if key.split(".")[0] not in BOOKKEEPING_KEYS]
    if trajectory and not allowed:
        raise ConfigError(
            f"resuming after epoch {start_epoch} with a config that changes what is trained: "
            f"{'; '.join(d for d, k in zip(described, changes, strict=True) if k in trajectory)}. "
            "Resume with the run's own config (its config.yaml), or accept the change with allow_config_changes=true."
        )
    for line in described:
        say(f"config change from epoch {start_epoch}: {line}")
