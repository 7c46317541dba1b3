"""The tiny world's build: the shipped CLIP's quality, the manifest that pins it to its build
config, resumable training, and the `align-gen world build` command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from align_gen.cli import main
from align_gen.world import clip, shapes
from align_gen.world.build import MANIFEST, SHIPPED_DIR, WorldBuildConfig, build_world, file_digest

SHIPPED_ALIGNMENT_MARGIN = 0.5  # measured: 0.728 own vs 0.013 other prompts (README, The tiny world)


def load_shipped_clip():
    from transformers import AutoTokenizer, CLIPModel

    folder = SHIPPED_DIR / "clip"
    return CLIPModel.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def test_shipped_weights_are_what_the_build_config_says() -> None:
    manifest = json.loads((SHIPPED_DIR / MANIFEST).read_text())
    config = WorldBuildConfig()
    assert set(manifest["stages"]) == {"clip", "vae", "unet", "captioner"}
    for stage, recorded in manifest["stages"].items():
        expected = {"seed": config.seed, **dataclasses.asdict(getattr(config, stage))}
        assert recorded["config"] == json.loads(json.dumps(expected)), stage
        for name, digest in recorded["files"].items():
            assert file_digest(SHIPPED_DIR / name) == digest, name
    total = sum(path.stat().st_size for path in SHIPPED_DIR.rglob("*") if path.is_file())
    assert total < 25 * 2**20, total  # the budget for everything the world ships


@pytest.mark.usefixtures("single_thread")
def test_shipped_clip_classifies_held_out_colours_and_shapes() -> None:
    model, tokenizer = load_shipped_clip()
    accuracy = clip.zero_shot_accuracy(model, tokenizer, shapes.ShapesWorld(0))
    assert accuracy["colour"] >= 0.90 and accuracy["shape"] >= 0.80, accuracy


@pytest.mark.usefixtures("single_thread")
def test_shipped_clip_prefers_true_captions_to_shuffled_ones() -> None:
    model, tokenizer = load_shipped_clip()
    images, captions, _ = shapes.ShapesWorld(0).dataset(128, "heldout")
    image_features, text_features = clip.embed(model, tokenizer, images, captions)
    matched = (image_features * text_features).sum(dim=1)
    shuffled = (image_features * text_features.roll(1, dims=0)).sum(dim=1)
    assert matched.mean() > shuffled.mean() + 0.3, (matched.mean(), shuffled.mean())


def test_resumed_training_equals_an_uninterrupted_run() -> None:
    config = WorldBuildConfig().quick().clip
    world = shapes.ShapesWorld(0)
    straight, _ = clip.train_clip(config, world)
    saved = {}

    def on_step(step, loss, model, optimizer) -> None:
        if step == 2:
            saved.update(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step)
            saved["model"] = {k: v.clone() for k, v in saved["model"].items()}

    clip.train_clip(dataclasses.replace(config, steps=2), world, on_step=on_step)
    resumed, _ = clip.train_clip(config, world, state=saved)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_quick_build_writes_a_loadable_clip_and_a_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["world", "build", "--out", str(tmp_path), "--quick"]) == 0
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert set(manifest["stages"]) == {"clip", "vae", "unet", "captioner"}
    for record in manifest["stages"].values():
        assert all(file_digest(tmp_path / n) == d for n, d in record["files"].items())
    assert "clip/model.safetensors" in manifest["stages"]["clip"]["files"]
    assert "sd/model_index.json" in manifest["stages"]["unet"]["files"]
    assert "captioner/model.safetensors" in manifest["stages"]["captioner"]["files"]
    from reward_models import get_reward

    images, captions, _ = shapes.ShapesWorld(1).dataset(4, "train")
    scores = get_reward("clip_score", model=str(tmp_path / "clip"))(images, captions)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    # a second run skips what is built
    build_world(tmp_path, WorldBuildConfig().quick())
    assert "already built" in capsys.readouterr().out
    assert main(["world", "build", "--out", str(tmp_path), "--stages", "unet2"]) == 2


@pytest.mark.usefixtures("single_thread")
def test_shipped_world_model_draws_what_its_prompts_say() -> None:
    """The base world model loads through the same DiffusionPolicy as SD1.5, and its samples
    (its diffusers pipeline: DDIM, 20 steps, eta 0, guidance 3) match their own held-out prompts
    far better than other prompts, by the world's CLIP."""
    from align_gen.config import ModelConfig, SampleConfig
    from align_gen.policies import build_policy
    from align_gen.world.diffusion import prompt_alignment

    policy = build_policy(
        ModelConfig(pretrained=str(SHIPPED_DIR / "sd")),
        SampleConfig(num_steps=20, guidance_scale=3.0),
        "cpu",
        trainable=False,
    )
    assert policy.resolution == shapes.IMAGE_SIZE
    clip_model, clip_tokenizer = load_shipped_clip()
    prompts = shapes.all_captions("heldout")[::6]
    quality = prompt_alignment(policy.pipeline, clip_model, clip_tokenizer, prompts, seeds=[0, 1])
    assert quality["matched"] > quality["shuffled"] + SHIPPED_ALIGNMENT_MARGIN, quality


class _Payload:
    """Unpickling this runs code: it touches ``marker`` (what a malicious file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_stage_checkpoint_is_loaded_safely(tmp_path: Path) -> None:
    """A resumed build loads its stage checkpoint with weights_only: a pickle that would run
    code is refused with one clear error, and the code never runs."""
    from align_gen.errors import AlignGenError

    marker = tmp_path / "code-ran"
    (tmp_path / "out" / ".build").mkdir(parents=True)
    torch.save({"model": _Payload(marker), "step": 1}, tmp_path / "out" / ".build" / "clip.pt")
    with pytest.raises(AlignGenError, match="clip.pt is not a world-build checkpoint of tensors"):
        build_world(tmp_path / "out", WorldBuildConfig().quick(), ("clip",))
    assert not marker.exists()
