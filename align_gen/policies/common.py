"""What every denoising policy shares, whatever its denoiser (UNet or flow transformer).

A denoising policy samples through its family's log-prob pipeline (:mod:`pipelines`: the
sampling loop, classifier-free guidance as ONE batched forward of 2B, the transition kernel
that both draws and scores a step) and re-scores stored steps through the same pipeline's
``denoise`` and ``transition``, so sampling and training can never drift apart.
:class:`DenoiserPolicy` adds what training needs (with the trainable-weights machinery of
:class:`~align_gen.policies.weights.TrainableWeights`, shared with the VLM policy): the
configuration of the model (LoRA, attention kernel, offloading), re-scoring in pieces of
``steps_per_forward`` steps, the matching losses and saving. A subclass supplies the matching
loss's noising and target and the training timesteps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

from align_gen.config import ModelConfig, SampleConfig
from align_gen.errors import ConfigError
from align_gen.policies.weights import TrainableWeights, write_model_card
from align_gen.policy import split_steps
from align_gen.types import MatchingTerms, Rollout, StepScores
from pipelines.log_prob import AttentionBackendError, LogProbMixin

Tensor = torch.Tensor

# LoRA targets when model.lora.target_modules is empty: the attention projections of diffusers'
# UNet and transformer blocks.
DENOISER_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# model.attention values that restrict PyTorch's scaled_dot_product_attention to one kernel.
SDPA_KERNELS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
CUDA_ONLY_ATTENTION = ("sdpa_efficient", "sdpa_cudnn", "xformers")


def per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """(B,) mean over non-batch elements of (a - b)^2."""
    return (a - b).pow(2).flatten(1).mean(dim=1)


class DenoiserPolicy(TrainableWeights):
    """The shared half of a diffusion-family :class:`~align_gen.policy.Policy`.

    A subclass names its :attr:`sampler_class` (the family's log-prob pipeline), calls
    :meth:`_attach` with the loaded pipeline, sets ``model`` (the denoiser; forward passes go
    through ``forward_model``: the model itself or the wrapper the trainer's accelerator puts
    around it), ``vae`` and ``resolution``, calls :meth:`_configure_model`, and implements the
    matching loss's pieces below.
    """

    sampler_class: type[LogProbMixin]
    takes_images = False  # text-to-image: prompts are strings
    steps_per_forward: int | None = 1  # re-scored steps per denoiser forward (train.steps_per_forward)
    _sde_steps: tuple[int, ...] | None = None  # the open sde_window's steps (None: every step)

    # The keyword of ``Pipeline.save_lora_weights`` that takes the denoiser's LoRA layers.
    lora_layers_argument = "unet_lora_layers"

    pipeline: object  # the pipeline as loaded: what a full fine-tune saves
    sampler: LogProbMixin  # the family's log-prob pipeline, sharing the pipeline's components
    vae: torch.nn.Module
    resolution: int
    model: torch.nn.Module
    forward_model: torch.nn.Module
    model_config: ModelConfig
    sample_config: SampleConfig
    device: torch.device

    # ----------------------------------------------------------------------------------------
    # what a subclass supplies

    def _matching_prediction(
        self, clean: Tensor, conditioning: dict[str, Tensor], t: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(prediction, target), both (B, C, h, w) float32, of the pre-training loss of the
        clean latents at timesteps ``t`` (B,) with ``noise``; no guidance."""
        raise NotImplementedError

    def training_timesteps(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(B,) timesteps drawn uniformly over the training range (see the Policy protocol)."""
        raise NotImplementedError

    def training_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(B, C, h, w) standard normal noise shaped like the clean latents, on the device."""
        side = self.resolution // self.vae_scale_factor
        shape = (batch, self.vae.config.latent_channels, side, side)
        return torch.randn(shape, generator=generator).to(self.device)

    # ----------------------------------------------------------------------------------------
    # set-up

    def _attach(self, pipeline, model_config: ModelConfig, sample_config: SampleConfig, device: torch.device | str) -> None:
        """Stores the configs and ``pipeline``, and builds the sampler: the family's log-prob
        pipeline on the same components, with its own scheduler (the pipeline's is never
        touched), sampling on ``device``."""
        self.model_config = model_config
        self.sample_config = sample_config
        self.device = torch.device(device)
        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self.sampler = self.sampler_class.from_pipeline(pipeline)
        self.sampler.device_override = self.device
        self.sampler.offload_frozen = model_config.offload_frozen
        self.scheduler = self.sampler.scheduler
        self.vae = pipeline.vae.requires_grad_(False).eval()

    def _set_timesteps(self) -> None:
        """Puts the sampler's scheduler on the ``sample.num_steps`` grid at :attr:`resolution`."""
        self.sampler.set_sampling_timesteps(self.sample_config.num_steps, self.resolution)

    @property
    def stochasticity(self) -> float:
        """The sampler's noise setting: ``sample.eta`` (DDIM) or ``sample.noise_level`` (flow SDE)."""
        return getattr(self.sample_config, self.sampler.stochasticity_name)

    def _configure_model(self, trainable: bool) -> None:
        """Freezes the model, or makes LoRA adapters / the whole model trainable in float32."""
        config = self.model_config
        if config.attention in CUDA_ONLY_ATTENTION and self.device.type != "cuda":
            raise ConfigError(
                f"model.attention={config.attention} needs a CUDA device; on {self.device.type} use sdpa, "
                "sdpa_flash or sdpa_math."
            )
        self.sampler.attention_backend = SDPA_KERNELS.get(config.attention)
        if config.attention == "xformers":
            try:
                self.model.enable_xformers_memory_efficient_attention()
            except (ImportError, ModuleNotFoundError, ValueError) as error:
                raise ConfigError(
                    f"model.attention=xformers is not available ({error}); install the `gpu` "
                    "extra (pip install 'align-gen[gpu]') or set model.attention=sdpa."
                ) from None
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if not trainable:
            self.model.requires_grad_(False).eval()
            self._reference_weights = None
        else:
            if config.gradient_checkpointing:
                self.model.enable_gradient_checkpointing()
            self._make_trainable(config.lora, config.lora.target_modules or DENOISER_LORA_TARGETS)
        self.sampler.reset_denoiser_dtype()  # the frozen weights' dtype, now that some train

    def use_forward_module(self, module: torch.nn.Module) -> None:
        """Forward passes (sampling, re-scoring, matching) go through ``module``."""
        self.forward_model = module
        self.sampler.forward_denoiser = module

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype the denoiser's inputs are cast to (its frozen weights')."""
        return self.sampler.denoiser_dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.sampler.vae_scale_factor  # diffusers': 2 ** (VAE levels - 1)

    @property
    def latent_multiple(self) -> int:
        """Image sides must be a multiple of this: the VAE's factor times the denoiser's patch."""
        return self.vae_scale_factor * (getattr(self.model.config, "patch_size", None) or 1)

    def _check_resolution(self) -> None:
        if self.resolution <= 0 or self.resolution % self.latent_multiple:
            raise ConfigError(
                f"sample.resolution={self.resolution} does not fit this model: image sides must be a positive "
                f"multiple of {self.latent_multiple} (its VAE's downsampling factor x its denoiser's patch size)."
            )

    def _place_frozen(self) -> None:
        """Freezes every text encoder the pipeline has (``text_encoder``, ``_2``, ``_3``), keeps
        them as :attr:`text_encoders`, and puts them and the VAE on the device, or with
        ``model.offload_frozen`` on the CPU, from where the sampler brings them in only while
        they run."""
        self.text_encoders = [encoder.requires_grad_(False).eval() for encoder in self.sampler.frozen_modules]
        home = torch.device("cpu") if self.model_config.offload_frozen else self.device
        for module in (self.vae, *self.text_encoders):
            module.to(home)

    @contextlib.contextmanager
    def _attention_errors(self) -> Iterator[None]:
        """Within: the sampler's attention-kernel error becomes a ConfigError naming the setting."""
        try:
            yield
        except AttentionBackendError as error:
            raise ConfigError(
                f"model.attention={self.model_config.attention}: {error} Set model.attention=sdpa to let PyTorch choose."
            ) from error

    # ----------------------------------------------------------------------------------------
    # sampling (the family's pipeline) and re-scoring (its denoise and transition)

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The conditioning of ``prompts`` at the sampling settings (what a rollout stores)."""
        with self.sampler.frozen_on_device(self.text_encoders):
            return self.sampler.encode_conditioning(
                prompts,
                guidance_scale=self.sample_config.guidance_scale,
                negative_prompt=self.sample_config.negative_prompt,
                resolution=self.resolution,
            )

    def decode(self, latents: Tensor) -> Tensor:
        """(B, 3, H, W) float32 images in [0, 1] from (B, C, h, w) latents."""
        return self.sampler.decode_latents_to_images(latents)

    def _denoise(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """The denoiser's output with guidance at ``sample.guidance_scale`` (the sampler's)."""
        with self._attention_errors():
            return self.sampler.denoise(latents, timesteps, conditioning, self.sample_config.guidance_scale)

    def _forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """One denoiser forward pass without guidance (the matching losses')."""
        with self._attention_errors():
            return self.sampler.forward(latents, timesteps, conditioning)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        generator: torch.Generator | None = None,
        images: Tensor | None = None,
        progress: bool = False,
        keep_step_means: bool = False,
    ) -> Rollout:
        """Runs the family's log-prob pipeline at the ``sample`` settings without grad, recording
        the trajectory and every step's log-prob (see :class:`~align_gen.policy.Policy`), noise
        only at the steps of :meth:`sde_window` when one is open."""
        if images is not None:
            raise ValueError("A text-to-image policy takes no input images.")
        if not prompts:
            raise ValueError("sample() needs at least one prompt.")
        config = self.sample_config
        with self._attention_errors():
            output = self.sampler.sample_with_log_probs(
                list(prompts),
                num_inference_steps=config.num_steps,
                guidance_scale=config.guidance_scale,
                stochasticity=self.stochasticity,
                negative_prompt=config.negative_prompt,
                resolution=self.resolution,
                generator=generator,
                progress=progress,
                sde_steps=self._sde_steps,
                keep_step_means=keep_step_means,
            )
        return Rollout(
            prompts=list(prompts),
            trajectory=output.latents,
            timesteps=output.timesteps,
            log_probs=output.log_probs,
            step_mask=output.step_mask,
            conditioning=output.conditioning,
            images=output.images,
            step_means=output.step_means,
            sde_steps=None if self._sde_steps is None else [self._sde_steps] * len(prompts),
        )

    @torch.no_grad()
    def data_rollout(self, prompts: Sequence[str], images: Tensor) -> Rollout:
        """A rollout of ``images`` (B, 3, H, W) in [0, 1] for ``prompts``: their conditioning at
        the sampling settings, the images' latents as the clean samples (a one-entry trajectory),
        no steps (see the Policy protocol)."""
        if len(prompts) != len(images):
            raise ValueError(f"data_rollout takes one image per prompt, got {len(prompts)} prompts and {len(images)} images.")
        latents = self.encode_samples(images)  # (B, C, h, w)
        batch = len(prompts)
        return Rollout(
            prompts=list(prompts),
            trajectory=latents[:, None],
            timesteps=torch.zeros(batch, 0, dtype=torch.long, device=self.device),
            log_probs=torch.zeros(batch, 0, device=self.device),
            step_mask=torch.zeros(batch, 0, dtype=torch.bool, device=self.device),
            conditioning=self.encode_prompts(prompts),
            images=images.to(self.device, torch.float32),
        )

    @contextlib.contextmanager
    def sde_window(self, steps: Sequence[int] | None) -> Iterator[None]:
        """Within: :meth:`sample` adds noise only at ``steps`` (see the Policy protocol)."""
        if steps is not None:
            steps = tuple(sorted(set(steps)))
            if not steps or steps[0] < 0 or steps[-1] >= self.sample_config.num_steps:
                raise ValueError(f"an SDE window must hold steps in [0, {self.sample_config.num_steps}), got {steps}.")
        previous, self._sde_steps = self._sde_steps, steps
        try:
            yield
        finally:
            self._sde_steps = previous

    def step_log_prob(self, rollout: Rollout, steps: Tensor) -> Tensor:
        """(B, k) float32 log-probs of the stored transitions at ``steps`` ((k,) or (B, k) step
        indices), WITH grad, through the same guidance and kernel as sampling. Every
        :attr:`steps_per_forward` columns run as one denoiser forward (their rows stacked
        column-major: c * B rows, each row's conditioning repeated)."""
        return self.step_scores(rollout, steps).log_prob

    def step_scores(self, rollout: Rollout, steps: Tensor, *, kl: bool = False, normalized_ratio: bool = False) -> StepScores:
        """(B, k) log-probs as :meth:`step_log_prob`'s, and on request each step's KL to the
        initial model's step (one more, no-grad, denoiser forward per piece) and GRPO-Guard's
        normalised log-ratio (from ``rollout.step_means``); see the Policy protocol."""
        steps = torch.as_tensor(steps, device=self.device)
        if steps.dim() == 1:
            steps = steps.expand(len(rollout), -1)
        if normalized_ratio and rollout.step_means is None:
            raise ValueError("the normalised ratio needs each step's sampling mean: sample with keep_step_means=True.")
        parts = self.step_pieces(steps)
        references: list[Tensor | None] = [None] * len(parts)
        if kl:  # every reference pass first: reference() may swap weights in place
            with torch.no_grad(), self.reference():
                references = [self._denoise(*self._transitions(rollout, part)[:3]) for part in parts]
        scores = []
        for part, reference_output in zip(parts, references, strict=True):
            latents, timesteps, conditioning, index, prev_latents, rows = self._transitions(rollout, part)
            old_mean = rollout.step_means[rows, index] if normalized_ratio else None
            model_output = self._denoise(latents, timesteps, conditioning)
            scores.append(
                self.sampler.score_transition(
                    model_output,
                    latents,
                    index,
                    prev_latents,
                    self.stochasticity,
                    reference_output=reference_output,
                    old_mean=old_mean,
                )
            )

        def columns(name: str) -> Tensor | None:  # each piece's (c * B,), column-major -> (B, k)
            values = [getattr(score, name) for score in scores]
            if values[0] is None:
                return None
            return torch.cat([value.view(-1, len(rollout)).t() for value in values], dim=1)

        return StepScores(columns("log_prob"), columns("kl"), columns("normalized_log_ratio"), columns("gain"))

    def _transitions(
        self, rollout: Rollout, steps: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor, Tensor, Tensor]:
        """The stored transitions at ``steps`` (B, c) as the c * B rows of one denoiser forward
        (stacked column-major, each row's conditioning repeated): (latents x_t, timesteps,
        conditioning, step indices, next latents, sample indices)."""
        batch, columns = steps.shape
        rows = torch.arange(batch, device=self.device).repeat(columns)  # (c * B,) column-major
        index = steps.t().reshape(-1)  # (c * B,)
        conditioning = rollout.conditioning
        if columns > 1:
            conditioning = {key: value.repeat(columns, *[1] * (value.dim() - 1)) for key, value in conditioning.items()}
        return (
            rollout.trajectory[rows, index],
            rollout.timesteps[rows, index],
            conditioning,
            index,
            rollout.trajectory[rows, index + 1],
            rows,
        )

    def step_pieces(self, steps: Tensor) -> tuple[Tensor, ...]:
        """``steps`` in pieces of :attr:`steps_per_forward` columns (see the Policy protocol)."""
        return split_steps(steps, self.steps_per_forward)

    def set_steps_per_forward(self, steps: int) -> None:
        if steps < 1:
            raise ConfigError(f"train.steps_per_forward must be >= 1, got {steps}.")
        self.steps_per_forward = steps

    def noise_level(self, timesteps: Tensor) -> Tensor:
        """(B,) float in [0, 1]: t / N for the scheduler's ``timesteps`` (the sampler's)."""
        return self.sampler.noise_level_of(timesteps)

    # ----------------------------------------------------------------------------------------
    # matching losses

    def _matching_inputs(
        self, rollout: Rollout, t: Tensor | None, noise: Tensor | None, clean: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(clean latents, timesteps, noise), drawing what was not given."""
        clean = rollout.final_samples if clean is None else clean
        if t is None:
            t = self.training_timesteps(clean.shape[0]).to(self.device)
        return clean, t, torch.randn_like(clean) if noise is None else noise

    def matching_loss(
        self,
        rollout: Rollout,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        clean: Tensor | None = None,
    ) -> Tensor:
        """(B,) the pre-training MSE of the clean latents (``rollout.final_samples`` unless
        ``clean`` is given) at timesteps ``t`` (B,); uniform weighting over elements; no CFG
        (the conditional branch)."""
        clean, t, noise = self._matching_inputs(rollout, t, noise, clean)
        prediction, target = self._matching_prediction(clean, rollout.conditioning, t, noise)
        return per_sample_mse(prediction, target)

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
        """The matching loss of the current model (WITH grad) and of each reference model
        (None = the initial weights, or a :meth:`trainable_state_dict` snapshot; no grad) at the
        same inputs, the mean squared difference of the predictions (grad through the current
        one), and with ``residuals`` the predictions minus the target and their clean-sample
        scale (:meth:`clean_scale`)."""
        clean, t, noise = self._matching_inputs(rollout, t, noise, clean)
        # Reference passes come first: entering reference() may copy weights in place, which
        # must not happen while a graph holds the current ones.
        reference_predictions = []
        for weights in references:
            with torch.no_grad(), self.reference(weights):
                reference_predictions.append(self._matching_prediction(clean, rollout.conditioning, t, noise)[0])
        prediction, target = self._matching_prediction(clean, rollout.conditioning, t, noise)
        extra = {}
        if residuals:
            extra = {
                "residual": prediction - target,
                "reference_residual": torch.stack([r - target for r in reference_predictions]),
                "clean_scale": self.clean_scale(t),
            }
        return MatchingTerms(
            loss=per_sample_mse(prediction, target),
            reference_loss=torch.stack([per_sample_mse(r, target) for r in reference_predictions]),
            divergence=torch.stack([per_sample_mse(prediction, r) for r in reference_predictions]),
            **extra,
        )

    def clean_scale(self, t: Tensor) -> Tensor:
        """(B,) float32 |d x0_hat / d prediction| at training timesteps ``t``: how an error of the
        model's prediction becomes an error of its clean-sample prediction."""
        raise NotImplementedError

    def encode_samples(self, samples: Tensor) -> Tensor:
        """(B, C, h, w) float32 latents of (B, 3, H, W) images in [0, 1] (the VAE posterior's
        mean, scaled and shifted as :meth:`decode` expects), resized to the policy's resolution."""
        return self.sampler.encode_images_to_latents(samples, self.resolution)

    # ----------------------------------------------------------------------------------------
    # persistence

    def save(self, path: str | Path) -> None:
        """LoRA: diffusers LoRA weights with their adapter config (``pipe.load_lora_weights(path)``
        rebuilds the adapter at the trained alpha / rank); full: a pipeline folder
        (``<Pipeline>.from_pretrained(path)``). Both with an align_gen_model.json card."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_model_card(path, self.model_config.pretrained, self.model_config.lora.enabled)
        if self.model_config.lora.enabled:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.model))
            # The adapter's peft config (rank, alpha, targets) rides in the safetensors header,
            # where load_lora_weights reads it: without it diffusers assumes alpha == rank.
            metadata_argument = self.lora_layers_argument.replace("_lora_layers", "_lora_adapter_metadata")
            metadata = self.model.peft_config["default"].to_dict()
            type(self.pipeline).save_lora_weights(
                path, **{self.lora_layers_argument: layers, metadata_argument: metadata}
            )
        else:
            self.pipeline.save_pretrained(path, safe_serialization=True)
