"""Rewards on tiny *real* open_clip models (built from a registered config, saved to a temporary
checkpoint and loaded back through the reward's own ``pretrained=<path>`` code), the real LAION
aesthetic head when ../shared/fixtures has it, and golden JPEG sizes computed with PIL."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from safetensors.torch import save_file

from reward_models import (
    AestheticHead,
    AestheticScore,
    ClipScore,
    WeightedSum,
    available_rewards,
    build_reward,
    get_reward,
)
from reward_models.errors import RewardConfigError, RewardError, RewardWeightsMissingError

FIXTURE_HEAD = (
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sac+logos+ava1-l14-linearMSE.pth"
)
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def tiny_clip_config(embed_dim: int) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 4,
            "layers": 2,
        },
    }


@pytest.fixture(scope="module")
def tiny_clips(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[int, tuple[str, Path, torch.nn.Module]]:
    """{embed_dim: (open_clip model name, checkpoint path, the model)} for embed_dim 32 and 768."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    out = {}
    for embed_dim in (32, 768):
        name = f"align-gen-test-tiny-clip-{embed_dim}"
        (folder / f"{name}.json").write_text(json.dumps(tiny_clip_config(embed_dim)))
        open_clip.add_model_config(folder / f"{name}.json")
        torch.manual_seed(embed_dim)
        model = open_clip.create_model(name).eval()
        checkpoint = folder / f"{name}.pt"
        torch.save(model.state_dict(), checkpoint)
        out[embed_dim] = (name, checkpoint, model)
    return out


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(3, 3, 32, 32)


def manual_image_embeddings(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """32x32 input (no resize): normalise with the OpenAI mean/std, encode, L2-normalise."""
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        features = model.encode_image((images - mean) / std)
    return features / features.norm(dim=-1, keepdim=True)


def pil_jpeg_kb(array: np.ndarray, quality: int = 95) -> float:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


# ---------------------------------------------------------------- registry


def test_registry_lists_builtin_names() -> None:
    assert {"jpeg_compressibility", "jpeg_incompressibility", "clip_score", "aesthetic"} <= set(
        available_rewards()
    )


def test_unknown_name_lists_valid_names_and_suggests() -> None:
    with pytest.raises(RewardError, match="aesthetic, clip_score") as info:
        get_reward("aesthetc")
    assert "Did you mean 'aesthetic'" in str(info.value)


def test_unknown_option_is_config_error_naming_it() -> None:
    with pytest.raises(RewardConfigError, match="'qualty'.*valid options: quality, batch_size"):
        get_reward("jpeg_compressibility", qualty=50)


@pytest.fixture
def user_rewards(register_test_reward) -> str:
    """A plain function, a factory and a NaN reward registered in Python; their name prefix."""

    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

    def make_scaled(scale=1.0):
        return lambda images, prompts: scale * images.mean(dim=(1, 2, 3))

    def nan_reward(images, prompts):
        return images.mean(dim=(1, 2, 3)) * float("nan")

    for function in (brightness, make_scaled, nan_reward):
        register_test_reward(f"user_{function.__name__}")(function)
    return "user_"


def test_registered_function_and_factory(user_rewards: str, images: torch.Tensor) -> None:
    plain = get_reward(f"{user_rewards}brightness")
    assert plain.name == f"{user_rewards}brightness"
    torch.testing.assert_close(plain(images, PROMPTS), images.mean(dim=(1, 2, 3)))
    scaled = get_reward(f"{user_rewards}make_scaled", scale=3.0)
    torch.testing.assert_close(scaled(images, PROMPTS), 3 * images.mean(dim=(1, 2, 3)))
    with pytest.raises(RewardError, match="NaN"):
        get_reward(f"{user_rewards}nan_reward")(images, PROMPTS)


def test_a_module_spec_is_refused_without_importing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs are data: 'module:function' names nothing, and the module is never imported."""
    marker = tmp_path / "imported"
    (tmp_path / "align_gen_side_effect.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="looks like a 'module:function' spec.*align_gen.rewards"):
        get_reward("align_gen_side_effect:anything")
    with pytest.raises(RewardError, match="'os:system' looks like"):
        build_reward({"os:system": 1.0}, {"os:system": {"command": f"touch {marker}"}})
    assert not marker.exists()


def test_an_installed_package_declares_a_reward_by_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, register_test_reward, images: torch.Tensor
) -> None:
    """A package's ``align_gen.rewards`` entry point (here a real dist-info on sys.path) makes
    its name usable in a config; its module is imported only when that name is asked for."""
    (tmp_path / "align_gen_plugin_rewards.py").write_text(
        "def darkness(images, prompts):\n    return 1 - images.mean(dim=(1, 2, 3))\n"
    )
    dist_info = tmp_path / "align_gen_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: align-gen-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[align_gen.rewards]\ndarkness = align_gen_plugin_rewards:darkness\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "align_gen_plugin_rewards", raising=False)

    with pytest.raises(RewardError, match="Did you mean 'darkness'"):
        get_reward("darknes")
    assert "align_gen_plugin_rewards" not in sys.modules
    reward = build_reward({"darkness": 2.0, "jpeg_compressibility": 1.0})
    reward(images, PROMPTS)
    torch.testing.assert_close(reward.last_terms["darkness"], 1 - images.mean(dim=(1, 2, 3)))


def test_build_reward_weighted_sum_matches_hand_computation(
    user_rewards: str, images: torch.Tensor
) -> None:
    name = f"{user_rewards}brightness"
    reward = build_reward(
        {"jpeg_compressibility": 0.5, name: 2.0}, {"jpeg_compressibility": {"quality": 80}}
    )
    assert isinstance(reward, WeightedSum)
    scores = reward(images, PROMPTS)
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    jpeg_kb = torch.tensor([pil_jpeg_kb(np.ascontiguousarray(a), quality=80) for a in arrays])
    brightness = images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(scores, 0.5 * -jpeg_kb + 2.0 * brightness)
    torch.testing.assert_close(reward.last_terms["jpeg_compressibility"], -jpeg_kb)
    torch.testing.assert_close(reward.last_terms[name], brightness)


def test_build_reward_single_term_and_errors(images: torch.Tensor) -> None:
    single = build_reward({"jpeg_incompressibility": 1.0})
    assert single.name == "jpeg_incompressibility" and not isinstance(single, WeightedSum)
    doubled = build_reward({"jpeg_incompressibility": 2.0})
    torch.testing.assert_close(doubled(images, PROMPTS), 2 * single(images, PROMPTS))
    with pytest.raises(RewardConfigError, match="empty"):
        build_reward({})
    with pytest.raises(RewardConfigError, match="clip_score"):
        build_reward({"jpeg_compressibility": 1.0}, {"clip_score": {"batch_size": 4}})
    with pytest.raises(RewardConfigError, match="finite number"):
        build_reward({"jpeg_compressibility": float("nan")})


# ---------------------------------------------------------------- jpeg


def test_jpeg_golden_values_grey_vs_noise() -> None:
    torch.manual_seed(1)
    grey = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64)
    batch = torch.cat([grey, noise])
    scores = get_reward("jpeg_compressibility")(batch, ["", ""])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    grey_kb = pil_jpeg_kb(np.full((64, 64, 3), 128, dtype=np.uint8))  # round(127.5) = 128
    noise_kb = pil_jpeg_kb((noise[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    torch.testing.assert_close(scores, torch.tensor([-grey_kb, -noise_kb]))
    assert noise_kb > 5 * grey_kb
    torch.testing.assert_close(get_reward("jpeg_incompressibility")(batch, ["", ""]), -scores)


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("bad", "prompts", "match"),
    [
        (torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"], r"\[0, 1\]"),
        (torch.rand(2, 8, 8), ["a", "b"], r"\(B, 3, H, W\)"),
        (torch.rand(2, 4, 8, 8), ["a", "b"], r"\(B, 3, H, W\)"),
        (torch.rand(2, 3, 8, 8), ["a"], "one prompt per image"),
        (torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], "NaN"),
    ],
)
def test_bad_inputs_raise_reward_error(bad: torch.Tensor, prompts: list[str], match: str) -> None:
    with pytest.raises(RewardError, match=match):
        get_reward("jpeg_compressibility")(bad, prompts)


# ---------------------------------------------------------------- clip_score


def test_clip_score_matches_manual_cosine(tiny_clips: dict, images: torch.Tensor) -> None:
    name, checkpoint, model = tiny_clips[32]
    reward = get_reward("clip_score", model_name=name, pretrained=str(checkpoint), batch_size=2)
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer(name)(PROMPTS))
    text = text / text.norm(dim=-1, keepdim=True)
    expected = (manual_image_embeddings(model, images) * text).sum(dim=-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    # An already-built model + tokenizer gives the same scores.
    direct = ClipScore(model=model, tokenizer=open_clip.get_tokenizer(name), device="cpu")
    torch.testing.assert_close(direct(images, PROMPTS), scores, atol=1e-5, rtol=1e-5)
    # Own prompt vs a different one: random weights, so only the range is meaningful.
    shuffled = reward(images, PROMPTS[1:] + PROMPTS[:1])
    assert torch.isfinite(shuffled).all() and shuffled.abs().max() <= 1 + 1e-5


def test_clip_preprocessing_matches_open_clip_pil_transform(tiny_clips: dict) -> None:
    name, checkpoint, model = tiny_clips[32]
    reward = ClipScore(model_name=name, pretrained=str(checkpoint), device="cpu")
    torch.manual_seed(2)
    smooth = F.interpolate(torch.rand(1, 3, 6, 5), size=(48, 40), mode="bilinear")  # H=48, W=40
    ours = reward.encoder.preprocess(smooth)
    transform = open_clip.image_transform(32, is_train=False)  # resize short side, crop, normalise
    pil = Image.fromarray((smooth[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    reference = transform(pil).unsqueeze(0)
    assert ours.shape == reference.shape == (1, 3, 32, 32)
    assert (ours - reference).abs().max() < 0.05  # uint8 rounding and PIL-vs-torch bicubic


def test_clip_score_bfloat16_close_to_float32(tiny_clips: dict, images: torch.Tensor) -> None:
    name, checkpoint, _ = tiny_clips[32]
    fp32 = ClipScore(model_name=name, pretrained=str(checkpoint), device="cpu")
    bf16 = ClipScore(model_name=name, pretrained=str(checkpoint), device="cpu", dtype="bfloat16")
    scores = bf16(images, PROMPTS)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, fp32(images, PROMPTS), atol=0.05, rtol=0)


def test_clip_score_missing_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no_such_clip.pt"
    with pytest.raises(RewardWeightsMissingError, match=str(missing)):
        get_reward("clip_score", pretrained=str(missing))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # hub reads the env at import
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(
        RewardWeightsMissingError, match=r"'ViT-L-14'/'openai' offline.*clip_score\.pretrained="
    ):
        get_reward("clip_score")
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------- aesthetic


def manual_mlp(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Dropout is off at inference, and the LAION head has no activations: five affine maps."""
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x.squeeze(-1)


@pytest.mark.skipif(not FIXTURE_HEAD.is_file(), reason="../shared/fixtures is absent")
def test_aesthetic_with_real_laion_head(tiny_clips: dict, images: torch.Tensor) -> None:
    name, checkpoint, model = tiny_clips[768]
    reward = get_reward(
        "aesthetic", head_path=str(FIXTURE_HEAD), clip_model=name, clip_pretrained=str(checkpoint)
    )
    assert isinstance(reward, AestheticScore)
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    state = torch.load(FIXTURE_HEAD, map_location="cpu", weights_only=True)
    expected = manual_mlp(state, manual_image_embeddings(model, images))
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


def test_aesthetic_safetensors_head_and_dim_mismatch(
    tiny_clips: dict, images: torch.Tensor, tmp_path: Path
) -> None:
    name, checkpoint, model = tiny_clips[32]
    torch.manual_seed(3)
    head = AestheticHead(input_dim=32)
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    reward = AestheticScore(
        head_path=str(tmp_path / "head.safetensors"),
        clip_model=name,
        clip_pretrained=str(checkpoint),
    )
    expected = manual_mlp(head.state_dict(), manual_image_embeddings(model, images))
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    torch.save(AestheticHead(input_dim=768).state_dict(), tmp_path / "head768.pth")
    with pytest.raises(RewardError, match="768-d CLIP embeddings.*gives 32-d"):
        AestheticScore(
            head_path=str(tmp_path / "head768.pth"),
            clip_model=name,
            clip_pretrained=str(checkpoint),
        )


def test_aesthetic_head_with_wrong_keys(tmp_path: Path) -> None:
    torch.save({"linear.weight": torch.zeros(1, 768)}, tmp_path / "wrong.pth")
    with pytest.raises(RewardError, match=r"expected keys \['layers.0.weight'"):
        get_reward("aesthetic", head_path=str(tmp_path / "wrong.pth"))


def test_aesthetic_missing_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no_such_head.pth"
    with pytest.raises(RewardWeightsMissingError, match=str(missing)):
        get_reward("aesthetic", head_path=str(missing))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(RewardWeightsMissingError, match="trl-lib/ddpo-aesthetic-predictor.*head_path"):
        get_reward("aesthetic")
    assert time.monotonic() - start < 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_clip_score_moves_images_to_the_model_device(
    tiny_clips: dict, images: torch.Tensor
) -> None:
    name, checkpoint, _ = tiny_clips[32]
    cpu = ClipScore(model_name=name, pretrained=str(checkpoint), device="cpu")
    cuda = ClipScore(model_name=name, pretrained=str(checkpoint), device="cuda")
    from_cpu, from_cuda = cuda(images, PROMPTS), cpu(images.cuda(), PROMPTS)
    assert from_cpu.device.type == "cpu" and from_cuda.device.type == "cuda"
    torch.testing.assert_close(from_cpu, from_cuda.cpu(), atol=1e-3, rtol=0)
