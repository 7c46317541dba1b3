"""The Stable Diffusion 1.x / 2.x policy: a UNet denoiser with DDIM(eta) transitions.

Sampling runs :class:`~pipelines.StableDiffusionLogProbPipeline`; re-scoring runs the same
pipeline's ``denoise`` (classifier-free guidance, written once) and ``transition``
(the DDIM kernel of :mod:`pipelines.kernels`, which both draws and re-scores a step). An
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

import torch

from align_gen.config import ModelConfig, SampleConfig
from align_gen.policies.common import DenoiserPolicy
from align_gen.policies.weights import MODEL_CARD_FILE
from pipelines.stable_diffusion import (
    StableDiffusionLogProbPipeline,
    StableDiffusionXLLogProbPipeline,
)

Tensor = torch.Tensor

__all__ = ["MODEL_CARD_FILE", "DiffusionPolicy", "SDXLPolicy"]


class DiffusionPolicy(DenoiserPolicy):
    """A Stable Diffusion pipeline behind the :class:`~align_gen.policy.Policy` protocol.

    ``model`` and its alias ``unet`` are the UNet2DConditionModel; forward passes go through
    ``forward_model`` (the UNet, or the wrapper the trainer's accelerator puts around it).
    """

    sampler_class = StableDiffusionLogProbPipeline
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
        self._attach(pipeline, model_config, sample_config, device)
        self.model = self.forward_model = self.unet = pipeline.unet
        self.unet.to(self.device)
        self._place_frozen()  # SDXL's second text encoder included
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self._configure_model(trainable)
        self.resolution = sample_config.resolution or self.sampler.native_resolution
        self._check_resolution()
        self._set_timesteps()

    def training_timesteps(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(B,) integer timesteps uniform over [0, num_train_timesteps), on the CPU."""
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), generator=generator)

    def clean_scale(self, t: Tensor) -> Tensor:
        """x0_hat from x_t and the prediction: epsilon, (x_t - sqrt(1 - abar) eps) / sqrt(abar),
        slope sqrt((1 - abar) / abar); v, sqrt(abar) x_t - sqrt(1 - abar) v, slope sqrt(1 - abar);
        sample, the prediction itself, slope 1."""
        abar = self.scheduler.alphas_cumprod.to(self.device)[t.to(self.device).long()].float()  # (B,)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return ((1 - abar) / abar).sqrt()
        if prediction_type == "v_prediction":
            return (1 - abar).sqrt()
        return torch.ones_like(abar)

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

    Sampling, re-scoring, the matching loss, LoRA and saving are :class:`DiffusionPolicy`'s;
    prompt encoding (two text encoders) and the UNet's added conditioning (pooled text embeds
    and size / crop time ids) are :class:`~pipelines.StableDiffusionXLLogProbPipeline`'s.
    """

    sampler_class = StableDiffusionXLLogProbPipeline

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
