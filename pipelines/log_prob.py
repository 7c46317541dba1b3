"""Sampling that records the log-probability of every denoising step, for diffusers pipelines.

:class:`LogProbMixin` turns a diffusers text-to-image pipeline into one whose call returns, with
the images, the whole latent trajectory and each step's log-probability under the sampler
(:class:`LogProbPipelineOutput`): what policy-gradient methods (DDPO, GRPO, ...) train on. A
family's pipeline (:mod:`pipelines.stable_diffusion`, :mod:`pipelines.flow`) supplies four
pieces: prompt encoding, one denoiser forward pass, the sampler's transition kernel (one function
that both draws a step and scores a given one, :mod:`pipelines.kernels`) and the sampler's
timestep grid. Classifier-free guidance, the sampling loop, decoding and encoding are written
here once.

Everything a trainer needs to re-score stored steps later is public and is the code the call
runs: :meth:`LogProbMixin.denoise` (guidance as ONE batched forward of 2B rows, unconditional
first) and :meth:`LogProbMixin.transition`. So an unchanged model reproduces the recorded
log-probs exactly when it re-scores at the sampling batch size.

Four settings serve training loops and default to plain inference: :attr:`forward_denoiser`
(the module forward passes go through: the denoiser, or a wrapper of it such as accelerate's
DDP or ``torch.compile``), :attr:`attention_backend` (one PyTorch SDPA kernel, or None to let
PyTorch choose), :attr:`offload_frozen` (keep the text encoders and the VAE on the CPU between
uses) and :attr:`device_override` (where sampling runs, when offloading leaves diffusers unable
to tell).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from pipelines.kernels import gaussian_kl, gaussian_log_prob

Tensor = torch.Tensor


class AttentionBackendError(RuntimeError):
    """The attention kernel :attr:`LogProbMixin.attention_backend` names cannot run these inputs."""


@dataclasses.dataclass
class LogProbPipelineOutput:
    """What a log-prob pipeline call returns; B prompts, T steps, latents (C, h, w).

    Attributes:
        images: (B, 3, H, W) float32 in [0, 1], the decoded samples.
        latents: (B, T+1, C, h, w) the latents x_T .. x_0 the sampler visited (x_0 last).
        timesteps: (B, T) the scheduler timestep of each step, in sampling order.
        log_probs: (B, T) float32 log p(x_{t-1} | x_t, c) of each step (mean over the latent's
            elements), 0 where a step has no density.
        step_mask: (B, T) bool: the steps with a usable log-density (a flow sampler's last step,
            and every deterministic step, have none).
        conditioning: the tensors the denoiser was conditioned on, batch first (and their
            ``negative_`` twins under guidance): what re-scoring the steps needs.
        step_means: (B, T, C, h, w) float32 mean of each step's Gaussian, when the call was asked
            to keep them (``keep_step_means``), else None.
    """

    images: Tensor
    latents: Tensor
    timesteps: Tensor
    log_probs: Tensor
    step_mask: Tensor
    conditioning: dict[str, Tensor]
    step_means: Tensor | None = None


@dataclasses.dataclass(frozen=True)
class TransitionScores:
    """What re-scoring stored transitions under the current model gives, (B,) each, float32.

    Attributes:
        log_prob: log pi_theta(x_{t-1} | x_t), WITH grad (the sampling call's numbers when the
            model is unchanged).
        kl: KL(pi_theta(. | x_t) || pi_ref(. | x_t)) to a reference model's step from the same
            x_t, in closed form (the two Gaussians share their std), WITH grad; None unless a
            reference output was given.
        normalized_log_ratio: GRPO-Guard's log-ratio to the sampling step, s (log pi_theta -
            log pi_old + mean|mu_theta - mu_old|^2 / (2 s^2)) = mean((x_{t-1} - mu_old) / s *
            (mu_theta - mu_old)), WITH grad; None unless the sampling step's mean was given.
        gain: |d mu / d model output| of each step's kernel (no grad), with the normalised
            log-ratio (GRPO-Guard re-weights the steps by it); else None.
    """

    log_prob: Tensor
    kl: Tensor | None
    normalized_log_ratio: Tensor | None
    gain: Tensor | None


def classifier_free_guidance(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """uncond + scale * (cond - uncond) (Ho & Salimans 2022); every pipeline here uses this one."""
    return uncond + scale * (cond - uncond)


class LogProbMixin:
    """Sampling with per-step log-probs for a diffusers pipeline (see the module docstring).

    A subclass also derives from the diffusers pipeline it extends and implements the methods
    under "what a family supplies".
    """

    # The scheduler class of the sampler (the pipeline's own scheduler config is reused).
    sampler_scheduler_class: type
    # The keyword of the call's stochasticity and its default (DDIM's eta, the flow SDE's level).
    stochasticity_name: str
    # Settings for training loops (see the module docstring).
    forward_denoiser: torch.nn.Module | None = None
    attention_backend: SDPBackend | None = None
    offload_frozen: bool = False
    # Where sampling runs; None = where diffusers would run the pipeline (with offload_frozen
    # the frozen modules sit on the CPU, so a trainer names the device).
    device_override: torch.device | None = None
    _denoiser_dtype: torch.dtype | None = None
    _sampling_grid: tuple[int, int] | None = None  # (steps, resolution) the scheduler is set for

    # ----------------------------------------------------------------------------------------
    # what a family supplies

    @property
    def denoiser(self) -> torch.nn.Module:
        """The module that predicts the noise / velocity (``unet`` or ``transformer``)."""
        raise NotImplementedError

    def encode_conditioning(
        self, prompts: Sequence[str], *, guidance_scale: float, negative_prompt: str = "", resolution: int = 0
    ) -> dict[str, Tensor]:
        """The tensors the denoiser is conditioned on for ``prompts`` (batch first), and, when
        ``guidance_scale`` asks for classifier-free guidance, the unconditional branch's under
        the same keys prefixed ``negative_``. ``resolution``: the image side (0 = native)."""
        raise NotImplementedError

    def denoiser_forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """(B, C, h, w) float32 output of one pass of :meth:`forward_module` at (B,) timesteps,
        without guidance (``conditioning``: the keys without the ``negative_`` prefix)."""
        raise NotImplementedError

    def transition(
        self,
        model_output: Tensor,
        latents: Tensor,
        step_index: Tensor,
        timesteps: Tensor,
        stochasticity: float,
        prev_latents: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One step of the sampler at (B,) step indices on the grid (``timesteps``: the same
        steps' scheduler timesteps, as the denoiser saw them): draws the next latents
        (``prev_latents`` None) or scores the given ones; returns them and their (B,) float32
        log-prob, through :meth:`step_table`. ``stochasticity`` is DDIM's eta or the flow SDE's
        noise level; at 0 the step is deterministic (the ODE: the Gaussian's mean), with no
        log-density (log-probs 0)."""
        table = self.step_table(stochasticity)
        if stochasticity == 0:
            latents = table.mean_and_std(model_output, step_index, latents)[0].to(latents.dtype)
            return latents, torch.zeros(len(latents), device=latents.device)
        return table.step(model_output, step_index, latents, prev_latents, generator)

    def score_transition(
        self,
        model_output: Tensor,
        latents: Tensor,
        step_index: Tensor,
        prev_latents: Tensor,
        stochasticity: float,
        *,
        reference_output: Tensor | None = None,
        old_mean: Tensor | None = None,
    ) -> TransitionScores:
        """Re-scores stored transitions x_t -> x_{t-1}
        (``latents`` -> ``prev_latents``) given the denoiser's ``model_output`` (WITH grad):
        their log-prob, as :meth:`transition` computes it, and on request their closed-form KL
        to the step a ``reference_output`` of another model makes, and GRPO-Guard's normalised
        log-ratio to the sampling step whose mean was ``old_mean`` with the steps' gains (see
        :class:`TransitionScores`)."""
        table = self.step_table(stochasticity)
        mean, std = table.mean_and_std(model_output, step_index, latents)
        if stochasticity == 0:  # the ODE: no log-density, 0 as sampling records (the graph kept)
            return TransitionScores(mean.flatten(1).mean(dim=1) * 0, None, None, None)
        log_prob = gaussian_log_prob(prev_latents, mean, std)
        kl = None
        if reference_output is not None:
            kl = gaussian_kl(mean, table.mean_and_std(reference_output, step_index, latents)[0], std)
        normalized = gain = None
        if old_mean is not None:
            noise = (prev_latents.float() - old_mean.float()) / std  # the sampling step's eps
            normalized = (noise * (mean - old_mean.float())).flatten(1).mean(dim=1)
            gain = table.output_gain(step_index).to(log_prob.device)
        return TransitionScores(log_prob, kl, normalized, gain)

    def build_step_table(self, stochasticity: float, device: torch.device):
        """The per-step scalars of the sampler on the current grid at ``stochasticity``, on
        ``device`` (:class:`~pipelines.kernels.DDIMStepTable` or
        :class:`~pipelines.kernels.FlowSDEStepTable`), indexed by step index."""
        raise NotImplementedError

    def set_sampling_timesteps(self, num_inference_steps: int, resolution: int) -> None:
        """Puts :attr:`scheduler` (the sampler's) on the grid of ``num_inference_steps`` steps
        for images of ``resolution`` pixels a side (once: again only when either changes)."""
        if self._sampling_grid != (num_inference_steps, resolution):
            self._set_grid(num_inference_steps, resolution)
            self._sampling_grid = (num_inference_steps, resolution)
            self._step_tables = {}

    def step_table(self, stochasticity: float):
        """The grid's step table at ``stochasticity`` on :attr:`sampling_device`, built once per
        grid, stochasticity and device: a transition then only gathers its rows on the device,
        with no read back to the host (which would stall a GPU at every step)."""
        tables = self.__dict__.setdefault("_step_tables", {})  # emptied when the grid changes
        key = (stochasticity, self.sampling_device)
        if key not in tables:
            tables[key] = self.build_step_table(stochasticity, self.sampling_device)
        return tables[key]

    def _set_grid(self, num_inference_steps: int, resolution: int) -> None:
        self.scheduler.set_timesteps(num_inference_steps, device=self.sampling_device)

    def step_mask(self, batch: int, levels: Sequence[float]) -> Tensor:
        """(B, T) bool: which steps have a usable log-density, given each step's stochasticity
        ``levels`` (T,): the stochastic ones, unless a family excludes more."""
        mask = torch.tensor([level > 0 for level in levels], dtype=torch.bool, device=self.sampling_device)
        return mask.expand(batch, -1).clone()

    @property
    def native_resolution(self) -> int:
        """The image side in pixels the model was built for."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------
    # construction

    @property
    def sampling_device(self) -> torch.device:
        """Where sampling runs: :attr:`device_override`, or diffusers' execution device."""
        return self.device_override if self.device_override is not None else self._execution_device

    @classmethod
    def from_pipeline(cls, pipeline):
        """A log-prob pipeline that shares every component of ``pipeline`` (nothing is copied or
        cast) except the scheduler: the sampler gets its own copy (of class
        :attr:`sampler_scheduler_class`, from the same config), so sampling never changes
        ``pipeline``'s."""
        parameters = inspect.signature(cls.__init__).parameters
        arguments = {name: value for name, value in pipeline.components.items() if name in parameters}
        arguments["scheduler"] = cls.sampler_scheduler_class.from_config(pipeline.scheduler.config)
        for flag, value in (("requires_safety_checker", False), ("add_watermarker", False)):
            if flag in parameters:
                arguments[flag] = value
        if "force_zeros_for_empty_prompt" in parameters and "force_zeros_for_empty_prompt" in pipeline.config:
            arguments["force_zeros_for_empty_prompt"] = pipeline.config.force_zeros_for_empty_prompt
        sampler = cls(**arguments)
        sampler.set_progress_bar_config(disable=True)
        return sampler

    # ----------------------------------------------------------------------------------------
    # the denoiser, with guidance

    @property
    def denoiser_dtype(self) -> torch.dtype:
        """The dtype the denoiser's inputs are cast to: its frozen weights' (read once: diffusers'
        ``ModelMixin.dtype`` walks every submodule, 1-4 ms per read at SD1.5 size)."""
        if self._denoiser_dtype is None:
            self._denoiser_dtype = self._frozen_weights_dtype()
        return self._denoiser_dtype

    def reset_denoiser_dtype(self) -> None:
        """Forgets :attr:`denoiser_dtype` (after the denoiser's weights were made trainable)."""
        self._denoiser_dtype = None

    def _frozen_weights_dtype(self) -> torch.dtype:
        """The first frozen weight's dtype, or float32 when every weight trains (trainable
        weights are float32)."""
        return next((p.dtype for p in self.denoiser.parameters() if not p.requires_grad), torch.float32)

    def noise_level_of(self, timesteps: Tensor) -> Tensor:
        """(B,) float in [0, 1]: t / N for the scheduler's ``timesteps`` (for a DDPM schedule the
        share of the training horizon, for a flow schedule the flow time sigma)."""
        return timesteps.float() / self.scheduler.config.num_train_timesteps

    def forward_module(self) -> torch.nn.Module:
        """What forward passes go through: :attr:`forward_denoiser`, or the denoiser itself."""
        return self.forward_denoiser if self.forward_denoiser is not None else self.denoiser

    def forward(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor]) -> Tensor:
        """:meth:`denoiser_forward` with the SDPA kernel :attr:`attention_backend` names.

        Raises:
            AttentionBackendError: that kernel cannot run these inputs.
        """
        if self.attention_backend is None:
            return self.denoiser_forward(latents, timesteps, conditioning)
        try:
            with sdpa_kernel(self.attention_backend):
                return self.denoiser_forward(latents, timesteps, conditioning)
        except RuntimeError as error:
            if "No available kernel" not in str(error) and "No viable backend" not in str(error):
                raise
            raise AttentionBackendError(
                f"PyTorch's {self.attention_backend.name} attention kernel cannot run these inputs "
                f"({latents.dtype} on {latents.device.type}; flash needs float16 / bfloat16 on a GPU)."
            ) from error

    def denoise(self, latents: Tensor, timesteps: Tensor, conditioning: dict[str, Tensor], guidance_scale: float) -> Tensor:
        """The denoiser's output for (B, C, h, w) latents at (B,) timesteps, with classifier-free
        guidance when ``conditioning`` has the ``negative_`` keys: ONE batched forward of 2B
        (unconditional first), the same in sampling and re-scoring, so both see the same batch
        composition."""
        keys = [key for key in conditioning if not key.startswith("negative_")]
        if "negative_" + keys[0] not in conditioning:
            return self.forward(latents, timesteps, {k: conditioning[k] for k in keys})
        doubled = {k: torch.cat([conditioning["negative_" + k], conditioning[k]]) for k in keys}
        output = self.forward(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), doubled)
        uncond_out, cond_out = output.chunk(2)
        return classifier_free_guidance(uncond_out, cond_out, guidance_scale)

    # ----------------------------------------------------------------------------------------
    # the ends of sampling

    @property
    def frozen_modules(self) -> list[torch.nn.Module]:
        """The text encoders the pipeline has (``text_encoder``, ``_2``, ``_3``)."""
        return [
            encoder
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if (encoder := getattr(self, name, None)) is not None
        ]

    @contextlib.contextmanager
    def frozen_on_device(self, modules: Sequence[torch.nn.Module]) -> Iterator[None]:
        """Within: ``modules`` on the execution device (a no-op unless :attr:`offload_frozen`)."""
        if not self.offload_frozen:
            yield
            return
        for module in modules:
            module.to(self.sampling_device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")

    def initial_latents(self, batch: int, resolution: int, generator: torch.Generator | None) -> Tensor:
        """(B, C, h, w) standard normal latents: the VAE's channels (not the denoiser's input
        width: FLUX's takes 2x2-packed latents), drawn on the generator's device."""
        side = resolution // self.vae_scale_factor
        shape = (batch, self.vae.config.latent_channels, side, side)
        noise_device = generator.device if generator is not None else self.sampling_device
        return torch.randn(shape, generator=generator, device=noise_device).to(self.sampling_device)

    @torch.no_grad()
    def decode_latents_to_images(self, latents: Tensor) -> Tensor:
        """(B, 3, H, W) float32 images in [0, 1] from (B, C, h, w) latents."""
        config = self.vae.config
        # SD3's and FLUX's VAE latents are shifted as well as scaled; SD1.x/2.x's have no shift.
        shift = getattr(config, "shift_factor", None) or 0.0
        scaled = latents.to(self.vae.dtype) / config.scaling_factor + shift
        with self.frozen_on_device([self.vae]):
            images = self.vae.decode(scaled).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images_to_latents(self, images: Tensor, resolution: int) -> Tensor:
        """(B, C, h, w) float32 latents of (B, 3, H, W) images in [0, 1] (the VAE posterior's
        mean, scaled and shifted as :meth:`decode_latents_to_images` expects), resized to
        ``resolution``."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("encode_images_to_latents takes (B, 3, H, W) image tensors in [0, 1].")
        images = images.to(self.sampling_device, torch.float32)
        if images.shape[-2:] != (resolution, resolution):
            images = torch.nn.functional.interpolate(
                images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
            )
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        with self.frozen_on_device([self.vae]):
            posterior = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return ((posterior.mean.float() - shift) * config.scaling_factor).contiguous()

    # ----------------------------------------------------------------------------------------
    # the call

    @torch.no_grad()
    def sample_with_log_probs(
        self,
        prompts: Sequence[str],
        *,
        num_inference_steps: int,
        guidance_scale: float,
        stochasticity: float,
        negative_prompt: str = "",
        resolution: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        sde_steps: Sequence[int] | None = None,
        keep_step_means: bool = False,
    ) -> LogProbPipelineOutput:
        """Runs the stochastic sampler over the scheduler's timesteps, recording the trajectory
        and every step's log-prob (the family's ``__call__`` names ``stochasticity`` as its
        sampler does: ``eta`` or ``noise_level``).

        ``sde_steps``: the step indices that add noise (a window, as in Flow-GRPO-Fast and
        MixGRPO); the others take the deterministic step (the ODE) and have no log-density.
        None: every step. ``keep_step_means``: also record each step's Gaussian mean
        (``step_means``; one more latent per step)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("sampling needs at least one prompt.")
        resolution = resolution or self.native_resolution
        device = self.sampling_device
        self.set_sampling_timesteps(num_inference_steps, resolution)
        latents = self.initial_latents(len(prompts), resolution, generator)
        with self.frozen_on_device(self.frozen_modules):
            conditioning = self.encode_conditioning(
                prompts, guidance_scale=guidance_scale, negative_prompt=negative_prompt, resolution=resolution
            )
        batch = len(prompts)
        trajectory, log_probs, means = [latents], [], []
        timesteps = self.scheduler.timesteps
        noisy = set(range(len(timesteps)) if sde_steps is None else sde_steps)
        levels = [stochasticity if i in noisy else 0.0 for i in range(len(timesteps))]
        for i, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not progress)):
            t_batch = t.expand(batch).to(device)
            step_index = torch.full((batch,), i, device=device)
            model_output = self.denoise(latents, t_batch, conditioning, guidance_scale)
            if keep_step_means:
                means.append(self.step_table(levels[i]).mean_and_std(model_output, step_index, latents)[0])
            latents, log_prob = self.transition(model_output, latents, step_index, t_batch, levels[i], generator=generator)
            trajectory.append(latents)
            log_probs.append(log_prob)
        return LogProbPipelineOutput(
            images=self.decode_latents_to_images(latents),
            latents=torch.stack(trajectory, dim=1),
            timesteps=timesteps.to(device).expand(batch, -1).clone(),
            log_probs=torch.stack(log_probs, dim=1).float(),
            step_mask=self.step_mask(batch, levels),
            conditioning=conditioning,
            step_means=torch.stack(means, dim=1) if keep_step_means else None,
        )
