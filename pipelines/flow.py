"""Stable Diffusion 3 and FLUX.1 sampling with per-step log-probs: the flow SDE of Flow-GRPO.

The sampler is the marginal-preserving SDE of a flow-matching model, one step of which
:func:`pipelines.kernels.flow_sde_step_with_logprob` both draws and re-scores. Timesteps are the
scheduler's own, t = sigma * num_train_timesteps (what SD3's transformer takes). The last step
(sigma_next = 0) is recorded but has no usable density (``step_mask`` False): its Gaussian is
too sharp. ``noise_level = 0`` samples the deterministic ODE (evaluation): no log-density, so
its log-probs are 0 and every step is masked::

    from pipelines import StableDiffusion3LogProbPipeline
    pipe = StableDiffusion3LogProbPipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    out = pipe(["a photo of a cat"], num_inference_steps=10, guidance_scale=4.5, noise_level=0.7)

FLUX.1 differs in four ways, all inside :class:`FluxLogProbPipeline`:

- Latent layout. FLUX's transformer takes the VAE latents packed into 2x2 patches, a (B, h/2 *
  w/2, 4C) token sequence with (h/2 * w/2, 3) position ids. The pipeline keeps latents unpacked,
  (B, C, h, w), everywhere (trajectory, decoding, encoding) and packs / unpacks inside
  :meth:`FluxLogProbPipeline.denoiser_forward` with diffusers' own ``_pack_latents`` /
  ``_unpack_latents``. The kernel is elementwise, so both layouts give the same numbers.
- Conditioning. ``encode_prompt``: T5 hidden states (``prompt_embeds``, at most
  ``min(512, tokenizer_2.model_max_length)`` tokens) and the CLIP pooled output
  (``pooled_prompt_embeds``); text and image ids are rebuilt in every forward pass.
- Guidance. A guidance-distilled model (FLUX.1-dev, ``transformer.config.guidance_embeds``)
  takes the guidance scale as an input embedding, in one pass of B and with no negative prompt
  (the conditioning carries it as ``guidance``, (B,)); a model without it (FLUX.1-schnell) gets
  true classifier-free guidance with the negative prompt when ``guidance_scale > 1`` (diffusers'
  ``true_cfg_scale``), through the shared batched 2B pass.
- Schedule. Sigmas ``linspace(1, 1/n, n)`` shifted by ``mu = calculate_shift(h/2 * w/2)`` (the
  image's token count), exactly the grid ``FluxPipeline.__call__`` sets for the same resolution
  and step count. The transformer takes sigma = t / 1000.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

from pipelines.kernels import FlowSDEStepTable
from pipelines.log_prob import LogProbMixin, LogProbPipelineOutput

Tensor = torch.Tensor

# FLUX's transformer reads latents in 2x2 patches.
PATCH = 2
# diffusers' FluxPipeline refuses longer T5 prompts.
MAX_T5_TOKENS = 512


class FlowLogProbMixin(LogProbMixin):
    """What the flow-matching pipelines share: the flow SDE sampler, its masked last step, and
    the call."""

    sampler_scheduler_class = FlowMatchEulerDiscreteScheduler
    stochasticity_name = "noise_level"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def build_step_table(self, stochasticity: float, device: torch.device) -> FlowSDEStepTable:
        return FlowSDEStepTable.from_scheduler(self.scheduler, stochasticity, device)

    def step_mask(self, batch: int, levels: Sequence[float]) -> Tensor:
        step_mask = super().step_mask(batch, levels)
        step_mask[:, -1] = False  # the last step's Gaussian is too sharp to train on
        return step_mask

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        num_inference_steps: int = 10,
        guidance_scale: float = 4.5,
        noise_level: float = 0.7,
        negative_prompt: str = "",
        resolution: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ) -> LogProbPipelineOutput:
        """Samples ``prompt`` with the flow SDE (``noise_level`` a in its std
        a * sqrt(sigma / (1 - sigma)); 0 = the ODE) and guidance, recording every step;
        ``resolution`` is the image side in pixels (default: the model's)."""
        return self.sample_with_log_probs(
            prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            stochasticity=noise_level,
            negative_prompt=negative_prompt,
            resolution=resolution,
            generator=generator,
            progress=progress,
        )


class StableDiffusion3LogProbPipeline(FlowLogProbMixin, StableDiffusion3Pipeline):
    """A StableDiffusion3Pipeline whose call samples with the flow SDE and returns every step's
    latents and log-probability. A pipeline without T5 (``text_encoder_3=None``) gets zeros for
    the T5 tokens, as in diffusers."""

    @property
    def native_resolution(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    def _set_grid(self, num_inference_steps: int, resolution: int) -> None:
        if self.scheduler.config.use_dynamic_shifting:
            raise ValueError(
                "the SD3 sampler needs a fixed-shift schedule; this scheduler uses resolution-dependent "
                "shifting (use_dynamic_shifting=True), which only FLUX's pipeline supports."
            )
        super()._set_grid(num_inference_steps, resolution)

    @torch.no_grad()
    def encode_conditioning(
        self, prompts: Sequence[str], *, guidance_scale: float, negative_prompt: str = "", resolution: int = 0
    ) -> dict[str, Tensor]:
        """{"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, P)} and, with guidance, the
        same two keys prefixed "negative_", from the pipeline's ``encode_prompt``."""
        prompts = list(prompts)
        guided = guidance_scale > 1.0
        negative = [negative_prompt] * len(prompts)
        embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts,
            prompt_2=prompts,
            prompt_3=prompts,
            device=self.sampling_device,
            do_classifier_free_guidance=guided,
            negative_prompt=negative,
            negative_prompt_2=negative,
            negative_prompt_3=negative,
        )
        conditioning = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if guided:
            conditioning.update(negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
        return conditioning

    def denoiser_forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """(B, C, h, w) float32 predicted velocity at (B,) float timesteps sigma * N."""
        dtype = self.denoiser_dtype
        return self.forward_module()(
            hidden_states=latents.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"].to(dtype),
            pooled_projections=conditioning["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0].float()


class FluxLogProbPipeline(FlowLogProbMixin, FluxPipeline):
    """A FluxPipeline whose call samples with the flow SDE and returns every step's latents
    (unpacked: (B, C, h, w)) and log-probability (see the module docstring)."""

    @property
    def guidance_embedded(self) -> bool:
        """Whether the model is guidance-distilled (FLUX.1-dev): guidance is an input."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def max_sequence_length(self) -> int:
        return min(MAX_T5_TOKENS, self.tokenizer_2.model_max_length)

    @property
    def native_resolution(self) -> int:
        # The transformer has no sample size; FLUX's VAE config records the training resolution.
        return self.vae.config.sample_size

    @property
    def latent_multiple(self) -> int:
        """Image sides must be a multiple of this: latents are packed in 2x2 patches."""
        return PATCH * self.vae_scale_factor

    def true_cfg(self, guidance_scale: float) -> bool:
        """Whether sampling runs classifier-free guidance with a negative prompt (2B passes)."""
        return guidance_scale > 1.0 and not self.guidance_embedded

    def _set_grid(self, num_inference_steps: int, resolution: int) -> None:
        """FluxPipeline.__call__'s grid (diffusers 0.42.1): sigmas linspace(1, 1/n, n) (none with
        ``use_flow_sigmas``), shifted by mu of the image's token count when the scheduler uses
        dynamic shifting (a scheduler without it ignores mu, as in the pipeline)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        n, config = num_inference_steps, self.scheduler.config
        mu = calculate_shift(
            (resolution // self.latent_multiple) ** 2,  # the image's token count (h / 2) * (w / 2)
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / n, n)
        self.scheduler.set_timesteps(n, device=self.sampling_device, sigmas=sigmas, mu=mu)

    @torch.no_grad()
    def encode_conditioning(
        self, prompts: Sequence[str], *, guidance_scale: float, negative_prompt: str = "", resolution: int = 0
    ) -> dict[str, Tensor]:
        """{"prompt_embeds": (B, L, D) T5 states, "pooled_prompt_embeds": (B, P) CLIP pooled},
        with "guidance" (B,) for a guidance-distilled model, or, with true guidance, the two
        keys prefixed "negative_" for ``negative_prompt``."""
        prompts = list(prompts)
        device = self.sampling_device
        embeds, pooled, _ = self.encode_prompt(
            prompt=prompts, prompt_2=prompts, device=device, max_sequence_length=self.max_sequence_length
        )
        conditioning = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.guidance_embedded:  # the distilled guidance, a scale like the pipeline's (not / N)
            conditioning["guidance"] = torch.full((len(prompts),), guidance_scale, device=device)
        if self.true_cfg(guidance_scale):
            negative = [negative_prompt] * len(prompts)
            negative_embeds, negative_pooled, _ = self.encode_prompt(
                prompt=negative, prompt_2=negative, device=device, max_sequence_length=self.max_sequence_length
            )
            conditioning.update(negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
        return conditioning

    def denoiser_forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """(B, C, h, w) float32 predicted velocity of (B, C, h, w) latents at (B,) timesteps
        sigma * N, through the transformer's (B, h/2 * w/2, 4C) packed tokens."""
        dtype, device = self.denoiser_dtype, latents.device
        batch, channels, height, width = latents.shape
        tokens = self._pack_latents(latents, batch, channels, height, width)  # (B, hw/4, 4C)
        embeds = conditioning["prompt_embeds"]  # (B, L, D)
        output = self.forward_module()(
            hidden_states=tokens.to(dtype),
            timestep=self.noise_level_of(timesteps).to(device),  # sigma in [0, 1]
            guidance=conditioning.get("guidance"),
            pooled_projections=conditioning["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=self._prepare_latent_image_ids(batch, height // PATCH, width // PATCH, device, dtype),
            return_dict=False,
        )[0]  # (B, hw/4, 4C)
        scale = self.vae_scale_factor
        return self._unpack_latents(output, height * scale, width * scale, scale).float()  # (B, C, h, w)
