"""The Stable Diffusion 1.x / 2.x policy: a UNet denoiser with DDIM(eta) transitions.

Sampling and re-scoring share one function per concern: ``_denoise`` (in
:class:`~align_gen.policies.common.DenoiserPolicy`) applies classifier-free guidance (the only
place CFG is written) and
:func:`align_gen.kernels.ddim_step_with_logprob` both draws and re-scores a transition. An
un-updated policy therefore reproduces its rollout's log-probs exactly, provided the re-scoring
forward pass has the same batch size as sampling (float kernels differ between batch sizes by
more than DDPO's 1e-4 clip range; the trainer keeps them equal by default).

Trainable weights are LoRA adapters (peft, through diffusers' adapter API) or the whole UNet.
The VAE and the text encoder are frozen. Log-probs are computed in float32 whatever the
weights' dtype.

:class:`SDXLPolicy` is the same policy for Stable Diffusion XL: two text encoders (through the
pipeline's ``encode_prompt``), and the UNet's added conditioning (pooled text embeds and the
size / crop time ids) carried in the conditioning dict, so CFG, re-scoring and the matching loss
pass it exactly as they pass the prompt embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from align_gen.config import ModelConfig, SampleConfig
from align_gen.kernels import ddim_step_with_logprob
from align_gen.policies.common import DenoiserPolicy, classifier_free_guidance
from align_gen.policies.weights import MODEL_CARD_FILE

Tensor = torch.Tensor

__all__ = ["MODEL_CARD_FILE", "DiffusionPolicy", "SDXLPolicy", "classifier_free_guidance"]


class DiffusionPolicy(DenoiserPolicy):
    """A Stable Diffusion pipeline behind the :class:`~align_gen.policy.Policy` protocol.

    ``model`` and its alias ``unet`` are the UNet2DConditionModel; ``denoiser`` is what forward
    passes go through (the UNet, or the wrapper the trainer's accelerator puts around it).
    """

    conditioning_keys = ("prompt_embeds",)
    lora_layers_argument = "unet_lora_layers"

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

        self._attach(pipeline, model_config, sample_config, device, DDIMScheduler.from_config(pipeline.scheduler.config))
        self.model = self.unet = pipeline.unet
        # Configuration is always read from self.model; the trainer may wrap self.forward_model.
        self.forward_model = self.model
        self.vae = pipeline.vae.requires_grad_(False).eval()
        self.unet.to(self.device)
        self._place_frozen(pipeline)  # SDXL's second text encoder included
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self._configure_model(trainable)
        # diffusers' ModelMixin.dtype walks every submodule (1-4 ms per read at SD1.5 size, paid
        # on every denoising step); the dtype of the frozen weights never changes, so read it once.
        # conv_in is never a LoRA target, so its dtype is the one inputs must be cast to.
        self.model_dtype = self.unet.conv_in.weight.dtype
        self.resolution = sample_config.resolution or self.unet.config.sample_size * self.vae_scale_factor
        self._check_resolution()

    # ----------------------------------------------------------------------------------------
    # the model-specific forward pieces

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

    def _denoiser_forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        dtype = self.model_dtype
        return self.forward_model(latents.to(dtype), timesteps, conditioning["prompt_embeds"].to(dtype)).sample.float()

    def _transition(
        self,
        model_output: Tensor,
        latents: Tensor,
        step_index: Tensor,
        timesteps: Tensor,
        prev_latents: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        # DDIM reads the timestep itself; DDIMScheduler's init_noise_sigma is 1, so the initial
        # noise needs no scaling.
        return ddim_step_with_logprob(
            self.scheduler,
            model_output,
            timesteps,
            latents,
            eta=self.sample_config.eta,
            prev_sample=prev_latents,
            generator=generator,
        )

    def training_timesteps(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(B,) integer timesteps uniform over [0, num_train_timesteps), on the CPU."""
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), generator=generator)

    def _matching_prediction(
        self, clean: Tensor, conditioning: dict[str, Tensor], t: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The denoising loss at integer training timesteps ``t`` (B,) in [0, num_train_timesteps):
        epsilon, v or x0 target per the scheduler's prediction type."""
        t = t.to(self.device)
        noisy = self.scheduler.add_noise(clean, noise, t)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(clean, noise, t)
        else:
            target = clean
        prediction = self._forward(noisy, t, conditioning)
        return prediction, target.float()


class SDXLPolicy(DiffusionPolicy):
    """A StableDiffusionXLPipeline behind the :class:`~align_gen.policy.Policy` protocol.

    Sampling, re-scoring (DDIM with log-prob, whatever scheduler the pipeline ships), the
    matching loss, LoRA and saving are :class:`DiffusionPolicy`'s; only prompt encoding and the
    UNet call differ. Images are generated at ``resolution`` with no crop, so the time ids are
    (resolution, resolution, 0, 0, resolution, resolution), as the pipeline's default call uses.
    """

    conditioning_keys = ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids")

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
        super().__init__(pipeline, model_config, sample_config, device, trainable=trainable)
        self.text_encoder_2 = pipeline.text_encoder_2  # frozen and placed by DiffusionPolicy

    def _time_ids(self, batch: int) -> Tensor:
        """(B, 6) float32 SDXL micro-conditioning: original size, crop top-left, target size."""
        side = self.resolution
        return torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32, device=self.device).expand(batch, -1)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": (B, L, D1 + D2), "pooled_prompt_embeds": (B, P), "add_time_ids":
        (B, 6)} and, with CFG, the same three keys prefixed "negative_", from the pipeline's
        ``encode_prompt``."""
        prompts = list(prompts)
        guided = self.sample_config.guidance_scale > 1.0
        negative = [self.sample_config.negative_prompt] * len(prompts)
        embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=prompts,
            device=self.device,
            do_classifier_free_guidance=guided,
            negative_prompt=negative,
            negative_prompt_2=negative,
        )
        time_ids = self._time_ids(len(prompts)).contiguous()
        conditioning = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "add_time_ids": time_ids}
        if guided:
            conditioning.update(
                negative_prompt_embeds=negative_embeds,
                negative_pooled_prompt_embeds=negative_pooled,
                negative_add_time_ids=time_ids.clone(),
            )
        return conditioning

    def _denoiser_forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        dtype = self.model_dtype
        added = {
            "text_embeds": conditioning["pooled_prompt_embeds"].to(dtype),
            "time_ids": conditioning["add_time_ids"].to(dtype),
        }
        embeds = conditioning["prompt_embeds"].to(dtype)
        return self.forward_model(latents.to(dtype), timesteps, embeds, added_cond_kwargs=added).sample.float()
