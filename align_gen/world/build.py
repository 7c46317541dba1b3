"""``align-gen world build``: trains the tiny world's models, deterministically and resumably.

Each stage trains one model from the procedural shapes world (:mod:`align_gen.world.shapes`)
and writes it, in the format of the real model it stands in for, to ``<out>/<stage>/``. A stage
saves a checkpoint every ``checkpoint_every`` steps in ``<out>/.build/<stage>.pt``; running the
command again resumes there (an interrupted build loses at most that many steps) and skips
stages that are done. ``<out>/manifest.json`` records each stage's training config, its
measured quality, its wall time and the sha256 of every file it wrote, so a test can check that
the shipped weights are what the build config says.

Stages, in order (a later one reads what an earlier one wrote):
- ``clip``: the world's CLIP (its ``clip_score`` reward and its text encoder);
- ``vae``: an SD-format ``AutoencoderKL`` (32 px images <-> 16 x 16 x 4 latents);
- ``unet``: an SD-format text-to-image UNet on those latents, conditioned on the CLIP's text
  tower, written with them as a ``StableDiffusionPipeline`` folder (``<out>/sd``);
- ``captioner``: a LLaVA-format captioning VLM whose vision tower is the CLIP's (reads
  ``<out>/clip``), answering colour / shape questions and captioning (``<out>/captioner``).
The learned preference reward follows (see the README's status).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align_gen.durable import fsync_dir, fsync_file
from align_gen.errors import AlignGenError
from align_gen.world import WEIGHTS_DIR, captioner, clip, diffusion, shapes

SHIPPED_DIR = WEIGHTS_DIR  # what the package ships (align-gen:world... names these folders)
MANIFEST = "manifest.json"
STAGES = ("clip", "vae", "unet", "captioner")
OUTPUTS = {"clip": "clip", "vae": "vae", "unet": "sd", "captioner": "captioner"}  # each stage's folder under the output


@dataclasses.dataclass(frozen=True)
class WorldBuildConfig:
    """The whole build: the world's seed and each stage's training config."""

    seed: int = 0
    checkpoint_every: int = 50
    clip: clip.ClipTrainConfig = dataclasses.field(default_factory=clip.ClipTrainConfig)
    vae: diffusion.VaeTrainConfig = dataclasses.field(default_factory=diffusion.VaeTrainConfig)
    unet: diffusion.UnetTrainConfig = dataclasses.field(default_factory=diffusion.UnetTrainConfig)
    captioner: captioner.CaptionerTrainConfig = dataclasses.field(default_factory=captioner.CaptionerTrainConfig)

    def quick(self) -> WorldBuildConfig:
        """A few steps of every stage: checks the build end to end (not for shipping)."""
        few = {"steps": 4, "batch_size": 8, "warmup_steps": 1}
        return dataclasses.replace(
            self,
            checkpoint_every=2,
            clip=dataclasses.replace(self.clip, **{**few, "batch_size": 16}),
            vae=dataclasses.replace(self.vae, **few, scale_images=16),
            unet=dataclasses.replace(self.unet, **few),
            captioner=dataclasses.replace(self.captioner, **few, eval_images=8),
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
            print(f"{stage}: already built ({out / OUTPUTS[stage]}); delete it to rebuild")
            continue
        manifest["stages"][stage] = _STAGE_BUILDERS[stage](out, config)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if (out / ".build").is_dir() and not any((out / ".build").iterdir()):
        (out / ".build").rmdir()
    return manifest


def _stage_config(config: WorldBuildConfig, stage: str) -> dict:
    """The stage's config as the manifest stores it (JSON types: tuples become lists)."""
    return json.loads(json.dumps({"seed": config.seed, **dataclasses.asdict(getattr(config, stage))}))


def _train_stage(out: Path, config: WorldBuildConfig, stage: str, train) -> tuple[torch.nn.Module, float]:
    """Runs ``train(state, on_step)`` for ``stage`` with a progress bar (its time estimate) and
    a checkpoint every ``config.checkpoint_every`` steps; returns (model, seconds)."""
    checkpoint = out / ".build" / f"{stage}.pt"
    state = _load_checkpoint(checkpoint) if checkpoint.is_file() else None
    steps = getattr(config, stage).steps
    started = time.perf_counter()
    bar = tqdm(total=steps, initial=state["step"] if state else 0, desc=f"world {stage}", unit="step")

    def on_step(step: int, loss: float, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step % config.checkpoint_every == 0 and step < steps:
            _save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step})

    result = train(state, on_step)
    bar.close()
    checkpoint.unlink(missing_ok=True)
    return result, time.perf_counter() - started


def _record(out: Path, config: WorldBuildConfig, stage: str, folder: Path, quality: dict, seconds: float) -> dict:
    print(f"{stage}: {quality}; {folder}")
    return {
        "config": _stage_config(config, stage),
        "quality": quality,
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "files": {str(p.relative_to(out)): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()},
    }


def _build_clip(out: Path, config: WorldBuildConfig) -> dict:
    world = shapes.ShapesWorld(config.seed)
    (model, tokenizer), seconds = _train_stage(
        out, config, "clip", lambda state, on_step: clip.train_clip(config.clip, world, state, on_step)
    )
    clip.save_clip(model, tokenizer, out / "clip")
    return _record(out, config, "clip", out / "clip", clip.zero_shot_accuracy(model, tokenizer, world), seconds)


def _build_vae(out: Path, config: WorldBuildConfig) -> dict:
    world = shapes.ShapesWorld(config.seed)
    vae, seconds = _train_stage(
        out, config, "vae", lambda state, on_step: diffusion.train_vae(config.vae, world, state, on_step)
    )
    folder = out / "vae"
    quality = {"psnr_db": diffusion.vae_psnr(vae, world)}
    folder.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(vae).to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return _record(out, config, "vae", folder, quality, seconds)


def _build_unet(out: Path, config: WorldBuildConfig) -> dict:
    from diffusers import AutoencoderKL

    for needed in ("clip", "vae"):
        if not (out / needed).is_dir():
            raise FileNotFoundError(f"the unet stage needs the {needed} stage's output in {out / needed}; build it first")
    world = shapes.ShapesWorld(config.seed)
    vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).eval()
    text_encoder, tokenizer = diffusion.load_text_encoder(out / "clip")

    def train(state, on_step):
        return diffusion.train_unet(config.unet, world, vae, text_encoder, tokenizer, state, on_step)

    unet, seconds = _train_stage(out, config, "unet", train)
    pipeline = diffusion.assemble_pipeline(vae, unet, out / "clip")
    diffusion.save_pipeline(pipeline, out / "sd")
    clip_model, clip_tokenizer = clip.load_clip(out / "clip")
    heldout = shapes.all_captions("heldout")
    prompts = heldout[:: max(1, len(heldout) // 32)]
    quality = diffusion.prompt_alignment(pipeline, clip_model, clip_tokenizer, prompts, seeds=[0, 1])
    return _record(out, config, "unet", out / "sd", quality, seconds)


def _build_captioner(out: Path, config: WorldBuildConfig) -> dict:
    if not (out / "clip").is_dir():
        raise FileNotFoundError(f"the captioner stage needs the clip stage's output in {out / 'clip'}; build it first")
    clip_model, _ = clip.load_clip(out / "clip")
    (model, processor), seconds = _train_stage(
        out, config, "captioner", lambda state, on_step: captioner.train_captioner(config.captioner, clip_model, state, on_step)
    )
    captioner.save_captioner(model, processor, out / "captioner")
    world = shapes.ShapesWorld(config.seed)
    quality = captioner.answer_accuracy(model, processor, world, config.captioner.eval_images)
    return _record(out, config, "captioner", out / "captioner", quality, seconds)


def _save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file, fsync'd and renamed, so a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    fsync_file(temporary)
    temporary.replace(path)
    fsync_dir(path.parent)


def _load_checkpoint(path: Path) -> dict:
    """A stage checkpoint, loaded safely: tensors and plain values only, never pickled code."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling refusals and truncation alike
        reason = " ".join(str(error).split())[:160]
        raise AlignGenError(
            f"{path} is not a world-build checkpoint of tensors ({type(error).__name__}: {reason}); "
            "delete it to restart the stage."
        ) from None


_STAGE_BUILDERS = {"clip": _build_clip, "vae": _build_vae, "unet": _build_unet, "captioner": _build_captioner}
