"""HPS v2 on a tiny *real* open_clip model: a registered tiny config stands in for ViT-H-14, its
random weights are saved in the HPS checkpoint layout (a torch file whose ``state_dict`` entry is
the open_clip state dict, here in float16) and loaded back through ``get_reward("hpsv2",
model=<file>, architecture=<tiny config>)``. Scores are checked against open_clip run by hand on
the same weights, and the preprocessing against the reference's evaluation transform."""

from __future__ import annotations

import json
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from huggingface_hub import constants as hub_constants
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from reward_models import available_rewards, get_reward
from reward_models.errors import RewardConfigError, RewardError, RewardWeightsMissingError
from reward_models.hpsv2 import HPSv2

PROMPTS = ["a red circle", "a blue square", "a green triangle on a white table"]
ARCHITECTURE = "align-gen-test-tiny-hps"
OTHER_ARCHITECTURE = "align-gen-test-tiny-hps-narrow-text"  # another text width: does not fit
MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT-H-14-shaped open_clip config at toy size (32 px, patch 8, width 64, 2 layers, the
    real 49408-token vocabulary), registered with open_clip, saved as {"state_dict": ...}."""
    folder = tmp_path_factory.mktemp("tiny_hps")
    for name, text_width in ((ARCHITECTURE, 64), (OTHER_ARCHITECTURE, 48)):
        config = {
            "embed_dim": 32,
            "vision_cfg": {
                "image_size": 32,
                "layers": 2,
                "width": 64,
                "head_width": 16,
                "patch_size": 8,
            },
            "text_cfg": {
                "context_length": 77,
                "vocab_size": 49408,
                "width": text_width,
                "heads": 4,
                "layers": 2,
            },
        }
        (folder / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(ARCHITECTURE)
    path = folder / "HPS_tiny_compressed.pt"
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def reward(checkpoint: Path) -> HPSv2:
    built = get_reward(
        "hpsv2", model=str(checkpoint), architecture=ARCHITECTURE, device="cpu", batch_size=2
    )
    assert isinstance(built, HPSv2)
    return built


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(3, 3, 32, 32)


def test_hpsv2_is_registered() -> None:
    assert "hpsv2" in available_rewards()


def test_score_is_the_cosine_computed_by_hand(
    checkpoint: Path, reward: HPSv2, images: torch.Tensor, single_thread: None
) -> None:
    """32 px images need no resize: pixels = (x - mean) / std with the OpenAI statistics.
    Expected = <f_img / |f_img|, f_txt / |f_txt|>, no logit scale, from a separately built
    open_clip model holding the checkpoint's (float16 -> float32) weights."""
    scores = reward(images, PROMPTS)  # batch_size 2: chunks of 2 and 1
    assert scores.shape == (3,) and scores.dtype == torch.float32
    model = open_clip.create_model(ARCHITECTURE).eval()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    with torch.no_grad():
        image = F.normalize(model.encode_image((images - MEAN) / STD), dim=-1)
        text = F.normalize(
            model.encode_text(open_clip.get_tokenizer(ARCHITECTURE)(PROMPTS)), dim=-1
        )
    expected = (image * text).sum(dim=-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    shuffled = reward(images, PROMPTS[1:] + PROMPTS[:1])
    assert not torch.allclose(shuffled, scores) and shuffled.abs().max() <= 1 + 1e-5


@pytest.mark.parametrize("height, width", [(48, 40), (40, 48), (64, 64)])
def test_preprocessing_follows_the_reference_resize_max_size(
    reward: HPSv2, height: int, width: int
) -> None:
    """The reference (hpsv2's ResizeMaxSize on a float tensor): long side -> 32 with
    torchvision's bicubic resize, pad with 0 (black) centred, normalise. Values stay inside
    [0.2, 0.8] so bicubic overshoot never reaches our clamp to [0, 1]."""
    torch.manual_seed(2)
    small = 0.2 + 0.6 * torch.rand(1, 3, 6, 5)
    smooth = F.interpolate(small, size=(height, width), mode="bilinear")
    ours = reward.preprocess(smooth)
    scale = 32 / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    resized = TF.resize(smooth, [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC)
    pad_h, pad_w = 32 - new_h, 32 - new_w
    padded = TF.pad(resized, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2])
    reference = (padded - MEAN) / STD
    assert ours.shape == reference.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # open_clip's own 'longest' PIL transform agrees up to uint8 and PIL-vs-torch bicubic.
    transform = open_clip.image_transform(32, is_train=False, resize_mode="longest")
    pil = Image.fromarray((smooth[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    assert (ours - transform(pil).unsqueeze(0)).abs().max() < 0.05


def test_bfloat16_scores_are_float32_and_close(
    checkpoint: Path, reward: HPSv2, images: torch.Tensor
) -> None:
    bf16 = HPSv2(model=str(checkpoint), architecture=ARCHITECTURE, device="cpu", dtype="bfloat16")
    assert bf16.model.visual.conv1.weight.dtype == torch.bfloat16
    scores = bf16(images, PROMPTS)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, reward(images, PROMPTS), atol=0.05, rtol=0)


def test_missing_weights_give_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "HPS_v2.1_compressed.pt"
    with pytest.raises(RewardWeightsMissingError) as info:
        get_reward("hpsv2", model=str(missing), architecture=ARCHITECTURE)
    message = str(info.value)
    assert "\n" not in message
    assert f"hpsv2: model: file {missing} does not exist" in message
    assert "reward.options.hpsv2.model=/path/to/HPS_v2.1_compressed.pt" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(RewardWeightsMissingError) as info:
        get_reward("hpsv2")  # the default: v2.1 from the hub, not cached here
    message = str(info.value)
    assert "\n" not in message
    assert "'HPS_v2.1_compressed.pt' from hub repo 'xswu/HPSv2' offline" in message
    assert "hf download xswu/HPSv2 HPS_v2.1_compressed.pt" in message
    assert time.monotonic() - start < 5
    with pytest.raises(RewardWeightsMissingError, match="'HPS_v2_compressed.pt' from hub repo"):
        get_reward("hpsv2", model="hub:xswu/HPSv2/HPS_v2_compressed.pt")
    with pytest.raises(RewardConfigError, match="hub:<owner>/<repo>/<file>"):
        get_reward("hpsv2", model="hub:xswu/HPS_v2.1_compressed.pt")


def test_checkpoint_of_another_architecture_is_a_reward_error(checkpoint: Path) -> None:
    with pytest.raises(
        RewardError,
        match=f"hpsv2: checkpoint .* does not fit open_clip model '{OTHER_ARCHITECTURE}'",
    ):
        get_reward("hpsv2", model=str(checkpoint), architecture=OTHER_ARCHITECTURE, device="cpu")
    with pytest.raises(RewardConfigError, match="hpsv2: unknown open_clip model 'ViT-H-15'"):
        get_reward("hpsv2", model=str(checkpoint), architecture="ViT-H-15", device="cpu")
