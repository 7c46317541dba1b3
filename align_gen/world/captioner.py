"""The tiny world's captioning VLM: a LLaVA that sees with the world CLIP's vision tower.

A transformers ``LlavaForConditionalGeneration`` in LLaVA-1.5's layout: the world CLIP's vision
tower (its config, its trained weights; the 64 patch tokens of one of its layers, CLIP's class
token dropped, are the image tokens), LLaVA's two-layer MLP projector and a small Llama, with a
word-level tokenizer over the world's caption words, the questions' words and the specials, a
chat template, and a ``LlavaProcessor`` whose 32 px ``CLIPImageProcessor`` normalises as the
world CLIP does. So it loads as any image-text-to-text checkpoint does (``VLMPolicy``,
``align-gen sample`` / ``evaluate``) and is the offline stand-in for a real LLaVA.

Training is supervised instruction tuning, LLaVA's second stage in miniature: teacher forcing
on (train-split image, question, answer) triples, the loss the mean NLL of each answer's tokens
(its end-of-sequence token included; prompt and image tokens carry none), averaged over the
batch per example so one-word answers weigh as much as captions. The questions
(:data:`QUESTIONS`): "what colour is the shape?" -> "red" and "what shape is it?" -> "circle" on
one-shape images, "describe the image." -> the full caption on scenes of every kind. The vision
tower stays frozen unless ``vision_learning_rate`` > 0. Simplified against LLaVA: no separate
projector pre-training stage (one stage trains projector and language model together from
scratch, which a language model this small allows).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from align_gen.builtins.tiny_vlms import word_level_llava
from align_gen.world import clip, shapes
from align_gen.world.training import OnStep, resume, warmup_cosine

QUESTIONS = {
    "colour": "what colour is the shape?",
    "shape": "what shape is it?",
    "caption": "describe the image.",
}
ROLE_WORDS = ("user", "assistant")  # the chat template writes the roles as words
MIRRORS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MAX_ANSWER_TOKENS = 10  # the longest caption ("a purple circle left of an orange square") is 8 words


@dataclasses.dataclass(frozen=True)
class CaptionerTrainConfig:
    """How the world's captioner is trained (the defaults are what ships).

    Measured at 600 steps (held-out greedy accuracy, one thread): tuning the vision tower at
    1e-4 raised shape accuracy (0.92 -> 1.00) but made a step 1.6x slower, and matched the frozen
    tower run for 1.7x as many steps; the CLIP's layer 2 of 4 (``vision_feature_layer`` -3)
    describes two-shape relations better than LLaVA's penultimate layer (correct up to wording:
    24% vs 9% held-out), layer 1 about as well, the patch embeddings worse; learning rate 2e-3
    was worse than 1e-3."""

    steps: int = 1500
    batch_size: int = 48
    learning_rate: float = 1e-3
    # 0 keeps the world CLIP's vision tower frozen; > 0 tunes it at this rate.
    vision_learning_rate: float = 0.0
    weight_decay: float = 0.01
    warmup_steps: int = 50
    seed: int = 0
    # Fractions of a batch asking the colour, the shape, and for the caption (normalised to sum
    # 1). Captions carry most: they name colour and shape too, and relations are the hard part.
    task_mix: tuple[float, float, float] = (0.15, 0.15, 0.7)
    # The Llama language model; the vision tower is the world CLIP's.
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    intermediate_size: int = 256
    # The vision tower's hidden state whose patch tokens are the image tokens (-1: its last
    # layer's, LLaVA's -2: the penultimate). Earlier layers keep more of where things are.
    vision_feature_layer: int = -3
    eval_images: int = 300  # held-out images per question that the build's quality is measured on


def vocabulary() -> list[str]:
    """The tokenizer's words after its specials: punctuation, the world's caption words, the
    questions' words and the chat roles."""
    question_words = [word for question in QUESTIONS.values() for word in question.replace("?", " ").replace(".", " ").split()]
    return list(dict.fromkeys([*clip.PUNCTUATION, "?", *shapes.caption_words(), *question_words, *ROLE_WORDS]))


def build_captioner(config: CaptionerTrainConfig, clip_model) -> tuple[torch.nn.Module, object]:
    """(model, processor): a LLaVA whose vision tower is a copy of ``clip_model``'s (config and
    weights) and whose projector and language model are random from ``config.seed``."""
    from transformers import CLIPVisionConfig

    vision_config = CLIPVisionConfig(**clip_model.config.vision_config.to_dict())
    model, processor = word_level_llava(
        vision_config,
        clip.build_image_processor(),
        words=vocabulary(),
        vision_feature_layer=config.vision_feature_layer,
        seed=config.seed,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
    )
    model.model.vision_tower.load_state_dict(clip_model.vision_model.state_dict())
    return model, processor


def prompt_ids(processor, question: str) -> list[int]:
    """The chat prompt's token ids for ``question`` about one image (its image tokens expanded),
    as the processor makes them at inference."""
    chat = _chat(processor, question)
    blank = Image.new("RGB", (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE))
    return processor(images=[blank], text=[chat], return_tensors="pt")["input_ids"][0].tolist()


def _chat(processor, question: str) -> str:
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)


def draw_examples(rng: np.random.Generator, n: int, split: str, task_mix: tuple[float, ...]) -> tuple[torch.Tensor, list[str], list[str]]:
    """``n`` (image, task, answer) examples of ``split``: images (n, 3, 32, 32) in [0, 1], the
    task of each (a key of :data:`QUESTIONS`), its answer."""
    tasks = [list(QUESTIONS)[i] for i in rng.choice(len(QUESTIONS), size=n, p=np.asarray(task_mix) / sum(task_mix))]
    scenes = [shapes.sample_scene(rng, split) if task == "caption" else shapes.single_shape_scene(rng, split) for task in tasks]
    images = torch.stack([shapes.to_tensor(shapes.render(scene)) for scene in scenes])
    return images, tasks, [answer(scene, task) for scene, task in zip(scenes, tasks, strict=True)]


def answer(scene: shapes.Scene, task: str) -> str:
    """The true answer to ``QUESTIONS[task]`` about ``scene``."""
    if task == "caption":
        return scene.caption
    if len(scene.shapes) != 1:
        raise ValueError(f"the {task!r} question is asked of one-shape scenes; this one has {len(scene.shapes)}")
    return scene.shapes[0].colour if task == "colour" else scene.shapes[0].kind


def teacher_forcing_batch(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (B, L) of prompt + answer, and
    ``answer_mask`` (B, L): True at the answer's tokens (the ones the loss scores)."""
    length = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    answer_mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, (prompt, reply) in enumerate(zip(prompts, answers, strict=True)):
        ids[row, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
        attention[row, : len(prompt) + len(reply)] = 1
        answer_mask[row, len(prompt) : len(prompt) + len(reply)] = True
    return {"input_ids": ids, "attention_mask": attention, "answer_mask": answer_mask}


def answer_loss(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """The batch mean of each example's mean answer-token NLL.

    Args:
        logits: (B, L, V) the model's logits at every position (position i predicts token i + 1).
        input_ids: (B, L) prompt + answer token ids.
        answer_mask: (B, L) True at answer tokens.
    """
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:], reduction="none")  # (B, L - 1)
    scored = answer_mask[:, 1:].float()  # (B, L - 1): the targets that are answer tokens
    return ((nll * scored).sum(dim=1) / scored.sum(dim=1)).mean()


def train_captioner(
    config: CaptionerTrainConfig,
    clip_model,
    state: dict | None = None,
    on_step: OnStep | None = None,
) -> tuple[torch.nn.Module, object]:
    """(model, processor): trains the captioner on train-split examples from scratch (its vision
    tower from ``clip_model``), or from ``state`` (``model``, ``optimizer``, ``step``, saved by a
    caller's ``on_step``), calling ``on_step(step, loss, model, optimizer)`` after each step.
    Each step's examples come from a generator seeded by (seed, step), so a resumed run sees the
    same data."""
    model, processor = build_captioner(config, clip_model)
    tokenizer = processor.tokenizer
    vision = model.model.vision_tower
    vision.requires_grad_(config.vision_learning_rate > 0)
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]}]
    if config.vision_learning_rate > 0:
        groups.append({"params": list(vision.parameters()), "lr": config.vision_learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    start = resume(model, optimizer, state)
    schedule = warmup_cosine(optimizer, config.steps, config.warmup_steps, start)
    prompts = {task: prompt_ids(processor, question) for task, question in QUESTIONS.items()}
    model.train()
    for step in range(start, config.steps):
        rng = np.random.default_rng([config.seed, step])
        images, tasks, answers = draw_examples(rng, config.batch_size, "train", config.task_mix)
        replies = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in answers]
        batch = teacher_forcing_batch([prompts[task] for task in tasks], replies, tokenizer.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=clip.normalise_images(images),
            use_cache=False,
        ).logits
        loss = answer_loss(logits, batch["input_ids"], batch["answer_mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step + 1, loss.item(), model, optimizer)
    model.eval()
    return model, processor


@torch.no_grad()
def greedy_answers(model, processor, images: torch.Tensor, question: str, max_new_tokens: int = MAX_ANSWER_TOKENS) -> list[str]:
    """The model's greedy answers to ``question`` about each of ``images`` (B, 3, H, W) in
    [0, 1], through the processor as at inference."""
    pixels = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    chat = _chat(processor, question)
    inputs = processor(images=[Image.fromarray(p) for p in pixels], text=[chat] * len(pixels), return_tensors="pt")
    tokenizer = processor.tokenizer
    generated = model.generate(
        **inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return [text.strip() for text in tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def mirrored_caption(caption: str) -> str:
    """The caption that says the same of the same image the other way round: "a red circle left
    of a blue square" <-> "a blue square right of a red circle" (above <-> below); any other
    caption is its own mirror. The world draws either wording for a two-shape relation scene."""
    for relation, mirror in MIRRORS.items():
        first, found, second = caption.partition(f" {relation} ")
        if found:
            return f"{second} {mirror} {first}"
    return caption


def answer_accuracy(model, processor, world: shapes.ShapesWorld, count: int = 300, seed: int = 12345) -> dict[str, float]:
    """Greedy accuracy on held-out images: the colour and the shape of ``count`` one-shape
    scenes (drawn from ``seed``), and the caption of ``count`` scenes of every kind
    (``world.dataset``), exactly (``caption``) and up to the wording of a relation
    (``caption_either_wording``: the scene's caption or its :func:`mirrored_caption`)."""
    rng = np.random.default_rng(seed)
    singles = [shapes.single_shape_scene(rng, "heldout") for _ in range(count)]
    images = torch.stack([shapes.to_tensor(shapes.render(scene)) for scene in singles])
    results = {}
    for task in ("colour", "shape"):
        said = greedy_answers(model, processor, images, QUESTIONS[task])
        results[task] = float(np.mean([s == answer(scene, task) for s, scene in zip(said, singles, strict=True)]))
    scene_images, captions, _ = world.dataset(count, "heldout")
    said = greedy_answers(model, processor, scene_images, QUESTIONS["caption"])
    results["caption"] = float(np.mean([s == c for s, c in zip(said, captions, strict=True)]))
    results["caption_either_wording"] = float(np.mean([s in (c, mirrored_caption(c)) for s, c in zip(said, captions, strict=True)]))
    return results


def save_captioner(model, processor, folder: Path) -> None:
    """A transformers folder: the model's weights in float16 (it loads back in float32) and its
    processor (tokenizer, chat template, image processor)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)
    processor.save_pretrained(folder)
