"""Run metrics: one JSON line per epoch in metrics.jsonl, one per held-out evaluation in
evaluation.jsonl, TensorBoard when installed, and the learning-curve plot."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from align_gen.durable import write_atomic

METRICS_FILE = "metrics.jsonl"
EVALUATION_FILE = "evaluation.jsonl"


class MetricsLog:
    """Appends one JSON line per call (flushed and fsync'd); on resume, drops the lines of epochs
    that will be redone, rewriting the file atomically, and a last line cut off by a crash.

    Each line's ``epoch_key`` field orders it: ``"epoch"`` (the epoch index) in metrics.jsonl,
    ``"epochs_done"`` (updates finished when it was measured) in evaluation.jsonl. Lines whose
    key is at least ``redo_from`` are dropped. TensorBoard scalars get ``tensorboard_prefix``.
    """

    def __init__(
        self,
        output_dir: Path,
        *,
        redo_from: int,
        tensorboard: bool,
        enabled: bool = True,
        filename: str = METRICS_FILE,
        epoch_key: str = "epoch",
        tensorboard_prefix: str = "",
    ):
        self.path = output_dir / filename
        self.enabled = enabled
        self.epoch_key = epoch_key
        self.prefix = tensorboard_prefix
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            kept = [row for row in read_metrics(self.path) if row[epoch_key] < redo_from]
            write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional
                return
            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != self.epoch_key:
                    self.writer.add_scalar(self.prefix + key, value, metrics[self.epoch_key])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class TornLineWarning(UserWarning):
    """A metrics file's last line was cut off mid-write (a crash or a full disk) and is ignored."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines metrics file. A last line cut off mid-write is dropped with a
    :class:`TornLineWarning`; a damaged line before it is an error (the file was edited)."""
    lines = [line for line in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not a JSON line; the file was edited or damaged.") from None
            warnings.warn(f"{path}: ignoring its last line, cut off mid-write: {line[:60]!r}", TornLineWarning, stacklevel=2)
    return rows


EPOCH_AXIS = "epochs of updates done when the samples were drawn"
KEY_LABELS = {"reward_mean": "mean reward"}


def plot_learning_curve(
    metrics_path: str | Path,
    out_path: str | Path,
    key: str = "reward_mean",
    evaluation_path: str | Path | None = None,
) -> None:
    """Writes :func:`learning_curve_figure` of a run's metrics (and held-out evaluations, when
    ``evaluation_path`` exists) to ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    evaluations = (
        read_metrics(evaluation_path) if evaluation_path is not None and Path(evaluation_path).is_file() else []
    )
    figure = learning_curve_figure(rows, evaluations, key)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)


def learning_curve_figure(rows: list[dict[str, Any]], evaluations: list[dict[str, Any]], key: str = "reward_mean"):
    """The learning curve: ``key`` of each training epoch (with +-1 std when ``<key minus
    _mean>_std`` exists) and the held-out evaluations' mean reward, on one x axis: the epochs of
    updates done when the samples were drawn. A training row ``"epoch": e`` holds the samples
    drawn before epoch e's update, so with e updates done; a held-out row ``"epochs_done": k``
    was sampled after k updates (0: before training). Epochs get integer ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in rows]
    values = [row[key] for row in rows]
    label = KEY_LABELS.get(key, key)
    figure, axis = plt.subplots(figsize=(6, 4))
    samples = f", {rows[0]['samples']} per epoch" if rows and "samples" in rows[0] else ""
    axis.plot(epochs, values, marker="o", label=f"training samples ({label}{samples})")
    std_key = key.replace("_mean", "_std")
    if std_key != key and rows and all(std_key in row for row in rows):
        low = [v - row[std_key] for v, row in zip(values, rows, strict=True)]
        high = [v + row[std_key] for v, row in zip(values, rows, strict=True)]
        axis.fill_between(epochs, low, high, alpha=0.2, label="training samples: +-1 std")
    if evaluations:
        axis.plot(
            [row["epochs_done"] for row in evaluations],
            [row["reward_mean"] for row in evaluations],
            marker="s",
            color="tab:red",
            label=f"held-out evaluation ({label}, {evaluations[0]['n']} samples)"
            if "n" in evaluations[0]
            else f"held-out evaluation ({label})",
        )
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel(EPOCH_AXIS)
    axis.set_ylabel(label if evaluations else f"{label} (training samples)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure
