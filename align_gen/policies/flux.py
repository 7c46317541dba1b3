"""The FLUX.1 policy: the SD3 flow policy with FLUX's packed tokens, text encoders and guidance.

Everything that makes a flow policy RL-trainable is inherited from
:class:`~align_gen.policies.flow.FlowPolicy` unchanged: the flow SDE kernel that both samples
and re-scores, the masked last step, ``noise_level = 0`` as the ODE, the velocity-space matching
loss, the reference model, the trainable weights and saving. Four things differ:

- Latent layout. FLUX's transformer takes the VAE latents packed into 2x2 patches, a (B, h/2 *
  w/2, 4C) token sequence with (h/2 * w/2, 3) position ids. The policy keeps latents unpacked,
  (B, C, h, w), everywhere (trajectory, ``final_samples``, ``encode_samples``, the matching loss)
  and packs / unpacks inside :meth:`FluxPolicy._forward` with the pipeline's own
  ``_pack_latents`` / ``_unpack_latents``. The kernel is elementwise, so both layouts give the
  same numbers; unpacked keeps decoding, encoding, the initial noise (drawn in the shape
  ``FluxPipeline`` draws it, so a seed gives the pipeline's noise) and every objective shared
  with the other families, at the cost of two reshapes per forward pass.
- Conditioning. The pipeline's ``encode_prompt``: T5 hidden states (``prompt_embeds``, at most
  ``min(512, tokenizer_2.model_max_length)`` tokens, diffusers' default 512 for real FLUX) and
  the CLIP pooled output (``pooled_prompt_embeds``). The text ids are zeros and the image ids
  follow from the latent size, so both are rebuilt in every forward pass, never stored.
- Guidance. A guidance-distilled model (FLUX.1-dev, ``transformer.config.guidance_embeds``)
  takes ``sample.guidance_scale`` as an input embedding, in one pass of B and with no negative
  prompt, as ``FluxPipeline``'s ``guidance_scale``; the matching loss uses the same value. A
  model without it (FLUX.1-schnell) gets true classifier-free guidance with
  ``sample.negative_prompt`` when ``sample.guidance_scale > 1`` (the pipeline's
  ``true_cfg_scale``), through the shared batched 2B pass.
- Schedule. FLUX shifts its sigmas by the image's token count: sigmas ``linspace(1, 1/n, n)``
  shifted by ``mu = calculate_shift(h/2 * w/2)`` (use_dynamic_shifting), exactly the grid
  ``FluxPipeline.__call__`` sets for the same resolution and step count. The kernel reads the
  scheduler's sigmas, so nothing else changes. The transformer takes sigma = t / 1000.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from align_gen.config import ModelConfig, SampleConfig
from align_gen.policies.flow import FlowPolicy

Tensor = torch.Tensor

# FLUX's transformer reads latents in 2x2 patches.
PATCH = 2
# diffusers' FluxPipeline refuses longer T5 prompts.
MAX_T5_TOKENS = 512


class FluxPolicy(FlowPolicy):
    """A FluxPipeline behind the :class:`~align_gen.policy.Policy` protocol.

    ``model`` and its alias ``transformer`` are the FluxTransformer2DModel; latents are
    (B, C, h, w) VAE latents, packed only inside :meth:`_forward`.
    """

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
        self.guidance_embedded = bool(pipeline.transformer.config.guidance_embeds)
        self.max_sequence_length = min(MAX_T5_TOKENS, pipeline.tokenizer_2.model_max_length)
        super().__init__(pipeline, model_config, sample_config, device, trainable=trainable)

    def _native_resolution(self) -> int:
        # The transformer has no sample size; FLUX's VAE config records the training resolution.
        return self.vae.config.sample_size

    @property
    def latent_multiple(self) -> int:
        return PATCH * self.vae_scale_factor  # latents are packed in 2x2 patches

    def _image_seq_len(self) -> int:
        """The number of image tokens: (h / 2) * (w / 2) for (h, w) latents."""
        self._check_resolution()  # before the timesteps are set from it
        return (self.resolution // self.latent_multiple) ** 2

    def _set_timesteps(self) -> None:
        """FluxPipeline.__call__'s grid (diffusers 0.42.1): sigmas linspace(1, 1/n, n) (none with
        ``use_flow_sigmas``), shifted by mu of the image's token count when the scheduler uses
        dynamic shifting (a scheduler without it ignores mu, as in the pipeline)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        n, config = self.sample_config.num_steps, self.scheduler.config
        mu = calculate_shift(
            self._image_seq_len(),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / n, n)
        self.scheduler.set_timesteps(n, device=self.device, sigmas=sigmas, mu=mu)

    @property
    def true_cfg(self) -> bool:
        """Whether sampling runs classifier-free guidance with a negative prompt (2B passes)."""
        return self.sample_config.guidance_scale > 1.0 and not self.guidance_embedded

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": (B, L, D) T5 states, "pooled_prompt_embeds": (B, P) CLIP pooled}
        and, with true CFG, the same two keys prefixed "negative_" for ``sample.negative_prompt``."""
        prompts = list(prompts)
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        conditioning = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.true_cfg:
            negative = [self.sample_config.negative_prompt] * len(prompts)
            negative_embeds, negative_pooled, _ = self.pipeline.encode_prompt(
                prompt=negative, prompt_2=negative, device=self.device, max_sequence_length=self.max_sequence_length
            )
            conditioning.update(negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
        return conditioning

    def _denoiser_forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """(B, C, h, w) float32 predicted velocity of (B, C, h, w) latents at (B,) timesteps
        sigma * N, through the transformer's (B, h/2 * w/2, 4C) packed tokens."""
        pipeline, dtype, device = self.pipeline, self.model_dtype, latents.device
        batch, channels, height, width = latents.shape
        tokens = pipeline._pack_latents(latents, batch, channels, height, width)  # (B, hw/4, 4C)
        embeds = conditioning["prompt_embeds"]  # (B, L, D)
        guidance = None
        if self.guidance_embedded:  # the distilled guidance, a scale like the pipeline's (not / N)
            guidance = torch.full((batch,), self.sample_config.guidance_scale, device=device)
        output = self.forward_model(
            hidden_states=tokens.to(dtype),
            timestep=self.noise_level(timesteps).to(device),  # sigma in [0, 1]
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=pipeline._prepare_latent_image_ids(batch, height // PATCH, width // PATCH, device, dtype),
            return_dict=False,
        )[0]  # (B, hw/4, 4C)
        scale = self.vae_scale_factor
        return pipeline._unpack_latents(output, height * scale, width * scale, scale).float()  # (B, C, h, w)
