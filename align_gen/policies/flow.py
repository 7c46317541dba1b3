"""The Stable Diffusion 3 policy: a flow-matching transformer with SDE transitions.

Sampling runs :class:`~pipelines.StableDiffusion3LogProbPipeline` (the marginal-preserving SDE
of Flow-GRPO, whose one step :func:`pipelines.kernels.flow_sde_step_with_logprob` both draws
and re-scores); re-scoring runs the same pipeline's ``denoise`` and ``transition``, so an
un-updated policy reproduces its rollout's log-probs at the same batch size as sampling.
Guidance, the reference model, the trainable weights and saving are shared with the SD UNet
policy (:class:`~align_gen.policies.common.DenoiserPolicy`).

Timesteps are the scheduler's own, t = sigma * num_train_timesteps (what the transformer takes),
so ``noise_level(t) = t / num_train_timesteps`` is the flow time sigma in [0, 1]. The last
step (sigma_next = 0) is recorded but marked False in ``step_mask``: its Gaussian is too sharp to
train on. ``sample.noise_level = 0`` samples the deterministic ODE (evaluation): it has no
log-density, so its log-probs are 0 and every step is masked.

Trainable weights are LoRA adapters or the whole transformer; the VAE and the text encoders are
frozen.
"""

from __future__ import annotations

import torch

from align_gen.config import ModelConfig, SampleConfig
from align_gen.errors import ConfigError
from align_gen.policies.common import DenoiserPolicy
from pipelines.flow import StableDiffusion3LogProbPipeline

Tensor = torch.Tensor


class FlowPolicy(DenoiserPolicy):
    """A StableDiffusion3Pipeline behind the :class:`~align_gen.policy.Policy` protocol.

    ``model`` and its alias ``transformer`` are the SD3Transformer2DModel; forward passes go
    through ``forward_model`` (the transformer, or the trainer's accelerator wrapper).
    """

    sampler_class = StableDiffusion3LogProbPipeline
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
        self._attach(pipeline, model_config, sample_config, device)
        self.model = self.forward_model = self.transformer = pipeline.transformer
        self._check_schedule()
        self.resolution = sample_config.resolution or self.sampler.native_resolution
        self._check_resolution()  # before the sampling grid: a resolution-dependent shift (FLUX) reads it
        self._set_timesteps()
        self.transformer.to(self.device)
        self._place_frozen()
        self._configure_model(trainable)

    def _check_schedule(self) -> None:
        if self.scheduler.config.use_dynamic_shifting:
            raise ConfigError(
                "the SD3 flow policy needs a fixed-shift schedule; this scheduler uses resolution-"
                "dependent shifting (use_dynamic_shifting=True), which only the FLUX policy supports."
            )

    def training_timesteps(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """(B,) float timesteps sigma * N with sigma uniform in [0, 1), on the CPU."""
        return torch.rand(batch, generator=generator) * self.scheduler.config.num_train_timesteps

    def clean_scale(self, t: Tensor) -> Tensor:
        """x0_hat = x_s - sigma v: slope sigma, the flow time of ``t``."""
        return self.noise_level(t.to(self.device)).float()

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
