"""A vision-language model as the judge: the probability that it answers "yes" about an image.

The ``vlm_judge`` reward asks a transformers VLM (any ``AutoModelForImageTextToText`` checkpoint
with a chat template: Qwen2.5-VL / Qwen2-VL Instruct, LLaVA-1.5 / LLaVA-NeXT, SmolVLM / Idefics3,
...) one templated question per image, by default "Does this image show {prompt}? Answer yes or
no.", and reads the model's next-token distribution right after the assistant's turn opens:

    p_yes = sum of the probabilities of the "yes" tokens, p_no likewise,
    reward = p_yes / (p_yes + p_no)           (normalise: true, the default)
    reward = p_yes                            (normalise: false)

(VQAScore's recipe, Lin et al. 2024). A "yes" token is the first token of each word in ``yes``
("Yes", "yes"), written alone and after a space (tokenizers split " Yes" and "Yes" apart); "no"
the same. Normalising over the two answers makes the score independent of how much probability
the model puts on other openings ("The", "Sure"). No text is generated: one forward pass per
batch. The images go to the processor as PIL images, so its own resizing applies.
"""

from __future__ import annotations

from typing import Any

import torch

from reward_models.errors import RewardConfigError, RewardError
from reward_models.hf_clip import resolve_source
from reward_models.hub import dtype_keyword, load_pretrained, resolve_placement
from reward_models.registry import BatchedReward, Prompt, register_reward

DEFAULT_QUESTION = "Does this image show {prompt}? Answer yes or no."


def _to_pil(image: torch.Tensor):
    from PIL import Image

    pixels = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


@register_reward("vlm_judge")
class VLMJudge(BatchedReward):
    """P("yes") of a VLM asked ``question`` (with ``{prompt}``) about each image (module docstring).

    Options: ``model`` (hub id or folder; required), ``question``, ``yes`` / ``no`` (the answer
    words), ``normalise`` (default true), ``device``, ``dtype`` (None: float16 on CUDA, float32
    on CPU), ``batch_size``.
    """

    def __init__(
        self,
        model: str | None = None,
        question: str = DEFAULT_QUESTION,
        yes: list[str] | tuple[str, ...] = ("Yes", "yes"),
        no: list[str] | tuple[str, ...] = ("No", "no"),
        normalise: bool = True,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if model is None:
            raise RewardConfigError(f"{self.name}: no model given; set reward.options.{self.name}.model=<hub id or folder>")
        if not isinstance(question, str) or "{prompt}" not in question:
            raise RewardConfigError(f"{self.name}: question must contain {{prompt}}, got {question!r}")
        if not isinstance(normalise, bool):
            raise RewardConfigError(f"{self.name}: normalise must be true or false, got {normalise!r}")
        self.question, self.normalise = question, normalise
        self.device, self.dtype = resolve_placement(device, dtype, self.name)
        source, local = resolve_source(model, self.name, "model", "vlm")
        fix = f"set reward.options.{self.name}.model=/path/to/folder or a hub id"
        self.processor = load_pretrained(AutoProcessor, source, local, what=f"{self.name}: model", fix=fix)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None or getattr(self.processor, "chat_template", None) is None:
            raise RewardError(f"{self.name}: {source} has no tokenizer with a chat template; give an instruction-tuned VLM")
        self.yes_ids, self.no_ids = self.answer_tokens(tokenizer, yes, "yes"), self.answer_tokens(tokenizer, no, "no")
        if set(self.yes_ids) & set(self.no_ids):
            raise RewardConfigError(f"{self.name}: the yes and no words share a token; choose other words")
        model_ = load_pretrained(AutoModelForImageTextToText, source, local, what=f"{self.name}: model", fix=fix,
                                 **{dtype_keyword(): self.dtype})
        self.model = model_.to(self.device).eval()
        self.model.requires_grad_(False)

    def answer_tokens(self, tokenizer: Any, words: list[str] | tuple[str, ...], which: str) -> list[int]:
        """The first token of each word, alone and after a space; unknown tokens are dropped."""
        if isinstance(words, str) or not words or not all(isinstance(word, str) and word.strip() for word in words):
            raise RewardConfigError(f"{self.name}: {which} must be a list of words, got {words!r}")
        ids = []
        for word in words:
            for text in (word, " " + word):
                tokens = tokenizer.encode(text, add_special_tokens=False)
                if tokens and tokens[0] != tokenizer.unk_token_id and tokens[0] not in ids:
                    ids.append(tokens[0])
        if not ids:
            raise RewardConfigError(f"{self.name}: the tokenizer knows none of the {which} words {list(words)}")
        return ids

    def messages(self, prompt: Prompt) -> list[dict]:
        text = self.question.format(prompt=str(prompt))
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    def score_chunk(self, images: torch.Tensor, prompts: list[Prompt]) -> torch.Tensor:
        texts = [self.processor.apply_chat_template(self.messages(p), add_generation_prompt=True) for p in prompts]
        inputs = self.processor(images=[_to_pil(image) for image in images], text=texts, return_tensors="pt",
                                padding=True)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        logits = self.model(**inputs).logits.float()  # (b, sequence, vocabulary)
        mask = inputs["attention_mask"]
        last = mask.shape[1] - 1 - mask.flip(1).float().argmax(dim=1)  # the last real token, left or right padding
        probabilities = logits[torch.arange(len(last), device=logits.device), last].softmax(dim=-1)
        p_yes = probabilities[:, self.yes_ids].sum(dim=-1)
        p_no = probabilities[:, self.no_ids].sum(dim=-1)
        return p_yes / (p_yes + p_no).clamp_min(1e-30) if self.normalise else p_yes
