"""The Stable Diffusion 1.x / 2.x policy: a UNet denoiser with DDIM(eta) transitions.

Sampling and re-scoring share one function per concern: :meth:`DiffusionPolicy._denoise` applies
classifier-free guidance (the only place CFG is written) and
:func:`align_gen.kernels.ddim_step_with_logprob` both draws and re-scores a transition. An
un-updated policy therefore reproduces its rollout's log-probs exactly, provided the re-scoring
forward pass has the same batch size as sampling (float kernels differ between batch sizes by
more than DDPO's 1e-4 clip range; the trainer keeps them equal by default).

Trainable weights are LoRA adapters (peft, through diffusers' adapter API) or the whole UNet.
The VAE and the text encoder are frozen. Log-probs are computed in float32 whatever the
weights' dtype.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align_gen.config import ModelConfig, SampleConfig
from align_gen.errors import ConfigError, MissingWeightsError
from align_gen.kernels import ddim_step_with_logprob
from align_gen.policies.loading import dtype_from_name, load_sd_pipeline
from align_gen.types import Rollout

Tensor = torch.Tensor

# Written next to a saved model: which base model a LoRA folder belongs to.
MODEL_CARD_FILE = "align_gen_model.json"


def _per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """(B,) mean over non-batch elements of (a - b)^2."""
    return (a - b).pow(2).flatten(1).mean(dim=1)


def classifier_free_guidance(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """uncond + scale * (cond - uncond) (Ho & Salimans 2022); every policy uses this one."""
    return uncond + scale * (cond - uncond)


class DiffusionPolicy:
    """A Stable Diffusion pipeline behind the :class:`~align_gen.policy.Policy` protocol."""

    def __init__(
        self,
        pipeline,
        model_config: ModelConfig,
        sample_config: SampleConfig,
        device: torch.device | str = "cpu",
        *,
        trainable: bool = True,
    ) -> None:
        """Wraps ``pipeline``; ``trainable=False`` freezes everything (sampling, evaluation)."""
        from diffusers import DDIMScheduler

        self.model_config = model_config
        self.sample_config = sample_config
        self.device = torch.device(device)
        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        self.scheduler.set_timesteps(sample_config.num_steps, device=self.device)
        self.unet = pipeline.unet
        # The module forward passes go through: the UNet itself, or the wrapper the trainer's
        # accelerator puts around it (DDP/FSDP). Configuration is always read from self.unet.
        self.denoiser = self.unet
        self.vae = pipeline.vae.requires_grad_(False).eval()
        self.text_encoder = pipeline.text_encoder.requires_grad_(False).eval()
        self.tokenizer = pipeline.tokenizer
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(self.device)
        self._reference_weights: dict[str, Tensor] | None = None
        self._configure_unet(trainable)
        # diffusers' ModelMixin.dtype walks every submodule (1-4 ms per read at SD1.5 size, paid
        # on every denoising step); the dtype of the frozen weights never changes, so read it once.
        # conv_in is never a LoRA target, so its dtype is the one inputs must be cast to.
        self.unet_dtype = self.unet.conv_in.weight.dtype
        self.resolution = sample_config.resolution or self.unet.config.sample_size * self.vae_scale_factor

    @classmethod
    def from_config(
        cls,
        model_config: ModelConfig,
        sample_config: SampleConfig,
        device: torch.device | str = "cpu",
        *,
        trainable: bool = True,
        lora_path: str | Path | None = None,
    ) -> DiffusionPolicy:
        """Loads ``model_config.pretrained``; ``lora_path`` applies trained LoRA weights first."""
        pipeline = load_sd_pipeline(
            model_config.pretrained,
            revision=model_config.revision,
            variant=model_config.variant,
            dtype=dtype_from_name(model_config.dtype),
        )
        if lora_path is not None:
            if not Path(lora_path).exists():
                raise MissingWeightsError(f"LoRA weights not found: {lora_path}")
            pipeline.load_lora_weights(str(lora_path))
        return cls(pipeline, model_config, sample_config, device, trainable=trainable)

    # ----------------------------------------------------------------------------------------
    # set-up

    def _configure_unet(self, trainable: bool) -> None:
        config = self.model_config
        if config.attention == "xformers":
            if self.device.type != "cuda":
                raise ConfigError("model.attention=xformers needs a CUDA device; use sdpa on CPU.")
            try:
                self.unet.enable_xformers_memory_efficient_attention()
            except (ImportError, ModuleNotFoundError, ValueError) as error:
                raise ConfigError(
                    f"model.attention=xformers is not available ({error}); install the `gpu` "
                    "extra (pip install 'align-gen[gpu]') or set model.attention=sdpa."
                ) from None
        if not trainable:
            self.unet.requires_grad_(False).eval()
            return
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if config.lora.enabled:
            from peft import LoraConfig as PeftLoraConfig

            self.unet.requires_grad_(False)
            self.unet.add_adapter(
                PeftLoraConfig(
                    r=config.lora.rank,
                    lora_alpha=config.lora.alpha,
                    lora_dropout=config.lora.dropout,
                    init_lora_weights="gaussian",
                    target_modules=list(config.lora.target_modules),
                )
            )
        else:
            self.unet.requires_grad_(True)
            # The frozen reference of a fully fine-tuned model: a CPU copy of the initial weights.
            self._reference_weights = {k: v.detach().cpu().clone() for k, v in self.unet.state_dict().items()}
        # Trainable weights in float32 even when the frozen ones are half precision.
        for param in self.trainable_parameters():
            param.data = param.data.float()

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self.unet.parameters() if p.requires_grad)

    # ----------------------------------------------------------------------------------------
    # the shared forward pieces

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": (B, L, D), "negative_prompt_embeds": (B, L, D)} from the text encoder."""

        def encode(texts: Sequence[str]) -> Tensor:
            ids = self.tokenizer(
                list(texts),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            return self.text_encoder(ids)[0]

        conditioning = {"prompt_embeds": encode(prompts)}
        if self.sample_config.guidance_scale > 1.0:
            negative = encode([self.sample_config.negative_prompt])
            conditioning["negative_prompt_embeds"] = negative.expand(len(prompts), -1, -1).contiguous()
        return conditioning

    def _denoise(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """The denoiser's output for (B, C, h, w) latents at (B,) timesteps, with CFG applied.

        CFG runs as ONE batched forward of 2B (unconditional first), the same in sampling and
        re-scoring, so both see the same batch composition.
        """
        cond = conditioning["prompt_embeds"]
        dtype = self.unet_dtype
        if "negative_prompt_embeds" in conditioning:
            embeds = torch.cat([conditioning["negative_prompt_embeds"], cond])
            output = self.denoiser(
                torch.cat([latents, latents]).to(dtype), torch.cat([timesteps, timesteps]), embeds.to(dtype)
            ).sample.float()
            uncond_out, cond_out = output.chunk(2)
            return classifier_free_guidance(uncond_out, cond_out, self.sample_config.guidance_scale)
        return self.denoiser(latents.to(dtype), timesteps, cond.to(dtype)).sample.float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, 3, H, W) float32 images in [0, 1] from (B, C, h, w) latents."""
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(scaled).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------------------------------------
    # the Policy protocol

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        generator: torch.Generator | None = None,
        images: Tensor | None = None,
        progress: bool = False,
    ) -> Rollout:
        if images is not None:
            raise ValueError("A text-to-image policy takes no input images.")
        if not prompts:
            raise ValueError("sample() needs at least one prompt.")
        conditioning = self.encode_prompts(prompts)
        batch = len(prompts)
        side = self.resolution // self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, side, side)
        noise_device = generator.device if generator is not None else self.device
        latents = torch.randn(shape, generator=generator, device=noise_device).to(self.device)
        latents = latents * self.scheduler.init_noise_sigma
        trajectory, log_probs = [latents], []
        timesteps = self.scheduler.timesteps
        for t in tqdm(timesteps, desc="sampling", leave=False, disable=not progress):
            t_batch = t.expand(batch).to(self.device)
            model_output = self._denoise(latents, t_batch, conditioning)
            latents, log_prob = ddim_step_with_logprob(
                self.scheduler, model_output, t_batch, latents, eta=self.sample_config.eta, generator=generator
            )
            trajectory.append(latents)
            log_probs.append(log_prob)
        return Rollout(
            prompts=list(prompts),
            trajectory=torch.stack(trajectory, dim=1),
            timesteps=timesteps.to(self.device).expand(batch, -1).clone(),
            log_probs=torch.stack(log_probs, dim=1).float(),
            step_mask=torch.ones(batch, len(timesteps), dtype=torch.bool, device=self.device),
            conditioning=conditioning,
            images=self.decode(latents),
        )

    def step_log_prob(self, rollout: Rollout, steps: Tensor) -> Tensor:
        steps = torch.as_tensor(steps, device=self.device)
        batch = len(rollout)
        if steps.dim() == 1:
            steps = steps.expand(batch, -1)
        rows = torch.arange(batch, device=self.device)
        columns = []
        for j in range(steps.shape[1]):
            index = steps[:, j]
            latents = rollout.trajectory[rows, index]
            prev_latents = rollout.trajectory[rows, index + 1]
            timesteps = rollout.timesteps[rows, index]
            model_output = self._denoise(latents, timesteps, rollout.conditioning)
            _, log_prob = ddim_step_with_logprob(
                self.scheduler,
                model_output,
                timesteps,
                latents,
                eta=self.sample_config.eta,
                prev_sample=prev_latents,
            )
            columns.append(log_prob)
        return torch.stack(columns, dim=1)

    def noise_level(self, timesteps: Tensor) -> Tensor:
        """(B,) float in [0, 1]: how noisy the scheduler's integer ``timesteps`` are (t / N)."""
        return timesteps.float() / self.scheduler.config.num_train_timesteps

    def _matching_prediction(self, rollout: Rollout, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(prediction, target), both (B, C, h, w) float32, of the denoising loss at ``t``."""
        clean = rollout.final_samples
        noisy = self.scheduler.add_noise(clean, noise, t)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(clean, noise, t)
        else:
            target = clean
        prediction = self.denoiser(
            noisy.to(self.unet_dtype), t, rollout.conditioning["prompt_embeds"].to(self.unet_dtype)
        ).sample.float()
        return prediction, target.float()

    def _matching_inputs(self, rollout: Rollout, t: Tensor | None, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        clean = rollout.final_samples
        if t is None:
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (clean.shape[0],), device=self.device)
        return t, torch.randn_like(clean) if noise is None else noise

    def matching_loss(
        self, rollout: Rollout, *, t: Tensor | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """(B,) the denoising MSE on the clean latents at training timesteps ``t`` (B,) in
        [0, num_train_timesteps); uniform weighting over elements; no CFG (conditional branch)."""
        t, noise = self._matching_inputs(rollout, t, noise)
        prediction, target = self._matching_prediction(rollout, t, noise)
        return _per_sample_mse(prediction, target)

    def matching_loss_and_divergence(
        self, rollout: Rollout, *, t: Tensor | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(B,) matching loss as :meth:`matching_loss`, and (B,) the divergence from the
        reference model at the same inputs: mean (prediction - reference prediction)^2, with
        grad through the current prediction only."""
        t, noise = self._matching_inputs(rollout, t, noise)
        # The reference pass comes first: for a fully fine-tuned UNet, entering reference()
        # swaps weights in place, which must not happen while a graph holds the current ones.
        with torch.no_grad(), self.reference():
            reference_prediction, _ = self._matching_prediction(rollout, t, noise)
        prediction, target = self._matching_prediction(rollout, t, noise)
        return _per_sample_mse(prediction, target), _per_sample_mse(prediction, reference_prediction)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Forward passes use the initial weights: adapters disabled, or the stored initial UNet."""
        if self._reference_weights is None:
            self.unet.disable_adapters()
            try:
                yield
            finally:
                self.unet.enable_adapters()
            return
        current = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        self.unet.load_state_dict(self._reference_weights)
        try:
            yield
        finally:
            self.unet.load_state_dict(current)

    # ----------------------------------------------------------------------------------------
    # persistence

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trained weights only, keyed by parameter name (LoRA or the full UNet)."""
        names = {id(p): n for n, p in self.unet.named_parameters()}
        return {names[id(p)]: p.detach().cpu().contiguous() for p in self.trainable_parameters()}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.unet.named_parameters())
        missing = set(self.trainable_state_dict()) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable weights, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def save(self, path: str | Path) -> None:
        """LoRA: diffusers LoRA weights (``pipe.load_lora_weights(path)``); full: a pipeline
        folder (``StableDiffusionPipeline.from_pretrained(path)``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        kind = "lora" if self.model_config.lora.enabled else "full"
        description = {"base_model": self.model_config.pretrained, "kind": kind}
        (path / MODEL_CARD_FILE).write_text(json.dumps(description, indent=1))
        if kind == "lora":
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
            type(self.pipeline).save_lora_weights(path, unet_lora_layers=layers)
        else:
            self.pipeline.save_pretrained(path, safe_serialization=True)
