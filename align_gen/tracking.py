"""Run metrics: one JSON line per epoch in metrics.jsonl, TensorBoard when installed, and the
learning-curve plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends per-epoch metrics; on resume, drops lines of epochs that will be redone."""

    def __init__(self, output_dir: Path, *, start_epoch: int, tensorboard: bool, enabled: bool = True):
        self.path = output_dir / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["epoch"] < start_epoch]
            self.path.write_text("".join(line + "\n" for line in kept))
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
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, metrics["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_learning_curve(metrics_path: str | Path, out_path: str | Path, key: str = "reward_mean") -> None:
    """Plots ``key`` (with +-1 std when ``<key minus _mean>_std`` exists) against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    epochs = [row["epoch"] for row in rows]
    values = [row[key] for row in rows]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(epochs, values, marker="o", label=key)
    std_key = key.replace("_mean", "_std")
    if std_key != key and all(std_key in row for row in rows):
        low = [v - row[std_key] for v, row in zip(values, rows, strict=True)]
        high = [v + row[std_key] for v, row in zip(values, rows, strict=True)]
        axis.fill_between(epochs, low, high, alpha=0.2, label="+-1 std")
    axis.set_xlabel("epoch")
    axis.set_ylabel(key)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
