"""``clip_score`` / ``clip_text_image`` with a transformers CLIP folder (``model=<folder>``): the
tiny world's CLIP at its real size with random weights, saved by ``align_gen.world.clip.save_clip``
(float16 weights, a word-level 16-token tokenizer, a 32 px image processor) and loaded back
through the reward's own code, as the world's reward is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import CLIPModel

from align_gen.world.clip import ClipTrainConfig, build_clip, build_tokenizer, embed, save_clip
from align_gen.world.shapes import ShapesWorld
from reward_models import ClipScore, TransformersClipEncoder, get_reward
from reward_models.errors import RewardConfigError, RewardWeightsMissingError

LONG_TEXT = " ".join(["a red circle left of a blue square"] * 4)  # 32 words: past 16 tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_tokenizer()
    model = build_clip(ClipTrainConfig(), tokenizer)
    path = tmp_path_factory.mktemp("world") / "clip"
    save_clip(model, tokenizer, path)
    return path


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, list[str]]:
    images, captions, _ = ShapesWorld(seed=0).batch(4)  # (4, 3, 32, 32) in [0, 1]
    return images, captions


@pytest.fixture(scope="module")
def reward(folder: Path) -> ClipScore:
    built = get_reward("clip_score", model=str(folder), device="cpu", batch_size=3)
    assert isinstance(built, ClipScore)
    return built


def reference_cosine(folder: Path, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """<f_img, f_txt> of the world's own ``embed`` on the saved (float16) weights in float32."""
    model = CLIPModel.from_pretrained(folder).float().eval()
    with torch.no_grad():
        image_features, text_features = embed(model, build_tokenizer(), images, texts)
    return (image_features * text_features).sum(dim=-1)  # (B,)


def test_clip_score_is_the_world_cosine(
    folder: Path, reward: ClipScore, batch: tuple[torch.Tensor, list[str]]
) -> None:
    images, captions = batch
    scores = reward(images, captions)  # two chunks: 3 + 1
    assert scores.shape == (4,) and scores.dtype == torch.float32
    torch.testing.assert_close(
        scores, reference_cosine(folder, images, captions), atol=1e-4, rtol=0
    )
    encoder = reward.encoder
    assert isinstance(encoder, TransformersClipEncoder)
    assert encoder.max_tokens == 16 and encoder.embed_dim == 128 and encoder.image_size == (32, 32)
    assert encoder.model.dtype == torch.float32


def test_clip_text_image_scores_texts_truncated_to_16_tokens(
    folder: Path, reward: ClipScore, batch: tuple[torch.Tensor, list[str]]
) -> None:
    images, captions = batch
    texts = [*captions[:3], LONG_TEXT]
    text_reward = get_reward("clip_text_image", model=str(folder), device="cpu")
    scores = text_reward(images, ["what is drawn?"] * 4, texts=texts)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores[:3], reward(images, captions)[:3], atol=1e-6, rtol=0)
    # <bos> + 14 words + <eos> = 16 tokens: the long text scores as its first 14 words.
    first_words = " ".join(LONG_TEXT.split()[:14])
    expected = reference_cosine(folder, images[3:], [first_words])
    torch.testing.assert_close(scores[3:], expected, atol=1e-4, rtol=0)


def test_model_with_open_clip_options_is_a_config_error(folder: Path) -> None:
    with pytest.raises(RewardConfigError, match=r"clip_score: model=.* and model_name \(open_clip\)"):
        get_reward("clip_score", model=str(folder), model_name="ViT-B-32")
    with pytest.raises(RewardConfigError, match="model_name / pretrained"):
        get_reward("clip_text_image", model=str(folder), model_name="ViT-B-32", pretrained="openai")
    with pytest.raises(RewardConfigError, match="processor is an option of a transformers CLIP"):
        get_reward("clip_score", processor=str(folder))


def test_missing_folder_is_a_one_line_error_naming_the_option(tmp_path: Path) -> None:
    missing = tmp_path / "world_clip"
    for name in ("clip_score", "clip_text_image"):
        with pytest.raises(RewardWeightsMissingError) as info:
            get_reward(name, model=str(missing))
        message = str(info.value)
        assert "\n" not in message
        assert f"{missing} does not exist" in message
        assert f"reward.options.{name}.model=/path/to/" in message


def test_larger_images_are_resized_to_the_model_input(
    reward: ClipScore, batch: tuple[torch.Tensor, list[str]]
) -> None:
    images, captions = batch
    large = F.interpolate(images, size=(64, 64), mode="bilinear").clamp(0, 1)  # (4, 3, 64, 64)
    pixels = reward.encoder.preprocess(large)
    assert pixels.shape == (4, 3, 32, 32)
    # The processor's shortest-edge resize (bicubic, antialiased) then the same 32 px path.
    resized = F.interpolate(large, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(
        reward(large, captions), reward(resized, captions), atol=1e-6, rtol=0
    )
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5 processes tensors with torchvision: the same ops, so the same numbers,
        # except that the reward clips bicubic overshoot to [0, 1] (= [-1, 1] at mean/std 0.5),
        # as uint8 processors do, and the shapes' sharp edges do overshoot.
        image_processor = reward.encoder.processor.image_processor
        expected = image_processor(large, do_rescale=False, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixels, expected.clamp(-1, 1), atol=1e-5, rtol=0)
