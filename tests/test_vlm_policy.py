"""The VLM policy on tiny offline LLaVA, Qwen2-VL, Qwen2.5-VL and Idefics3 models: sampling with
log-probs, exact re-scoring with padding, matching losses, LoRA placement, saving, and bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from align_gen.config import LoraConfig, ModelConfig, SampleConfig
from align_gen.errors import ConfigError
from align_gen.image_datasets import load_image_dataset
from align_gen.policies import VLMPolicy, build_policy
from align_gen.policies.vlm import masked_token_mean, token_log_probs
from align_gen.types import Rollout, VisualPrompt

QUESTIONS = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "data" / "shape_questions.jsonl"
FAMILIES = ["tiny-random-llava", "tiny-random-qwen2-vl", "tiny-random-qwen2.5-vl", "tiny-random-idefics3"]
LENGTH = 6


def make_policy(family: str, *, lora: bool = True, **model_options) -> VLMPolicy:
    model = ModelConfig(pretrained=f"align-gen:{family}", lora=LoraConfig(enabled=lora, rank=4, alpha=4.0), **model_options)
    return build_policy(model, SampleConfig(max_new_tokens=LENGTH), "cpu")


def questions(count: int, start: int = 0) -> list[VisualPrompt]:
    """``count`` shape questions, every other one with a longer question (so the batch pads)."""
    prompts = load_image_dataset(str(QUESTIONS)).visual_prompts()[start : start + count]
    return [
        dataclasses.replace(prompt, text="Look at this image. " * (i % 2) + prompt.text) for i, prompt in enumerate(prompts)
    ]


@pytest.fixture(params=FAMILIES)
def policy(request) -> VLMPolicy:
    torch.manual_seed(0)
    return make_policy(request.param)


def test_rescoring_reproduces_the_sampled_log_probs_with_padding(policy: VLMPolicy) -> None:
    rollout = policy.sample(questions(4), generator=torch.Generator().manual_seed(0))
    assert rollout.conditioning["attention_mask"].eq(0).any()  # the batch is left-padded
    assert rollout.trajectory.shape == rollout.log_probs.shape == (4, LENGTH)
    rescored = policy.step_log_prob(rollout, torch.arange(LENGTH))
    torch.testing.assert_close(rescored, rollout.log_probs, atol=1e-5, rtol=0)
    assert torch.equal(rollout.step_mask, rollout.trajectory >= 0)
    assert (rollout.log_probs[rollout.step_mask] < 0).all()
    assert (rollout.log_probs[~rollout.step_mask] == 0).all()


def test_rollouts_of_different_prompt_lengths_concatenate_without_moving_the_scores(policy: VLMPolicy) -> None:
    short = policy.sample(questions(2, start=0)[:1], generator=torch.Generator().manual_seed(1))
    long = policy.sample(questions(2, start=4)[1:], generator=torch.Generator().manual_seed(2))
    assert short.conditioning["input_ids"].shape[1] != long.conditioning["input_ids"].shape[1]
    both = Rollout.concatenate([short, long])
    rescored = policy.step_log_prob(both, torch.arange(LENGTH))
    torch.testing.assert_close(rescored, both.log_probs, atol=1e-5, rtol=0)
    # (B, k) per-sample steps gather the same values
    steps = torch.tensor([[0, 2], [1, 3]])
    torch.testing.assert_close(policy.step_log_prob(both, steps), both.log_probs.gather(1, steps), atol=1e-5, rtol=0)


def test_teacher_forced_logits_equal_generate_s_incremental_logits(policy: VLMPolicy) -> None:
    """The pass that records and re-scores log-probs sees what generation's KV-cached steps saw."""
    prompts = questions(3)
    conditioning = policy._prompt_inputs([p.text for p in prompts], torch.rand(3, 3, policy.resolution, policy.resolution))
    inputs = policy._model_inputs(conditioning, conditioning["input_ids"][:, :0])
    with torch.no_grad():
        out = policy.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=LENGTH,
            min_new_tokens=LENGTH,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=policy.pad_token_id,
            suppress_tokens=policy.excluded_tokens,
        )
        generated = out.sequences[:, inputs["input_ids"].shape[1] :]
        teacher_forced = policy._answer_logits(conditioning, generated)
    torch.testing.assert_close(teacher_forced, torch.stack(out.logits, dim=1).float(), atol=1e-4, rtol=1e-4)


def test_sampling_is_reproducible_from_the_generator_and_decodes(policy: VLMPolicy) -> None:
    prompts = questions(4)
    first = policy.sample(prompts, generator=torch.Generator().manual_seed(3))
    again = policy.sample(prompts, generator=torch.Generator().manual_seed(3))
    other = policy.sample(prompts, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first.trajectory, again.trajectory)
    assert not torch.equal(first.trajectory, other.trajectory)
    assert first.texts == policy.decode(first.trajectory) and all(isinstance(t, str) for t in first.texts)
    assert policy.resolution == 32  # the processor's own image size (a SizeDict / pixel count)
    assert first.images.shape == (4, 3, 32, 32)
    # nothing after an end-of-sequence token
    for row in first.trajectory:
        ends = torch.isin(row, torch.tensor(policy.eos_token_ids)).nonzero()
        if len(ends):
            assert (row[int(ends[0]) + 1 :] == -1).all()
    # the image placeholders are never sampled
    assert not torch.isin(first.trajectory, torch.tensor(policy.excluded_tokens)).any()


def test_plain_prompts_with_image_tensors_work_too(policy: VLMPolicy) -> None:
    images = torch.rand(2, 3, 40, 40)
    rollout = policy.sample(["What colour is the shape?"] * 2, images=images, generator=torch.Generator().manual_seed(0))
    assert len(rollout.texts) == 2
    with pytest.raises(ValueError, match="needs an image per prompt"):
        policy.sample(["What colour is the shape?"])


def test_matching_loss_is_the_mean_token_nll_at_temperature_one(policy: VLMPolicy) -> None:
    rollout = policy.sample(questions(3), generator=torch.Generator().manual_seed(0))
    nll = policy.matching_loss(rollout)
    expected = -masked_token_mean(rollout.log_probs, rollout.trajectory)  # sampled at temperature 1
    torch.testing.assert_close(nll, expected, atol=1e-5, rtol=0)
    assert nll.requires_grad


def test_matching_terms_reference_loss_and_kl_by_hand(policy: VLMPolicy) -> None:
    rollout = policy.sample(questions(2), generator=torch.Generator().manual_seed(0))
    t, noise = policy.training_timesteps(2), policy.training_noise(2)
    assert noise.shape == (2, 0) and policy.noise_level(t).eq(1).all()
    terms = policy.matching_terms(rollout, t=t, noise=noise)
    torch.testing.assert_close(terms.loss, terms.reference_loss[0])  # adapters start at B = 0
    assert terms.divergence.abs().max() < 1e-6

    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    terms = policy.matching_terms(rollout, t=t, noise=noise)
    answers = rollout.trajectory
    excluded = torch.tensor(policy.excluded_tokens)
    current = policy._answer_logits(rollout.conditioning, answers).index_fill(-1, excluded, -1e9).log_softmax(-1)
    with torch.no_grad(), policy.reference():
        reference = policy._answer_logits(rollout.conditioning, answers).index_fill(-1, excluded, -1e9).log_softmax(-1)
    kl = (current.exp() * (current - reference)).sum(-1)
    torch.testing.assert_close(terms.divergence[0], masked_token_mean(kl, answers), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        terms.reference_loss[0], -masked_token_mean(token_log_probs(reference, answers), answers), atol=1e-5, rtol=1e-4
    )
    assert terms.divergence[0].min() > 0 and terms.divergence.requires_grad


def test_encoded_answers_end_with_eos_and_pad_with_minus_one(policy: VLMPolicy) -> None:
    tokens = policy.encode_samples(["red", "a blue circle"])
    assert tokens.shape == (2, LENGTH)
    assert tokens[0, 1] == policy.eos_token_ids[0] and (tokens[0, 2:] == -1).all()
    assert policy.decode(tokens) == ["red", "a blue circle"]
    with pytest.raises(ConfigError, match="max_new_tokens"):
        policy.encode_samples(["red green blue red green blue red"])


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_sits_on_the_language_model_and_the_vision_tower_stays_frozen(family: str) -> None:
    policy = make_policy(family)
    trainable = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    language_model_names = ("language_model", "text_model")  # LLaVA and Qwen's name, Idefics3's
    assert trainable and all("lora_" in name and any(part in name for part in language_model_names) for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}

    full = make_policy(family, lora=False)
    frozen = {name for name, p in full.model.named_parameters() if not p.requires_grad}
    assert frozen and all(("vision" in name or "visual" in name) for name in frozen)


def test_train_vision_tower_adds_adapters_to_the_vision_encoder() -> None:
    policy = make_policy("tiny-random-llava", train_vision_tower=True)
    names = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert any("vision_tower" in name for name in names) and any("language_model" in name for name in names)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_saved_model_loads_back_with_the_same_log_probs(lora: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    policy = make_policy("tiny-random-llava", lora=lora)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if param.requires_grad and ("lora_B" in name or not lora):
                param.add_(torch.randn_like(param) * 0.1)
    rollout = policy.sample(questions(2), generator=torch.Generator().manual_seed(0))
    policy.save(tmp_path / "final")
    assert (tmp_path / "final" / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    config = ModelConfig(pretrained="align-gen:tiny-random-llava" if lora else str(tmp_path / "final"))
    loaded = build_policy(
        config, SampleConfig(max_new_tokens=LENGTH), "cpu", trainable=False, lora_path=tmp_path / "final" if lora else None
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded.step_log_prob(rollout, torch.arange(LENGTH)), rollout.log_probs, atol=1e-5, rtol=0)


def test_an_unreadable_image_names_the_example(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "data.jsonl").write_text('{"image": "broken.png", "prompt": "What colour?", "answer": "red"}\n')
    prompts = load_image_dataset(str(tmp_path / "data.jsonl")).visual_prompts()
    with pytest.raises(ConfigError, match="cannot read the image of example 0"):
        make_policy("tiny-random-llava").sample(prompts)


def test_a_prompt_longer_than_the_context_is_refused() -> None:
    policy = make_policy("tiny-random-llava")
    prompt = dataclasses.replace(questions(1)[0], text="what colour is the shape " * 40)
    with pytest.raises(ConfigError, match="exceeds the model's context of 128 tokens"):
        policy.sample([prompt])


def test_a_model_without_a_chat_template_is_refused() -> None:
    from align_gen.builtins.tiny_vlms import build_tiny_random_llava

    model, processor = build_tiny_random_llava()
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        VLMPolicy(model, processor, ModelConfig(pretrained="my-base-model"), SampleConfig())


def test_a_missing_vlm_folder_names_itself(tmp_path: Path) -> None:
    from align_gen.errors import MissingWeightsError

    folder = tmp_path / "vlm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match="cannot load the vision-language model"):
        build_policy(ModelConfig(pretrained=str(folder)), SampleConfig(), "cpu")
