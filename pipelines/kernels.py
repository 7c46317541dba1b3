"""Stateless transition kernels that both sample a denoising step and score it.

A kernel returns ``(x_prev, log pi(x_prev | x_t, c))``. The same function draws the transition
during a rollout (``prev_sample=None``) and re-scores the stored transition during training
(``prev_sample`` given), so sampling and training can never drift apart. Log-probs are always
computed in float32, whatever the model's dtype.

Two ways to take a step, with the same numbers:

- The functions :func:`ddim_step_with_logprob` and :func:`flow_sde_step_with_logprob` check
  every input and compute the step's scalars (alphas, sigmas, dt, std) on the host at each call,
  in float64. Convenient for one step; on a GPU their host-side checks of device tensors wait
  for the device at every call.
- A step table (:class:`DDIMStepTable`, :class:`FlowSDEStepTable`) holds those scalars for every
  step of a sampling grid, computed once in float64 and cast to float32 on the device; its
  ``step`` only gathers the rows of the current step indices. The log-prob pipelines keep one
  per grid, so neither sampling nor re-scoring reads anything back from the device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

Tensor = torch.Tensor
Reduce = Literal["mean", "sum"]

__all__ = [
    "DDIMStepTable",
    "FlowSDEStepTable",
    "Reduce",
    "ddim_step_with_logprob",
    "flow_sde_step_with_logprob",
    "flow_sigmas",
    "gaussian_kl",
    "gaussian_log_prob",
]

_REDUCTIONS: tuple[str, ...] = ("mean", "sum")
_PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def gaussian_log_prob(
    x: Tensor, mean: Tensor, std: Tensor | float, reduce: Reduce = "mean"
) -> Tensor:
    """Log-density of ``x`` under the diagonal Gaussian N(mean, std^2), reduced per sample.

    log p = -(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi), element-wise, then averaged
    (``reduce="mean"``) or summed (``reduce="sum"``) over every non-batch dimension.

    Args:
        x: (B, ...) the point to score; any float dtype (cast to float32).
        mean: (B, ...) same shape as ``x``.
        std: a float, or a tensor broadcastable to ``x``'s shape, e.g. (B, 1, 1, 1). Must be
            > 0; callers check this (a check here would force a device sync on every call).
        reduce: "mean" (the per-element convention of the DDPO anchor, which keeps PPO ratios
            finite) or "sum" (the exact joint log-density, e.g. for a chain likelihood).

    Returns:
        (B,) float32 log-probs.
    """
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}.")
    if x.shape != mean.shape:
        raise ValueError(
            f"x and mean must have the same shape, got {tuple(x.shape)} and {tuple(mean.shape)}."
        )
    if x.ndim < 1:
        raise ValueError("x must have a leading batch dimension, got a 0-d tensor.")
    std32 = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    try:
        broadcast_ok = torch.broadcast_shapes(std32.shape, x.shape) == x.shape
    except RuntimeError:
        broadcast_ok = False
    if not broadcast_ok:
        raise ValueError(
            f"std of shape {tuple(std32.shape)} does not broadcast to x's shape {tuple(x.shape)}."
        )
    diff = x.float() - mean.float()  # (B, ...) float32
    log_prob = -(diff**2) / (2 * std32**2) - torch.log(std32) - _LOG_SQRT_2PI  # (B, ...)
    dims = tuple(range(1, x.ndim))
    if not dims:  # (B,) input: each element is its own sample; reducing over () would reduce all
        return log_prob
    return log_prob.mean(dim=dims) if reduce == "mean" else log_prob.sum(dim=dims)  # (B,)


def gaussian_kl(mean: Tensor, reference_mean: Tensor, std: Tensor, reduce: Reduce = "mean") -> Tensor:
    """KL(N(mean, std^2) || N(reference_mean, std^2)) of two diagonal Gaussians with the same std,
    in closed form, reduced per sample: (mean - reference_mean)^2 / (2 std^2) element-wise, then
    averaged (``reduce="mean"``, the per-element convention of the log-probs) or summed (the
    exact KL).

    Args:
        mean: (B, ...) the current model's step mean, WITH grad.
        reference_mean: (B, ...) the reference model's step mean at the same state.
        std: broadcastable to ``mean``'s shape, e.g. (B, 1, 1, 1); > 0 (callers check).

    Returns:
        (B,) float32 KLs.
    """
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}.")
    if mean.shape != reference_mean.shape or mean.ndim < 2:
        raise ValueError(
            f"mean and reference_mean must both be (B, ...), got {tuple(mean.shape)} and {tuple(reference_mean.shape)}."
        )
    per_element = (mean.float() - reference_mean.float()).pow(2) / (2 * std.float().pow(2))  # (B, ...)
    dims = tuple(range(1, mean.ndim))
    return per_element.mean(dim=dims) if reduce == "mean" else per_element.sum(dim=dims)


def _check_ddim_scheduler(scheduler: DDIMScheduler, eta: float, deterministic_ok: bool = False) -> None:
    """Raises a ValueError for a scheduler or eta the DDIM kernel cannot handle (eta = 0, the
    deterministic DDIM, only with ``deterministic_ok``: a step table's mean without log-probs)."""
    if not (eta > 0 or (deterministic_ok and eta == 0)):  # also catches NaN
        raise ValueError(
            f"log-probs need a stochastic step: eta must be > 0 (got {eta}); use eta=0 only for "
            "deterministic sampling without log-probs, via the scheduler itself."
        )
    if not eta <= 1:
        # Beyond eta = 1 (DDPM), sigma_t^2 can exceed 1 - abar_prev and the direction term's
        # square root becomes imaginary; diffusers would silently return NaN there.
        raise ValueError(f"eta must be in (0, 1] (1 = DDPM), got {eta}.")
    if scheduler.num_inference_steps is None:
        raise ValueError("The scheduler has no timesteps: call scheduler.set_timesteps(n) first.")
    if scheduler.config.prediction_type not in _PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {scheduler.config.prediction_type!r} is not supported; "
            f"valid: {_PREDICTION_TYPES}."
        )
    if scheduler.config.thresholding:
        raise ValueError(
            "Dynamic thresholding (scheduler.config.thresholding=True) is unsupported by the "
            "log-prob kernel; disable it or use clip_sample instead."
        )


def _check_shapes(model_output: Tensor, sample: Tensor, prev_sample: Tensor | None) -> None:
    """Raises a ValueError unless ``sample`` is (B, ...) and the others have its shape."""
    if sample.ndim < 2:
        raise ValueError(
            f"sample must be (B, ...) with at least 2 dims, got shape {tuple(sample.shape)}."
        )
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}."
        )
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}."
        )


def _batch_timesteps(scheduler: DDIMScheduler, timestep: int | Tensor, batch_size: int) -> Tensor:
    """Returns (B,) int64 timesteps on CPU, checked against the training range."""
    t = torch.as_tensor(timestep).cpu()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"timestep must be an integer or an integer tensor, got dtype {t.dtype}.")
    if t.ndim == 0:
        t = t.expand(batch_size)
    elif t.shape != (batch_size,):
        raise ValueError(
            f"timestep must be a scalar or of shape (B,) = ({batch_size},), got {tuple(t.shape)}."
        )
    num_train_timesteps = scheduler.config.num_train_timesteps
    if bool(((t < 0) | (t >= num_train_timesteps)).any()):
        raise ValueError(f"timestep must lie in [0, {num_train_timesteps}), got {t.tolist()}.")
    return t.long()


def _broadcast(values: Sequence[Tensor], ndim: int) -> tuple[Tensor, ...]:
    """(B,) per-sample scalars viewed as (B, 1, ..., 1) to broadcast over ndim-dim samples."""
    view = (-1,) + (1,) * (ndim - 1)
    return tuple(value.view(view) for value in values)


@dataclasses.dataclass(frozen=True)
class DDIMStepTable:
    """The per-step scalars of DDIM(eta) for a sequence of timesteps on one sampling grid.

    Each field is an (S,) float32 tensor whose row i belongs to the i-th timestep the table was
    built for (a pipeline's table: the grid's i-th step), all on one device. They are computed
    once in float64 on the CPU (1 - abar_t / abar_prev cancels catastrophically in float32 near
    t = 0) and then cast, so a step at device-resident row indices is only a gather: no read back
    to the host, no copy to the device. The square roots are taken of the float32 values, the
    operations a per-step computation runs, so stepping through the table equals
    :func:`ddim_step_with_logprob` bit for bit.

    Build it from a scheduler's grid with :meth:`from_scheduler` (a pipeline keeps one per grid,
    eta and device) or for any timesteps with :meth:`build`; step with :meth:`step`.
    """

    eta: float
    prediction_type: str
    clip_sample_range: float | None  # None: the scheduler does not clip x0
    sqrt_abar: Tensor  # sqrt(abar_t)
    sqrt_beta: Tensor  # sqrt(1 - abar_t)
    sqrt_abar_prev: Tensor  # sqrt(abar_{t-1}), t-1 the previous step on the grid
    sqrt_direction_var: Tensor  # sqrt(1 - abar_{t-1} - sigma_t^2), the direction to x_t
    sigma: Tensor  # sigma_t(eta), the step's standard deviation

    @classmethod
    def build(
        cls, scheduler: DDIMScheduler, eta: float, timesteps: Tensor, device: torch.device | str = "cpu"
    ) -> DDIMStepTable:
        """The rows of integer ``timesteps`` (S,) on ``scheduler``'s grid, placed on ``device``.

        eta = 0 builds the deterministic DDIM's table: its steps have sigma_t = 0 and no
        log-density, so only :meth:`mean_and_std` (the step itself) may be used.

        Raises:
            ValueError: eta outside [0, 1], no grid, an unsupported prediction type or
                thresholding, a timestep outside [0, N), or (eta > 0) a step with sigma_t = 0.
        """
        _check_ddim_scheduler(scheduler, eta, deterministic_ok=True)
        t = _batch_timesteps(scheduler, timesteps, len(timesteps))  # (S,) int64 on the CPU
        # See formulas (12) and (16) of the DDIM paper (Song et al. 2021, arXiv 2010.02502).
        # Notation (<variable name> -> <symbol in the paper>):
        # - abar_t, abar_prev -> alpha_t, alpha_{t-1} (DDIM writes the cumulative product as alpha)
        # - sigma_t -> sigma_t(eta) of eq. (16)
        # 1. the previous step value (= t - 1 on the inference grid)
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # (S,)
        # 2. alphas and sigma_t(eta) of formula (16), in float64 on the CPU
        alphas_cumprod = scheduler.alphas_cumprod.to("cpu", torch.float64)  # (N,)
        final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).to(alphas_cumprod)
        abar_t = alphas_cumprod[t]  # (S,)
        abar_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final_alpha_cumprod)
        beta_t, beta_prev = 1 - abar_t, 1 - abar_prev  # (S,)
        sigma_t = eta * (beta_prev / beta_t).sqrt() * (1 - abar_t / abar_prev).sqrt()  # (S,)
        if eta > 0 and not bool((sigma_t > 0).all()):
            raise ValueError(
                f"sigma_t = 0 for timesteps {t[sigma_t <= 0].tolist()}: the step is deterministic and "
                "has no log-density. This happens at the last step when abar_prev = 1 "
                "(set_alpha_to_one=True); build the scheduler with set_alpha_to_one=False (as Stable "
                "Diffusion does) or exclude that step."
            )
        # The direction coefficient is >= 0 for eta <= 1; clamp away float rounding below 0.
        direction_var = (beta_prev - sigma_t**2).clamp(min=0)  # (S,)
        abar_t, abar_prev, beta_t, sigma_t, direction_var = (
            value.to(torch.float32) for value in (abar_t, abar_prev, beta_t, sigma_t, direction_var)
        )
        clip = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None
        return cls(
            eta=eta,
            prediction_type=scheduler.config.prediction_type,
            clip_sample_range=clip,
            sqrt_abar=abar_t.sqrt().to(device),
            sqrt_beta=beta_t.sqrt().to(device),
            sqrt_abar_prev=abar_prev.sqrt().to(device),
            sqrt_direction_var=direction_var.sqrt().to(device),
            sigma=sigma_t.to(device),
        )

    @classmethod
    def from_scheduler(
        cls, scheduler: DDIMScheduler, eta: float, device: torch.device | str = "cpu"
    ) -> DDIMStepTable:
        """The table of every step of ``scheduler``'s grid (after ``set_timesteps``): row i is
        ``scheduler.timesteps[i]``."""
        if scheduler.num_inference_steps is None:
            raise ValueError("The scheduler has no timesteps: call scheduler.set_timesteps(n) first.")
        return cls.build(scheduler, eta, scheduler.timesteps.cpu(), device)

    def mean_and_std(self, model_output: Tensor, index: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
        """The Gaussian of the step at the table's rows ``index`` ((B,) integers; a grid's table:
        the step index) from ``sample`` x_t: its (B, ...) float32 mean, WITH grad through
        ``model_output``, and its (B, 1, ..., 1) float32 std sigma_t, gathered on the table's
        device without reading the indices back (``index_select`` refuses out-of-range ones
        instead of wrapping them)."""
        rows = index.to(self.sigma.device).long()
        scalars = (self.sqrt_abar, self.sqrt_beta, self.sqrt_abar_prev, self.sqrt_direction_var, self.sigma)
        scalars = [value.index_select(0, rows).to(sample.device) for value in scalars]
        sqrt_abar, sqrt_beta, sqrt_abar_prev, sqrt_direction_var, sigma_t = _broadcast(scalars, sample.ndim)

        # 3. the predicted original sample x0_hat and eps_hat, "predicted x_0" of formula (12)
        # (x0_hat -> f_theta^(t)(x_t), eps_hat -> epsilon_theta^(t)(x_t))
        x_t, out = sample.float(), model_output.float()  # (B, ...) float32; the cast keeps the graph
        if self.prediction_type == "epsilon":
            x0_hat = (x_t - sqrt_beta * out) / sqrt_abar
            eps_hat = out
        elif self.prediction_type == "sample":
            x0_hat = out
            eps_hat = (x_t - sqrt_abar * x0_hat) / sqrt_beta
        else:  # v_prediction
            x0_hat = sqrt_abar * x_t - sqrt_beta * out
            eps_hat = sqrt_abar * out + sqrt_beta * x_t

        # 4. clip the predicted x_0 (thresholding is rejected); eps_hat is not re-derived, as in
        # diffusers' default use_clipped_model_output=False
        if self.clip_sample_range is not None:
            x0_hat = x0_hat.clamp(-self.clip_sample_range, self.clip_sample_range)

        # 5. the mean of x_{t-1}: formula (12) without the noise term, i.e.
        # sqrt(abar_prev) * x0_hat + "direction pointing to x_t"
        mean = sqrt_abar_prev * x0_hat + sqrt_direction_var * eps_hat  # (B, ...) float32
        return mean, sigma_t

    def output_gain(self, index: Tensor) -> Tensor:
        """(B,) float32 |d mean / d model_output| of the steps at rows ``index``: the mean is
        affine in the model's output (x0 clipping aside), with this slope for every element."""
        rows = index.to(self.sigma.device).long()
        scalars = (self.sqrt_abar, self.sqrt_beta, self.sqrt_abar_prev, self.sqrt_direction_var)
        sqrt_abar, sqrt_beta, sqrt_abar_prev, sqrt_direction_var = (value.index_select(0, rows) for value in scalars)
        if self.prediction_type == "epsilon":  # x0_hat = (x - sqrt_beta out) / sqrt_abar, eps_hat = out
            gain = sqrt_direction_var - sqrt_abar_prev * sqrt_beta / sqrt_abar
        elif self.prediction_type == "sample":  # x0_hat = out, eps_hat = (x - sqrt_abar out) / sqrt_beta
            gain = sqrt_abar_prev - sqrt_direction_var * sqrt_abar / sqrt_beta
        else:  # v: x0_hat = sqrt_abar x - sqrt_beta out, eps_hat = sqrt_abar out + sqrt_beta x
            gain = sqrt_direction_var * sqrt_abar - sqrt_abar_prev * sqrt_beta
        return gain.abs()

    def step(
        self,
        model_output: Tensor,
        index: Tensor,
        sample: Tensor,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        reduce: Reduce = "mean",
    ) -> tuple[Tensor, Tensor]:
        """:func:`ddim_step_with_logprob` for sample b at the table's row ``index[b]``, through
        :meth:`mean_and_std`."""
        if self.eta == 0:
            raise ValueError("the deterministic DDIM (eta 0) has no log-density: take its step with mean_and_std.")
        _check_shapes(model_output, sample, prev_sample)
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}.")
        mean, sigma_t = self.mean_and_std(model_output, index, sample)

        # 6. sample x_{t-1} = mean + sigma_t * z, or take the stored one
        if prev_sample is None:
            noise_device = generator.device if generator is not None else sample.device
            z = torch.randn(sample.shape, generator=generator, device=noise_device, dtype=torch.float32)
            prev_sample = (mean + sigma_t * z.to(sample.device)).to(sample.dtype)  # (B, ...)
            # Score the sample as a fixed point (what a re-score of the stored tensor sees), so the
            # log-prob's gradient is the score-function one, and re-scoring reproduces it exactly.
            scored = prev_sample.detach()
        else:
            scored = prev_sample

        # 7. log pi(x_{t-1} | x_t) under N(mean, sigma_t^2), in float32
        log_prob = gaussian_log_prob(scored, mean, sigma_t, reduce=reduce)  # (B,)
        return prev_sample, log_prob


# Adapted from diffusers 0.42.1 DDIMScheduler.step: same math, plus per-sample t and log-probs.
def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    eta: float = 1.0,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    reduce: Reduce = "mean",
) -> tuple[Tensor, Tensor]:
    """One stochastic DDIM step x_t -> x_{t-1} and its log-probability under the policy.

    Samples x_{t-1} ~ N(mean, sigma_t^2 I) when ``prev_sample`` is None (rollout), otherwise
    re-scores the given ``prev_sample`` (training). Gradients flow from ``log_prob`` back to
    ``model_output`` through the mean; a sampled x_{t-1} is held fixed inside the log-prob (as a
    stored one is), so both modes give the same score-function gradient. Matches
    ``DDIMScheduler.step(..., use_clipped_model_output=False)`` given the same noise. Checks
    every input on the host at each call; the pipelines step through a :class:`DDIMStepTable` of
    their grid instead (same numbers, nothing read back from the device).

    Args:
        scheduler: a ``DDIMScheduler`` on which ``set_timesteps`` has been called; only its
            config and alphas are read (no state is changed).
        model_output: (B, ...) the denoiser output (epsilon, v or x0 per
            ``scheduler.config.prediction_type``), with guidance already applied.
        timestep: the current t: an int or 0-d tensor, or a (B,) integer tensor when the batch
            mixes steps (training on shuffled transitions).
        sample: (B, ...) the current latent x_t.
        eta: noise scale in (0, 1]; 1 = DDPM posterior variance (the DDPO default).
        prev_sample: (B, ...) a stored x_{t-1} to re-score, or None to sample one.
        generator: seeds the noise z when sampling; z is drawn in float32 on the generator's
            device and moved to ``sample``'s device, so a CPU generator is reproducible anywhere.
        reduce: "mean" over latent elements (the DDPO anchor's convention: a sum over ~16k
            elements overflows the PPO ratio exp(logp_new - logp_old)), or "sum" (the exact
            log-density, which REBEL's chain likelihood sum_t log pi(x_{t-1}|x_t) needs).

    Returns:
        prev_sample: (B, ...) x_{t-1} in ``sample``'s dtype (the given one when re-scoring).
        log_prob: (B,) float32 log pi(x_{t-1} | x_t, c), reduced over non-batch dims.

    Raises:
        ValueError: eta <= 0 or > 1, unsupported prediction type, thresholding, shape
            mismatches, timesteps out of range, or a step with sigma_t = 0.
    """
    _check_shapes(model_output, sample, prev_sample)
    _check_ddim_scheduler(scheduler, eta)  # the table also builds eta = 0, which has no log-prob
    t = _batch_timesteps(scheduler, timestep, sample.shape[0])  # (B,) on the CPU
    table = DDIMStepTable.build(scheduler, eta, t, device=sample.device)  # row b: sample b's step
    rows = torch.arange(sample.shape[0], device=sample.device)
    return table.step(model_output, rows, sample, prev_sample, generator, reduce=reduce)


def flow_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler, step_index: int | Tensor
) -> tuple[Tensor, Tensor]:
    """The flow times (sigma, sigma_next) = ``scheduler.sigmas[i]``, ``[i + 1]`` of step i.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` after ``set_timesteps``; only its sigmas
            are read (its step counter is neither used nor changed).
        step_index: i, the position in ``scheduler.timesteps`` (not a timestep value): an int,
            a 0-d tensor, or a (B,) integer tensor when each sample sits at its own step.

    Returns:
        sigma, sigma_next: float32 CPU tensors, 0-d or (B,) like ``step_index``.
    """
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("The scheduler has no sampling grid: call set_timesteps(n) first.")
    index = torch.as_tensor(step_index).cpu()
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"step_index must be an integer position, not a timestep: {index.dtype}.")
    num_steps = len(scheduler.sigmas) - 1
    if bool(((index < 0) | (index >= num_steps)).any()):
        raise ValueError(f"step_index must lie in [0, {num_steps}), got {index.tolist()}.")
    sigmas = scheduler.sigmas.to("cpu", torch.float32)  # (num_steps + 1,), ends with 0
    return sigmas[index], sigmas[index + 1]


def _check_flow_inputs(
    model_output: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    sample: Tensor,
    prev_sample: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Raises a ValueError for every input ``flow_sde_step_with_logprob`` cannot handle (the flow
    times' ranges and the noise level: :meth:`FlowSDEStepTable.build`; the mode and reduction:
    its ``step``); returns the flow times as (B,) float64 CPU tensors."""
    if sample.ndim < 2:
        raise ValueError(f"sample must be (B, ...) with >= 2 dims, got {tuple(sample.shape)}.")
    for name, other in (("model_output", model_output), ("prev_sample", prev_sample)):
        if other is not None and other.shape != sample.shape:
            raise ValueError(f"{name} shape {tuple(other.shape)} != sample {tuple(sample.shape)}.")
    batch = sample.shape[0]
    s, s_next = (torch.as_tensor(v, dtype=torch.float64).cpu() for v in (sigma, sigma_next))
    if s.shape not in ((), (batch,)) or s_next.shape not in ((), (batch,)):
        raise ValueError(
            f"sigma and sigma_next must be scalars or of shape (B,) = ({batch},), got "
            f"{tuple(s.shape)} and {tuple(s_next.shape)}."
        )
    return s.expand(batch), s_next.expand(batch)


def _check_flow_step(noise_level: float, prev_sample: Tensor | None, reduce: str, return_log_prob: bool) -> None:
    """Raises a ValueError for a reduction or mode the flow step cannot take at ``noise_level``
    (a table's, checked >= 0 when it was built)."""
    if return_log_prob and noise_level == 0:
        raise ValueError(
            "noise_level=0 is the deterministic Euler (ODE) step, which has no log-density: pass "
            "return_log_prob=False to take it (evaluation), or noise_level > 0 (Flow-GRPO: 0.7)."
        )
    if prev_sample is not None and not return_log_prob:
        raise ValueError("prev_sample is given only to be re-scored: keep return_log_prob=True.")
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}.")


@dataclasses.dataclass(frozen=True)
class FlowSDEStepTable:
    """The per-step scalars of the flow SDE for a sequence of steps sigma_i -> sigma_next_i.

    Each field is an (S,) float32 tensor indexed by the step i, all on one device. They are
    computed once in float64 on the CPU (so dt rounds to the very float32 dt diffusers uses) and
    then cast, so a step at device-resident step indices is only a gather: no read back to the
    host, no copy to the device, and the same numbers as :func:`flow_sde_step_with_logprob`.

    Build it from a scheduler's grid with :meth:`from_scheduler` (a pipeline keeps one per
    grid, noise level and device) or from any flow times with :meth:`build`; step with
    :meth:`step`.
    """

    noise_level: float
    dt: Tensor  # sigma_next - sigma < 0
    drift_coef: Tensor  # sigma_t^2 / (2 sigma), sigma_t = a sqrt(sigma / (1 - sigma)) (guarded at 1)
    std: Tensor  # sigma_t sqrt(|dt|), the step's standard deviation
    one_minus_sigma: Tensor  # 1 - sigma

    @classmethod
    def build(
        cls, sigma: Tensor, sigma_next: Tensor, noise_level: float, device: torch.device | str = "cpu"
    ) -> FlowSDEStepTable:
        """The table of the steps ``sigma`` -> ``sigma_next`` ((S,) each), placed on ``device``.

        Raises:
            ValueError: noise_level < 0, flow times outside 0 <= sigma_next < sigma <= 1, or (with
                noise) a step whose std underflows float32.
        """
        if not noise_level >= 0:  # also catches NaN
            raise ValueError(f"noise_level must be >= 0 (0 = deterministic ODE), got {noise_level}.")
        s, s_next = (torch.as_tensor(v).to("cpu", torch.float64) for v in (sigma, sigma_next))
        if not bool(((s > 0) & (s <= 1)).all()):  # also catches NaN
            raise ValueError(
                f"sigma must lie in (0, 1] (the flow time, 1 = pure noise), got {s.tolist()}; pass "
                "scheduler.sigmas[i] (see flow_sigmas), not scheduler.timesteps[i] = 1000 * sigma."
            )
        if not bool(((s_next >= 0) & (s_next < s)).all()):
            raise ValueError(
                f"sigma_next must lie in [0, sigma) (steps go from noise toward data; a zero-length "
                f"step has std 0), got sigma={s.tolist()}, sigma_next={s_next.tolist()}."
            )
        # The marginal-preserving SDE of Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, "ODE to SDE"):
        # dx = [v + sigma_t^2/(2t) (x + (1-t) v)] dt + sigma_t dw from t = 1 to 0, by Euler-Maruyama.
        # Notation (<variable name> -> <symbol in the paper>):
        # - s, s_next -> t, t + dt (dt < 0); a -> noise_level
        # - std_t -> sigma_t = a sqrt(t / (1 - t)); std -> sigma_t sqrt(|dt|)
        # The per-step scalars: dt, sigma_t with the sigma = 1 guard, sigma_t^2/(2t), the std
        dt = s_next - s  # (S,) < 0
        std_t = noise_level * (s / torch.where(s >= 1, 1 - s_next, 1 - s)).sqrt()  # (S,)
        drift_coef = std_t**2 / (2 * s)  # (S,)
        std = std_t * (-dt).sqrt()  # (S,)
        if noise_level > 0 and not bool((std.float() > 0).all()):
            raise ValueError(f"The step's std {std.tolist()} underflows float32: no log-density.")
        dt, drift_coef, std, one_minus_s = (
            value.to(device, torch.float32) for value in (dt, drift_coef, std, 1 - s)
        )
        return cls(noise_level, dt, drift_coef, std, one_minus_s)

    @classmethod
    def from_scheduler(
        cls, scheduler: FlowMatchEulerDiscreteScheduler, noise_level: float, device: torch.device | str = "cpu"
    ) -> FlowSDEStepTable:
        """The table of every step of ``scheduler``'s grid (after ``set_timesteps``)."""
        if getattr(scheduler, "num_inference_steps", None) is None:
            raise ValueError("The scheduler has no sampling grid: call set_timesteps(n) first.")
        sigmas = scheduler.sigmas.to("cpu", torch.float32)  # (S + 1,), ends with 0
        return cls.build(sigmas[:-1], sigmas[1:], noise_level, device)

    def mean_and_std(self, model_output: Tensor, step_index: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
        """The Gaussian of the step at (B,) integer ``step_index`` from ``sample`` x_sigma: its
        (B, ...) float32 mean, WITH grad through ``model_output``, and its (B, 1, ..., 1)
        float32 std, gathered on the table's device without reading the indices back
        (index_select refuses out-of-range ones)."""
        index = step_index.to(self.dt.device).long()
        scalars = (self.dt, self.drift_coef, self.std, self.one_minus_sigma)
        scalars = [value.index_select(0, index).to(sample.device) for value in scalars]
        dt, drift_coef, std, one_minus_s = _broadcast(scalars, sample.ndim)  # each (B, 1, ..., 1)

        # 2. the mean x + [v + sigma_t^2/(2t) eps_hat] dt (x + v dt, the Euler step, when a = 0),
        # with eps_hat = x + (1 - t) v the predicted noise: sigma_t^2/(2t) eps_hat is -sigma_t^2/2
        # times the score -eps_hat / t, the term that keeps the ODE's marginals
        x, v = sample.float(), model_output.float()  # (B, ...) float32; the cast keeps the graph
        eps_hat = x + one_minus_s * v  # (B, ...)
        mean = x + (v + drift_coef * eps_hat) * dt  # (B, ...) float32
        return mean, std

    def output_gain(self, step_index: Tensor) -> Tensor:
        """(B,) float32 |d mean / d v| of the steps at ``step_index``: (1 + sigma_t^2 (1 - sigma)
        / (2 sigma)) |dt|, i.e. (1 + a^2 / 2) |dt| except at sigma = 1, where it is |dt|."""
        index = step_index.to(self.dt.device).long()
        dt, drift_coef, one_minus_s = (value.index_select(0, index) for value in (self.dt, self.drift_coef, self.one_minus_sigma))
        return ((1 + drift_coef * one_minus_s) * dt).abs()

    def step(
        self,
        model_output: Tensor,
        step_index: Tensor,
        sample: Tensor,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        reduce: Reduce = "mean",
        return_log_prob: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """:func:`flow_sde_step_with_logprob` at (B,) integer ``step_index``, through
        :meth:`mean_and_std`."""
        _check_flow_step(self.noise_level, prev_sample, reduce, return_log_prob)
        _check_shapes(model_output, sample, prev_sample)
        mean, std = self.mean_and_std(model_output, step_index, sample)

        # 3. sample x_next = mean + std * z (the ODE draws no noise), or take the stored one
        if prev_sample is None:
            next_sample = mean
            if self.noise_level > 0:
                device = generator.device if generator is not None else sample.device
                z = torch.randn(sample.shape, generator=generator, device=device, dtype=torch.float32)
                next_sample = mean + std * z.to(sample.device)
            prev_sample = next_sample.to(sample.dtype)  # (B, ...)
            scored = prev_sample.detach()  # a fixed point: exactly what a re-score sees
        else:
            scored = prev_sample
        if not return_log_prob:
            return prev_sample, None

        # 4. log pi(x_next | x_sigma) under N(mean, std^2), in float32
        log_prob = gaussian_log_prob(scored, mean, std, reduce=reduce)  # (B,)
        return prev_sample, log_prob


# Adapted from diffusers 0.42.1 FlowMatchEulerDiscreteScheduler.step (its Euler update is the
# noise_level = 0 case), made stateless and per-sample, plus the Flow-GRPO SDE and log-probs.
def flow_sde_step_with_logprob(
    model_output: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    sample: Tensor,
    noise_level: float = 0.7,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    reduce: Reduce = "mean",
    return_log_prob: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """One step x_sigma -> x_sigma_next of the rectified-flow SDE and its log-probability.

    For SD3/FLUX-style models predicting the velocity v of x_sigma = (1 - sigma) x0 + sigma eps.
    Samples x_next ~ N(mean, std^2 I) when ``prev_sample`` is None (rollout), else re-scores the
    given one (training); as in :func:`ddim_step_with_logprob`, gradients reach ``model_output``
    through the mean while a sampled x_next is held fixed inside the log-prob.

    Design decisions:
    - No scheduler argument: the step needs only the two flow times, looked up with
      :func:`flow_sigmas` (any shift or custom schedule ends up in ``scheduler.sigmas``), so
      per-sample steps come free and diffusers' stateful step counter is never touched. The
      pipelines step through a :class:`FlowSDEStepTable` of their grid instead (same numbers).
    - sigma = 1 guard: std_t = a sqrt(sigma / (1 - sigma)) is infinite at sigma = 1, the first
      step. There 1 - sigma is replaced by 1 - sigma_next = |dt|, so that step's std is exactly
      ``noise_level``: the Flow-GRPO anchor's choice (it uses sigmas[1]). Only sigma == 1 is
      guarded; diffusers' schedules start at exactly 1.0.
    - noise_level = 0 is the deterministic ODE for evaluation. It has no density, so it needs
      ``return_log_prob=False``; it draws no noise and equals diffusers' Euler ``step``.
    - The last step (sigma_next = 0) has a finite but very sharp Gaussian: it is computed here,
      and the flow policy marks it False in ``Rollout.step_mask`` (excluded from training).

    Args:
        model_output: (B, ...) the predicted velocity v, with guidance already applied.
        sigma: the current flow time in (0, 1]: a float, a 0-d or a (B,) float tensor.
        sigma_next: the next flow time in [0, sigma), in the same forms.
        sample: (B, ...) the current latent x_sigma.
        noise_level: a >= 0 in std_t = a sqrt(sigma / (1 - sigma)); 0.7 is Flow-GRPO's default.
        prev_sample: (B, ...) a stored x_next to re-score, or None to sample one.
        generator: seeds z, drawn in float32 on its device, then moved to ``sample``'s device.
        reduce: "mean" over latent elements or "sum", as in :func:`ddim_step_with_logprob`.
        return_log_prob: False returns None for the log-prob; required when noise_level = 0.

    Returns:
        prev_sample: (B, ...) x_next in ``sample``'s dtype (the given one when re-scoring).
        log_prob: (B,) float32 log pi(x_next | x_sigma, c), or None if not ``return_log_prob``.

    Raises:
        ValueError: noise_level < 0 or = 0 with log-probs, mismatched shapes, or sigmas outside
            0 <= sigma_next < sigma <= 1.
    """
    s, s_next = _check_flow_inputs(model_output, sigma, sigma_next, sample, prev_sample)  # (B,) float64 CPU each
    table = FlowSDEStepTable.build(s, s_next, noise_level, device=sample.device)  # row b: sample b
    rows = torch.arange(sample.shape[0], device=sample.device)
    return table.step(
        model_output, rows, sample, prev_sample, generator, reduce=reduce, return_log_prob=return_log_prob
    )
