"""``align-gen world build``: trains the tiny world's models, deterministically and resumably.

Each stage trains one model from the procedural shapes world (:mod:`align_gen.world.shapes`)
and writes it, in the format of the real model it stands in for, to ``<out>/<stage>/``. A stage
saves a checkpoint every ``checkpoint_every`` steps in ``<out>/.build/<stage>.pt``; running the
command again resumes there (an interrupted build loses at most that many steps) and skips
stages that are done. ``<out>/manifest.json`` records each stage's training config, its
measured quality, its wall time and the sha256 of every file it wrote, so a test can check that
the shipped weights are what the build config says.

Stages built so far: ``clip`` (the world's CLIP: its ``clip_score`` reward and text encoder).
The VAE, the diffusion UNet, the captioning VLM and the learned preference reward follow (see
the README's status).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align_gen.world import clip, shapes

SHIPPED_DIR = Path(__file__).parent / "weights"  # what the package ships (and make demo uses)
MANIFEST = "manifest.json"
STAGES = ("clip",)


@dataclasses.dataclass(frozen=True)
class WorldBuildConfig:
    """The whole build: the world's seed and each stage's training config."""

    seed: int = 0
    checkpoint_every: int = 50
    clip: clip.ClipTrainConfig = dataclasses.field(default_factory=clip.ClipTrainConfig)

    def quick(self) -> WorldBuildConfig:
        """A few steps of every stage: checks the build end to end (not for shipping)."""
        return dataclasses.replace(
            self, checkpoint_every=2, clip=dataclasses.replace(self.clip, steps=4, batch_size=16, warmup_steps=1)
        )


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def build_world(out: Path, config: WorldBuildConfig = WorldBuildConfig(), stages: tuple[str, ...] = STAGES) -> dict:
    """Builds ``stages`` into ``out`` (resuming, and skipping stages already built with the same
    config); returns the manifest."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown world build stage(s) {unknown}; stages: {', '.join(STAGES)}")
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    for stage in stages:
        recorded = manifest["stages"].get(stage)
        if recorded is not None and recorded["config"] == _stage_config(config, stage):
            print(f"{stage}: already built ({out / stage}); delete it to rebuild")
            continue
        manifest["stages"][stage] = _STAGE_BUILDERS[stage](out, config)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if (out / ".build").is_dir() and not any((out / ".build").iterdir()):
        (out / ".build").rmdir()
    return manifest


def _stage_config(config: WorldBuildConfig, stage: str) -> dict:
    return {"seed": config.seed, **dataclasses.asdict(getattr(config, stage))}


def _build_clip(out: Path, config: WorldBuildConfig) -> dict:
    checkpoint = out / ".build" / "clip.pt"
    state = torch.load(checkpoint, weights_only=False) if checkpoint.is_file() else None
    world = shapes.ShapesWorld(config.seed)
    train_config = config.clip
    started = time.perf_counter()
    # tqdm's bar shows the time left: the estimate the README promises.
    bar = tqdm(total=train_config.steps, initial=state["step"] if state else 0, desc="world clip", unit="step")

    def on_step(step: int, loss: float, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % config.checkpoint_every == 0 and step < train_config.steps:
            _save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step})

    model, tokenizer = clip.train_clip(train_config, world, state, on_step)
    bar.close()
    seconds = time.perf_counter() - started
    folder = out / "clip"
    clip.save_clip(model, tokenizer, folder)
    quality = clip.zero_shot_accuracy(model, tokenizer, world)
    checkpoint.unlink(missing_ok=True)
    print(f"clip: zero-shot held-out colour {quality['colour']:.1%}, shape {quality['shape']:.1%}; {folder}")
    return {
        "config": _stage_config(config, "clip"),
        "quality": quality,
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "files": {str(p.relative_to(out)): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()},
    }


def _save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file and renamed, so a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


_STAGE_BUILDERS = {"clip": _build_clip}
