"""The Stable Diffusion 3 policy: a flow-matching transformer with SDE transitions.

The sampler is the marginal-preserving SDE of Flow-GRPO, one step of which
:func:`align_gen.kernels.flow_sde_step_with_logprob` both draws and re-scores; classifier-free
guidance, re-scoring, the reference model, the trainable weights and saving are shared with the
SD UNet policy (:class:`~align_gen.policies.common.DenoiserPolicy`). An un-updated policy
therefore reproduces its rollout's log-probs, at the same batch size as sampling.

Timesteps are the scheduler's own, t = sigma * num_train_timesteps (what the transformer takes),
so ``noise_level(t) = t / num_train_timesteps`` is the flow time sigma in [0, 1]. The last
step (sigma_next = 0) is recorded but marked False in ``step_mask``: its Gaussian is too sharp to
train on. ``sample.noise_level = 0`` samples the deterministic ODE (evaluation): it has no
log-density, so its log-probs are 0 and every step is masked.

Trainable weights are LoRA adapters or the whole transformer; the VAE and the text encoders are
frozen. Prompts are encoded by the pipeline's own ``encode_prompt`` (a pipeline without T5,
``text_encoder_3=None``, gets zeros for the T5 tokens, as in diffusers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from align_gen.config import ModelConfig, SampleConfig
from align_gen.errors import ConfigError
from align_gen.kernels import flow_sde_step_with_logprob, flow_sigmas
from align_gen.policies.common import DenoiserPolicy

Tensor = torch.Tensor


class FlowPolicy(DenoiserPolicy):
    """A StableDiffusion3Pipeline behind the :class:`~align_gen.policy.Policy` protocol.

    ``model`` and its alias ``transformer`` are the SD3Transformer2DModel; ``denoiser`` is what
    forward passes go through (the transformer, or the trainer's accelerator wrapper).
    """

    conditioning_keys = ("prompt_embeds", "pooled_prompt_embeds")
    lora_layers_argument = "transformer_lora_layers"

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
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.model = self.transformer = pipeline.transformer
        self.forward_model = self.model
        self.vae = pipeline.vae.requires_grad_(False).eval()
        # Before the sampling grid: a resolution-dependent shift (FLUX) reads it.
        self.resolution = sample_config.resolution or self._native_resolution()
        self._check_resolution()
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        self._attach(pipeline, model_config, sample_config, device, scheduler)
        self.transformer.to(self.device)
        self._place_frozen(pipeline)
        self._configure_model(trainable)
        # Read once (ModelMixin.dtype walks every submodule): the frozen weights' dtype, or
        # float32 when every weight is trained (trainable weights are always float32).
        self.model_dtype = next((p.dtype for p in self.transformer.parameters() if not p.requires_grad), torch.float32)

    def _native_resolution(self) -> int:
        """The image side in pixels the model was built for (``sample.resolution`` unset)."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    def _set_timesteps(self) -> None:
        if self.scheduler.config.use_dynamic_shifting:
            raise ConfigError(
                "the SD3 flow policy needs a fixed-shift schedule; this scheduler uses resolution-"
                "dependent shifting (use_dynamic_shifting=True), which only the FLUX policy supports."
            )
        super()._set_timesteps()

    # ----------------------------------------------------------------------------------------
    # the model-specific forward pieces

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, P)} and, with CFG, the same
        two keys prefixed "negative_", from the pipeline's ``encode_prompt``."""
        prompts = list(prompts)
        guided = self.sample_config.guidance_scale > 1.0
        negative = [self.sample_config.negative_prompt] * len(prompts)
        embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=prompts,
            prompt_3=prompts,
            device=self.device,
            do_classifier_free_guidance=guided,
            negative_prompt=negative,
            negative_prompt_2=negative,
            negative_prompt_3=negative,
        )
        conditioning = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if guided:
            conditioning.update(negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
        return conditioning

    def _denoiser_forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """(B, C, h, w) float32 predicted velocity at (B,) float timesteps sigma * N."""
        dtype = self.model_dtype
        return self.forward_model(
            hidden_states=latents.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"].to(dtype),
            pooled_projections=conditioning["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0].float()

    def _transition(
        self,
        model_output: Tensor,
        latents: Tensor,
        step_index: Tensor,
        timesteps: Tensor,
        prev_latents: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        sigma, sigma_next = flow_sigmas(self.scheduler, step_index)  # (B,) each
        noise_level = self.sample_config.noise_level
        latents, log_prob = flow_sde_step_with_logprob(
            model_output,
            sigma,
            sigma_next,
            latents,
            noise_level,
            prev_sample=prev_latents,
            generator=generator,
            return_log_prob=noise_level > 0,
        )
        # The ODE (noise_level 0) has no log-density: log-probs 0, every step masked.
        return latents, log_prob if log_prob is not None else torch.zeros(len(latents), device=self.device)

    def _step_mask(self, batch: int, num_steps: int) -> Tensor:
        step_mask = torch.ones(batch, num_steps, dtype=torch.bool, device=self.device)
        step_mask[:, -1] = False  # the last step's Gaussian is too sharp to train on
        if self.sample_config.noise_level == 0:
            step_mask[:] = False  # the ODE has no log-density
        return step_mask

    def training_timesteps(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(B,) float timesteps sigma * N with sigma uniform in [0, 1), on the CPU."""
        return torch.rand(batch, generator=generator) * self.scheduler.config.num_train_timesteps

    def _matching_prediction(
        self, clean: Tensor, conditioning: dict[str, Tensor], t: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The flow-matching loss at timesteps ``t`` (B,) = sigma * N: x_s = (1 - s) x0 + s eps
        with s = sigma, velocity target eps - x0."""
        clean, t = clean.float(), t.to(self.device)
        s = self.noise_level(t).view(-1, *([1] * (clean.ndim - 1)))  # (B, 1, 1, 1)
        noisy = (1 - s) * clean + s * noise  # (B, C, h, w)
        prediction = self._forward(noisy, t.float(), conditioning)
        return prediction, (noise - clean).float()
