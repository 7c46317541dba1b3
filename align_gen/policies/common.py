"""What every denoising policy shares, whatever its denoiser (UNet or flow transformer).

:class:`DenoiserPolicy` holds (with the trainable-weights machinery of
:class:`~align_gen.policies.weights.TrainableWeights`, shared with the VLM policy)
classifier-free guidance (:func:`classifier_free_guidance`, the only place CFG is written, run
as ONE batched forward of 2B), re-scoring of stored transitions, the matching losses and saving.
A subclass supplies the model-specific pieces: prompt encoding, one denoiser forward pass, the
transition kernel of one step, and the matching loss's noising and target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from align_gen.config import ModelConfig, SampleConfig
from align_gen.errors import ConfigError
from align_gen.policies.weights import TrainableWeights, write_model_card
from align_gen.policy import split_steps
from align_gen.types import MatchingTerms, Rollout

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


def classifier_free_guidance(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """uncond + scale * (cond - uncond) (Ho & Salimans 2022); every policy uses this one."""
    return uncond + scale * (cond - uncond)


class DenoiserPolicy(TrainableWeights):
    """The shared half of a diffusion-family :class:`~align_gen.policy.Policy`.

    Subclasses set ``model`` (the denoiser module; ``forward_model`` is what forward passes go
    through: the model itself or the wrapper the trainer's accelerator puts around it),
    ``pipeline``, ``model_config``, ``sample_config`` and ``device``, call
    :meth:`_configure_model`, and implement the abstract methods below.
    """

    # The conditioning tensors one forward pass takes; CFG also needs "negative_" + each of them.
    conditioning_keys: tuple[str, ...] = ("prompt_embeds",)
    takes_images = False  # text-to-image: prompts are strings
    steps_per_forward: int | None = 1  # re-scored steps per denoiser forward (train.steps_per_forward)
    _sdpa_kernel: SDPBackend | None = None  # the one SDPA kernel model.attention allows (None: PyTorch picks)

    # The keyword of ``Pipeline.save_lora_weights`` that takes the denoiser's LoRA layers.
    lora_layers_argument = "unet_lora_layers"

    pipeline: object
    vae: torch.nn.Module
    resolution: int
    model: torch.nn.Module
    forward_model: torch.nn.Module
    model_config: ModelConfig
    sample_config: SampleConfig
    device: torch.device

    # ----------------------------------------------------------------------------------------
    # what a subclass supplies

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _denoiser_forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """(B, C, h, w) float32 output of one denoiser pass, ``conditioning`` keyed as
        :attr:`conditioning_keys`, without guidance."""
        raise NotImplementedError

    def _transition(
        self,
        model_output: Tensor,
        latents: Tensor,
        step_index: Tensor,
        timesteps: Tensor,
        prev_latents: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One step of the sampler's kernel at (B,) step indices / timesteps: draws the next
        latents (``prev_latents`` None) or re-scores the stored ones, and returns them with
        their (B,) float32 log-prob. Sampling and re-scoring both go through here."""
        raise NotImplementedError

    def _step_mask(self, batch: int, num_steps: int) -> Tensor:
        """(B, T) bool: which recorded steps are trainable (all, unless a subclass says not)."""
        return torch.ones(batch, num_steps, dtype=torch.bool, device=self.device)

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

    def _attach(
        self, pipeline, model_config: ModelConfig, sample_config: SampleConfig, device: torch.device | str, scheduler
    ) -> None:
        """Stores the configs and ``pipeline``, and puts ``scheduler`` (the sampler's own copy, so
        the pipeline's is never touched) on its ``sample.num_steps`` grid."""
        self.model_config = model_config
        self.sample_config = sample_config
        self.device = torch.device(device)
        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self.scheduler = scheduler
        self._set_timesteps()

    def _set_timesteps(self) -> None:
        """Puts ``self.scheduler`` on the ``sample.num_steps`` sampling grid; a subclass may pass
        more (FLUX's resolution-dependent shift)."""
        self.scheduler.set_timesteps(self.sample_config.num_steps, device=self.device)

    def _configure_model(self, trainable: bool) -> None:
        """Freezes the model, or makes LoRA adapters / the whole model trainable in float32."""
        config = self.model_config
        if config.attention in CUDA_ONLY_ATTENTION and self.device.type != "cuda":
            raise ConfigError(
                f"model.attention={config.attention} needs a CUDA device; on {self.device.type} use sdpa, "
                "sdpa_flash or sdpa_math."
            )
        self._sdpa_kernel = SDPA_KERNELS.get(config.attention)
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
            return
        if config.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self._make_trainable(config.lora, config.lora.target_modules or DENOISER_LORA_TARGETS)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

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

    # ----------------------------------------------------------------------------------------
    # the ends of sampling

    def _start_sampling(
        self, prompts: Sequence[str], images: Tensor | None, generator: torch.Generator | None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """(conditioning, (B, C, h, w) initial noise) for a text-to-image rollout of ``prompts``."""
        if images is not None:
            raise ValueError("A text-to-image policy takes no input images.")
        if not prompts:
            raise ValueError("sample() needs at least one prompt.")
        side = self.resolution // self.vae_scale_factor
        # The VAE's channels, not the denoiser's input width (FLUX's takes 2x2-packed latents).
        shape = (len(prompts), self.vae.config.latent_channels, side, side)
        noise_device = generator.device if generator is not None else self.device
        latents = torch.randn(shape, generator=generator, device=noise_device).to(self.device)
        with self._frozen_on_device(self.text_encoders):
            conditioning = self.encode_prompts(prompts)
        return conditioning, latents

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, 3, H, W) float32 images in [0, 1] from (B, C, h, w) latents."""
        config = self.vae.config
        # SD3's VAE latents are shifted as well as scaled; SD1.x/2.x's have no shift_factor.
        shift = getattr(config, "shift_factor", None) or 0.0
        scaled = latents.to(self.vae.dtype) / config.scaling_factor + shift
        with self._frozen_on_device([self.vae]):
            images = self.vae.decode(scaled).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    def _place_frozen(self, pipeline) -> None:
        """Freezes every text encoder ``pipeline`` has (``text_encoder``, ``_2``, ``_3``), keeps
        them as :attr:`text_encoders`, and puts them and the VAE on the device, or with
        ``model.offload_frozen`` on the CPU, from where :meth:`_frozen_on_device` brings them in
        only while they run."""
        self.text_encoders = [
            encoder.requires_grad_(False).eval()
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if (encoder := getattr(pipeline, name, None)) is not None
        ]
        home = torch.device("cpu") if self.model_config.offload_frozen else self.device
        for module in (self.vae, *self.text_encoders):
            module.to(home)

    @contextlib.contextmanager
    def _frozen_on_device(self, modules: Sequence[torch.nn.Module]) -> Iterator[None]:
        """Within: ``modules`` on the device (a no-op unless ``model.offload_frozen``)."""
        if not self.model_config.offload_frozen:
            yield
            return
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")

    # ----------------------------------------------------------------------------------------
    # guidance and re-scoring

    def _forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """One denoiser forward pass (no CFG) with the attention kernel ``model.attention`` names."""
        if self._sdpa_kernel is None:
            return self._denoiser_forward(latents, timesteps, conditioning)
        try:
            with sdpa_kernel(self._sdpa_kernel):
                return self._denoiser_forward(latents, timesteps, conditioning)
        except RuntimeError as error:
            if "No available kernel" not in str(error) and "No viable backend" not in str(error):
                raise
            raise ConfigError(
                f"model.attention={self.model_config.attention}: PyTorch's {self._sdpa_kernel.name} kernel cannot run "
                f"these inputs ({latents.dtype} on {latents.device.type}; flash needs float16 / bfloat16 on a GPU). "
                "Set model.attention=sdpa to let PyTorch choose."
            ) from error

    def _denoise(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """The denoiser's output for (B, C, h, w) latents at (B,) timesteps, with CFG applied.

        CFG runs as ONE batched forward of 2B (unconditional first), the same in sampling and
        re-scoring, so both see the same batch composition.
        """
        keys = self.conditioning_keys
        if "negative_" + keys[0] not in conditioning:
            return self._forward(latents, timesteps, {k: conditioning[k] for k in keys})
        doubled = {k: torch.cat([conditioning["negative_" + k], conditioning[k]]) for k in keys}
        output = self._forward(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), doubled)
        uncond_out, cond_out = output.chunk(2)
        return classifier_free_guidance(uncond_out, cond_out, self.sample_config.guidance_scale)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        generator: torch.Generator | None = None,
        images: Tensor | None = None,
        progress: bool = False,
    ) -> Rollout:
        """Runs the stochastic sampler over ``scheduler.timesteps`` without grad, recording the
        trajectory and every step's log-prob (see :class:`~align_gen.policy.Policy`)."""
        conditioning, latents = self._start_sampling(prompts, images, generator)
        batch = len(prompts)
        trajectory, log_probs = [latents], []
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not progress)):
            t_batch = t.expand(batch).to(self.device)
            step_index = torch.full((batch,), i, device=self.device)
            model_output = self._denoise(latents, t_batch, conditioning)
            latents, log_prob = self._transition(model_output, latents, step_index, t_batch, generator=generator)
            trajectory.append(latents)
            log_probs.append(log_prob)
        return Rollout(
            prompts=list(prompts),
            trajectory=torch.stack(trajectory, dim=1),
            timesteps=timesteps.to(self.device).expand(batch, -1).clone(),
            log_probs=torch.stack(log_probs, dim=1).float(),
            step_mask=self._step_mask(batch, len(timesteps)),
            conditioning=conditioning,
            images=self.decode(latents),
        )

    def step_log_prob(self, rollout: Rollout, steps: Tensor) -> Tensor:
        """(B, k) float32 log-probs of the stored transitions at ``steps`` ((k,) or (B, k) step
        indices), WITH grad, through the same guidance and kernel as sampling. Every
        :attr:`steps_per_forward` columns run as one denoiser forward (their rows stacked
        column-major: c * B rows, each row's conditioning repeated)."""
        steps = torch.as_tensor(steps, device=self.device)
        if steps.dim() == 1:
            steps = steps.expand(len(rollout), -1)
        return torch.cat([self._log_prob_of_columns(rollout, part) for part in self.step_pieces(steps)], dim=1)

    def step_pieces(self, steps: Tensor) -> tuple[Tensor, ...]:
        """``steps`` in pieces of :attr:`steps_per_forward` columns (see the Policy protocol)."""
        return split_steps(steps, self.steps_per_forward)

    def set_steps_per_forward(self, steps: int) -> None:
        if steps < 1:
            raise ConfigError(f"train.steps_per_forward must be >= 1, got {steps}.")
        self.steps_per_forward = steps

    def _log_prob_of_columns(self, rollout: Rollout, steps: Tensor) -> Tensor:
        """(B, c) log-probs of the transitions at ``steps`` (B, c), in one denoiser forward."""
        batch, columns = steps.shape
        rows = torch.arange(batch, device=self.device).repeat(columns)  # (c * B,) column-major
        index = steps.t().reshape(-1)  # (c * B,)
        latents = rollout.trajectory[rows, index]  # (c * B, C, h, w)
        timesteps = rollout.timesteps[rows, index]  # (c * B,)
        conditioning = rollout.conditioning
        if columns > 1:
            conditioning = {key: value.repeat(columns, *[1] * (value.dim() - 1)) for key, value in conditioning.items()}
        model_output = self._denoise(latents, timesteps, conditioning)
        prev_latents = rollout.trajectory[rows, index + 1]
        log_prob = self._transition(model_output, latents, index, timesteps, prev_latents)[1]  # (c * B,)
        return log_prob.view(columns, batch).t()

    def noise_level(self, timesteps: Tensor) -> Tensor:
        """(B,) float in [0, 1]: t / N for the scheduler's ``timesteps`` (for a DDPM schedule the
        share of the training horizon, for a flow schedule the flow time sigma)."""
        return timesteps.float() / self.scheduler.config.num_train_timesteps

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
    ) -> MatchingTerms:
        """The matching loss of the current model (WITH grad) and of each reference model
        (None = the initial weights, or a :meth:`trainable_state_dict` snapshot; no grad) at the
        same inputs, and the mean squared difference of the predictions (grad through the
        current one)."""
        clean, t, noise = self._matching_inputs(rollout, t, noise, clean)
        # Reference passes come first: entering reference() may copy weights in place, which
        # must not happen while a graph holds the current ones.
        reference_predictions = []
        for weights in references:
            with torch.no_grad(), self.reference(weights):
                reference_predictions.append(self._matching_prediction(clean, rollout.conditioning, t, noise)[0])
        prediction, target = self._matching_prediction(clean, rollout.conditioning, t, noise)
        return MatchingTerms(
            loss=per_sample_mse(prediction, target),
            reference_loss=torch.stack([per_sample_mse(r, target) for r in reference_predictions]),
            divergence=torch.stack([per_sample_mse(prediction, r) for r in reference_predictions]),
        )

    @torch.no_grad()
    def encode_samples(self, samples: Tensor) -> Tensor:
        """(B, C, h, w) float32 latents of (B, 3, H, W) images in [0, 1] (the VAE posterior's
        mean, scaled and shifted as :meth:`decode` expects), resized to the policy's resolution."""
        if not isinstance(samples, Tensor) or samples.dim() != 4 or samples.shape[1] != 3:
            raise ValueError("encode_samples takes (B, 3, H, W) image tensors in [0, 1].")
        images = samples.to(self.device, torch.float32)
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = torch.nn.functional.interpolate(
                images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True, align_corners=False
            )
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        with self._frozen_on_device([self.vae]):
            posterior = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return ((posterior.mean.float() - shift) * config.scaling_factor).contiguous()

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
