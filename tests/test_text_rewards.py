"""Text rewards for vision-language policies, and the ``texts=`` side of the reward contract.

``answer_match`` against hand-derived 0/1 values; ``clip_text_image`` on a tiny *real* open_clip
model (built from a test config, saved, loaded back through ``pretrained=<path>``) against a
cosine computed by hand; ``sequence_classifier`` on a tiny *real* BertForSequenceClassification
and a WordLevel tokenizer built in-process, saved with save_pretrained and loaded back through
``model=<folder>``, against the model's own logits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import open_clip
import pytest
import torch
from huggingface_hub import constants as hub_constants
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    PreTrainedTokenizerFast,
)

from align_gen.types import VisualPrompt
from reward_models import (
    AnswerMatch,
    ClipTextImage,
    FunctionReward,
    SequenceClassifier,
    WeightedSum,
    available_rewards,
    build_reward,
    get_reward,
    jpeg_size_kb,
)
from reward_models.errors import RewardConfigError, RewardError, RewardWeightsMissingError


def visual(text: str, answer: str | None = None, key: str = "img.png") -> VisualPrompt:
    return VisualPrompt(text=text, image_key=key, open_image=lambda: None, answer=answer)


PROMPTS = [
    visual("What colour is the car?", "red", "car.png"),
    visual("What is in the sky?", "a bird", "sky.png"),
    visual("Is it day?", "yes", "day.png"),
]
TEXTS = ["The car is red.", "It is a plane", "yes"]


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(3, 3, 32, 32)


def score_one(reward: AnswerMatch, answer: str | None, text: str) -> float:
    return float(reward(torch.zeros(1, 3, 4, 4), [visual("q?", answer)], texts=[text])[0])


def test_text_rewards_are_registered_and_listed_apart() -> None:
    assert {"clip_text_image", "answer_match", "sequence_classifier"} <= set(available_rewards())
    with pytest.raises(
        RewardError,
        match=r"text rewards \(vision-language policies\): .*"
        r"answer_match, clip_text_image, sequence_classifier",
    ):
        get_reward("answer_mach")


# ---------------------------------------------------------------- answer_match


@pytest.mark.parametrize(
    ("mode", "case_sensitive", "answer", "text", "expected"),
    [
        ("contains", False, "red", "It is RED.", 1.0),  # lowercased, trailing "." dropped
        ("contains", False, "red", "It is reddish", 0.0),  # whole words only
        ("contains", False, "New York", "  in new\n  york city ", 1.0),  # whitespace collapsed
        ("contains", False, "C++", "I write C++ daily", 1.0),  # boundary after a non-word char
        ("contains", False, "car", "scary cars", 0.0),
        ("contains", True, "red", "It is RED.", 0.0),
        ("contains", True, "Red", "Red!", 1.0),
        ("exact", False, "red", "  Red!? ", 1.0),
        ("exact", False, "3.5", "3.5.", 1.0),  # only the trailing "." goes
        ("exact", False, "red", "red car", 0.0),
        ("exact", True, "Red", "red", 0.0),
        ("regex", False, r"\b(yes|yeah)\b", "Yeah, sure", 1.0),  # the answer is the regex
        ("regex", True, "yes", "YES", 0.0),
        ("regex", False, "^yes$", "yes, it is", 0.0),  # raw text, not normalised
    ],
)
def test_answer_match_hand_derived(
    mode: str, case_sensitive: bool, answer: str, text: str, expected: float
) -> None:
    reward = get_reward("answer_match", mode=mode, case_sensitive=case_sensitive)
    assert score_one(reward, answer, text) == expected


def test_answer_match_batch_scores_on_the_images_device(images: torch.Tensor) -> None:
    scores = get_reward("answer_match")(images, PROMPTS, texts=TEXTS)
    # "red" in "the car is red" (yes); "a bird" in "it is a plane" (no); "yes" (yes)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0, 1.0]))
    assert scores.dtype == torch.float32 and scores.device == images.device


def test_answer_match_pattern_with_escaped_answer() -> None:
    reward = get_reward("answer_match", mode="regex", pattern=r"^answer:\s*{answer}$")
    # {answer} -> re.escape("1+1") = "1\+1": literal "+", so "11" (which the unescaped regex
    # "1+1" would match) does not.
    assert score_one(reward, "1+1", "Answer:  1+1") == 1.0
    assert score_one(reward, "1+1", "answer: 11") == 0.0
    strict = get_reward("answer_match", mode="regex", pattern="{answer}", case_sensitive=True)
    assert score_one(strict, "Paris", "paris") == 0.0


def test_answer_match_pattern_without_answer_accepts_plain_prompts() -> None:
    reward = get_reward("answer_match", mode="regex", pattern=r"\d{2}")  # braces kept as regex
    texts = ["about 42 apples", "7 apples"]
    scores = reward(torch.zeros(2, 3, 4, 4), ["how many?", "how many?"], texts=texts)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]))


def test_answer_match_missing_answer_names_the_prompt_and_the_fix() -> None:
    reward = get_reward("answer_match", mode="exact")
    with pytest.raises(
        RewardError,
        match=r"prompt 'Where\?' \(image 'x.png'\) has no reference answer.*'answer' field.*"
        r"answer_match\.pattern",
    ):
        reward(torch.zeros(1, 3, 4, 4), [visual("Where?", None, "x.png")], texts=["here"])
    with pytest.raises(RewardError, match="prompt 'a cat' is a plain text prompt"):
        reward(torch.zeros(1, 3, 4, 4), ["a cat"], texts=["a cat"])
    with pytest.raises(RewardError, match="empty answer"):
        reward(torch.zeros(1, 3, 4, 4), [visual("Where?", " . ")], texts=["here"])
    with pytest.raises(RewardError, match="answer '\\(' of prompt 'Where\\?'.*not a regex"):
        get_reward("answer_match", mode="regex")(
            torch.zeros(1, 3, 4, 4), [visual("Where?", "(")], texts=["("]
        )


def test_answer_match_bad_options() -> None:
    with pytest.raises(RewardConfigError, match="mode must be one of 'exact', 'contains', 'regex'"):
        get_reward("answer_match", mode="fuzzy")
    with pytest.raises(RewardConfigError, match="needs mode 'regex'"):
        get_reward("answer_match", pattern="yes")
    with pytest.raises(RewardConfigError, match="is not a regex"):
        get_reward("answer_match", mode="regex", pattern="(")
    with pytest.raises(RewardConfigError, match="case_sensitive must be true or false"):
        get_reward("answer_match", case_sensitive="yes")
    with pytest.raises(RewardConfigError, match="valid options: mode, pattern, case_sensitive"):
        get_reward("answer_match", modes="exact")


# ---------------------------------------------------------------- the contract's texts


def test_text_reward_without_texts_is_an_error(images: torch.Tensor) -> None:
    reward = get_reward("answer_match")
    message = "answer_match scores generated texts, so it needs a vision-language policy; "
    with pytest.raises(RewardError, match=message + "got texts=None"):
        reward(images, PROMPTS)
    with pytest.raises(RewardError, match=r"one generated text per image \(3\), got 2"):
        reward(images, PROMPTS, texts=TEXTS[:2])
    with pytest.raises(RewardError, match="list of 3 strings.*got a str"):
        reward(images, PROMPTS, texts="red")
    with pytest.raises(RewardError, match=r"texts\[1\] is a int"):
        reward(images, PROMPTS, texts=["a", 1, "b"])


def test_image_rewards_ignore_texts_and_accept_visual_prompts(images: torch.Tensor) -> None:
    jpeg = get_reward("jpeg_compressibility")
    assert jpeg.needs_texts is False
    expected = -jpeg_size_kb(images)
    torch.testing.assert_close(jpeg(images, ["a", "b", "c"]), expected)
    torch.testing.assert_close(jpeg(images, PROMPTS), expected)
    torch.testing.assert_close(jpeg(images, PROMPTS, texts=TEXTS), expected)
    with pytest.raises(RewardError, match=r"prompts\[1\] is a int.*image prompts"):
        jpeg(images, ["a", 2, "c"])


def test_weighted_sum_passes_texts_to_every_term(images: torch.Tensor) -> None:
    reward = build_reward({"jpeg_compressibility": 0.5, "answer_match": 2.0})
    assert isinstance(reward, WeightedSum) and reward.needs_texts
    scores = reward(images, PROMPTS, texts=TEXTS)
    match = torch.tensor([1.0, 0.0, 1.0])
    jpeg = -jpeg_size_kb(images)
    torch.testing.assert_close(scores, 0.5 * jpeg + 2.0 * match)
    torch.testing.assert_close(reward.last_terms["answer_match"], match)
    with pytest.raises(RewardError, match="answer_match scores generated texts"):
        reward(images, PROMPTS)
    assert not WeightedSum({"j": get_reward("jpeg_compressibility")}, {"j": 1.0}).needs_texts


@pytest.fixture
def user_rewards(register_test_reward) -> str:
    """Plain functions and a factory registered in Python; returns their name prefix."""

    def brevity(images, prompts, texts):
        return -torch.tensor([float(len(t)) for t in texts])

    def optional_texts(images, prompts, *, texts=None):
        n = images.shape[0]
        return torch.full((n,), -1.0) if texts is None else torch.ones(n)

    def scaled(images, prompts, scale=2.0):
        return scale * images.mean(dim=(1, 2, 3))

    def make_brevity(weight=1.0):
        return lambda images, prompts, texts: -weight * torch.tensor([1.0 * len(texts[0])])

    for function in (brevity, optional_texts, scaled, make_brevity):
        register_test_reward(f"user_{function.__name__}")(function)
    return "user_"


def test_function_reward_of_three_arguments_gets_texts(user_rewards: str, images: torch.Tensor) -> None:
    brevity = get_reward(f"{user_rewards}brevity")
    assert isinstance(brevity, FunctionReward) and brevity.needs_texts
    lengths = torch.tensor([float(len(t)) for t in TEXTS])  # 15, 13, 3
    torch.testing.assert_close(brevity(images, PROMPTS, texts=TEXTS), -lengths)
    with pytest.raises(RewardError, match=f"{user_rewards}brevity scores generated texts"):
        brevity(images, PROMPTS)
    optional = get_reward(f"{user_rewards}optional_texts")
    assert not optional.needs_texts  # texts has a default: the function decides
    torch.testing.assert_close(optional(images, PROMPTS), torch.full((3,), -1.0))
    torch.testing.assert_close(optional(images, PROMPTS, texts=TEXTS), torch.ones(3))
    # A third positional parameter with a default and another name is not texts.
    scaled = get_reward(f"{user_rewards}scaled")
    torch.testing.assert_close(scaled(images, PROMPTS, texts=TEXTS), 2 * images.mean((1, 2, 3)))
    factory = get_reward(f"{user_rewards}make_brevity", weight=0.5)  # returns a text function
    assert factory.needs_texts
    torch.testing.assert_close(
        factory(images[:1], PROMPTS[:1], texts=["abcd"]), torch.tensor([-2.0])
    )


# ---------------------------------------------------------------- clip_text_image


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, torch.nn.Module]:
    """(open_clip model name, checkpoint path, model): a 2-layer, width-64 CLIP on 32 px."""
    folder = tmp_path_factory.mktemp("tiny_text_clip")
    name = "align-gen-test-tiny-text-clip"
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 4,
            "layers": 2,
        },
    }
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(7)
    model = open_clip.create_model(name).eval()
    checkpoint = folder / f"{name}.pt"
    torch.save(model.state_dict(), checkpoint)
    return name, checkpoint, model


def test_clip_text_image_is_the_cosine_of_image_and_text(
    tiny_clip: tuple[str, Path, torch.nn.Module], images: torch.Tensor
) -> None:
    name, checkpoint, model = tiny_clip
    reward = get_reward(
        "clip_text_image", model_name=name, pretrained=str(checkpoint), batch_size=2
    )
    assert isinstance(reward, ClipTextImage) and reward.needs_texts
    long_text = "a very long answer " * 60  # 240 words, far past the 77-token context
    texts = ["a red car", "a bird in the sky", long_text]
    scores = reward(images, PROMPTS, texts=texts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    tokens = open_clip.get_tokenizer(name)(texts)
    assert tokens.shape == (3, 77)  # the long text was truncated by the tokenizer
    with torch.no_grad():
        image_features = model.encode_image((images - mean) / std)  # 32 px: no resize
        text_features = model.encode_text(tokens)
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    torch.testing.assert_close(scores, 1.0 * cosine, atol=1e-5, rtol=1e-5)  # scale 1: raw cosine
    with pytest.raises(RewardError, match="clip_text_image scores generated texts"):
        reward(images, PROMPTS)


def test_clip_text_image_missing_checkpoint(tiny_clip: tuple, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_clip.pt"
    with pytest.raises(RewardWeightsMissingError, match=f"{missing}.*clip_text_image.pretrained="):
        get_reward("clip_text_image", model_name=tiny_clip[0], pretrained=str(missing))


# ---------------------------------------------------------------- sequence_classifier

WORDS = "what colour is the car red blue a it bird plane sky in day yes no".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel over WORDS; pairs encode as [CLS] A [SEP] B [SEP] with segment ids 0 / 1."""
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=32,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def tiny_bert_config(num_labels: int) -> BertConfig:
    return BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        pad_token_id=0,
        num_labels=num_labels,
        id2label={i: name for i, name in enumerate(["bad", "ok", "good"][:num_labels])},
    )


@pytest.fixture(scope="module")
def classifier_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"three": a 3-label classifier, "one": a 1-logit one, "base": a BertModel, no head}."""
    root = tmp_path_factory.mktemp("tiny_classifier")
    folders = {}
    for key, labels in (("three", 3), ("one", 1)):
        torch.manual_seed(labels)
        BertForSequenceClassification(tiny_bert_config(labels)).save_pretrained(root / key)
        tiny_tokenizer().save_pretrained(root / key)
        folders[key] = root / key
    BertModel(tiny_bert_config(1)).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    folders["base"] = root / "base"
    return folders


def direct_logits(folder: Path, prompts: list, texts: list[str]) -> torch.Tensor:
    """(B, num_labels) from the saved model and tokenizer, without the reward's code."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    tokens = tokenizer([str(p) for p in prompts], texts, padding=True, return_tensors="pt")
    assert tokens["token_type_ids"][0].tolist().count(1) > 0  # the answer is segment B
    with torch.no_grad():
        return model(**tokens).logits


def test_sequence_classifier_scores_the_chosen_logit(
    classifier_folders: dict[str, Path], images: torch.Tensor
) -> None:
    folder = classifier_folders["three"]
    texts = ["the car is red", "it is a plane in the sky", "yes"]
    logits = direct_logits(folder, PROMPTS, texts)  # (3, 3)
    reward = get_reward("sequence_classifier", model=str(folder), batch_size=2)
    assert isinstance(reward, SequenceClassifier) and reward.label == 2  # last of 3 labels
    scores = reward(images, PROMPTS, texts=texts)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, logits[:, 2], atol=1e-5, rtol=1e-5)
    by_name = SequenceClassifier(model=str(folder), label="bad")
    torch.testing.assert_close(
        by_name(images, PROMPTS, texts=texts), logits[:, 0], atol=1e-5, rtol=1e-5
    )
    single = SequenceClassifier(model=str(classifier_folders["one"]))
    assert single.label == 0
    with pytest.raises(RewardError, match="sequence_classifier scores generated texts"):
        reward(images, PROMPTS)


def test_sequence_classifier_errors(
    classifier_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = str(classifier_folders["three"])
    with pytest.raises(RewardConfigError, match=r"label must be an index in \[0, 3\).*'bad', 'good'"):
        get_reward("sequence_classifier", model=folder, label=3)
    with pytest.raises(RewardConfigError, match="no model given.*sequence_classifier.model="):
        get_reward("sequence_classifier")
    missing = tmp_path / "no_such_model"
    with pytest.raises(RewardWeightsMissingError, match=f"{missing} does not exist.*classifier.model="):
        get_reward("sequence_classifier", model=str(missing))
    missing.mkdir()
    with pytest.raises(RewardWeightsMissingError, match=f"{missing} has no config.json"):
        get_reward("sequence_classifier", model=str(missing))
    with pytest.raises(RewardError, match="randomly initialised head"):
        get_reward("sequence_classifier", model=str(classifier_folders["base"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(
        RewardWeightsMissingError,
        match=r"could not load 'align-gen/no-such-rm' from the hub offline.*"
        r"huggingface-cli download align-gen/no-such-rm",
    ):
        get_reward("sequence_classifier", model="align-gen/no-such-rm")
    assert time.monotonic() - start < 5
