"""Stateless transition kernels that both sample a denoising step and score it.

A kernel returns ``(x_prev, log pi(x_prev | x_t, c))``. The same function draws the transition
during a rollout (``prev_sample=None``) and re-scores the stored transition during training
(``prev_sample`` given), so sampling and training can never drift apart (DESIGN.md, "Transition
kernels"). Log-probs are always computed in float32, whatever the model's dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers import DDIMScheduler

Tensor = torch.Tensor
Reduce = Literal["mean", "sum"]

__all__ = ["Reduce", "ddim_step_with_logprob", "gaussian_log_prob"]

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


def _check_ddim_inputs(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    sample: Tensor,
    eta: float,
    prev_sample: Tensor | None,
    reduce: str,
) -> None:
    """Raises a ValueError for every input ``ddim_step_with_logprob`` cannot handle."""
    if not eta > 0:  # also catches NaN
        raise ValueError(
            f"log-probs need a stochastic step: eta must be > 0 (got {eta}); use eta=0 only for "
            "deterministic sampling without log-probs, via the scheduler itself."
        )
    if not eta <= 1:
        # Beyond eta = 1 (DDPM), sigma_t^2 can exceed 1 - abar_prev and the direction term's
        # square root becomes imaginary; diffusers would silently return NaN there.
        raise ValueError(f"eta must be in (0, 1] (1 = DDPM), got {eta}.")
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}.")
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
    """Returns (B,) int64 timesteps on CPU, where the per-sample scalars are computed."""
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
    ``DDIMScheduler.step(..., use_clipped_model_output=False)`` given the same noise.

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
    _check_ddim_inputs(scheduler, model_output, sample, eta, prev_sample, reduce)

    # See formulas (12) and (16) of the DDIM paper (Song et al. 2021, arXiv 2010.02502).
    # Notation (<variable name> -> <symbol in the paper>):
    # - abar_t, abar_prev -> alpha_t, alpha_{t-1} (DDIM writes the cumulative product as alpha)
    # - eps_hat -> epsilon_theta^(t)(x_t)
    # - x0_hat -> f_theta^(t)(x_t), the "predicted x_0" of eq. (12)
    # - sigma_t -> sigma_t(eta) of eq. (16)
    # - mean -> eq. (12) without its "random noise" term; prev_sample -> x_{t-1}

    # 1. get the previous step value (= t - 1 on the inference grid), per sample
    t = _batch_timesteps(scheduler, timestep, sample.shape[0])  # (B,)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # (B,)

    # 2. compute alphas and sigma_t(eta) of formula (16), per sample. These B scalars are computed
    # in float64 on CPU: 1 - abar_t/abar_prev cancels catastrophically in float32 near t = 0.
    alphas_cumprod = scheduler.alphas_cumprod.to("cpu", torch.float64)  # (N,)
    final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).to(alphas_cumprod)
    abar_t = alphas_cumprod[t]  # (B,)
    abar_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final_alpha_cumprod)
    beta_t, beta_prev = 1 - abar_t, 1 - abar_prev  # (B,)
    sigma_t = eta * (beta_prev / beta_t).sqrt() * (1 - abar_t / abar_prev).sqrt()  # (B,)
    if not bool((sigma_t > 0).all()):
        raise ValueError(
            f"sigma_t = 0 for timesteps {t[sigma_t <= 0].tolist()}: the step is deterministic and "
            "has no log-density. This happens at the last step when abar_prev = 1 "
            "(set_alpha_to_one=True); build the scheduler with set_alpha_to_one=False (as Stable "
            "Diffusion does) or exclude that step."
        )
    # The direction coefficient is >= 0 for eta <= 1; clamp away float rounding below 0.
    direction_var = (beta_prev - sigma_t**2).clamp(min=0)  # (B,)

    # Broadcast the per-sample scalars to the sample's shape, float32 on its device.
    view = (-1,) + (1,) * (sample.ndim - 1)
    abar_t, abar_prev, beta_t, sigma_t, direction_var = (
        v.to(sample.device, torch.float32).view(view)
        for v in (abar_t, abar_prev, beta_t, sigma_t, direction_var)
    )  # each (B, 1, ..., 1)

    # 3. compute the predicted original sample x0_hat and eps_hat, "predicted x_0" of formula (12)
    x_t, out = sample.float(), model_output.float()  # (B, ...) float32; the cast keeps the graph
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        x0_hat = (x_t - beta_t.sqrt() * out) / abar_t.sqrt()
        eps_hat = out
    elif prediction_type == "sample":
        x0_hat = out
        eps_hat = (x_t - abar_t.sqrt() * x0_hat) / beta_t.sqrt()
    else:  # v_prediction
        x0_hat = abar_t.sqrt() * x_t - beta_t.sqrt() * out
        eps_hat = abar_t.sqrt() * out + beta_t.sqrt() * x_t

    # 4. clip the predicted x_0 (thresholding was rejected above); eps_hat is not re-derived,
    # as in diffusers' default use_clipped_model_output=False
    if scheduler.config.clip_sample:
        clip_range = scheduler.config.clip_sample_range
        x0_hat = x0_hat.clamp(-clip_range, clip_range)

    # 5. compute the mean of x_{t-1}: formula (12) without the noise term, i.e.
    # sqrt(abar_prev) * x0_hat + "direction pointing to x_t"
    mean = abar_prev.sqrt() * x0_hat + direction_var.sqrt() * eps_hat  # (B, ...) float32

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
