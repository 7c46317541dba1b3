"""Vision-language models (transformers image-text-to-text) behind the Policy protocol.

Any model that ``AutoModelForImageTextToText`` loads with a processor that has a chat template
(LLaVA, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, ...) is a policy whose action is an answer
to (image, question): a token is a step, so REBEL, DDPO, AWM and SePPO run on it unchanged.

- ``sample`` builds each prompt with the processor's chat template (one image, then the
  question), samples the answer with ``generate`` (temperature / top-p / top-k of ``sample:``,
  never the checkpoint's own generation defaults), then records every token's log-prob with the
  SAME teacher-forced pass that :meth:`VLMPolicy.step_log_prob` uses to re-score, so an
  un-updated policy reproduces them exactly whatever the padding (tested against generate's own
  logits too). Log-probs are those of the temperature-scaled distribution over the vocabulary
  minus the image placeholder tokens, which sampling may never emit (an emitted placeholder
  would break the next forward pass); top-p / top-k only filter sampling, so keep them off
  (the defaults) for exactly on-policy ratios.
- An answer is stored as (B, T) token ids, T = ``sample.max_new_tokens``, -1 after its
  end-of-sequence token (which is part of the answer and trained on). Prompts are left-padded;
  rollouts of different prompt lengths concatenate by left-padding more, which the attention
  mask hides (positions come from the mask, so the scores do not move).
- ``matching_loss`` is the answer's mean per-token NLL (temperature 1): AWM's matching loss and
  SePPO's d(x) = NLL_theta - NLL_ref. ``matching_terms``' divergence is the mean per-token
  KL(pi_theta || pi_ref) over the vocabulary (AWM's pull toward the reference).
  A VLM has no noise or timesteps: ``training_noise`` is (B, 0), ``noise_level`` is 1.
- LoRA goes on the language model's attention projections (``q_proj, k_proj, v_proj, o_proj``
  unless ``model.lora.target_modules`` says otherwise); the vision tower stays frozen unless
  ``model.train_vision_tower``. Full fine-tuning trains the language model, its head and the
  projector (and the vision tower only when asked). ``reference()`` disables the adapters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from align_gen.config import ModelConfig, SampleConfig
from align_gen.errors import ConfigError
from align_gen.image_datasets import load_prompt_images
from align_gen.policies.weights import TrainableWeights, write_model_card
from align_gen.policy import split_steps
from align_gen.types import MatchingTerms, Rollout, StepScores, VisualPrompt

Tensor = torch.Tensor

VLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Where transformers' VLMs keep their vision encoder (LLaVA, Qwen2-VL, Idefics3 / SmolVLM).
VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model")
# Model config fields naming placeholder tokens that generation must never emit.
PLACEHOLDER_TOKEN_FIELDS = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "video_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
)
# Per-token conditioning tensors (B, P) that extend over the answer (with zeros) in a forward.
PER_TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")
# The logit of tokens removed from the vocabulary: exp() is exactly 0, yet every difference and
# gradient stays finite (-inf would make KL's 0 * (-inf - -inf) a NaN gradient).
EXCLUDED_LOGIT = -1e9
DYNAMIC_RESOLUTION_DEFAULT = 448  # processors without a fixed size (Qwen2-VL)
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def vocabulary_log_probs(logits: Tensor, temperature: float = 1.0, excluded: Sequence[int] = ()) -> Tensor:
    """(B, T, V) float32 log softmax(logits / temperature) with the ``excluded`` token ids
    removed from the vocabulary (given :data:`EXCLUDED_LOGIT`)."""
    scaled = logits.float() / temperature
    if excluded:
        scaled = scaled.index_fill(-1, torch.as_tensor(list(excluded), device=scaled.device), EXCLUDED_LOGIT)
    return scaled.log_softmax(dim=-1)


def token_log_probs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, excluded: Sequence[int] = ()) -> Tensor:
    """(B, T) float32 log pi(token) of :func:`vocabulary_log_probs`; 0 where ``tokens`` is -1
    (padding).

    Args:
        logits: (B, T, V) the logits that predict each token.
        tokens: (B, T) token ids, -1 for padding.
    """
    return pick_tokens(vocabulary_log_probs(logits, temperature, excluded), tokens)


def pick_tokens(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """(B, T) the (B, T, V) vocabulary ``log_probs`` of (B, T) ``tokens``; 0 where padding (-1)."""
    return log_probs.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(tokens < 0, 0.0)


def token_kl(log_probs: Tensor, reference_log_probs: Tensor, tokens: Tensor) -> Tensor:
    """(B, T) KL(pi || pi_ref) of each token's distribution, sum_v pi (log pi - log pi_ref), from
    (B, T, V) vocabulary log-probs of both; 0 where ``tokens`` is padding (-1)."""
    return (log_probs.exp() * (log_probs - reference_log_probs)).sum(dim=-1).masked_fill(tokens < 0, 0.0)


def masked_token_mean(values: Tensor, tokens: Tensor) -> Tensor:
    """(B,) mean of (B, T) ``values`` over each answer's tokens (``tokens`` >= 0)."""
    mask = (tokens >= 0).float()
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class VLMPolicy(TrainableWeights):
    """A transformers vision-language model as a :class:`~align_gen.policy.Policy`."""

    takes_images = True
    steps_per_forward = None  # one teacher-forced pass scores every token

    def __init__(
        self,
        model,
        processor,
        model_config: ModelConfig,
        sample_config: SampleConfig,
        device: torch.device | str = "cpu",
        *,
        trainable: bool = True,
    ) -> None:
        """Wraps ``model`` and its ``processor``; ``trainable=False`` freezes everything."""
        self.model_config = model_config
        self.sample_config = sample_config
        self.device = torch.device(device)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if not (getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)):
            raise ConfigError(
                f"the model {model_config.pretrained!r} has no chat template (neither its processor nor its "
                "tokenizer defines one), so align-gen cannot build its prompts; use an instruction-tuned "
                "checkpoint or add a chat_template to its processor_config.json / tokenizer_config.json."
            )
        self.tokenizer.padding_side = "left"
        self.model = self.forward_model = model.to(self.device)
        self.resolution = sample_config.resolution or _native_resolution(processor)
        self.context_length = _context_length(model.config)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id
        self.eos_token_ids = _eos_token_ids(model, self.tokenizer)
        self.excluded_tokens = sorted(
            {getattr(model.config, field) for field in PLACEHOLDER_TOKEN_FIELDS if getattr(model.config, field, None) is not None}
        )
        self._flat_pixels = False  # set when the processor returns patches, not (B, ...) images
        self._configure_model(trainable)

    # ----------------------------------------------------------------------------------------
    # set-up

    def _configure_model(self, trainable: bool) -> None:
        config = self.model_config
        if config.channels_last or config.offload_frozen:
            raise ConfigError(
                "model.channels_last and model.offload_frozen apply to diffusion models (their denoiser; their VAE and "
                "text encoders); a VLM has neither to move or speed up."
            )
        if config.attention != "sdpa":
            raise ConfigError(
                f"model.attention={config.attention} selects a diffusion denoiser's attention kernel; a VLM runs "
                "transformers' default (sdpa): leave model.attention=sdpa."
            )
        self._reference_weights = None
        if not trainable:
            self.model.requires_grad_(False).eval()
            return
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        vision = _vision_tower(self.model)
        if config.lora.enabled:
            suffixes = tuple(config.lora.target_modules or VLM_LORA_TARGETS)
            scope = self.model if config.train_vision_tower else _language_model(self.model)
            prefix = _module_name(self.model, scope)
            targets = [
                name
                for name, _ in self.model.named_modules()
                if name.startswith(prefix) and name.rsplit(".", 1)[-1] in suffixes and "lm_head" not in name
            ]
            if not targets:
                raise ConfigError(
                    f"model.lora.target_modules={list(suffixes)} matches no module of the language model "
                    f"of {config.pretrained!r}; name its attention projections (e.g. q_proj, v_proj)."
                )
            self._make_trainable(config.lora, targets)
        else:
            self._make_trainable(config.lora, ())
            if vision is not None and not config.train_vision_tower:
                vision.requires_grad_(False)
        self.model.eval()

    # ----------------------------------------------------------------------------------------
    # prompts and forward passes

    def _questions_and_images(
        self, prompts: Sequence[str | VisualPrompt], images: Tensor | None
    ) -> tuple[list[str], Tensor]:
        if not prompts:
            raise ValueError("sample() needs at least one prompt.")
        if images is None:
            if not all(isinstance(prompt, VisualPrompt) for prompt in prompts):
                raise ValueError(
                    "a vision-language policy needs an image per prompt: pass VisualPrompts (from an image "
                    "dataset) or images=(B, 3, H, W) tensors in [0, 1]."
                )
            images = load_prompt_images(prompts, self.resolution)
        if images.dim() != 4 or images.shape[0] != len(prompts) or images.shape[1] != 3:
            raise ValueError(f"images must be ({len(prompts)}, 3, H, W), got {tuple(images.shape)}")
        return [str(prompt) for prompt in prompts], images.float().clamp(0, 1)

    def _prompt_inputs(self, questions: list[str], images: Tensor) -> dict[str, Tensor]:
        """The processor's batch for the chat prompts of ``questions`` about ``images``:
        left-padded ``input_ids`` / ``attention_mask`` (B, P), the pixel inputs with the batch
        first, and any other inputs the model takes."""
        from PIL import Image

        chats = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for question in questions
        ]
        pixels = (images * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        pil_images = [[Image.fromarray(array)] for array in pixels]
        inputs = self.processor(images=pil_images, text=chats, return_tensors="pt", padding=True)
        lengths = inputs["attention_mask"].sum(dim=1)
        longest = int(lengths.argmax())
        needed = int(lengths[longest]) + self.sample_config.max_new_tokens
        if needed > self.context_length:
            raise ConfigError(
                f"the prompt {questions[longest]!r} takes {int(lengths[longest])} tokens (its image included) and "
                f"sample.max_new_tokens is {self.sample_config.max_new_tokens}: {needed} exceeds the model's context "
                f"of {self.context_length} tokens; shorten the prompt, lower sample.max_new_tokens or the image "
                "resolution (sample.resolution)."
            )
        batch = len(questions)
        conditioning = {}
        for key, value in inputs.items():
            if not isinstance(value, Tensor):
                continue
            if key == "pixel_values" and value.shape[0] != batch:  # patches of all images (Qwen2-VL)
                self._flat_pixels = True
                value = value.reshape(batch, -1, *value.shape[1:])
            conditioning[key] = value.to(self.device)
        return conditioning

    def _model_inputs(self, conditioning: dict[str, Tensor], answers: Tensor) -> dict[str, Tensor]:
        """Keyword arguments of one forward pass over prompt + ``answers`` (B, T), -1 padded."""
        mask = torch.cat([conditioning["attention_mask"], (answers >= 0).long()], dim=1)
        ids = torch.cat([conditioning["input_ids"], answers], dim=1).masked_fill(mask == 0, self.pad_token_id)
        inputs = {"input_ids": ids, "attention_mask": mask}
        for key, value in conditioning.items():
            if key in inputs:
                continue
            if key == "pixel_values" and self._flat_pixels:
                value = value.flatten(0, 1)
            elif key in PER_TOKEN_KEYS:
                value = F.pad(value, (0, answers.shape[1]))
            inputs[key] = value
        return inputs

    def _answer_logits(self, conditioning: dict[str, Tensor], answers: Tensor) -> Tensor:
        """(B, T, V) float32 logits that predict each answer token, teacher-forced."""
        length = answers.shape[1]
        output = self.forward_model(**self._model_inputs(conditioning, answers), use_cache=False, logits_to_keep=length + 1)
        return output.logits[:, :-1].float()

    # ----------------------------------------------------------------------------------------
    # sampling and re-scoring

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str | VisualPrompt],
        *,
        generator: torch.Generator | None = None,
        images: Tensor | None = None,
        progress: bool = False,
        keep_step_means: bool = False,
    ) -> Rollout:
        """Answers for (image, question) prompts, with every token's log-prob (see the module
        docstring); ``generator`` makes the answers reproducible. A token has no Gaussian step:
        ``keep_step_means`` raises ValueError."""
        if keep_step_means:
            raise ValueError("a VLM's steps are tokens, with no Gaussian mean to keep.")
        questions, images = self._questions_and_images(prompts, images)
        conditioning = self._prompt_inputs(questions, images)
        inputs = self._model_inputs(conditioning, answers=conditioning["input_ids"][:, :0])
        seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            sequences = self.model.generate(**inputs, generation_config=self.generation_config())
        answers = self._answer_tokens(sequences[:, inputs["input_ids"].shape[1] :])
        log_probs = token_log_probs(
            self._answer_logits(conditioning, answers), answers, self.sample_config.temperature, self.excluded_tokens
        )
        batch, length = answers.shape
        return Rollout(
            prompts=list(prompts),
            trajectory=answers,
            timesteps=torch.arange(length, device=self.device).expand(batch, -1).clone(),
            log_probs=log_probs,
            step_mask=answers >= 0,
            conditioning=conditioning,
            images=images.to(self.device),
            texts=self.decode(answers),
        )

    def generation_config(self):
        """The ``GenerationConfig`` of :meth:`sample`: ``sample:``'s settings only, never the
        checkpoint's own generation defaults (Qwen2-VL ships top_k 1, for instance)."""
        from transformers import GenerationConfig

        config = self.sample_config
        return GenerationConfig(
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
            suppress_tokens=self.excluded_tokens or None,
        )

    def _answer_tokens(self, generated: Tensor) -> Tensor:
        """(B, max_new_tokens) answer ids from generated ids: -1 after the first end-of-sequence
        token and in the columns generation stopped before."""
        length = self.sample_config.max_new_tokens
        answers = F.pad(generated, (0, length - generated.shape[1]), value=-1)
        is_end = torch.isin(answers, torch.as_tensor(self.eos_token_ids, device=answers.device))
        ended_before = (is_end.long().cumsum(dim=1) - is_end.long()) > 0  # (B, T): an earlier EOS
        return answers.masked_fill(ended_before, -1)

    def decode(self, answers: Tensor) -> list[str]:
        """The texts of (B, T) answer tokens (special tokens and padding dropped)."""
        return [
            self.tokenizer.decode(row[row >= 0].tolist(), skip_special_tokens=True).strip() for row in answers.cpu()
        ]

    def step_pieces(self, steps: Tensor) -> tuple[Tensor, ...]:
        """``steps`` in one piece: one teacher-forced pass scores every token."""
        return split_steps(steps, None)

    def set_steps_per_forward(self, steps: int) -> None:
        """Ignored: one teacher-forced pass scores every token."""

    def step_log_prob(self, rollout: Rollout, steps: Tensor) -> Tensor:
        """(B, k) float32 log-probs of the answer tokens at ``steps`` ((k,) or (B, k) token
        positions), WITH grad; one teacher-forced pass scores them all."""
        answers = rollout.trajectory
        log_probs = token_log_probs(
            self._answer_logits(rollout.conditioning, answers),
            answers,
            self.sample_config.temperature,
            self.excluded_tokens,
        )
        return _at_steps(log_probs, torch.as_tensor(steps, device=self.device))

    def step_scores(self, rollout: Rollout, steps: Tensor, *, kl: bool = False, normalized_ratio: bool = False) -> StepScores:
        """(B, k) log-probs as :meth:`step_log_prob`'s and, with ``kl``, (B, k) KL(pi_theta ||
        pi_ref) of each token's distribution (the sampler's: at ``sample.temperature``, excluded
        tokens removed) to the initial model's given the same prefix, summed over the
        vocabulary; 0 at padding. Both WITH grad; one no-grad reference pass and one current
        pass. A token has no Gaussian step: ``normalized_ratio`` raises ValueError."""
        if normalized_ratio:
            raise ValueError("GRPO-Guard's normalised ratio is defined for Gaussian denoising steps, not for tokens.")
        if not kl:
            return StepScores(self.step_log_prob(rollout, steps))
        answers = rollout.trajectory
        temperature = self.sample_config.temperature
        with torch.no_grad(), self.reference():  # first: reference() may swap weights in place
            reference = vocabulary_log_probs(self._answer_logits(rollout.conditioning, answers), temperature, self.excluded_tokens)
        current = vocabulary_log_probs(self._answer_logits(rollout.conditioning, answers), temperature, self.excluded_tokens)
        log_probs = pick_tokens(current, answers)  # (B, T)
        divergence = token_kl(current, reference, answers)  # (B, T)
        steps = torch.as_tensor(steps, device=self.device)
        return StepScores(_at_steps(log_probs, steps), _at_steps(divergence, steps))

    def data_rollout(self, prompts: Sequence[str], images: Tensor) -> Rollout:
        """Offline image pairs are a text-to-image model's data: ValueError."""
        raise ValueError("a rollout of given images is a text-to-image model's; a VLM's data are answers.")

    @contextlib.contextmanager
    def sde_window(self, steps: Sequence[int] | None) -> Iterator[None]:
        """A window of noised steps is a diffusion sampler's: ConfigError for any but None."""
        if steps is not None:
            raise ConfigError(
                "sample.sde_window adds noise at some denoising steps only; a VLM's tokens are all sampled, "
                "so it has none: set sample.sde_window.size=0."
            )
        yield

    # ----------------------------------------------------------------------------------------
    # matching losses

    def _answer_log_softmax(self, rollout: Rollout, answers: Tensor) -> Tensor:
        """(B, T, V) float32 log pi(. | prompt, answer prefix) at temperature 1."""
        return vocabulary_log_probs(self._answer_logits(rollout.conditioning, answers), 1.0, self.excluded_tokens)

    def _answers(self, rollout: Rollout, clean: Tensor | None) -> Tensor:
        return (rollout.final_samples if clean is None else clean).to(self.device)

    def matching_loss(
        self,
        rollout: Rollout,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        clean: Tensor | None = None,
    ) -> Tensor:
        """(B,) the mean per-token NLL of the answers (``rollout``'s, or ``clean`` (B, T) token
        ids) given the rollout's prompts, WITH grad; ``t`` and ``noise`` are unused."""
        answers = self._answers(rollout, clean)
        logits = self._answer_logits(rollout.conditioning, answers)
        return -masked_token_mean(token_log_probs(logits, answers, 1.0, self.excluded_tokens), answers)

    def matching_terms(
        self,
        rollout: Rollout,
        *,
        t: Tensor,
        noise: Tensor,
        clean: Tensor | None = None,
        references: Sequence[dict[str, Tensor] | None] = (None,),
        residuals: bool = False,
    ) -> MatchingTerms:
        """The answers' NLL under the current model (WITH grad) and each reference (no grad),
        and the mean per-token KL(pi_theta || pi_ref) (grad through the current model). A token
        has no regression residual: ``residuals`` raises ValueError."""
        if residuals:
            raise ValueError("matching residuals are a denoiser's (prediction - target); a VLM's loss is a token NLL.")
        answers = self._answers(rollout, clean)
        index = answers.clamp(min=0).unsqueeze(-1)
        reference_log_probs = []
        for weights in references:  # before the current pass: reference() may swap weights in place
            with torch.no_grad(), self.reference(weights):
                reference_log_probs.append(self._answer_log_softmax(rollout, answers))
        log_probs = self._answer_log_softmax(rollout, answers)

        def nll(full: Tensor) -> Tensor:
            return -masked_token_mean(full.gather(-1, index).squeeze(-1), answers)

        def kl(reference: Tensor) -> Tensor:
            return masked_token_mean(token_kl(log_probs, reference, answers), answers)

        return MatchingTerms(
            loss=nll(log_probs),
            reference_loss=torch.stack([nll(r) for r in reference_log_probs]),
            divergence=torch.stack([kl(r) for r in reference_log_probs]),
        )

    def training_timesteps(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(B,) zeros: an answer has no noise level to draw."""
        return torch.zeros(batch, dtype=torch.long, device=self.device)

    def training_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(B, 0): a VLM's matching loss adds no noise."""
        return torch.zeros(batch, 0, device=self.device)

    def noise_level(self, timesteps: Tensor) -> Tensor:
        """(B,) ones: every token counts fully in timestep weightings."""
        return torch.ones(timesteps.shape[0], device=timesteps.device)

    @torch.no_grad()
    def encode_samples(self, samples: Sequence[str]) -> Tensor:
        """(B, max_new_tokens) token ids of answer texts, each ended by the end-of-sequence
        token and padded with -1 (the representation of ``rollout.final_samples``)."""
        if isinstance(samples, str) or not all(isinstance(text, str) for text in samples):
            raise ValueError("a VLM's encode_samples takes a list of answer texts.")
        length = self.sample_config.max_new_tokens
        rows = []
        for text in samples:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_token_ids[0]]
            if len(ids) > length:
                raise ConfigError(
                    f"the answer {text!r} takes {len(ids)} tokens with its end-of-sequence token; "
                    f"sample.max_new_tokens={length} must be at least that."
                )
            rows.append(ids + [-1] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    # ----------------------------------------------------------------------------------------
    # persistence

    def save(self, path: str | Path) -> None:
        """LoRA: a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
        what ``PeftModel.from_pretrained(base, path)`` and :func:`load_lora_adapter` read);
        full: a complete model folder. The processor is saved beside it either way, with an
        align_gen_model.json card naming the base model."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_model_card(path, self.model_config.pretrained, self.model_config.lora.enabled)
        if self.model_config.lora.enabled:
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            self.model.peft_config["default"].save_pretrained(path)
            weights = {name: value.contiguous() for name, value in get_peft_model_state_dict(self.model).items()}
            save_file(weights, path / ADAPTER_WEIGHTS_FILE)
        else:
            self.model.save_pretrained(path, safe_serialization=True)
        self.processor.save_pretrained(path)


def _at_steps(values: Tensor, steps: Tensor) -> Tensor:
    """(B, k) columns of (B, T) per-token ``values`` at ``steps`` ((k,) shared or (B, k))."""
    return values[:, steps] if steps.dim() == 1 else values.gather(1, steps)


def load_lora_adapter(model: torch.nn.Module, path: str | Path) -> None:
    """Injects the peft LoRA adapter saved in folder ``path`` (by :meth:`VLMPolicy.save`) into
    ``model`` in place."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    config = LoraConfig.from_pretrained(path)
    inject_adapter_in_model(config, model)
    result = set_peft_model_state_dict(model, load_file(path / ADAPTER_WEIGHTS_FILE))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"the adapter in {path} has weights the model lacks, e.g. {unexpected[:3]}")


# --------------------------------------------------------------------------------------------
# model introspection


def _language_model(model) -> torch.nn.Module:
    language = getattr(model, "language_model", None)
    return language if isinstance(language, torch.nn.Module) else model.get_decoder()


def _vision_tower(model) -> torch.nn.Module | None:
    for owner in (getattr(model, "model", None), model):
        for name in VISION_TOWER_NAMES:
            module = getattr(owner, name, None)
            if isinstance(module, torch.nn.Module):
                return module
    return None


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """The qualified name of ``module`` inside ``model`` ('' for the model itself)."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _context_length(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "max_position_embeddings", 0) or 10**9)


def _native_resolution(processor) -> int:
    """The side of the images the processor makes: for dynamic-resolution processors (Qwen2-VL,
    whose sizes are pixel counts) the square side of its largest image capped at
    :data:`DYNAMIC_RESOLUTION_DEFAULT`; else its crop size, else its resize size, else the side
    of the square tiles its vision encoder sees (Idefics3 / SmolVLM's ``max_image_size``)."""
    image_processor = processor.image_processor
    if hasattr(image_processor, "merge_size"):
        pixels = _size_field(getattr(image_processor, "size", None), "longest_edge")
        pixels = pixels or getattr(image_processor, "max_pixels", None)
        return min(DYNAMIC_RESOLUTION_DEFAULT, math.isqrt(int(pixels))) if pixels else DYNAMIC_RESOLUTION_DEFAULT
    for field, key in (
        ("crop_size", "height"),
        ("size", "height"),
        ("size", "shortest_edge"),
        ("max_image_size", "longest_edge"),
    ):
        value = _size_field(getattr(image_processor, field, None), key)
        if value:
            return int(value)
    return DYNAMIC_RESOLUTION_DEFAULT


def _size_field(size, key: str):
    """``size[key]`` of a processor size (a dict, or transformers' SizeDict); None if absent."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _eos_token_ids(model, tokenizer) -> list[int]:
    """The end-of-sequence ids: the generation config's (one or a list) and the tokenizer's."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in ([configured] if isinstance(configured, int) else list(configured or [])) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    if not ids:
        raise ConfigError("the model's tokenizer and generation config name no end-of-sequence token.")
    return ids
