"""Tests of the DDIM transition kernel against diffusers' DDIMScheduler and torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from pipelines.kernels import DDIMStepTable, ddim_step_with_logprob, gaussian_log_prob

SHAPE = (3, 4, 8, 8)  # (B, C, h, w): a tiny latent batch
NUM_STEPS = 10


def make_scheduler(
    prediction_type: str = "epsilon", clip_sample: bool = False, **kwargs: object
) -> DDIMScheduler:
    """A Stable-Diffusion-like DDIM scheduler: last step t=1 -> prev=-99 uses final_alpha_cumprod."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=kwargs.pop("set_alpha_to_one", False),
        steps_offset=1,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        **kwargs,
    )
    scheduler.set_timesteps(NUM_STEPS)
    return scheduler


def reference_mean_std(
    scheduler: DDIMScheduler, model_output: torch.Tensor, t: int, sample: torch.Tensor, eta: float
) -> tuple[torch.Tensor, float]:
    """The DDIM mean and sigma_t, written out independently from the DDIM paper's formulas, in float64."""
    abar = scheduler.alphas_cumprod.double()
    prev = t - 1000 // NUM_STEPS
    a_t = abar[t].item()
    a_prev = abar[prev].item() if prev >= 0 else float(scheduler.final_alpha_cumprod)
    x, out = sample.double(), model_output.double()
    if scheduler.config.prediction_type == "epsilon":
        x0, eps = (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t), out
    elif scheduler.config.prediction_type == "sample":
        x0, eps = out, (x - math.sqrt(a_t) * out) / math.sqrt(1 - a_t)
    else:
        x0 = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * out
        eps = math.sqrt(a_t) * out + math.sqrt(1 - a_t) * x
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    return mean, sigma


def random_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("t", [901, 501, 1])
def test_log_prob_matches_torch_normal(reduce: str, t: int) -> None:
    """(a) log_prob == Normal(mean, sigma).log_prob(x_prev) reduced over (C, h, w)."""
    scheduler = make_scheduler()
    model_output, sample = random_inputs()
    prev_sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    _, log_prob = ddim_step_with_logprob(
        scheduler, model_output, t, sample, eta=0.8, prev_sample=prev_sample, reduce=reduce
    )
    mean, sigma = reference_mean_std(scheduler, model_output, t, sample, eta=0.8)
    element = torch.distributions.Normal(mean, sigma).log_prob(prev_sample.double())  # (B, C, h, w)
    expected = element.mean((1, 2, 3)) if reduce == "mean" else element.sum((1, 2, 3))
    assert log_prob.shape == (SHAPE[0],) and log_prob.dtype == torch.float32
    # At t=1 sigma_t is ~0.03, so log p ~ -1e3 per element: compare relative to float32 precision.
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-5)


def test_gaussian_log_prob_by_hand() -> None:
    """x = mean + 2 std everywhere: log p = -2 - log std - log sqrt(2 pi) per element.

    With std = 0.5: -2 + 0.693147 - 0.918939 = -2.225792 (mean); times 4 elements = -8.903168 (sum).
    """
    mean = torch.zeros(2, 4)
    x = mean + 2 * 0.5
    expected = -2 + math.log(2) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.5), torch.full((2,), expected))
    torch.testing.assert_close(
        gaussian_log_prob(x, mean, 0.5, "sum"), torch.full((2,), 4 * expected)
    )
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(x, mean, 0.5, "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        gaussian_log_prob(x, mean[:1], 0.5)
    with pytest.raises(ValueError, match="broadcast"):
        gaussian_log_prob(x, mean, torch.ones(3))


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prev_sample_matches_diffusers_step(prediction_type: str, clip_sample: bool) -> None:
    """(b) Same noise z -> the same x_{t-1} as DDIMScheduler.step, at every step incl. the last."""
    scheduler = make_scheduler(prediction_type, clip_sample, clip_sample_range=0.5)
    model_output, sample = random_inputs()
    assert int(scheduler.timesteps[-1]) - 1000 // NUM_STEPS < 0  # the last step uses final_alpha
    for i, t in enumerate(scheduler.timesteps):
        gen = torch.Generator().manual_seed(100 + i)
        ours, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=0.7, generator=gen)
        # Reproduce the kernel's z: float32 randn of the sample's shape from the same seed.
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i))
        theirs = scheduler.step(model_output, t, sample, eta=0.7, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_per_sample_timesteps_equal_separate_calls() -> None:
    """(c) A (B,) timestep tensor scores each sample as if it were alone with a scalar timestep."""
    scheduler = make_scheduler("v_prediction")
    model_output, sample = random_inputs()
    prev_sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([901, 401, 1])
    out, log_prob = ddim_step_with_logprob(
        scheduler, model_output, timesteps, sample, prev_sample=prev_sample, reduce="sum"
    )
    assert torch.equal(out, prev_sample)
    for b, t in enumerate(timesteps.tolist()):
        _, alone = ddim_step_with_logprob(
            scheduler,
            model_output[b : b + 1],
            t,
            sample[b : b + 1],
            prev_sample=prev_sample[b : b + 1],
            reduce="sum",
        )
        torch.testing.assert_close(log_prob[b : b + 1], alone, rtol=1e-6, atol=1e-4)


def test_gradient_flows_to_model_output() -> None:
    """(d) log_prob is differentiable in model_output; sampling and re-scoring give one gradient."""
    scheduler = make_scheduler()
    model_output, sample = random_inputs()
    model_output.requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    prev_sample, log_prob = ddim_step_with_logprob(
        scheduler, model_output, 501, sample, generator=gen
    )
    (sampled_grad,) = torch.autograd.grad(log_prob.sum(), model_output)
    assert torch.isfinite(sampled_grad).all() and sampled_grad.abs().sum() > 0

    _, rescored = ddim_step_with_logprob(
        scheduler, model_output, 501, sample, prev_sample=prev_sample.detach()
    )
    (rescored_grad,) = torch.autograd.grad(rescored.sum(), model_output)
    torch.testing.assert_close(sampled_grad, rescored_grad)


@pytest.mark.parametrize("eta", [0.0, -0.5])
def test_nonpositive_eta_raises(eta: float) -> None:
    """(e) eta <= 0 has no density: a clear error, raised before any computation."""
    model_output, sample = random_inputs()
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(make_scheduler(), model_output, 501, sample, eta=eta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rescoring_reproduces_sampled_log_prob_exactly(dtype: torch.dtype) -> None:
    """(f) Re-scoring the sampled x_{t-1} returns bit-identical log-probs (PPO ratio exactly 1)."""
    scheduler = make_scheduler()
    model_output, sample = (x.to(dtype) for x in random_inputs())
    gen = torch.Generator().manual_seed(4)
    prev_sample, log_prob = ddim_step_with_logprob(
        scheduler, model_output, 301, sample, generator=gen
    )
    assert prev_sample.dtype == dtype and log_prob.dtype == torch.float32
    again, rescored = ddim_step_with_logprob(
        scheduler, model_output, 301, sample, prev_sample=prev_sample
    )
    assert again is prev_sample
    assert torch.equal(rescored, log_prob)


def test_generator_makes_sampling_reproducible() -> None:
    scheduler = make_scheduler()
    model_output, sample = random_inputs()
    first = ddim_step_with_logprob(
        scheduler, model_output, 501, sample, generator=torch.Generator().manual_seed(5)
    )
    second = ddim_step_with_logprob(
        scheduler, model_output, 501, sample, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_invalid_inputs_raise() -> None:
    model_output, sample = random_inputs()
    with pytest.raises(ValueError, match="valid: .*epsilon"):
        ddim_step_with_logprob(make_scheduler("foo"), model_output, 501, sample)
    with pytest.raises(ValueError, match="thresholding"):
        ddim_step_with_logprob(make_scheduler(thresholding=True), model_output, 501, sample)
    with pytest.raises(ValueError, match="model_output shape"):
        ddim_step_with_logprob(make_scheduler(), model_output[:2], 501, sample)
    with pytest.raises(ValueError, match="prev_sample shape"):
        ddim_step_with_logprob(make_scheduler(), model_output, 501, sample, prev_sample=sample[:1])
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        ddim_step_with_logprob(make_scheduler(), model_output, torch.tensor([1, 2]), sample)
    with pytest.raises(ValueError, match="must lie in"):
        ddim_step_with_logprob(make_scheduler(), model_output, 1000, sample)
    with pytest.raises(ValueError, match="integer"):
        ddim_step_with_logprob(make_scheduler(), model_output, torch.tensor(1.0), sample)
    with pytest.raises(ValueError, match="reduce"):
        ddim_step_with_logprob(make_scheduler(), model_output, 501, sample, reduce="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ddim_step_with_logprob(make_scheduler(), model_output, 501, sample, eta=1.5)
    unset = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(unset, model_output, 501, sample)


def test_deterministic_last_step_raises() -> None:
    """set_alpha_to_one=True makes abar_prev = 1 at the last step, so sigma_t = 0: no density.
    The grid's step table refuses it when it is built, before any sampling."""
    scheduler = make_scheduler(set_alpha_to_one=True)
    model_output, sample = random_inputs()
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[-1], sample)
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        DDIMStepTable.from_scheduler(scheduler, eta=1.0)


@pytest.mark.parametrize(
    ("prediction_type", "clip_sample"), [("epsilon", False), ("v_prediction", False), ("sample", True)]
)
def test_the_grid_table_steps_exactly_as_the_kernel(prediction_type: str, clip_sample: bool) -> None:
    """A step through the grid's table (scalars computed once, then gathered by step index)
    draws and re-scores bit for bit what the per-call kernel does at the same timesteps."""
    scheduler = make_scheduler(prediction_type, clip_sample)
    table = DDIMStepTable.from_scheduler(scheduler, eta=0.8)
    model_output, sample = random_inputs()
    index = torch.tensor([0, 4, NUM_STEPS - 1])  # first, middle and last step, one per sample
    timesteps = scheduler.timesteps[index]
    drawn, log_prob = table.step(model_output, index, sample, generator=torch.Generator().manual_seed(3))
    expected, expected_log_prob = ddim_step_with_logprob(
        scheduler, model_output, timesteps, sample, eta=0.8, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(drawn, expected) and torch.equal(log_prob, expected_log_prob)
    rescored = table.step(model_output, index, sample, prev_sample=drawn, reduce="sum")[1]
    expected = ddim_step_with_logprob(scheduler, model_output, timesteps, sample, 0.8, drawn, reduce="sum")[1]
    assert torch.equal(rescored, expected)
    with pytest.raises(IndexError):  # an index off the grid is refused, not wrapped around
        table.step(model_output, torch.tensor([0, 1, NUM_STEPS]), sample)
