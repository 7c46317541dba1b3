"""Rewards for generated texts: what a vision-language policy answered about its input image.

A vision-language (VLM) rollout has input images (B, 3, H, W) in [0, 1], prompts that are
image prompts (:class:`~reward_models.registry.ImagePrompt`) (``str(p)`` is the question, ``p.answer`` the dataset's reference answer
or None) and the generated answers ``texts``. The rewards here set ``needs_texts = True``: they
are called as ``reward(images, prompts, texts=texts)`` and raise ``RewardError`` without texts.

- ``clip_text_image``: cosine similarity of CLIP embeddings (open_clip, or a transformers
  ``CLIPModel`` folder) of each input image and its generated text, in [-1, 1] (not x100), loaded
  and preprocessed exactly as ``clip_score``.
- ``answer_match``: 1.0 when the generated text matches the reference answer (exact, as a
  whole-word substring, or by regex), else 0.0.
- ``sequence_classifier``: a logit of any transformers ``AutoModelForSequenceClassification``
  (a learned text reward, e.g. a reward model) on the pair (question, generated text).

Any ``package.module:fn`` function taking ``(images, prompts, texts)`` is a text reward too
(``reward.weights: {"my_rewards:brevity": 0.1}``): it gets the B generated texts as its third
argument and returns (B,) scores.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from reward_models.clip_score import ClipScore
from reward_models.errors import RewardConfigError, RewardError, RewardWeightsMissingError
from reward_models.hub import load_pretrained, resolve_placement
from reward_models.pickscore import HUB_ID
from reward_models.registry import BatchedReward, ImagePrompt, Prompt, register_reward

ANSWER_MODES = ("exact", "contains", "regex")
TRAILING_PUNCTUATION = ".,;:!?"
# tokenizers with no limit report model_max_length = int(1e30); anything this large is "unset".
UNSET_MAX_LENGTH = 1_000_000


@register_reward("clip_text_image")
class ClipTextImage(ClipScore):
    """Cosine similarity of CLIP embeddings of each input image and its generated text.

    Scale: the raw cosine of the L2-normalised embeddings, in [-1, 1], NOT multiplied by 100 nor
    clipped at 0 (the ``clip_score`` convention; a well-matched caption under OpenAI ViT-L/14
    scores about 0.25-0.35). The prompt (question) is not used. Texts longer than the model's
    context (77 tokens for the OpenAI and LAION models; min(77, the tokenizer's
    ``model_max_length``) for a transformers model) are truncated, so only their beginning is
    scored. Options are those of ``clip_score``: ``model_name``, ``pretrained`` (an open_clip
    tag or a local checkpoint file; offline and absent raises ``RewardWeightsMissingError`` naming
    ``clip_text_image.pretrained``), or instead ``model`` (a transformers ``CLIPModel`` folder
    or hub id, with ``processor``; errors name ``clip_text_image.model``), ``device``,
    ``dtype``, ``batch_size``, or an already-built open_clip ``model`` + ``tokenizer``.
    """

    needs_texts = True

    def score_chunk(  # type: ignore[override]
        self, images: torch.Tensor, prompts: list[Prompt], texts: list[str]
    ) -> torch.Tensor:
        image_features = self.encoder.encode_images(images)  # (b, D), unit norm
        text_features = self.encoder.encode_texts(texts)  # (b, D), unit norm, truncated tokens
        return (image_features * text_features).sum(dim=-1)  # (b,)


def normalise_answer(text: str, case_sensitive: bool = False) -> str:
    """Strip, collapse whitespace runs to one space, drop trailing ``.,;:!?`` and lowercase
    unless ``case_sensitive``: ``"  The  Red car!! "`` -> ``"the red car"``."""
    text = " ".join(text.split()).rstrip(TRAILING_PUNCTUATION + " ")
    return text if case_sensitive else text.lower()


def describe_prompt(prompt: Prompt) -> str:
    """A prompt for error messages: its question (cut at 80 characters) and image."""
    text = str(prompt)
    shown = repr(text if len(text) <= 80 else text[:77] + "...")
    if isinstance(prompt, ImagePrompt):
        return f"prompt {shown} (image {prompt.image_key!r})"
    return f"prompt {shown}"


@register_reward("answer_match")
class AnswerMatch(BatchedReward):
    """1.0 when a generated text matches its prompt's reference answer (``prompt.answer``), else 0.

    ``mode``:
      - ``"exact"``: the normalised text equals the normalised answer (see ``normalise_answer``:
        strip, collapse whitespace, drop trailing ``.,;:!?``, lowercase unless case_sensitive).
      - ``"contains"`` (default): the normalised answer occurs in the normalised text as whole
        words: answer "red" matches "It is red." but not "reddish".
      - ``"regex"``: ``re.search`` of a regex in the raw text. The regex is ``pattern`` for every
        sample, with ``{answer}`` in it replaced by ``re.escape(answer)`` (plain text replacement,
        so regex braces like ``\\d{2}`` are kept); without ``pattern``, each answer is a regex.
    ``case_sensitive`` (default False) applies to every mode. A prompt without an answer (or a
    plain string prompt) is an error whenever the mode needs answers. Images are not used.
    """

    needs_texts = True

    def __init__(
        self, mode: str = "contains", pattern: str | None = None, case_sensitive: bool = False
    ) -> None:
        super().__init__()
        if mode not in ANSWER_MODES:
            valid = ", ".join(repr(m) for m in ANSWER_MODES)
            raise RewardConfigError(f"{self.name}: mode must be one of {valid}; got {mode!r}")
        if not isinstance(case_sensitive, bool):
            raise RewardConfigError(f"{self.name}: case_sensitive must be true or false")
        if pattern is not None and (not isinstance(pattern, str) or mode != "regex"):
            raise RewardConfigError(
                f"{self.name}: pattern must be a regex string and needs mode 'regex'; "
                f"got pattern={pattern!r} with mode={mode!r}"
            )
        self.mode, self.pattern, self.case_sensitive = mode, pattern, case_sensitive
        self.flags = 0 if case_sensitive else re.IGNORECASE
        self.needs_answers = pattern is None or "{answer}" in pattern
        self.fixed: re.Pattern[str] | None = None  # the compiled pattern when it has no {answer}
        if pattern is not None:
            try:  # check it now, with an empty stand-in for {answer}
                compiled = re.compile(pattern.replace("{answer}", ""), self.flags)
            except re.error as err:
                raise RewardConfigError(
                    f"{self.name}: pattern {pattern!r} is not a regex: {err}"
                ) from err
            self.fixed = None if self.needs_answers else compiled

    def reference_answer(self, prompt: Prompt) -> str:
        """``prompt.answer``, or ``RewardError`` saying how to provide it."""
        answer = prompt.answer if isinstance(prompt, ImagePrompt) else None
        fix = (
            "add an 'answer' field to the dataset, or give reward.options.answer_match.pattern "
            "(with mode 'regex') to match every text against one regex"
        )
        if answer is None:
            kind = "has no reference answer"
            if not isinstance(prompt, ImagePrompt):
                kind = "is a plain text prompt, which has no reference answer"
            raise RewardError(
                f"{self.name}: {describe_prompt(prompt)} {kind}; mode {self.mode!r} compares "
                f"the generated text with it, so {fix}"
            )
        if not normalise_answer(answer):
            raise RewardError(
                f"{self.name}: {describe_prompt(prompt)} has an empty answer {answer!r}, which "
                f"would match any text; fix the dataset, or {fix}"
            )
        return answer

    def matches(self, text: str, prompt: Prompt) -> bool:
        """Whether ``text`` matches ``prompt``'s answer (or the pattern) under ``mode``."""
        if self.fixed is not None:
            return self.fixed.search(text) is not None
        answer = self.reference_answer(prompt)
        if self.mode == "regex":
            regex = answer  # without a pattern, each answer is a regex
            if self.pattern is not None:
                regex = self.pattern.replace("{answer}", re.escape(answer))
            try:
                return re.search(regex, text, self.flags) is not None
            except re.error as err:
                raise RewardError(
                    f"{self.name}: the answer {answer!r} of {describe_prompt(prompt)} is not a "
                    f"regex ({err}); give a pattern with {{answer}} to match it literally"
                ) from err
        got = normalise_answer(text, self.case_sensitive)
        want = normalise_answer(answer, self.case_sensitive)
        if self.mode == "exact":
            return got == want
        # Whole words: no word character right before or after (works for "C++" and "3.5" too).
        return re.search(rf"(?<!\w){re.escape(want)}(?!\w)", got) is not None

    def score_chunk(  # type: ignore[override]
        self, images: torch.Tensor, prompts: list[Prompt], texts: list[str]
    ) -> torch.Tensor:
        hits = [self.matches(text, prompt) for text, prompt in zip(texts, prompts, strict=True)]
        return torch.tensor(hits, dtype=torch.float32)  # (b,) in {0, 1}


def _load_pretrained(loader: Any, source: str, local: bool, **kwargs: Any) -> Any:
    fix = "set reward.options.sequence_classifier.model=/path/to/folder"
    return load_pretrained(loader, source, local, what="sequence_classifier", fix=fix, **kwargs)


@register_reward("sequence_classifier")
class SequenceClassifier(BatchedReward):
    """One logit of a transformers sequence classifier on (question, generated text) pairs.

    ``model``: hub id or local ``save_pretrained`` folder of an
    ``AutoModelForSequenceClassification`` with its tokenizer (e.g. a reward model trained on
    (prompt, response) pairs). The tokenizer encodes the pair ``(str(prompt), text)`` with its
    own special tokens, padded; pairs longer than its ``model_max_length`` (else the model's
    ``max_position_embeddings``) are truncated longest-first. Models trained on chat-formatted
    conversations need their chat template, which this hook does not apply.
    ``label``: index (or name in ``config.id2label``) of the logit used as the score; default 0
    for single-logit models (reward models), else the last label (e.g. POSITIVE of a
    NEGATIVE/POSITIVE classifier). The score is the raw logit, not a probability.
    ``dtype``: the model's own dtype; None = float16 on CUDA, float32 on CPU. Scores are float32.
    """

    needs_texts = True

    def __init__(
        self,
        model: str | None = None,
        label: int | str | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.device, self.dtype = resolve_placement(device, dtype, self.name)
        source, local = self.resolve_source(model)
        config = _load_pretrained(AutoConfig, source, local)
        self.label = self.resolve_label(label, config)
        # The tokenizer is small: load and check it before the model.
        self.tokenizer = _load_pretrained(AutoTokenizer, source, local)
        if self.tokenizer.pad_token is None:
            raise RewardError(
                f"{self.name}: the tokenizer of {source} has no pad token, so batches cannot be "
                "padded; set one (e.g. tokenizer.pad_token = tokenizer.eos_token, and the "
                "model config's pad_token_id to match) and save the folder again"
            )
        limit = self.tokenizer.model_max_length
        if limit >= UNSET_MAX_LENGTH:
            limit = getattr(config, "max_position_embeddings", None)
        self.max_length: int | None = int(limit) if limit else None
        classifier, info = _load_pretrained(
            AutoModelForSequenceClassification, source, local, output_loading_info=True
        )
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise RewardError(
                f"{self.name}: {source} lacks trained weights {missing[:3]}: a base model "
                "would score with a randomly initialised head; give a fine-tuned sequence "
                "classification model"
            )
        self.model = classifier.to(device=self.device, dtype=self.dtype).eval()
        self.model.requires_grad_(False)

    def resolve_source(self, model: str | None) -> tuple[str, bool]:
        """(a local folder or hub id, whether it is local); fails fast on a missing folder."""
        fix = "set reward.options.sequence_classifier.model=/path/to/folder or a hub id"
        if model is None:
            raise RewardConfigError(f"{self.name}: no model given; {fix}")
        if not isinstance(model, str) or not model:
            raise RewardConfigError(f"{self.name}: model must be a hub id or a folder, got {model!r}")
        path = Path(model).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise RewardWeightsMissingError(
                    f"{self.name}: model folder {path} has no config.json; {fix} "
                    "(a save_pretrained folder with the model and its tokenizer)"
                )
            return str(path), True
        if path.exists() or not HUB_ID.match(model):
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise RewardWeightsMissingError(f"{self.name}: model folder {path} {what}; {fix}")
        return model, False

    def resolve_label(self, label: int | str | None, config: Any) -> int:
        """The logit index for ``label`` (an index, a name in ``id2label``, or None)."""
        count = int(config.num_labels)
        names = {str(name): int(index) for index, name in config.id2label.items()}
        if label is None:
            return 0 if count == 1 else count - 1
        if isinstance(label, str) and label in names:
            return names[label]
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < count:
            return label
        raise RewardConfigError(
            f"{self.name}: label must be an index in [0, {count}) or one of {sorted(names)}; "
            f"got {label!r}"
        )

    def score_chunk(  # type: ignore[override]
        self, images: torch.Tensor, prompts: list[Prompt], texts: list[str]
    ) -> torch.Tensor:
        tokens = self.tokenizer(
            [str(prompt) for prompt in prompts],
            texts,
            padding=True,
            truncation="longest_first" if self.max_length else False,
            max_length=self.max_length,
            return_tensors="pt",
        )
        tokens = {key: value.to(self.device) for key, value in tokens.items()}
        logits = self.model(**tokens).logits  # (b, num_labels)
        return logits[:, self.label].float()  # (b,)
