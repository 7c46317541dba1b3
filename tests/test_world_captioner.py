"""The tiny world's captioning VLM: the shipped model names held-out colours, runs as a VLM
policy, and its build stage runs and resumes."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from align_gen.world import captioner, clip, shapes
from align_gen.world.build import MANIFEST, SHIPPED_DIR, WorldBuildConfig, build_world, file_digest

SHIPPED = SHIPPED_DIR / "captioner"


def load_shipped():
    from align_gen.policies.loading import load_vlm

    return load_vlm(str(SHIPPED))


def held_out_singles(count: int, seed: int = 7) -> tuple[torch.Tensor, list[shapes.Scene]]:
    rng = np.random.default_rng(seed)
    scenes = [shapes.single_shape_scene(rng, "heldout") for _ in range(count)]
    return torch.stack([shapes.to_tensor(shapes.render(scene)) for scene in scenes]), scenes


@pytest.mark.usefixtures("single_thread")
def test_shipped_captioner_names_the_colour_of_held_out_shapes() -> None:
    model, processor = load_shipped()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert next(model.parameters()).dtype == torch.float32
    images, scenes = held_out_singles(120)
    said = captioner.greedy_answers(model, processor, images, captioner.QUESTIONS["colour"])
    accuracy = np.mean([answer == scene.shapes[0].colour for answer, scene in zip(said, scenes, strict=True)])
    assert accuracy >= 0.8, (accuracy, said[:10])


def test_shipped_captioner_sees_with_the_shipped_clip_s_vision_tower() -> None:
    """Its processor normalises as the world CLIP does, and (the tower being frozen in training)
    its vision weights are the CLIP's."""
    model, processor = load_shipped()
    clip_model, _ = clip.load_clip(SHIPPED_DIR / "clip")
    images, _ = held_out_singles(4)
    pixels = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    from PIL import Image

    processed = processor.image_processor([Image.fromarray(p) for p in pixels], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processed, clip.normalise_images(images))
    for (name, ours), theirs in zip(model.model.vision_tower.state_dict().items(), clip_model.vision_model.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name


@pytest.mark.usefixtures("single_thread")
def test_shipped_captioner_is_a_vlm_policy_that_samples_answers() -> None:
    from align_gen.config import ModelConfig, SampleConfig
    from align_gen.policies import VLMPolicy, build_policy

    policy = build_policy(
        ModelConfig(pretrained="align-gen:world-captioner"),  # its shipped name: the folder SHIPPED
        SampleConfig(max_new_tokens=3, temperature=0.5),
        "cpu",
        trainable=False,
    )
    assert isinstance(policy, VLMPolicy) and policy.resolution == shapes.IMAGE_SIZE
    images, scenes = held_out_singles(8, seed=3)
    rollout = policy.sample([captioner.QUESTIONS["colour"]] * 8, images=images, generator=torch.Generator().manual_seed(0))
    assert rollout.trajectory.shape == (8, 3) and (rollout.log_probs[rollout.step_mask] <= 0).all()
    right = [text == scene.shapes[0].colour for text, scene in zip(rollout.texts, scenes, strict=True)]
    assert sum(right) >= 6, rollout.texts


def test_answer_loss_scores_answer_tokens_only() -> None:
    """Uniform logits over V = 5 tokens: every scored token's NLL is log 5, so the loss is log 5
    whatever the prompt; a confident right prediction on a prompt token changes nothing."""
    batch = captioner.teacher_forcing_batch([[1, 2, 3], [1, 2]], [[4, 0], [3, 4, 0]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 0], [1, 2, 3, 4, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["answer_mask"].tolist() == [[False, False, False, True, True], [False, False, True, True, True]]
    logits = torch.zeros(2, 5, 5)
    logits[0, 0, 2] = 50.0  # predicts prompt token 2 of row 0: not scored
    loss = captioner.answer_loss(logits, batch["input_ids"], batch["answer_mask"])
    assert math.isclose(loss.item(), math.log(5), rel_tol=1e-6)


def test_a_relation_caption_mirrors_to_the_other_wording() -> None:
    assert captioner.mirrored_caption("a red circle left of an orange square") == "an orange square right of a red circle"
    assert captioner.mirrored_caption("a blue square below a red circle") == "a red circle above a blue square"
    assert captioner.mirrored_caption("two green triangles") == "two green triangles"
    assert captioner.mirrored_caption("a large red circle") == "a large red circle"


def test_resumed_captioner_training_equals_an_uninterrupted_run() -> None:
    clip_model, _ = clip.load_clip(SHIPPED_DIR / "clip")
    config = WorldBuildConfig().quick().captioner
    straight, _ = captioner.train_captioner(config, clip_model)
    saved = {}

    def on_step(step, loss, model, optimizer) -> None:
        if step == 2:
            saved.update(model={k: v.clone() for k, v in model.state_dict().items()}, optimizer=optimizer.state_dict(), step=step)

    captioner.train_captioner(dataclasses.replace(config, steps=2), clip_model, on_step=on_step)
    resumed, _ = captioner.train_captioner(config, clip_model, state=saved)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_quick_build_writes_a_loadable_captioner(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = WorldBuildConfig().quick()
    with pytest.raises(FileNotFoundError, match="clip"):
        build_world(tmp_path, config, ("captioner",))
    shutil.copytree(SHIPPED_DIR / "clip", tmp_path / "clip")  # the stage reads <out>/clip
    manifest = build_world(tmp_path, config, ("captioner",))
    record = manifest["stages"]["captioner"]
    assert set(record["quality"]) == {"colour", "shape", "caption", "caption_either_wording"}
    assert "captioner/model.safetensors" in record["files"]
    assert all(file_digest(tmp_path / name) == digest for name, digest in record["files"].items())
    assert json.loads((tmp_path / MANIFEST).read_text())["stages"]["captioner"] == record
    from align_gen.policies.loading import is_vlm_source, load_vlm

    assert is_vlm_source(str(tmp_path / "captioner"))
    model, processor = load_vlm(str(tmp_path / "captioner"))
    said = captioner.greedy_answers(model, processor, held_out_singles(2)[0], captioner.QUESTIONS["shape"], max_new_tokens=2)
    assert len(said) == 2 and all(isinstance(text, str) for text in said)
    build_world(tmp_path, config, ("captioner",))
    assert "captioner: already built" in capsys.readouterr().out


def test_an_interrupted_captioner_build_resumes_from_its_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after step 3 of 4 (checkpoints every 2 steps), the build resumes at step 2 and
    writes the same weights as an uninterrupted build."""
    config = WorldBuildConfig().quick()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out in (straight, resumed):
        shutil.copytree(SHIPPED_DIR / "clip", out / "clip")
    expected = build_world(straight, config, ("captioner",))["stages"]["captioner"]["files"]["captioner/model.safetensors"]
    train = captioner.train_captioner

    def interrupted(train_config, clip_model, state=None, on_step=None):
        def stop(step, *args) -> None:
            on_step(step, *args)
            if step == 3:
                raise KeyboardInterrupt

        return train(train_config, clip_model, state, stop)

    monkeypatch.setattr(captioner, "train_captioner", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_world(resumed, config, ("captioner",))
    assert torch.load(resumed / ".build" / "captioner.pt", weights_only=False)["step"] == 2
    started_at = []

    def resuming(train_config, clip_model, state=None, on_step=None):
        started_at.append(state["step"] if state else 0)
        return train(train_config, clip_model, state, on_step)

    monkeypatch.setattr(captioner, "train_captioner", resuming)
    record = build_world(resumed, config, ("captioner",))["stages"]["captioner"]
    assert started_at == [2]
    assert record["files"]["captioner/model.safetensors"] == expected
    assert not (resumed / ".build").exists()
