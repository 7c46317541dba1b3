"""Stable Diffusion 1.x / 2.x and SDXL sampling with per-step log-probs: stochastic DDIM(eta).

The sampler is DDIM with noise scale ``eta`` (DDIM's own schedule of the pipeline's training
betas, whatever scheduler the model ships with); one step's log-probability is that of the
Gaussian DDIM draws from, computed as :func:`pipelines.kernels.ddim_step_with_logprob` does
(through the grid's :class:`~pipelines.kernels.DDIMStepTable`, built once on the device), which
also re-scores a stored step. Epsilon-, v- and sample-prediction models all work::

    from pipelines import StableDiffusionLogProbPipeline
    pipe = StableDiffusionLogProbPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    out = pipe(["a photo of a cat"], num_inference_steps=50, guidance_scale=5.0, eta=1.0)
    out.images, out.latents, out.log_probs   # (B, 3, H, W), (B, T+1, 4, h, w), (B, T)

SDXL's pipeline is the same with its two text encoders (the pipeline's ``encode_prompt``) and
the UNet's added conditioning (pooled text embeds and the size / crop time ids) carried in the
conditioning, so guidance and re-scoring pass it exactly as they pass the prompt embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from pipelines.kernels import DDIMStepTable
from pipelines.log_prob import LogProbMixin, LogProbPipelineOutput

Tensor = torch.Tensor


class DDIMLogProbMixin(LogProbMixin):
    """What the UNet pipelines share: the stochastic DDIM sampler and its call."""

    sampler_scheduler_class = DDIMScheduler
    stochasticity_name = "eta"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def _frozen_weights_dtype(self) -> torch.dtype:
        # conv_in is never a LoRA target, so its dtype is the one inputs must be cast to.
        return self.unet.conv_in.weight.dtype

    def build_step_table(self, stochasticity: float, device: torch.device) -> DDIMStepTable:
        # DDIM's init_noise_sigma is 1, so the noise of a step needs no scaling.
        return DDIMStepTable.from_scheduler(self.scheduler, stochasticity, device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        negative_prompt: str = "",
        resolution: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
    ) -> LogProbPipelineOutput:
        """Samples ``prompt`` with DDIM(``eta`` > 0) and classifier-free guidance
        (``guidance_scale`` 1 turns it off), recording every step; ``resolution`` is the image
        side in pixels (default: the model's)."""
        return self.sample_with_log_probs(
            prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            stochasticity=eta,
            negative_prompt=negative_prompt,
            resolution=resolution,
            generator=generator,
            progress=progress,
        )


class StableDiffusionLogProbPipeline(DDIMLogProbMixin, StableDiffusionPipeline):
    """A StableDiffusionPipeline whose call samples with stochastic DDIM and returns every
    step's latents and log-probability (:class:`~pipelines.log_prob.LogProbPipelineOutput`)."""

    @torch.no_grad()
    def encode_conditioning(
        self, prompts: Sequence[str], *, guidance_scale: float, negative_prompt: str = "", resolution: int = 0
    ) -> dict[str, Tensor]:
        """{"prompt_embeds": (B, L, D)} and, with guidance, "negative_prompt_embeds" (B, L, D)."""

        def encode(texts: Sequence[str]) -> Tensor:
            ids = self.tokenizer(
                list(texts),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.sampling_device)
            return self.text_encoder(ids)[0]

        conditioning = {"prompt_embeds": encode(prompts)}
        if guidance_scale > 1.0:
            negative = encode([negative_prompt])
            conditioning["negative_prompt_embeds"] = negative.expand(len(prompts), -1, -1).contiguous()
        return conditioning

    def denoiser_forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        dtype = self.denoiser_dtype
        embeds = conditioning["prompt_embeds"].to(dtype)
        return self.forward_module()(latents.to(dtype), timesteps, embeds).sample.float()


class StableDiffusionXLLogProbPipeline(DDIMLogProbMixin, StableDiffusionXLPipeline):
    """A StableDiffusionXLPipeline whose call samples with stochastic DDIM and returns every
    step's latents and log-probability. Images are generated at ``resolution`` with no crop, so
    the time ids are (resolution, resolution, 0, 0, resolution, resolution), as the pipeline's
    default call uses."""

    def time_ids(self, batch: int, resolution: int) -> Tensor:
        """(B, 6) float32 SDXL micro-conditioning: original size, crop top-left, target size."""
        side = resolution
        return torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32, device=self.sampling_device).expand(
            batch, -1
        )

    @torch.no_grad()
    def encode_conditioning(
        self, prompts: Sequence[str], *, guidance_scale: float, negative_prompt: str = "", resolution: int = 0
    ) -> dict[str, Tensor]:
        """{"prompt_embeds": (B, L, D1 + D2), "pooled_prompt_embeds": (B, P), "add_time_ids":
        (B, 6)} and, with guidance, the same three keys prefixed "negative_", from the
        pipeline's ``encode_prompt``."""
        prompts = list(prompts)
        guided = guidance_scale > 1.0
        negative = [negative_prompt] * len(prompts)
        embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts,
            prompt_2=prompts,
            device=self.sampling_device,
            do_classifier_free_guidance=guided,
            negative_prompt=negative,
            negative_prompt_2=negative,
        )
        time_ids = self.time_ids(len(prompts), resolution or self.native_resolution).contiguous()
        conditioning = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "add_time_ids": time_ids}
        if guided:
            conditioning.update(
                negative_prompt_embeds=negative_embeds,
                negative_pooled_prompt_embeds=negative_pooled,
                negative_add_time_ids=time_ids.clone(),
            )
        return conditioning

    def denoiser_forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        dtype = self.denoiser_dtype
        added = {
            "text_embeds": conditioning["pooled_prompt_embeds"].to(dtype),
            "time_ids": conditioning["add_time_ids"].to(dtype),
        }
        embeds = conditioning["prompt_embeds"].to(dtype)
        return self.forward_module()(latents.to(dtype), timesteps, embeds, added_cond_kwargs=added).sample.float()
