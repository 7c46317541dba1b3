"""PickScore on a tiny *real* transformers CLIPModel + CLIPProcessor (random weights, the real
CLIP BPE vocabulary), saved with save_pretrained and loaded back through the reward's own
``model=<folder>`` code, as a user's local copy of PickScore_v1 would be."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from huggingface_hub import constants as hub_constants
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
)

from align_gen.builtins.tiny_diffusion import build_clip_tokenizer
from reward_models import available_rewards, build_reward, get_reward
from reward_models.errors import RewardWeightsMissingError
from reward_models.pickscore import PickScore

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star on a black sky"]
# Not the OpenAI/LAION statistics, so a test fails if the reward ignores the processor's.
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
LOGIT_SCALE = 2.5  # exp(2.5) ~ 12.18; PickScore_v1 has ~4.6052 (exp = 100)


def tiny_clip() -> CLIPModel:
    """A 2-layer, width-32 CLIP on 32 px images (patch 8) and the real CLIP vocabulary."""
    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    config = CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=16,
        logit_scale_init_value=LOGIT_SCALE,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"model": model + processor folder, "bare": the model alone, "processor": processor}."""
    root = tmp_path_factory.mktemp("tiny_pickscore")
    model = tiny_clip()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=MEAN,
        image_std=STD,
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer())
    for name in ("model", "bare"):
        model.save_pretrained(root / name)
    processor.save_pretrained(root / "model")
    processor.save_pretrained(root / "processor")
    return {name: root / name for name in ("model", "bare", "processor")}


@pytest.fixture(scope="module")
def reward(folders: dict[str, Path]) -> PickScore:
    built = get_reward("pickscore", model=str(folders["model"]), device="cpu", batch_size=4)
    assert isinstance(built, PickScore)
    return built


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(4, 3, 32, 32)


def features(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]


def test_pickscore_is_registered() -> None:
    assert "pickscore" in available_rewards()


def test_score_matches_hand_computation(
    folders: dict[str, Path], reward: PickScore, images: torch.Tensor
) -> None:
    """32 px images need no resize or crop: pixels = (x - mean) / std. Expected score =
    exp(logit_scale) * <f_img / |f_img|, f_txt / |f_txt|> from a separately loaded CLIPModel."""
    scores = reward(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    model = CLIPModel.from_pretrained(folders["model"]).eval()
    pixels = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    tokens = build_clip_tokenizer()(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        image = features(model.get_image_features(pixel_values=pixels))
        text = features(
            model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        )
        cosine = image / image.norm(dim=-1, keepdim=True) * text / text.norm(dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * cosine.sum(dim=-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert float(reward.logit_scale) == pytest.approx(np.exp(LOGIT_SCALE), rel=1e-6)
    # Random weights: a prompt's own image need not win, but |score| <= exp(logit_scale).
    shuffled = reward(images, PROMPTS[1:] + PROMPTS[:1])
    assert shuffled.abs().max() <= np.exp(LOGIT_SCALE) + 1e-4


def test_batch_size_does_not_change_scores(reward: PickScore, images: torch.Tensor) -> None:
    one = copy.copy(reward)  # shares the loaded model; only the chunking differs
    one.batch_size = 1
    torch.testing.assert_close(one(images, PROMPTS), reward(images, PROMPTS), atol=1e-5, rtol=0)


def test_preprocessing_matches_the_processor_on_pil_images(reward: PickScore) -> None:
    torch.manual_seed(2)
    smooth = F.interpolate(torch.rand(1, 3, 6, 5), size=(48, 40), mode="bilinear")  # H=48, W=40
    ours = reward.preprocess(smooth)
    pil = Image.fromarray((smooth[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    reference = reward.processor.image_processor(images=[pil], return_tensors="pt")
    reference = reference["pixel_values"]
    assert ours.shape == reference.shape == (1, 3, 32, 32)
    assert (ours - reference).abs().max() < 0.05  # uint8 rounding and PIL-vs-torch bicubic
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5 processes tensors with torchvision: the same ops, so the same numbers.
        floats = reward.processor.image_processor(smooth, do_rescale=False, return_tensors="pt")
        torch.testing.assert_close(ours, floats["pixel_values"], atol=1e-5, rtol=0)


def test_separate_processor_folder_options_and_dtype(
    folders: dict[str, Path], reward: PickScore, images: torch.Tensor
) -> None:
    split = build_reward(
        {"pickscore": 0.5},
        {
            "pickscore": {
                "model": str(folders["bare"]),
                "processor": str(folders["processor"]),
                "device": "cpu",
                "dtype": "bfloat16",
            }
        },
    )
    scores = split(images, PROMPTS)
    assert scores.dtype == torch.float32
    assert split.rewards["pickscore"].model.dtype == torch.bfloat16  # type: ignore[attr-defined]
    expected = 0.5 * reward(images, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=0.1, rtol=0)  # bfloat16, scale ~12


def test_missing_weights_errors(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "PickScore_v1"
    with pytest.raises(RewardWeightsMissingError, match=f"{missing} does not exist.*pickscore.model="):
        get_reward("pickscore", model=str(missing))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    # The bare model folder has no processor config, so the default LAION processor is needed.
    with pytest.raises(RewardWeightsMissingError) as info:
        get_reward("pickscore", model=str(folders["bare"]), device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "'laion/CLIP-ViT-H-14-laion2B-s32B-b79K' from the hub offline" in message
    assert "reward.options.pickscore.processor=/path/to/" in message
    with pytest.raises(
        RewardWeightsMissingError,
        match=r"'yuvalkirstain/PickScore_v1' from the hub offline.*pickscore\.model=/path/to/Pick",
    ):
        get_reward("pickscore", processor=str(folders["processor"]), device="cpu")
    assert time.monotonic() - start < 5
    # A folder without weights names the folder.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "processor_config.json").write_text(json.dumps({}))
    with pytest.raises(RewardWeightsMissingError, match="load folder .*empty"):
        get_reward("pickscore", model=str(tmp_path / "empty"), processor=str(folders["processor"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_defaults_to_float16_and_returns_on_the_images_device(
    folders: dict[str, Path], reward: PickScore, images: torch.Tensor
) -> None:
    cuda = PickScore(model=str(folders["model"]), device="cuda")
    assert cuda.model.dtype == torch.float16
    scores = cuda(images, PROMPTS)
    assert scores.device.type == "cpu" and scores.dtype == torch.float32
    torch.testing.assert_close(scores, reward(images, PROMPTS), atol=0.05, rtol=0)
