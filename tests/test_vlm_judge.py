"""The ``vlm_judge`` reward on tiny random VLMs saved as folders (LLaVA with "yes" and "no" in its
vocabulary; Qwen2-VL and Idefics3 with other answer words): identities derived by hand from its
definition p_yes / (p_yes + p_no), batch and padding invariance, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align_gen.builtins.tiny_vlms import (
    TINY_IMAGE_SIZE,
    TINY_VISION_SIZES,
    TINY_WORDS,
    build_tiny_random_idefics3,
    build_tiny_random_qwen2_vl,
    word_level_llava,
)
from reward_models import get_reward
from reward_models.errors import RewardConfigError, RewardWeightsMissingError

PROMPTS = ["a red circle", "two green triangles", "a blue square left of a red circle"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here builds or runs a model on one intra-op thread (see conftest)."""


@pytest.fixture(scope="module")
def llava_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA whose word-level vocabulary has the question's and the answers' words."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    side = TINY_IMAGE_SIZE
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    vision = CLIPVisionConfig(**TINY_VISION_SIZES, image_size=side, patch_size=8)
    model, processor = word_level_llava(vision, image_processor, words=(*TINY_WORDS, "yes", "no", "does", "show", "answer", "or"))
    folder = tmp_path_factory.mktemp("llava_judge")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def images(count: int = 3) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_yes_and_no_swapped_sum_to_one_and_unnormalised_is_smaller(llava_judge: Path) -> None:
    """p_yes / (p_yes + p_no) + p_no / (p_no + p_yes) = 1; p_yes alone is at most the ratio."""
    judge = get_reward("vlm_judge", model=str(llava_judge))
    swapped = get_reward("vlm_judge", model=str(llava_judge), yes=["No", "no"], no=["Yes", "yes"])
    raw = get_reward("vlm_judge", model=str(llava_judge), normalise=False)
    scores = judge(images(), PROMPTS)
    assert torch.allclose(scores + swapped(images(), PROMPTS), torch.ones(3), atol=1e-6)
    assert (raw(images(), PROMPTS) <= scores + 1e-7).all() and ((scores > 0) & (scores < 1)).all()


def test_equal_yes_and_no_logits_give_one_half(llava_judge: Path) -> None:
    """With the output rows of "yes" and "no" zeroed both logits are 0, so p_yes = p_no."""
    judge = get_reward("vlm_judge", model=str(llava_judge))
    head = judge.model.get_output_embeddings().weight
    with torch.no_grad():
        head[judge.yes_ids + judge.no_ids] = 0.0
    assert torch.allclose(judge(images(), PROMPTS), torch.full((3,), 0.5), atol=1e-6)


def test_batches_and_padding_sides_do_not_change_a_score(llava_judge: Path) -> None:
    """Prompts of different lengths pad; the score is read at each row's last real token."""
    judge = get_reward("vlm_judge", model=str(llava_judge))
    together = judge(images(), PROMPTS)
    alone = torch.cat([judge(images()[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    judge.processor.tokenizer.padding_side = "right"
    right = judge(images(), PROMPTS)
    assert torch.allclose(together, alone, atol=1e-5) and torch.allclose(together, right, atol=1e-5)


@pytest.mark.parametrize("build", [build_tiny_random_qwen2_vl, build_tiny_random_idefics3], ids=["qwen2-vl", "idefics3"])
def test_other_families_with_their_own_chat_templates(build, tmp_path: Path) -> None:
    """Their tiny vocabularies lack "yes" and "no": judge with two words they have."""
    model, processor = build()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with pytest.raises(RewardConfigError, match="knows none of the yes words"):
        get_reward("vlm_judge", model=str(tmp_path))
    judge = get_reward("vlm_judge", model=str(tmp_path), question="is this {prompt}?", yes=["red"], no=["blue"])
    scores = judge(images(2), PROMPTS[:2])
    assert scores.shape == (2,) and ((scores > 0) & (scores < 1)).all()


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(RewardConfigError, match="no model given"):
        get_reward("vlm_judge")
    with pytest.raises(RewardConfigError, match=r"must contain \{prompt\}"):
        get_reward("vlm_judge", model=str(tmp_path), question="Is it good?")
    with pytest.raises(RewardWeightsMissingError, match="does not exist"):
        get_reward("vlm_judge", model=str(tmp_path / "missing"))
