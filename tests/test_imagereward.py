"""ImageReward through the ``image-reward`` package, on a tiny *real* model: the package's own
``VisionTransformer``, BLIP ``med.BertModel`` and ``MLP`` at toy size, saved as a plain state dict
in ImageReward.pt's layout (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
``blip.vision_proj.*``, ``blip.text_proj.*``, ``mlp.*``) beside a tiny ``med_config.json`` and a
BERT tokenizer folder, and loaded back through ``get_reward("imagereward", ...)``. The expected
scores come from the package's own ``ImageReward.score`` on PIL images.

The package is an optional extra (image-reward 1.5 imports helpers that transformers removed in
4.56 and the undeclared OpenAI ``clip`` module), so the tests that run the model skip when it
does not import; the missing-weights and missing-package errors are tested everywhere.
``make test-imagereward`` (run by CI) builds a second environment with the extra and runs them
there, with ALIGN_GEN_REQUIRE_IMAGEREWARD=1 turning that skip into a failure.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from PIL import Image
from torch import nn

from reward_models import available_rewards, get_reward
from reward_models.errors import RewardConfigError, RewardError, RewardWeightsMissingError
from reward_models.imagereward import REWARD_MEAN, REWARD_STD, ImageRewardScore

PROMPTS = ["a red circle", "a blue square on a table", "a green triangle"]
WORDS = "a red blue green circle square triangle on table the of cat dog".split()
REQUIRE_PACKAGE = "ALIGN_GEN_REQUIRE_IMAGEREWARD"
VISION = {"img_size": 32, "patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 2}


def package() -> Any | None:
    """The working ``ImageReward.ImageReward`` module, or None when it does not import."""
    try:
        return importlib.import_module("ImageReward.ImageReward")
    except ImportError:
        return None


def tiny_files(folder: Path) -> tuple[dict[str, Path], nn.Module]:
    """Tokenizer folder, med_config.json and ImageReward.pt of a tiny random ImageReward, and
    the source module (``blip`` with the tokenizer, ``mlp``) in eval mode."""
    from ImageReward.ImageReward import MLP
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    (folder / "tokenizer").mkdir()
    BertTokenizer(str(vocab)).save_pretrained(folder / "tokenizer")
    config = {
        "architectures": ["BertModel"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "vocab_size": 5 + len(WORDS) + 2,  # + BLIP's [DEC] and [ENC], as 30524 = 30522 + 2
        "type_vocab_size": 2,
        "pad_token_id": 0,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "initializer_range": 0.2,  # 0.02 in the real file: larger, so that the inputs matter
        "model_type": "bert",
        "encoder_width": 768,  # overwritten with the vision width, as in the real file
        "add_cross_attention": True,
    }
    (folder / "med_config.json").write_text(json.dumps(config))
    text_config = BertConfig.from_json_file(str(folder / "med_config.json"))
    text_config.encoder_width = VISION["embed_dim"]
    torch.manual_seed(0)
    blip = nn.ModuleDict(
        {
            "visual_encoder": VisionTransformer(**VISION),
            "text_encoder": BertModel(config=text_config, add_pooling_layer=False),
            "vision_proj": nn.Linear(VISION["embed_dim"], 16),  # in the file, unused to score
            "text_proj": nn.Linear(32, 16),
        }
    )
    source = nn.Module()
    source.blip, source.mlp = blip, MLP(32)
    # The package's MLP init (std 1/33, zero biases) gives raw rewards ~1e-3 that barely depend
    # on the input; variance-preserving weights make scores differ by image and prompt.
    for layer in source.mlp.layers:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
            nn.init.normal_(layer.bias, std=0.1)
    torch.save(source.state_dict(), folder / "ImageReward.pt")
    files = {name: folder / name for name in ("ImageReward.pt", "med_config.json", "tokenizer")}
    return files, source.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], nn.Module]:
    if package() is None:
        if os.environ.get(REQUIRE_PACKAGE) == "1":  # `make test-imagereward` sets it: no silent skip
            pytest.fail(f"{REQUIRE_PACKAGE}=1 but the image-reward package does not import")
        pytest.skip(
            "the image-reward package does not import (pip install 'align-gen[imagereward]')"
        )
    return tiny_files(tmp_path_factory.mktemp("tiny_imagereward"))


@pytest.fixture(scope="module")
def reward(tiny: tuple[dict[str, Path], nn.Module]) -> ImageRewardScore:
    files, _ = tiny
    built = get_reward(
        "imagereward",
        model=str(files["ImageReward.pt"]),
        med_config=str(files["med_config.json"]),
        tokenizer=str(files["tokenizer"]),
        device="cpu",
        batch_size=2,
    )
    assert isinstance(built, ImageRewardScore)
    return built


def package_reference(source: nn.Module, tokenizer: Any) -> Any:
    """The package's ``ImageReward`` holding ``source``'s tiny parts. Its constructor hard-codes
    a ViT-L and downloads bert-base-uncased, so the object is assembled around the tiny parts;
    ``mean`` / ``std`` / ``_transform`` are the package's own (read from its source)."""
    module = package()
    cls = module.ImageReward
    source_code = inspect.getsource(cls.__init__)
    mean = float(re.search(r"self\.mean = ([0-9.]+)", source_code).group(1))
    std = float(re.search(r"self\.std = ([0-9.]+)", source_code).group(1))
    reference = cls.__new__(cls)
    nn.Module.__init__(reference)
    reference.device = "cpu"
    reference.blip, reference.mlp = source.blip, source.mlp
    reference.blip.tokenizer = tokenizer
    reference.preprocess = module._transform(VISION["img_size"])
    reference.mean, reference.std = mean, std
    return reference.eval()


def test_imagereward_is_registered() -> None:
    assert "imagereward" in available_rewards()


def test_scores_equal_the_package_on_pil_images(
    tiny: tuple[dict[str, Path], nn.Module], reward: ImageRewardScore, single_thread: None
) -> None:
    """32 px images need no resize, so our float path and the package's PIL path see the same
    pixels: each score must equal ImageReward.score(prompt, pil_image)."""
    _, source = tiny
    torch.manual_seed(1)
    pixels = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    images = pixels.permute(0, 3, 1, 2).float() / 255
    scores = reward(images, PROMPTS)  # batch_size 2: chunks of 2 and 1
    assert scores.shape == (3,) and scores.dtype == torch.float32
    reference = package_reference(source, reward.tokenizer)
    assert (reference.mean, reference.std) == (REWARD_MEAN, REWARD_STD)
    with torch.no_grad():
        expected = [
            reference.score(prompt, Image.fromarray(image.numpy()))
            for prompt, image in zip(PROMPTS, pixels, strict=True)
        ]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert scores.std() > 0.1  # the images and prompts matter, not only the MLP's biases
    assert (reward(images, PROMPTS[::-1]) - scores).abs().max() > 1e-3  # the prompt matters


def test_tokenizer_and_preprocessing_match_the_package(
    tiny: tuple[dict[str, Path], nn.Module], reward: ImageRewardScore
) -> None:
    _, source = tiny
    reference = package_reference(source, reward.tokenizer)
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [
        len(WORDS) + 5,
        len(WORDS) + 6,
    ]
    assert reward.tokenizer.bos_token == "[DEC]"
    torch.manual_seed(2)
    smooth = F.interpolate(torch.rand(1, 3, 6, 5), size=(48, 40), mode="bilinear")  # H=48, W=40
    pil = Image.fromarray((smooth[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    theirs = reference.preprocess(pil).unsqueeze(0)  # Resize + CenterCrop + CLIP Normalize
    ours = reward.preprocess(smooth)
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().max() < 0.05  # uint8 rounding and PIL-vs-torch bicubic


def test_bad_checkpoints_are_reward_errors(
    tiny: tuple[dict[str, Path], nn.Module], tmp_path: Path
) -> None:
    files, source = tiny
    options = {"med_config": str(files["med_config.json"]), "tokenizer": str(files["tokenizer"])}
    state = source.state_dict()
    no_mlp = tmp_path / "no_mlp.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("mlp.")}, no_mlp)
    with pytest.raises(RewardError, match=r"lacks 10 weights .*'mlp\.layers\.0\.weight'"):
        get_reward("imagereward", model=str(no_mlp), **options)
    other = tmp_path / "clip.pt"
    torch.save({"visual.conv1.weight": torch.zeros(4, 3, 8, 8)}, other)
    with pytest.raises(RewardError, match="is not an ImageReward checkpoint"):
        get_reward("imagereward", model=str(other), **options)
    narrow = tmp_path / "med_config_narrow.json"
    narrow.write_text(
        files["med_config.json"].read_text().replace('"hidden_size": 32', '"hidden_size": 16')
    )
    with pytest.raises(RewardError, match="does not fit med_config"):
        get_reward(
            "imagereward",
            model=str(files["ImageReward.pt"]),
            med_config=str(narrow),
            tokenizer=str(files["tokenizer"]),
        )


def test_missing_weights_give_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "ImageReward.pt"
    with pytest.raises(RewardWeightsMissingError) as info:
        get_reward("imagereward", model=str(missing))
    message = str(info.value)
    assert "\n" not in message
    assert f"imagereward: model: file {missing} does not exist" in message
    assert "reward.options.imagereward.model=/path/to/ImageReward.pt" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(RewardWeightsMissingError) as info:
        get_reward("imagereward")  # the default hub file, not cached here
    message = str(info.value)
    assert "\n" not in message
    assert "'ImageReward.pt' from hub repo 'THUDM/ImageReward' offline" in message
    assert "hf download THUDM/ImageReward ImageReward.pt" in message
    missing.write_bytes(b"")  # the model file exists; its med_config is the next one needed
    with pytest.raises(RewardWeightsMissingError, match="'med_config.json' from hub repo 'THUDM/Imag"):
        get_reward("imagereward", model=str(missing))
    assert time.monotonic() - start < 5


def test_without_a_working_package_the_error_names_the_extra(tmp_path: Path) -> None:
    if package() is not None:
        pytest.skip("the image-reward package imports here")
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    (tmp_path / "med_config.json").write_text("{}")
    with pytest.raises(RewardConfigError, match=r"pip install 'align-gen\[imagereward\]'") as info:
        get_reward(
            "imagereward",
            model=str(tmp_path / "ImageReward.pt"),
            med_config=str(tmp_path / "med_config.json"),
        )
    assert "\n" not in str(info.value)
